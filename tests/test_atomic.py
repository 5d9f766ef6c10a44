"""src/atomic.py: outputs appear whole or not at all, and JSON outputs are strict JSON."""

from __future__ import annotations

import json

import pytest

from src.atomic import write_json


def strict_json(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity, as jq and `dvc exp show` do."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_write_json_writes_strict_json(tmp_path):
    path = tmp_path / "metrics" / "train.json"
    write_json(path, {"loss": 0.5, "epochs": 2})
    assert strict_json(path.read_text()) == {"epochs": 2, "loss": 0.5}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_write_json_refuses_nan_and_infinity_and_keeps_the_old_file(tmp_path, value):
    path = tmp_path / "train.json"
    write_json(path, {"loss": 0.5})
    with pytest.raises(ValueError):
        write_json(path, {"loss": 0.5, "val_loss": value})
    assert strict_json(path.read_text()) == {"loss": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["train.json"]  # no temporary left
