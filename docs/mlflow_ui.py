"""Screenshots of `mlflow ui` on a real store, for the README: `make docs` calls `capture`.

Debian's Chromium, driven by Playwright (no browser download): `apt-get install chromium`.
The UI is started on a free 127.0.0.1 port against the store's own SQLite file, the
pages are opened as a user would open them, and every process is stopped afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags, Chromium keeps trying Google's hosts, which
# this machine's closed network refuses.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
VIEWPORT = {"width": 1400, "height": 1050}
SETTLE_MS = 8000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(base: str, path: str, body: dict) -> dict:
    return requests.post(f"{base}/api/2.0/mlflow/{path}", json=body, timeout=30).json()


def capture(store_root: Path, out: Path, experiment: str = "learn-linear-filter") -> list[Path]:
    """docs/mlflow/{compare,charts,model}.png from the mlflow.db in `store_root`."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise SystemExit("error: no Chromium for the screenshots; `apt-get install chromium`")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    ui = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--port", str(port), "--host", "127.0.0.1",
         "--backend-store-uri", f"sqlite:///{store_root / 'mlflow.db'}"],
        cwd=store_root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{base}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline or ui.poll() is not None:
                raise SystemExit("error: mlflow ui did not start within 120 s")
            time.sleep(1)
        found = requests.get(
            f"{base}/api/2.0/mlflow/experiments/get-by-name",
            params={"experiment_name": experiment}, timeout=30,
        ).json()["experiment"]  # fmt: skip
        exp = found["experiment_id"]
        runs = _post(base, "runs/search", {"experiment_ids": [exp]})["runs"]
        run_ids = [r["info"]["run_id"] for r in runs]
        models = _post(base, "logged-models/search", {"experiment_ids": [exp]})["models"]
        model_id = models[0]["info"]["model_id"]
        # MLflow 3.17 keeps its GenAI / Model training switch per browser, and a fresh
        # browser starts on GenAI: the links pick the training view, as a click would.
        view = "workflowType=machine_learning"
        pages = {
            "charts.png": f"{base}/#/experiments/{exp}/runs?compareRunsMode=CHART&{view}",
            "compare.png": f"{base}/#/compare-runs?runs={_json(run_ids)}"
            f"&experiments={_json([exp])}&{view}",
            "model.png": f"{base}/#/experiments/{exp}/models/{model_id}?{view}",
        }
        out.mkdir(parents=True, exist_ok=True)
        shots = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport=VIEWPORT)
            for name, url in pages.items():
                # the UI polls its server, so the network never goes idle: wait for the page,
                # then give the charts time to draw once their data has arrived
                page.goto(url, wait_until="load", timeout=120_000)
                page.wait_for_timeout(SETTLE_MS)
                _close_assistant(page)
                page.screenshot(path=out / name)
                shots.append(out / name)
            browser.close()
        return shots
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


def _close_assistant(page) -> None:
    """The MLflow Assistant side panel opens by itself and hides half the page."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.last.click()
        page.wait_for_timeout(1500)


def _json(values: list[str]) -> str:
    from urllib.parse import quote

    return quote("[" + ",".join(f'"{v}"' for v in values) + "]")


if __name__ == "__main__":
    print(capture(Path(sys.argv[1]), Path(sys.argv[2])))
