"""Write .dvc/plots/page.html, the page of `dvc plots show` and `dvc plots diff`, offline.

DVC's own page loads Vega, Vega-Lite and vega-embed from a CDN, so offline it has no curves.
This page (`plots.html_template` in .dvc/config) holds the three libraries' minified builds
inline, byte for byte as npm publishes them, so it works wherever `dvc plots -o` writes it.
Their licences, and those of the packages their builds bundle (read from the builds' source
maps), go to .dvc/plots/licenses/.

Run it only to change a version: `python -m devtools.vega_page` (needs npm and the registry);
`python -m devtools.vega_page --keep-builds` rewrites the page around the builds it holds.
tests/test_plots.py checks the page against the hashes below.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLOTS = REPO / ".dvc/plots"
PAGE = PLOTS / "page.html"
LICENSES = PLOTS / "licenses"

# The majors DVC 3.67's own page loads (vega@5.20.2, vega-lite@5.2.0, vega-embed@6.18.2), at
# their last releases with a browser build: DVC's specs are Vega-Lite v5, and these carry the
# fixes for the XSS advisories of older Vega 5 releases.
# name: (version, build file in the package, npm's sha512 of the tarball, sha256 of the build)
LIBRARIES = {
    "vega": (
        "5.33.1",
        "build/vega.min.js",
        "sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw==",
        "463f3db6a40b20e9747b4ed38f37ed0add508838f9141b1cf8366784b07b30c8",
    ),
    "vega-lite": (
        "5.23.0",
        "build/vega-lite.min.js",
        "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA==",
        "58c27358e26f2d319cf62f45bc17a4c8362f08645001df2ec8d341eee4097c7f",
    ),
    "vega-embed": (
        "6.29.0",
        "build/vega-embed.min.js",
        "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q==",
        "12d02acfbe3ec59ef9a37dd4822a2e04e2961b5bbb671bbe661d2221715b99da",
    ),
}  # fmt: skip

# What dvc_render's HTML.embed() replaces, by plain str.replace (so the braces of JavaScript
# are safe). The page leaves out "{scripts}", which would bring back DVC's CDN tags.
PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}")
REPLACED = ("{scripts}", "{plot_divs}", "{refresh_tag}")

HEAD = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC plots</title>
    <!-- {credits}, inlined: this page needs no network. Their licences are
         in the repository's .dvc/plots/licenses/. Written by devtools/vega_page.py. -->
"""
# In a template's lists of column names, "<prefix>/*" stands for every column of the plot's
# data that starts with "<prefix>/", in the data's order: a bank's per-filter columns
# (kernel_rel_error/<name>) are known only from the data, and Vega-Lite's fold needs names.
# dvc_render's page calls vegaEmbed(element, spec) for each plot, so this wraps it. Where
# DVC draws the templates without this page (DVC Studio, VS Code), a pattern matches no
# column, and only the per-filter panels are missing.
COLUMNS = """    <script>
        // the column patterns of .dvc/plots/*.json: see devtools/vega_page.py
        (() => {
            const embed = window.vegaEmbed;
            const expand = (node, keys) => {
                if (Array.isArray(node)) {
                    return node.flatMap((item) =>
                        typeof item === "string" && item.endsWith("/*")
                            ? keys.filter((key) => key.startsWith(item.slice(0, -1)))
                            : [expand(item, keys)]
                    );
                }
                if (node && typeof node === "object") {
                    return Object.fromEntries(Object.entries(node).map(([name, value]) =>
                        [name, name === "values" ? value : expand(value, keys)]));
                }
                return node;
            };
            window.vegaEmbed = Object.assign((element, spec, options) => {
                const rows = (spec.data && spec.data.values) || [];
                const keys = [...new Set(rows.flatMap((row) => Object.keys(row)))];
                return embed(element, expand(spec, keys), options);
            }, embed);
        })();
    </script>
"""
TAIL = """    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def script(name: str, version: str, build: str) -> str:
    """One library's build as an inline script, refused if the HTML around it would break."""
    for bad in ("</script", "<!--", *REPLACED):
        if bad in build.lower():
            raise SystemExit(f"error: {name} {version} contains {bad!r}; it cannot be inlined")
    return f"    <script>/* {name} {version} */\n{build}\n    </script>\n"


def page(builds: dict[str, str]) -> str:
    credits = ", ".join(f"{name} {LIBRARIES[name][0]}" for name in LIBRARIES)
    scripts = "".join(script(name, LIBRARIES[name][0], builds[name]) for name in LIBRARIES)
    return HEAD.replace("{credits}", credits) + scripts + COLUMNS + TAIL


def inline_builds(html: str) -> dict[str, str]:
    """The builds inlined in a page written by page(), by library name."""
    found = re.findall(r"<script>/\* (\S+) \S+ \*/\n(.*?)\n    </script>", html, re.S)
    return dict(found)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def bundled(source_map: Path) -> set[str]:
    """The npm packages compiled into a build, from its source map (its own code aside)."""
    sources = json.loads(source_map.read_text())["sources"]
    return {m[-1] for s in sources if (m := re.findall(r"node_modules/((?:@[^/]+/)?[^/]+)", s))}


def licence(package: Path) -> Path | None:
    files = sorted(p for p in package.iterdir() if re.match(r"(?i)licen[cs]e|copying", p.name))
    return files[0] if files else None


def keep_builds() -> None:
    """Rewrite the page around the builds it already holds, once they pass their hashes."""
    builds = inline_builds(PAGE.read_text(encoding="utf-8"))
    for name, (version, build, _, digest) in LIBRARIES.items():
        if sha256(builds.get(name, "")) != digest:
            raise SystemExit(f"error: {PAGE} holds no {name} {version} {build}; run without flags")
    PAGE.write_bytes(page(builds).encode("utf-8"))
    print(f"wrote {PAGE.relative_to(REPO)}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "package.json").write_text('{"name": "vega-page", "private": true}')
        specs = [f"{name}@{version}" for name, (version, *_) in LIBRARIES.items()]
        subprocess.run(
            ["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund", *specs],
            cwd=root,
            check=True,
        )
        lock = json.loads((root / "package-lock.json").read_text())["packages"]
        modules = root / "node_modules"
        builds, notices = {}, {}
        for name, (version, build, integrity, digest) in LIBRARIES.items():
            entry = lock[f"node_modules/{name}"]
            if (entry["version"], entry["integrity"]) != (version, integrity):
                raise SystemExit(f"error: npm gave {name} {entry['version']} {entry['integrity']}")
            builds[name] = (modules / name / build).read_bytes().decode("utf-8")
            if sha256(builds[name]) != digest:
                raise SystemExit(f"error: {name} {build} has sha256 {sha256(builds[name])}")
            for dep in sorted(bundled(modules / name / f"{build}.map") | {name}):
                notices.setdefault(dep, (modules / dep, name))
        PAGE.write_bytes(page(builds).encode("utf-8"))
        LICENSES.mkdir(exist_ok=True)
        lines = ["# Licences of the code inlined in ../page.html", ""]
        for dep, (path, into) in sorted(notices.items()):
            meta = json.loads((path / "package.json").read_text())
            # Vega's monorepo packages (vega itself since 5.2x) ship no licence file:
            # theirs is the repository's, .dvc/plots/licenses/vega.LICENSE, from vega 5.20.2.
            monorepo = meta.get("repository") == "vega/vega"
            target = LICENSES / ("vega.LICENSE" if monorepo else f"{dep}.LICENSE")
            if found := licence(path):
                target.write_bytes(found.read_bytes())
            elif not target.exists():
                raise SystemExit(f"error: {dep} {meta['version']} ships no licence file")
            lines.append(f"- {dep} {meta['version']} ({meta['license']}), in {into}: {target.name}")
        (LICENSES / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {PAGE.relative_to(REPO)} and {LICENSES.relative_to(REPO)}/")


if __name__ == "__main__":
    keep_builds() if sys.argv[1:] == ["--keep-builds"] else main()
