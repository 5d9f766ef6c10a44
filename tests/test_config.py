import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from src import config, kernels
from src.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def defaults() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def with_change(path: str, value) -> dict:
    doc = defaults()
    *parents, key = path.split(".")
    node = doc
    for name in parents:
        node = node[name]
    node[key] = value
    return doc


def test_the_committed_params_are_valid_and_typed():
    params = config.parse(defaults())
    assert params.kernel == "sobel_x"
    assert params.data.source == "synthetic" and params.data.size == 256
    assert params.filter.operation == "correlate" and params.filter.padding == "valid"
    assert params.train.conv == "auto" and params.train.whiten == "gradient"
    assert params.true_kernel().shape == (3, 3)


@pytest.mark.parametrize("path, value, message", [
    ("kernel", "sobel_z", r"unknown kernel 'sobel_z'; choose from sobel_x, sobel_y, smiley"),
    ("kernel", 3, "unknown kernel 3"),
    ("train.epochs", "abc", r"train.epochs must be a whole number, got 'abc'"),
    ("train.epochs", 0, "train.epochs must be at least 1, got 0"),
    ("train.epochs", -2, "train.epochs must be at least 1"),
    ("train.batch_size", 0, "train.batch_size must be at least 1"),
    ("train.learning_rate", 0, "train.learning_rate must be greater than 0"),
    ("train.learning_rate", -0.1, "train.learning_rate must be greater than 0"),
    ("train.learning_rate", "fast", "train.learning_rate must be a number"),
    ("train.learning_rate", float("nan"), "train.learning_rate must be a finite number"),
    ("train.optimizer", "rmsprop", "train.optimizer must be one of sgd, adam; got 'rmsprop'"),
    ("train.conv", "winograd", "train.conv must be one of auto, direct, fft"),
    ("train.whiten", "zca", "train.whiten must be one of gradient, laplacian, none"),
    ("filter.operation", "convolution", "filter.operation must be one of correlate, convolve"),
    ("filter.padding", "full", "filter.padding must be one of valid, same"),
    ("filter.noise_std", -1, "filter.noise_std must be at least 0"),
    ("data.val_fraction", 1.5, "data.val_fraction must be at most 0.9"),
    ("data.size", 4, "data.size must be at least 8"),
    ("data.source", "", "data.source must be synthetic, mit_scenes, or a path"),
    ("data.categories", ["forest", "moon"], "data.categories: unknown moon; choose from coast"),
    ("data.sha256", "abc", "data.sha256 must be 64 hex digits"),
    ("seed", 1.5, "seed must be a whole number"),
    ("kernels.gaussian.sigma", 0, "kernels.gaussian.sigma must be a number greater than 0"),
    ("kernels.box.size", "big", "kernels.box.size must be a whole number"),
])
def test_a_bad_value_names_the_key_and_what_is_allowed(path, value, message):
    doc = with_change(path, value)
    if path.startswith("kernels."):
        doc["kernel"] = path.split(".")[1]
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.parse(doc)


def test_every_builtin_kernel_is_accepted_and_listed_on_error():
    for name in kernels.NAMES:
        assert config.parse(with_change("kernel", name)).kernel == name
    with pytest.raises(UserError) as error:
        config.parse(with_change("kernel", "nope"))
    for name in kernels.NAMES:
        assert name in str(error.value)


def test_kernel_settings_are_settable_like_dvc_exp_run_S():
    doc = with_change("kernel", "gaussian")
    doc["kernels"]["gaussian"].update(size=9, sigma=2.0)
    assert config.parse(doc).true_kernel().shape == (9, 9)
    doc["kernels"]["gaussian"]["covariance"] = [[25, 12.5], [12.5, 25]]
    assert config.parse(doc).true_kernel().shape == (9, 9)
    doc = with_change("kernel", "box")
    doc["kernels"]["box"]["size"] = 4
    assert config.parse(doc).true_kernel().shape == (4, 4)


def test_a_kernel_larger_than_the_images_is_refused():
    doc = with_change("kernel", "smiley")
    doc["data"]["size"] = 16
    with pytest.raises(UserError, match=r"32×32, larger than the 16×16 images"):
        config.parse(doc)


def test_a_crop_smaller_than_the_kernel_is_refused():
    doc = with_change("kernel", "smiley")
    doc["train"]["crop"] = 20
    with pytest.raises(UserError, match="train.crop must be 0 or at least the kernel size"):
        config.parse(doc)


def test_file_kernels_are_loaded_and_checked(tmp_path):
    import numpy as np

    good = tmp_path / "k.npy"
    np.save(good, np.arange(6.0).reshape(2, 3))
    assert config.parse(with_change("kernel", f"file:{good}")).true_kernel().shape == (2, 3)
    with pytest.raises(UserError, match="does not exist"):
        config.parse(with_change("kernel", f"file:{tmp_path / 'missing.npy'}"))


def test_malformed_yaml_and_a_non_mapping_are_one_line_errors(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("kernel: sobel_x\ntrain: [epochs: 3\n")
    with pytest.raises(UserError, match=r"not valid YAML at line \d+, column \d+.*git checkout"):
        config.load(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="must be a mapping"):
        config.load(bad)
    with pytest.raises(UserError, match="not found"):
        config.load(tmp_path / "absent.yaml")


def test_flatten_names_nested_keys_with_dots():
    assert config.flatten({"a": 1, "b": {"c": 2, "d": {"e": 3}}}) == {"a": 1, "b.c": 2, "b.d.e": 3}


@pytest.mark.parametrize("change, expected", [
    ("kernel: sobel_z", "error: kernel: unknown kernel 'sobel_z'; choose from"),
    ("train: {epochs: abc}", "error: train.epochs must be a whole number, got 'abc'"),
])
def test_a_stage_reports_a_bad_param_in_one_line_and_exits_non_zero(tmp_path, change, expected):
    doc = defaults()
    doc.update(yaml.safe_load(change))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    result = subprocess.run([sys.executable, "-m", "stages.filter"], cwd=tmp_path, text=True,
                            capture_output=True,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith(expected)
    assert "Traceback" not in result.stderr
