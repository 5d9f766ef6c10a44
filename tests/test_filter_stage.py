"""stages/filter.py on a tiny grayscale set in a temporary working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import signal

from src import filtering, kernels, paths
from src.errors import UserError
from stages import filter as filter_stage

REPO = Path(__file__).resolve().parents[1]
N, SIZE = 5, 40


def write_params(kernel="sobel_x", operation="correlate", padding="valid", noise_std=0.0, seed=0):
    doc = {
        "kernel": kernel,
        "seed": seed,
        "data": {"size": SIZE},
        "filter": {"operation": operation, "padding": padding, "noise_std": noise_std},
    }
    Path("params.yaml").write_text(yaml.safe_dump(doc))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A cwd holding what the grayscale stage writes: images.npy + index.csv."""
    monkeypatch.chdir(tmp_path)
    paths.GRAY.mkdir(parents=True)
    images = np.random.default_rng(0).random((N, SIZE, SIZE)).astype(np.float32)
    np.save(paths.GRAY_IMAGES, images)
    paths.GRAY_INDEX.write_text(
        "name,split\n" + "".join(f"img{i}.png,{'val' if i == 0 else 'train'}\n" for i in range(N))
    )
    write_params()
    return images


def outputs():
    info = json.loads((paths.FILTERED / "filter.json").read_text())
    return np.load(paths.TARGETS), np.load(paths.KERNEL), info


def test_correlate_valid(workdir):
    filter_stage.main()
    targets, kernel, info = outputs()
    assert targets.shape == (N, SIZE - 2, SIZE - 2) and targets.dtype == np.float32
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel, kernels.SOBEL_X)
    for img, target in zip(workdir, targets):
        np.testing.assert_allclose(
            target, signal.correlate2d(img, kernels.SOBEL_X, "valid"), atol=1e-5
        )
    assert info == {
        "kernel": "sobel_x",
        "shape": [3, 3],
        "operation": "correlate",
        "padding": "valid",
        "noise_std": 0.0,
        "images": N,
        "target_shape": [SIZE - 2, SIZE - 2],
    }


def test_convolve_saves_the_flipped_kernel_a_conv2d_must_learn(workdir):
    write_params(operation="convolve")
    filter_stage.main()
    targets, kernel, info = outputs()
    np.testing.assert_array_equal(kernel, kernels.SOBEL_X[::-1, ::-1])
    for img, target in zip(workdir, targets):
        np.testing.assert_allclose(
            target, signal.convolve2d(img, kernels.SOBEL_X, "valid"), atol=1e-5
        )
    # kernel.npy is the single source of truth: correlating with it reproduces the targets
    np.testing.assert_array_equal(targets, filtering.correlate(workdir, kernel, "valid"))
    assert info["operation"] == "convolve"


def test_smiley_same_padding(workdir):
    write_params(kernel="smiley", operation="convolve", padding="same")
    filter_stage.main()
    targets, kernel, info = outputs()
    assert targets.shape == (N, SIZE, SIZE)
    assert kernel.shape == (32, 32) and kernel.dtype == np.float32
    np.testing.assert_allclose(kernel, kernels.smiley()[::-1, ::-1], atol=1e-7)
    np.testing.assert_allclose(targets, filtering.correlate(workdir, kernel, "same"), atol=1e-6)
    assert info["shape"] == [32, 32] and info["padding"] == "same"
    assert info["target_shape"] == [SIZE, SIZE]


def test_noise_is_added_and_seeded(workdir):
    write_params(noise_std=0.5, seed=3)
    filter_stage.main()
    noisy, _, info = outputs()
    filter_stage.main()
    again, _, _ = outputs()
    write_params(noise_std=0.5, seed=4)
    filter_stage.main()
    other_seed, _, _ = outputs()
    clean = filtering.correlate(workdir, kernels.SOBEL_X, "valid")
    assert (noisy - clean).std() == pytest.approx(0.5, rel=0.05)
    np.testing.assert_array_equal(noisy, again)
    assert not np.allclose(noisy, other_seed)
    assert info["noise_std"] == 0.5


def test_rerun_replaces_the_outputs_and_leaves_no_temporaries(workdir):
    filter_stage.main()
    (paths.FILTERED / "stale.txt").write_text("from an older run")
    write_params(padding="same")
    filter_stage.main()
    assert sorted(p.name for p in paths.FILTERED.iterdir()) == [
        "filter.json",
        "kernel.npy",
        "targets.npy",
    ]
    assert sorted(p.name for p in Path("data").iterdir()) == ["filtered", "gray"]
    assert np.load(paths.TARGETS).shape == (N, SIZE, SIZE)


def test_missing_grayscale_says_which_stage_to_run(workdir):
    paths.GRAY_IMAGES.unlink()
    with pytest.raises(UserError, match="dvc repro grayscale"):
        filter_stage.main()
    assert not paths.FILTERED.exists()


@pytest.mark.parametrize("bad", [b"not an array", np.float64])
def test_grayscale_that_is_not_a_float32_stack_is_a_user_error(workdir, bad):
    if isinstance(bad, bytes):
        paths.GRAY_IMAGES.write_bytes(bad)
    else:
        np.save(paths.GRAY_IMAGES, workdir.astype(bad))
    with pytest.raises(UserError, match=r"not a stack of float32 images .*dvc repro -f grayscale"):
        filter_stage.main()
    assert not paths.FILTERED.exists()


def test_index_that_disagrees_with_the_images_is_a_user_error(workdir):
    paths.GRAY_INDEX.write_text("name,split\nimg0.png,train\n")
    with pytest.raises(UserError, match="index.csv"):
        filter_stage.main()


def test_failure_midway_keeps_the_previous_outputs(workdir, monkeypatch):
    filter_stage.main()
    before = np.load(paths.TARGETS)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(filtering, "make_targets", boom)
    write_params(padding="same")
    with pytest.raises(KeyboardInterrupt):
        filter_stage.main()
    np.testing.assert_array_equal(np.load(paths.TARGETS), before)
    assert sorted(p.name for p in Path("data").iterdir()) == ["filtered", "gray"]


def test_entry_point_turns_a_user_error_into_one_line(workdir):
    paths.GRAY_IMAGES.unlink()
    result = subprocess.run(
        [sys.executable, "-m", "stages.filter"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "dvc repro grayscale" in result.stderr
    assert "Traceback" not in result.stderr
