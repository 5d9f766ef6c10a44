"""The page of `dvc plots show` / `dvc plots diff` in headless Chromium with the network off,
for the README's screenshot (`make docs` calls `capture`) and for tests/test_plots.py.

Every request that is not for a file: URL or 127.0.0.1 is refused and recorded, and
Chromium's own traffic goes to a proxy that refuses it, so a page that needs the network
shows it: no curves, and the refused address in `Traffic.refused`.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from docs.mlflow_ui import CHROMIUM, CHROMIUM_ARGS

# Port 9 (discard) on the loopback: nothing listens, so every proxied request is refused.
OFFLINE_ARGS = [*CHROMIUM_ARGS, "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]
VIEWPORT = {"width": 1400, "height": 1000}
DRAWN_MS = 30_000


@dataclass
class Traffic:
    """What the page asked for beyond its files, and what went wrong."""

    refused: list[str] = field(default_factory=list)  # requests to the network
    failed: list[str] = field(default_factory=list)  # requests that did not complete
    errors: list[str] = field(default_factory=list)  # script errors and console errors


def local(url: str) -> bool:
    return url.startswith("file:") or urlsplit(url).hostname == "127.0.0.1"


@contextlib.contextmanager
def offline_page(path: Path, viewport: dict = VIEWPORT) -> Iterator[tuple[object, Traffic]]:
    """The local HTML file `path` open in Chromium (a fresh profile), once its views are drawn
    (or DRAWN_MS has passed: then the views without curves show what failed)."""
    from playwright.sync_api import sync_playwright

    traffic = Traffic()

    def route(request_route) -> None:
        url = request_route.request.url
        if local(url):
            request_route.continue_()
        else:
            traffic.refused.append(url)
            request_route.abort()

    def console(message) -> None:
        if message.type == "error":
            traffic.errors.append(message.text)

    with tempfile.TemporaryDirectory() as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=OFFLINE_ARGS, viewport=viewport
        )
        try:
            context.route("**/*", route)
            page = context.new_page()
            page.on("requestfailed", lambda request: traffic.failed.append(request.url))
            page.on("pageerror", lambda error: traffic.errors.append(str(error)))
            page.on("console", console)
            page.goto(Path(path).resolve().as_uri(), wait_until="load")
            # vega-embed draws asynchronously: wait until every view has its SVG
            with contextlib.suppress(Exception):
                page.wait_for_function(
                    "() => [...document.querySelectorAll('.vega-embed')]"
                    ".every(v => v.querySelector('svg .role-mark'))",
                    timeout=DRAWN_MS,
                )
            page.wait_for_timeout(300)
            yield page, traffic
        finally:
            context.close()


def views(page) -> list[dict]:
    """Each Vega view of the page: its title, and per panel (facet cell) its curves (line
    paths with a segment drawn), its points and the values written at the curves' ends."""
    return page.evaluate(
        """() => [...document.querySelectorAll('.vega-embed')].map(view => {
            const texts = (root, sel) => [...root.querySelectorAll(sel)].map(t => t.textContent);
            const cells = [...view.querySelectorAll('.mark-group.role-scope.cell > g')];
            const titles = texts(view, '.role-title-text text');  // the panels', then the view's
            return {
                title: titles[titles.length - 1] || '',
                panels: Object.fromEntries(cells.map(cell => [
                    texts(cell, '.role-title-text text')[0] || '', {
                        curves: [...cell.querySelectorAll('.mark-line.role-mark path')]
                            .filter(p => /^M[^M]*[LCZ]/.test(p.getAttribute('d') || '')).length,
                        points: cell.querySelectorAll('.mark-symbol.role-mark path').length,
                        labels: texts(cell, '.mark-text.role-mark text'),
                    }])),
                ticks: texts(view, '.role-axis-label text'),
                legend: texts(view, '.role-legend-label text'),
            };
        })"""
    )


def capture(index_html: Path, out: Path) -> Path:
    """A PNG of the Vega views of a `dvc plots` page (the figures below them left out),
    refused if the page asked for the network, failed a request or a script."""
    if not Path(CHROMIUM).exists():
        raise SystemExit("error: no Chromium for the screenshots; `apt-get install chromium`")
    with offline_page(index_html) as (page, traffic):
        if traffic.refused or traffic.failed or traffic.errors:
            raise SystemExit(f"error: {index_html} did not render offline: {traffic}")
        boxes = [v.bounding_box() for v in page.locator(".vega-embed").all()]
        if not boxes or not all(
            panel["curves"] for view in views(page) for panel in view["panels"].values()
        ):
            raise SystemExit(f"error: {index_html} has a Vega view without curves")
        clip = {
            "x": 0,
            "y": 0,
            "width": max(b["x"] + b["width"] for b in boxes) + 8,
            "height": max(b["y"] + b["height"] for b in boxes),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=out, clip=clip, full_page=True)
    return out
