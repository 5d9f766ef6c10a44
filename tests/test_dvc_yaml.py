"""dvc.yaml: each stage's code deps are exactly the modules its command runs.

A stage runs `python -m stages.<name>`. Its deps must list stages/<name>.py and every
src/ (or stages/) module it imports, directly or not: a missing one leaves a stale
cached stage when that module changes, an extra one reruns the stage for nothing.
Imports are read statically with ast, those inside functions included. Data deps
(data/..., model, metrics/...) are not checked.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("src", "stages")  # the project's own code; the rest is a library or data
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def imported_modules(path: Path, root: Path) -> set[Path]:
    """The project modules (files under root) that one file imports, anywhere in it."""
    package = path.relative_to(root).parent.parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # `from .x import y` in src/a.py is `from src.x import y`
            parent = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join([*parent, *filter(None, [node.module])])
            # `from src import a` names module src/a.py; `from src.x import y` names src/x.py
            names = [module, *(f"{module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] in PACKAGES:
                # importing src.a.b runs the package src/a/__init__.py first
                for depth in range(2, len(parts) + 1):
                    init = root.joinpath(*parts[:depth], "__init__.py")
                    if init.is_file():
                        found.add(init.relative_to(root))
                file = root / (name.replace(".", "/") + ".py")
                if file.is_file():
                    found.add(file.relative_to(root))
    return found


def code_deps(module: Path, root: Path = ROOT) -> set[Path]:
    """`module` and every project module it imports, transitively."""
    seen, todo = set(), [module]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(imported_modules(root / path, root))
    return seen


def test_imports_are_found_in_every_form(tmp_path):
    for name, text in {
        "stages/demo.py": "from src import a, b\nimport src.c as c\n"
        "def f():\n    from src.d import thing\n",
        "src/a.py": "import numpy\nfrom src.e import x\n",
        "src/b.py": "from src import paths_that_is_a_name_not_a_module\n",
        "src/c.py": "from . import f\n",
        "src/d.py": "import src.a\n",
        "src/e.py": "",
        "src/f.py": "from .g import y\n",
        "src/g.py": "",
        "src/unused.py": "",
    }.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    found = {str(p) for p in code_deps(Path("stages/demo.py"), tmp_path)}
    assert found == {
        "stages/demo.py",
        "src/a.py",
        "src/b.py",
        "src/c.py",
        "src/d.py",
        "src/e.py",
        "src/f.py",
        "src/g.py",
    }


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_list_exactly_the_code_it_runs(stage):
    spec = STAGES[stage]
    command = re.fullmatch(r"python -m stages\.(\w+)", spec["cmd"])
    assert command, f"stage {stage!r}: cmd {spec['cmd']!r} is not `python -m stages.<name>`"
    module = Path(f"stages/{command.group(1)}.py")
    assert (ROOT / module).is_file(), f"stage {stage!r}: {module} does not exist"

    needed = {str(p) for p in code_deps(module)}
    listed = {
        str(dep)
        for dep in spec.get("deps", [])
        if str(dep).startswith(tuple(f"{p}/" for p in PACKAGES))
    }
    missing, extra = sorted(needed - listed), sorted(listed - needed)
    assert not (missing or extra), f"stage {stage!r} in dvc.yaml: " + "; ".join(
        filter(
            None,
            [
                missing and f"add to deps: {', '.join(missing)}",
                extra and f"remove from deps: {', '.join(extra)}",
            ],
        )
    )


# The params that name a file DVC cannot see, and the fingerprint that stands in for it.
FINGERPRINTS = {
    "data.source": "data/fingerprints/source.json",
    "kernel": "data/fingerprints/kernel.json",
}


@pytest.mark.parametrize("param", sorted(FINGERPRINTS))
def test_a_stage_reading_a_named_file_depends_on_its_fingerprint(param):
    fingerprint = STAGES["fingerprint"]
    assert fingerprint.get("always_changed") is True  # it must look every time
    assert FINGERPRINTS[param] in fingerprint["outs"]
    readers = [name for name, spec in STAGES.items() if param in spec.get("params", [])]
    assert [name for name in readers if name != "fingerprint"], f"no stage reads {param}"
    for name in readers:
        if name != "fingerprint":
            assert FINGERPRINTS[param] in STAGES[name]["deps"], f"{name} must depend on it"
