"""src/errors.py: a failed stage's one line says how to get back what the run changed,
only where it applies (a stage DVC runs in the workspace itself); real git repos."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, clean_env

from src.errors import BACK_TO_COMMITTED

PARAMS = "train:\n  max_steps: 40   # the cap\n"
STAGE = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from src.errors import UserError, run_stage

def main():
    raise UserError("train.max_steps must be at least 1, got -1; set it to 1 or more")

run_stage(main)
"""


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    (root / "params.yaml").write_text(PARAMS)
    for args in (["init", "-q"], ["add", "params.yaml"], ["commit", "-qm", "params"]):
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
            cwd=root,
            check=True,
        )
    (tmp_path / "stage.py").write_text(STAGE)
    return root


def error_line(repo, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, str(repo.parent / "stage.py")],
        cwd=repo,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    return line


def test_changed_params_get_the_command_back_to_the_commit(repo):
    (repo / "params.yaml").write_text(PARAMS.replace("40 ", "-1"))  # same size, as DVC does
    line = error_line(repo, DVC_STAGE="fingerprint", DVC_ROOT=str(repo))
    assert line.startswith("error: train.max_steps must be at least 1, got -1; set it to 1")
    assert line.endswith(
        "; params.yaml differs from the last commit (`git status` may not show it): "
        f"back to the committed params and outputs with `{BACK_TO_COMMITTED}`"
    )


def test_committed_params_get_the_stages_checkout(repo):
    line = error_line(repo, DVC_STAGE="download", DVC_ROOT=str(repo))
    assert line.endswith("; `dvc checkout download` brings back its outputs of the last run")


@pytest.mark.parametrize("where", ["by hand", "in an experiment copy"])
def test_no_way_back_where_the_workspace_is_untouched(repo, tmp_path, where):
    """By hand DVC deleted nothing; a queued or --temp run works in a copy."""
    (repo / "params.yaml").write_text(PARAMS.replace("40 ", "-1"))
    env = {} if where == "by hand" else {"DVC_STAGE": "train", "DVC_ROOT": str(tmp_path)}
    line = error_line(repo, **env)
    assert line == ("error: train.max_steps must be at least 1, got -1; set it to 1 or more")
