"""src/stage_files.py: each file one stage hands to the next, written and read back, and
a missing or malformed one named with the stage that rewrites it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from src import paths, stage_files
from src.errors import UserError

ROWS = np.random.default_rng(7).random((9, 12, 10)).astype(np.float32)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # stage paths are relative to the repo root


def save(path, array):
    np.save(path, array)


def test_manifest_and_index_round_trip():
    for folder, write, read in (
        (paths.RAW, stage_files.write_manifest, stage_files.read_manifest),
        (paths.GRAY, stage_files.write_index, stage_files.read_index),
    ):
        folder.mkdir(parents=True)
        write(folder, ["a.png", "sub/b,c.jpg", "NA"], ["train", "val", "train"])
        table = read()
        assert table.to_dict("list") == {
            "name": ["a.png", "sub/b,c.jpg", "NA"],
            "split": ["train", "val", "train"],
        }


def test_read_manifest_errors():
    with pytest.raises(UserError, match="not found; rerun `dvc repro download`"):
        stage_files.read_manifest()
    paths.RAW.mkdir(parents=True)
    paths.MANIFEST.write_text("file,part\na.png,train\n")
    with pytest.raises(UserError, match="name,split"):
        stage_files.read_manifest()
    paths.MANIFEST.write_text("name,split\na.png,test\n")
    with pytest.raises(UserError, match="train or val"):
        stage_files.read_manifest()
    paths.MANIFEST.write_text("name,split\n")
    with pytest.raises(UserError, match="lists no images"):
        stage_files.read_manifest()


def test_an_index_that_disagrees_with_the_images_names_the_stage():
    paths.GRAY.mkdir(parents=True)
    save(paths.GRAY_IMAGES, ROWS)
    stage_files.write_index(paths.GRAY, ["a.png"], ["train"])
    with pytest.raises(UserError, match=r"lists 1 images; rerun `dvc repro -f grayscale`"):
        stage_files.open_gray_images_with_index()


def filter_info(**changes) -> stage_files.FilterInfo:
    doc = dict(
        kernel="sobel_x,sobel_y",
        names=("sobel_x", "sobel_y"),
        shape=(3, 3),
        channels=1,
        filters=2,
        activation="linear",
        linear=True,
        rescale=1,
        operation="convolve",
        padding="same",
        noise_std=0.01,
        images=9,
        target_shape=(12, 10),
    )
    return stage_files.FilterInfo(**{**doc, **changes})


def test_filter_outputs_round_trip():
    paths.FILTERED.mkdir(parents=True)
    info = filter_info()
    bank = np.stack([np.eye(3), np.ones((3, 3))], axis=-1)[:, :, None].astype(np.float32)
    stage_files.write_filter_outputs(paths.FILTERED, bank, info)
    assert stage_files.read_filter_info() == info
    kernel = stage_files.read_true_kernel()
    assert kernel.dtype == np.float64 and kernel.shape == (3, 3, 1, 2)
    np.testing.assert_array_equal(kernel, bank)
    paths.FILTER_INFO.write_text("{}")
    with pytest.raises(UserError, match="rerun `dvc repro -f filter`"):
        stage_files.read_filter_info()


HISTORY = pd.DataFrame(
    {
        "epoch": [1, 2],
        "steps": [16, 32],
        "crop_loss": [0.8, 0.4],
        "loss": [1.0, 0.5],
        "val_loss": [2.0, 1.0],
        "explained_variance": [0.9, 0.999],
        "kernel_mse": [0.1, 1e-12],
        "kernel_rel_error": [0.2, 3e-17],
        "newton_step": [1e-2, 1e-7],
        "standard_error": [1e-9, 1e-9],
        "kernel_change": [1.0, 1e-3],
        "elapsed_s": [0.5, 1.0],
        "extra": [0, 0],
    }
)


def test_history_round_trip_and_a_broken_one_names_train():
    paths.METRICS.mkdir()
    stage_files.write_history(HISTORY[HISTORY.columns[::-1]])  # written in column order
    back = stage_files.read_history()
    assert list(back.columns) == stage_files.HISTORY_COLUMNS
    np.testing.assert_allclose(back.kernel_rel_error, [0.2, 3e-17])
    assert back.steps.tolist() == [16, 32]
    paths.HISTORY.write_text("epoch,steps\n1,16\n")  # visualize needs at least epoch and loss
    with pytest.raises(UserError, match="lacks loss.*dvc repro -f train"):
        stage_files.read_history()


def test_a_history_without_held_out_images_or_a_true_kernel_leaves_those_columns_out():
    """No held-out images: no val_loss; a filter with no true kernel (median): no kernel
    errors. Absent columns, not NaN or empty cells."""
    paths.METRICS.mkdir()
    stage_files.write_history(HISTORY.drop(columns=["val_loss", "kernel_mse", "kernel_rel_error"]))
    header = paths.HISTORY.read_text().splitlines()[0].split(",")
    assert header == [
        c
        for c in stage_files.HISTORY_COLUMNS
        if c not in ("val_loss", "kernel_mse", "kernel_rel_error")
    ]
    back = stage_files.read_history()
    assert "val_loss" not in back.columns and "kernel_rel_error" not in back.columns
    with pytest.raises(ValueError, match="lacks crop_loss, newton_step"):
        stage_files.write_history(HISTORY.drop(columns=["crop_loss", "newton_step"]))


def test_a_banks_history_has_a_column_per_filter_after_the_others():
    paths.METRICS.mkdir()
    bank = HISTORY.assign(**{"kernel_rel_error/sobel_y": [0.3, 1e-16]})
    bank.insert(0, "kernel_rel_error/sobel_x", [0.1, 2e-17])
    stage_files.write_history(bank)
    header = paths.HISTORY.read_text().splitlines()[0].split(",")
    assert header == [
        *stage_files.HISTORY_COLUMNS,
        "kernel_rel_error/sobel_x",
        "kernel_rel_error/sobel_y",
    ]
    back = stage_files.read_history()
    np.testing.assert_allclose(back["kernel_rel_error/sobel_y"], [0.3, 1e-16])


STEPS = pd.DataFrame(
    {
        "step": [0, 1, 3, 10],
        "epoch": [0, 1, 1, 2],
        "kernel_mse": [0.5, 0.1, 0.01, 1e-12],
        "kernel_rel_error": [1.0, 0.2, 0.02, 3e-17],
    }
)


def test_steps_round_trip():
    paths.METRICS.mkdir()
    shuffled = ["kernel_rel_error", "extra", "step", "kernel_mse", "epoch"]
    stage_files.write_steps(STEPS.assign(extra=1)[shuffled])  # written in STEPS_COLUMNS order
    assert paths.STEPS.read_text().splitlines()[:2] == [
        "step,epoch,kernel_mse,kernel_rel_error",
        "0,0,0.5,1",
    ]
    back = stage_files.read_steps()
    assert list(back.columns) == stage_files.STEPS_COLUMNS + stage_files.STEPS_ERROR_COLUMNS
    assert back.step.dtype == np.int64 and back.epoch.dtype == np.int64
    np.testing.assert_allclose(back.kernel_rel_error, STEPS.kernel_rel_error)
    with pytest.raises(ValueError, match="lacks epoch"):
        stage_files.write_steps(STEPS.drop(columns="epoch"))


def test_steps_without_a_true_kernel_and_of_a_bank():
    paths.METRICS.mkdir()
    stage_files.write_steps(STEPS[["step", "epoch"]])  # median: no kernel errors at all
    assert paths.STEPS.read_text().splitlines()[:2] == ["step,epoch", "0,0"]
    assert list(stage_files.read_steps().columns) == ["step", "epoch"]
    stage_files.write_steps(STEPS.assign(**{"kernel_rel_error/a": 0.5, "kernel_rel_error/b": 1}))
    assert paths.STEPS.read_text().splitlines()[0] == (
        "step,epoch,kernel_mse,kernel_rel_error,kernel_rel_error/a,kernel_rel_error/b"
    )


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "has no rows"),
        ("step,epoch,kernel_mse,kernel_rel_error\n", "has no rows"),
        ("step,kernel_mse\n0,0.5\n", "has no rows or lacks epoch"),
        ("step,epoch,kernel_mse,kernel_rel_error\n0,0,1,1\n0,0,1,1\n", "step rising"),
        ("step,epoch,kernel_mse,kernel_rel_error\n0,0,1,1\n2.5,1,1,1\n", "whole numbers"),
        ("step,epoch,kernel_mse,kernel_rel_error\n0,,1,1\n", "whole numbers"),
    ],
)
def test_a_short_or_broken_steps_table_names_train(text, problem):
    paths.METRICS.mkdir()
    paths.STEPS.write_text(text)
    with pytest.raises(UserError, match=rf"^metrics/steps.csv.*{problem}.*`dvc repro -f train`$"):
        stage_files.read_steps()


def test_a_missing_steps_table_names_train():
    with pytest.raises(UserError, match=r"^metrics/steps.csv is missing; run `dvc repro train`"):
        stage_files.read_steps()


class SavedModel:
    """Stands in for the Keras model: only its save() is called."""

    def save(self, path):
        path.write_text("a Keras model")


def test_model_round_trip_with_its_bias():
    paths.MODEL.mkdir()
    snapshots = np.random.default_rng(0).normal(size=(4, 3, 3))
    stage_files.write_model(
        paths.MODEL,
        learned_kernel=snapshots[-1].astype(np.float32),
        bias=np.float32(-0.25),
        kernel_history=snapshots,
        model=SavedModel(),
        run={"run_id": "abc"},
    )
    assert sorted(p.name for p in paths.MODEL.iterdir()) == [
        "bias.json",
        "kernel.npy",
        "kernels.npy",
        "model.keras",
        "run.json",
    ]
    kernel, bias = stage_files.read_learned_layer()
    assert kernel.dtype == np.float64 and bias == [-0.25]  # one bias a filter
    np.testing.assert_allclose(kernel[..., 0, 0], snapshots[-1], rtol=1e-6)  # (kh, kw, 1, 1)
    np.testing.assert_array_equal(stage_files.read_kernel_snapshots()[..., 0, 0], snapshots)
    assert stage_files.read_run() == {"run_id": "abc"}


def test_the_model_of_a_bank_with_its_closed_form():
    """spec.md: model/kernel.npy (kh, kw, C, F), bias.json one bias a filter, kernels.npy
    (S, kh, kw, C, F), and the closed form's lstsq_kernel.npy and lstsq.json."""
    paths.MODEL.mkdir()
    rng = np.random.default_rng(0)
    snapshots = rng.normal(size=(4, 3, 3, 3, 2))
    closed = rng.normal(size=(3, 3, 3, 2))
    stage_files.write_model(
        paths.MODEL,
        learned_kernel=snapshots[-1].astype(np.float32),
        bias=np.array([0.5, -0.25], np.float32),
        kernel_history=snapshots,
        model=SavedModel(),
        run={"run_id": "abc"},
        lstsq={"kernel": closed, "bias": [0.5, -0.25], "val_loss": 1e-4, "seconds": 0.1},
    )
    assert {p.name for p in paths.MODEL.iterdir()} >= {"lstsq_kernel.npy", "lstsq.json"}
    np.testing.assert_array_equal(np.load(paths.LSTSQ_KERNEL), closed)
    assert json.loads(paths.LSTSQ_INFO.read_text()) == {
        "bias": [0.5, -0.25],
        "val_loss": 1e-4,
        "seconds": 0.1,
    }
    assert json.loads(paths.BIAS.read_text()) == {"bias": [0.5, -0.25]}


def test_the_model_of_a_bank_reads_back():
    paths.MODEL.mkdir()
    snapshots = np.random.default_rng(0).normal(size=(4, 3, 3, 3, 2))
    stage_files.write_model(
        paths.MODEL,
        learned_kernel=snapshots[-1],
        bias=np.array([0.5, -0.25]),
        kernel_history=snapshots,
        model=SavedModel(),
        run={"run_id": "abc"},
    )
    kernel, bias = stage_files.read_learned_layer()
    np.testing.assert_array_equal(kernel, snapshots[-1])
    np.testing.assert_array_equal(bias, [0.5, -0.25])
    np.testing.assert_array_equal(stage_files.read_kernel_snapshots(), snapshots)


@pytest.mark.parametrize("text", ['{"bias": NaN}', '{"bias": "0"}', '{"b": 0}', "[0]", "0.1 x"])
def test_a_damaged_bias_names_train(text):
    paths.MODEL.mkdir()
    np.save(paths.LEARNED_KERNEL, np.eye(3))
    paths.BIAS.write_text(text)
    with pytest.raises(UserError, match=r"^model/bias.json holds no finite bias; rerun `dvc re"):
        stage_files.read_learned_layer()
    paths.BIAS.unlink()
    with pytest.raises(UserError, match=r"^model/bias.json is missing; run `dvc repro train`"):
        stage_files.read_learned_layer()


def test_inputs_are_checked_in_order_and_name_their_stage():
    with pytest.raises(
        UserError,
        match=r"^data/gray/images.npy is missing; "
        r"run `dvc repro grayscale` first",
    ):
        stage_files.require_inputs("train")
    with pytest.raises(UserError, match=r"^model/kernels.npy is missing; run `dvc repro train`"):
        stage_files.require_inputs("visualize")


@pytest.mark.parametrize(
    "open_stage_output, path, stage",
    [
        (stage_files.open_gray_images, paths.GRAY_IMAGES, "grayscale"),
        (stage_files.open_targets, paths.TARGETS, "filter"),
    ],
)
def test_a_stage_output_names_the_stage_that_rewrites_it(open_stage_output, path, stage):
    with pytest.raises(UserError, match=f"not found; rerun `dvc repro -f {stage}`"):
        open_stage_output()
    path.parent.mkdir(parents=True)
    save(path, ROWS.astype(np.float64))
    with pytest.raises(UserError, match=f"dtype <f8.*rerun `dvc repro -f {stage}`"):
        open_stage_output()
    save(path, ROWS)
    with open_stage_output() as opened:
        np.testing.assert_array_equal(opened[2], ROWS[2])
    corrupted = ROWS.copy()
    corrupted[4, 0, 0] = np.nan
    save(path, corrupted)
    with (
        open_stage_output() as opened,
        pytest.raises(UserError, match=rf"^{path} holds NaN.*rerun `dvc repro -f {stage}`$"),
    ):
        opened[4]


@pytest.mark.parametrize("damage", [b"", b"\x93NUMPY junk", "truncated"])
def test_a_damaged_kernel_file_names_the_stage_to_rerun(damage):
    paths.FILTERED.mkdir(parents=True)
    info = filter_info(names=("sobel_x",), filters=1)
    stage_files.write_filter_outputs(paths.FILTERED, np.eye(3)[:, :, None, None], info)
    data = paths.KERNEL.read_bytes()
    paths.KERNEL.write_bytes(data[:-8] if damage == "truncated" else damage)
    with pytest.raises(
        UserError, match=r"not a finite 4-D kernel array; rerun `dvc repro -f filter`"
    ):
        stage_files.read_true_kernel()


def test_a_non_linear_filter_has_no_true_kernel_and_a_rescaled_one_its_own_inputs():
    paths.FILTERED.mkdir(parents=True)
    info = filter_info(names=("median",), kernel="median", filters=1, linear=False, rescale=2)
    stage_files.write_filter_outputs(paths.FILTERED, None, info)
    assert not paths.KERNEL.exists() and stage_files.read_true_kernel() is None
    with pytest.raises(UserError, match=r"inputs.npy not found; rerun `dvc repro -f filter`"):
        stage_files.open_inputs()
    with pytest.raises(ValueError, match="a non-linear one none"):
        stage_files.write_filter_outputs(paths.FILTERED, np.eye(3)[:, :, None, None], info)


def test_a_run_json_that_is_not_a_mapping_names_train():
    paths.MODEL.mkdir()
    paths.RUN_INFO.write_text("[1, 2]")
    with pytest.raises(UserError, match=r"names no MLflow run; rerun `dvc repro -f train`"):
        stage_files.read_run()
