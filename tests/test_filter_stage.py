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

from src import filtering, kernels, paths, stack, stage_files
from src.errors import UserError
from stages import filter as filter_stage

REPO = Path(__file__).resolve().parents[1]
N, SIZE = 5, 40


def write_params(
    kernel="sobel_x", operation="correlate", padding="valid", noise_std=0.0, seed=0, **more
):
    doc = {
        "kernel": kernel,
        "seed": seed,
        "data": {"size": SIZE, **more.pop("data", {})},
        "filter": {"operation": operation, "padding": padding, "noise_std": noise_std, **more},
    }
    Path("params.yaml").write_text(yaml.safe_dump(doc))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A cwd holding what the grayscale stage writes: images.npy + index.csv."""
    monkeypatch.chdir(tmp_path)
    paths.GRAY.mkdir(parents=True)
    images = np.random.default_rng(0).random((N, SIZE, SIZE)).astype(np.float32)
    np.save(paths.GRAY_IMAGES, images[..., None])  # (N, S, S, 1), as the grayscale stage writes
    paths.GRAY_INDEX.write_text(
        "name,split\n" + "".join(f"img{i}.png,{'val' if i == 0 else 'train'}\n" for i in range(N))
    )
    write_params()
    return images


def outputs(filters=1):
    """The gray one-filter targets (N, H', W') and kernel (kh, kw), checked to be stored
    as (N, H', W', 1) and (kh, kw, 1, 1); a bank's whole, with filters > 1."""
    info = json.loads((paths.FILTERED / "filter.json").read_text())
    targets, kernel = np.load(paths.TARGETS), np.load(paths.KERNEL)
    assert targets.ndim == 4 and targets.shape[3] == filters and kernel.ndim == 4
    if filters == 1 and kernel.shape[2] == 1:
        return targets[..., 0], kernel[:, :, 0, 0], info
    return targets, kernel, info


def stage_files_kernel():
    return stage_files.read_true_kernel()


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
        "names": ["sobel_x"],
        "shape": [3, 3],
        "channels": 1,
        "filters": 1,
        "activation": "linear",
        "linear": True,
        "rescale": 1,
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
    np.testing.assert_array_equal(stage_files_kernel(), kernel[:, :, None, None])


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
    assert np.load(paths.TARGETS).shape == (N, SIZE, SIZE, 1)


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

    monkeypatch.setattr(filtering, "make_pairs", boom)
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


# --- issues 18 and 19: banks, colour, activations, non-linear filters, rescale ----------


def test_a_bank_of_two_sizes_gives_one_target_channel_per_filter(workdir):
    write_params(kernel=["smiley", "sobel_x"])
    filter_stage.main()
    targets, kernel, info = outputs(filters=2)
    assert kernel.shape == (32, 32, 1, 2) and targets.shape == (N, SIZE - 31, SIZE - 31, 2)
    assert info["names"] == ["smiley", "sobel_x"] and info["kernel"] == "smiley,sobel_x"
    assert info["shape"] == [32, 32] and info["filters"] == 2
    # sobel_x, centred in 32×32, sees what a 3×3 sees 14 pixels in: the same target, cropped
    alone = filtering.correlate(workdir, kernels.SOBEL_X, "valid")
    np.testing.assert_allclose(
        targets[..., 1], alone[:, 14 : 14 + SIZE - 31, 14 : 14 + SIZE - 31], atol=1e-5
    )
    np.testing.assert_allclose(
        targets[..., 0], filtering.correlate(workdir, kernel[:, :, 0, 0], "valid"), atol=1e-5
    )


def test_colour_targets_sum_the_three_channels_and_apply_the_activation(workdir):
    rgb = np.random.default_rng(1).random((N, SIZE, SIZE, 3)).astype(np.float32)
    np.save(paths.GRAY_IMAGES, rgb)
    write_params(kernel=["red", "green"], data={"channels": 3}, activation="sigmoid")
    filter_stage.main()
    targets, kernel, info = outputs(filters=2)
    assert kernel.shape == (3, 3, 3, 2) and info["channels"] == 3
    assert info["activation"] == "sigmoid"
    for f, k in enumerate([kernels.colour_detector(0), kernels.colour_detector(1)]):
        pre = sum(
            signal.correlate2d(rgb[0, :, :, c].astype(np.float64), k[:, :, c], "valid")
            for c in range(3)
        )
        np.testing.assert_allclose(targets[0, ..., f], 1 / (1 + np.exp(-pre)), atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_the_activation_comes_after_the_conv_and_before_the_noise(workdir, activation):
    write_params(kernel="edge", activation=activation)
    filter_stage.main()
    targets, _, _ = outputs()
    pre = filtering.correlate(workdir, kernels.EDGE, "valid").astype(np.float64)
    expected = np.maximum(pre, 0) if activation == "relu" else np.tanh(pre)
    np.testing.assert_allclose(targets, expected, atol=1e-6)


def test_a_non_linear_filter_writes_no_kernel(workdir):
    write_params(kernel="median")
    filter_stage.main()
    info = json.loads(paths.FILTER_INFO.read_text())
    assert not paths.KERNEL.exists() and stage_files.read_true_kernel() is None
    assert info["linear"] is False and info["shape"] == [5, 5]
    from scipy import ndimage

    targets = np.load(paths.TARGETS)[..., 0]
    expected = ndimage.median_filter(workdir[0], size=5, mode="constant")[2:-2, 2:-2]
    np.testing.assert_array_equal(targets[0], expected)


def test_rescale_writes_the_reduced_inputs_and_aligns_the_targets_as_a_conv2d(workdir):
    fine = np.random.default_rng(2).random((N, 2 * SIZE, 2 * SIZE, 1)).astype(np.float32)
    np.save(paths.GRAY_IMAGES, fine)
    # a centred delta: a Conv2D of it gives back the input, so the target must be the
    # reduced input itself, cropped as a 3×3 'valid' Conv2D crops it
    delta = np.zeros((3, 3))
    delta[1, 1] = 1.0
    np.save("delta.npy", delta)
    write_params(kernel="file:delta.npy", rescale=2)
    filter_stage.main()
    targets, _, info = outputs()
    inputs = np.load(paths.INPUTS)
    assert inputs.shape == (N, SIZE, SIZE, 1) and info["rescale"] == 2
    expected = fine.reshape(N, SIZE, 2, SIZE, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(inputs[..., 0], expected, atol=1e-6)
    np.testing.assert_allclose(targets, inputs[:, 1:-1, 1:-1, 0], atol=1e-6)
    with stage_files.open_inputs() as layer_inputs:
        np.testing.assert_array_equal(layer_inputs[:], inputs)


@pytest.mark.parametrize("stage", ["filter", "fingerprint"])
def test_the_stage_imports_neither_tensorflow_nor_mlflow(stage):
    # issue 20: each second of import is a second of every `dvc exp run -S kernel=…`
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import stages.{stage}"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    modules = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()}
    assert not modules & {"tensorflow", "keras", "mlflow", "matplotlib", "torch", "jax"}


def test_memory_stays_at_one_block_however_many_large_images(tmp_path):
    # issue 22, item 8: the stage peaked at 10.5 GB for 13 smiley images at 4096² (all
    # of them in float64 at once); blocks now hold at most filtering.BLOCK_BYTES.
    side, count = 1024, 24
    (tmp_path / "data/gray").mkdir(parents=True)
    rng = np.random.default_rng(0)
    stack.write_stack(
        tmp_path / paths.GRAY_IMAGES,
        (rng.random((side, side, 1), dtype=np.float32) for _ in range(count)),
        count,
        (side, side, 1),
    )
    (tmp_path / paths.GRAY_INDEX).write_text(
        "name,split\n" + "".join(f"i{i}.png,train\n" for i in range(count))
    )
    doc = {"kernel": "sobel_x", "data": {"size": side}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    # the process's own high-water mark (VmHWM, in kB): getrusage's ru_maxrss starts from
    # the parent's at fork, and a test worker that trained before is past 1 GB
    script = (
        "from stages import filter as f\n"
        "f.main()\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "print(hwm.split()[1])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    peak_mb = int(result.stdout.split()[-1]) / 1024
    # about 150 MB of imports and one block of 4 images; all 24 at once would be ~1.1 GB
    assert peak_mb < 600, f"peak RSS {peak_mb:.0f} MB"
