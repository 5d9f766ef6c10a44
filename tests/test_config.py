import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pydantic
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
    assert params.true_kernel().shape == (3, 3, 1, 1)


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("kernel", "sobel_z", r"unknown kernel 'sobel_z'; choose from sobel_x, sobel_y, smiley"),
        ("kernel", 3, "unknown kernel 3"),
        ("train.max_steps", "abc", r"train.max_steps must be a whole number, got 'abc'"),
        ("train.max_steps", 0, "train.max_steps must be at least 1, got 0"),
        ("train.max_steps", -2, "train.max_steps must be at least 1"),
        ("train.max_steps", 10**8, "train.max_steps must be at most 10000000"),
        ("train.min_epoch_steps", 0, "train.min_epoch_steps must be at least 1"),
        ("train.tolerance", 0, "train.tolerance must be greater than 0"),
        ("train.tolerance", 1, "train.tolerance must be less than 1"),
        ("train.tolerance", "tight", "train.tolerance must be a number"),
        ("train.recipe", "seed", "train.recipe must be one of fast, original; got 'seed'"),
        ("train.precondition", "newton", "train.precondition must be one of kfac, none"),
        ("train.batch_size", 0, "train.batch_size must be at least 1"),
        ("train.learning_rate", 0, "train.learning_rate must be greater than 0"),
        ("train.learning_rate", -0.1, "train.learning_rate must be greater than 0"),
        ("train.learning_rate", "fast", "train.learning_rate must be a number"),
        ("train.learning_rate", float("nan"), "train.learning_rate must be a finite number"),
        (
            "train.learning_rate",
            float("inf"),
            "train.learning_rate must be a finite number, got inf",
        ),
        ("train.learning_rate", True, "train.learning_rate must be a number, got True"),
        ("train.max_steps", "3", "train.max_steps must be a whole number, got '3'"),
        ("train.max_steps", True, "train.max_steps must be a whole number, got True"),
        ("train.max_steps", 2.5, "train.max_steps must be a whole number, got 2.5"),
        ("train.optimizer", "rmsprop", "train.optimizer must be one of sgd, adam; got 'rmsprop'"),
        ("train.conv", "winograd", "train.conv must be one of auto, direct, fft"),
        ("train.whiten", "zca", "train.whiten must be one of gradient, laplacian, none"),
        ("filter.operation", "convolution", "filter.operation must be one of correlate, convolve"),
        ("filter.padding", "full", "filter.padding must be one of valid, same"),
        ("filter.noise_std", -1, "filter.noise_std must be at least 0"),
        ("data.val_fraction", 1.5, "data.val_fraction must be at most 0.9"),
        ("data.size", 4, "data.size must be at least 8"),
        ("data.source", "", "data.source must be synthetic, mit_scenes, samples, or a path"),
        ("data.categories", ["forest", "moon"], "data.categories: unknown moon; choose from coast"),
        ("data.sha256", "abc", "data.sha256 must be 64 hex digits"),
        ("seed", 1.5, "seed must be a whole number"),
        ("seed", -1, "seed must be at least 0"),
        ("seed", 2**32, "seed must be at most 4294967295, got 4294967296"),
        ("data.size", 100000, "data.size must be at most 4096, got 100000: each image is"),
        ("kernels.gaussian.sigma", 0, "kernels.gaussian.sigma must be from 0.1 to 4096 pixels"),
        ("kernels.gaussian.sigma", 1e200, "kernels.gaussian.sigma must be from 0.1 to 4096"),
        ("kernels.gaussian.sigma", 0.01, "kernels.gaussian.sigma must be from 0.1 to 4096"),
        ("kernels.gaussian.size", 10**9, "kernels.gaussian.size must be at most 4096"),
        ("kernels.box.size", 10**9, "kernels.box.size must be at most 4096, got 1000000000"),
        ("kernels.box.size", "big", "kernels.box.size must be a whole number"),
        ("kernels.box", 7, "kernels.box must be a mapping of settings, got 7"),
        ("train", 3, "train must be a mapping of settings, got 3"),
        ("mlflow.experiment", "", "mlflow.experiment must be a non-empty name, got ''"),
    ],
)
def test_a_bad_value_names_the_key_and_what_is_allowed(path, value, message):
    doc = with_change(path, value)
    if path.startswith("kernels."):
        doc["kernel"] = path.split(".")[1]
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.parse(doc)


def test_every_builtin_kernel_is_accepted_and_listed_on_error():
    for name in kernels.NAMES + kernels.NONLINEAR:
        doc = with_change("kernel", name)
        doc["data"]["channels"] = 3 if name in kernels.COLOUR else 1
        assert config.parse(doc).kernel == name
    with pytest.raises(UserError) as error:
        config.parse(with_change("kernel", "nope"))
    for name in kernels.NAMES + kernels.NONLINEAR:
        assert name in str(error.value)


def test_kernel_settings_are_settable_like_dvc_exp_run_S():
    doc = with_change("kernel", "gaussian")
    doc["kernels"]["gaussian"].update(size=9, sigma=2.0)
    assert config.parse(doc).true_kernel().shape == (9, 9, 1, 1)
    doc["kernels"]["gaussian"]["covariance"] = [[25, 12.5], [12.5, 25]]
    assert config.parse(doc).true_kernel().shape == (9, 9, 1, 1)
    doc = with_change("kernel", "box")
    doc["kernels"]["box"]["size"] = 4
    assert config.parse(doc).true_kernel().shape == (4, 4, 1, 1)


@pytest.mark.parametrize("size", [16, 32, 33])
@pytest.mark.parametrize("crop", [0, 128])
def test_images_too_small_for_the_kernel_are_refused(size, crop):
    # Crops of 0 or larger than the images are whole images: those must fit the kernel + 2.
    doc = with_change("kernel", "smiley")
    doc["data"]["size"], doc["train"]["crop"] = size, crop
    with pytest.raises(UserError) as error:
        config.parse(doc)
    assert str(error.value) == (
        f"kernel: smiley is 32×32, too large for the {size}×{size} images: training needs "
        "images of at least the kernel size + 2 (34); raise data.size or choose a smaller kernel"
    )


@pytest.mark.parametrize("crop", [0, 34, 128])
def test_images_of_the_kernel_size_plus_2_are_enough(crop):
    doc = with_change("kernel", "smiley")
    doc["data"]["size"], doc["train"]["crop"] = 34, crop
    assert config.parse(doc).true_kernel().shape == (32, 32, 1, 1)


def test_a_kernel_too_large_for_the_images_is_refused_before_it_is_built():
    doc = with_change("kernel", "box")
    doc["kernels"]["box"]["size"] = 4096  # 128 MB as float64
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match=r"box is 4096×4096, too large for the 256×256 images"):
            config.parse(doc)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


@pytest.mark.parametrize(
    "covariance, stds",
    [
        ([[1, 0.9999999], [0.9999999, 1]], "0.000316 and 1.41"),  # a diagonal line 1/3000 px wide
        ([[1e-12, 0], [0, 1]], "1e-06 and 1"),
        ([[1e-9, 0], [0, 1e-9]], "3.16e-05 and 3.16e-05"),
        ([[1e8, 0], [0, 1]], "1 and 1e+04"),
    ],
)
def test_a_nearly_singular_too_narrow_or_too_wide_covariance_is_refused(covariance, stds):
    doc = with_change("kernel", "gaussian")
    doc["kernels"]["gaussian"]["covariance"] = covariance
    with pytest.raises(UserError) as error:
        config.parse(doc)
    assert str(error.value).startswith(
        "kernels.gaussian.covariance must have principal standard deviations (the square roots "
        f"of its eigenvalues) from 0.1 to 4096 pixels, like sigma; it has {stds}"
    )


def test_a_crop_smaller_than_the_kernel_is_refused():
    doc = with_change("kernel", "smiley")
    doc["train"]["crop"] = 20
    with pytest.raises(UserError, match="train.crop must be 0 or at least the kernel size"):
        config.parse(doc)


def test_file_kernels_are_loaded_and_checked(tmp_path):
    import numpy as np

    good = tmp_path / "k.npy"
    np.save(good, np.arange(6.0).reshape(2, 3))
    assert config.parse(with_change("kernel", f"file:{good}")).true_kernel().shape == (2, 3, 1, 1)
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


@pytest.mark.parametrize(
    "path, message",
    [
        ("kernal", "kernal: unknown setting; did you mean kernel?"),
        ("trian", "trian: unknown setting; did you mean train?"),
        ("data.catgories", "data.catgories: unknown setting; did you mean data.categories?"),
        ("filter.noise", "filter.noise: unknown setting; did you mean filter.noise_std?"),
        ("train.max_step", "train.max_step: unknown setting; did you mean train.max_steps?"),
        (
            "train.epochs",
            "train.epochs: no longer a setting; training stops when converged now; "
            "cap it with train.max_steps",
        ),
        (
            "mlflow.experiment_name",
            "mlflow.experiment_name: unknown setting; did you mean mlflow.experiment?",
        ),
        ("kernels.gauss", "kernels.gauss: unknown setting; did you mean kernels.gaussian?"),
        ("kernels.box.sise", "kernels.box.sise: unknown setting; did you mean kernels.box.size?"),
        (
            "kernels.gaussian.sigms",
            "kernels.gaussian.sigms: unknown setting; did you mean kernels.gaussian.sigma?",
        ),
        (
            "kernels.gaussian.covariances",
            "kernels.gaussian.covariances: unknown setting; "
            "did you mean kernels.gaussian.covariance?",
        ),
        (
            "train.zzz",
            "train.zzz: unknown setting; choose from recipe, max_steps, tolerance, "
            "min_epoch_steps, batch_size, learning_rate, optimizer, precondition, conv, "
            "whiten, crop, devices, solver",
        ),
    ],
)
def test_an_unknown_key_names_the_closest_valid_one(path, message):
    with pytest.raises(UserError) as error:
        config.parse(with_change(path, 1))
    assert str(error.value) == message


@pytest.mark.parametrize(
    "kernel_settings, key",
    [
        *[
            ({"gaussian": {"sigma": sigma}}, "kernels.gaussian.sigma")
            for sigma in (0, -1.0, "wide", True, float("nan"))
        ],
        *[
            ({"gaussian": {"covariance": cov}}, "kernels.gaussian.covariance")
            for cov in ([[1, 2], [2, 1]], [[1, 0.5], [0.4, 1]], [1, 2, 3], "x", [[1, 0], [0, "a"]])
        ],
        *[
            ({name: {"size": size}}, f"kernels.{name}.size")
            for name in ("box", "gaussian")
            for size in (0, -3, 2.5, "5", True)
        ],
    ],
)
def test_kernel_settings_are_checked_even_for_a_kernel_not_selected(kernel_settings, key):
    doc = defaults()  # kernel: sobel_x, which takes no settings
    for name, changes in kernel_settings.items():
        doc["kernels"][name].update(changes)
    with pytest.raises(UserError) as error:
        config.parse(doc)
    message = str(error.value)
    assert message.startswith(f"{key} must be ") and "\n" not in message


def test_several_problems_name_the_first_and_count_the_rest():
    doc = with_change("train.max_steps", 0)
    doc["train"]["batch_size"] = 0
    doc["filter"]["padding"] = "full"
    with pytest.raises(UserError) as error:
        config.parse(doc)
    assert str(error.value) == "filter.padding must be one of valid, same; got 'full' (and 2 more)"


def test_whole_numbers_and_numbers_keep_their_type():
    params = config.parse(with_change("train.max_steps", 3.0))
    assert params.train.max_steps == 3 and type(params.train.max_steps) is int
    params = config.parse(with_change("train.learning_rate", 1))
    assert params.train.learning_rate == 1.0 and type(params.train.learning_rate) is float
    assert config.parse(with_change("data.categories", "forest, street")).data.categories == (
        "forest",
        "street",
    )


def test_the_models_are_frozen_and_buildable_from_keywords():
    cfg = config.TrainConfig(batch_size=2, crop=32)
    assert (cfg.batch_size, cfg.crop, cfg.max_steps) == (2, 32, 2000)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.max_steps = 3
    assert isinstance(config.parse(defaults()).data.categories, tuple)


@pytest.mark.parametrize("written", ["1e-05", "1E-5", "2.5e-3", ".5", "+1e2", "3.", "1.5E+2"])
def test_numbers_read_as_yaml_1_2_like_dvc_writes_them(tmp_path, written):
    # `dvc exp run -S train.learning_rate=1e-5` writes 1e-05, a string to YAML 1.1
    text = (REPO / "params.yaml").read_text()
    for key in ("learning_rate", "noise_std"):
        text, count = re.subn(rf"^(  {key}:) \S+", rf"\1 {written}", text, flags=re.M)
        assert count == 1
    (tmp_path / "params.yaml").write_text(text)
    params = config.load(tmp_path / "params.yaml")
    assert params.train.learning_rate == params.filter.noise_std == float(written.replace("_", ""))
    assert type(params.train.max_steps) is int and params.kernel == "sobel_x"


def test_params_yaml_holds_exactly_the_models_defaults():
    assert defaults() == config.Params().model_dump(mode="json")
    assert config.parse(defaults()) == config.Params()


def test_the_readme_params_reference_states_the_models_defaults():
    readme = (REPO / "README.md").read_text()
    section = re.search(r"^## Params reference\n(.*?)(?=^## )", readme, re.S | re.M).group(1)
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]*)` \|", section, re.M)
    table = {key: yaml.safe_load(default) for key, default in rows}
    assert len(table) == len(rows), "a key is listed twice"
    assert table == config.flatten(config.Params().model_dump(mode="json"))


def test_flatten_names_nested_keys_with_dots():
    assert config.flatten({"a": 1, "b": {"c": 2, "d": {"e": 3}}}) == {"a": 1, "b.c": 2, "b.d.e": 3}


@pytest.mark.parametrize(
    "change, expected",
    [
        ("kernel: sobel_z", "error: kernel: unknown kernel 'sobel_z'; choose from"),
        ("train: {max_steps: abc}", "error: train.max_steps must be a whole number, got 'abc'"),
        ("seed: 4294967296", "error: seed must be at most 4294967295, got 4294967296"),
        ("data: {size: 100000}", "error: data.size must be at most 4096, got 100000"),
    ],
)
def test_a_stage_reports_a_bad_param_in_one_line_and_exits_non_zero(tmp_path, change, expected):
    doc = defaults()
    doc.update(yaml.safe_load(change))
    lines = filter_stage_errors(tmp_path, doc)
    assert lines == [lines[0]] and lines[0].startswith(expected)


def test_a_stage_names_the_closest_key_for_a_typo(tmp_path):
    doc = defaults()
    doc["train"]["batch_sise"] = 4
    assert filter_stage_errors(tmp_path, doc) == [
        "error: train.batch_sise: unknown setting; did you mean train.batch_size?"
    ]


def filter_stage_errors(tmp_path, doc: dict) -> list[str]:
    """The non-blank stderr lines of `python -m stages.filter` run on `doc` as params.yaml."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    result = subprocess.run(
        [sys.executable, "-m", "stages.filter"],
        cwd=tmp_path,
        text=True,
        capture_output=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "key, value",
    [
        ("registered_model", "a/b"),
        ("registered_model", "x:y"),
        ("registered_model", "  "),
    ],
)
def test_an_mlflow_name_mlflow_would_refuse_after_training_is_refused_at_load(key, value):
    with pytest.raises(UserError, match=rf"^mlflow.{key} must be a name without"):
        config.parse({"mlflow": {key: value}})


def test_data_count_is_bounded_before_anything_is_allocated():
    with pytest.raises(UserError, match=r"^data.count must be at most 1000000, got 1000000000000"):
        config.parse({"data": {"count": 1e12}})


def test_the_original_recipe_is_the_seeds_training():
    cfg = config.parse(with_change("train.recipe", "original")).train
    assert cfg.batch_size == 16, "the params keep their values; effective() applies the recipe"
    used = cfg.effective()
    assert (used.optimizer, used.learning_rate, used.batch_size, used.crop) == ("adam", 1e-3, 1, 0)
    assert (used.whiten, used.precondition) == ("none", "none")
    assert config.Params().train.effective() == config.Params().train


def test_the_original_recipe_refuses_a_key_it_sets():
    doc = with_change("train.recipe", "original")
    doc["train"]["batch_size"] = 4
    with pytest.raises(UserError) as error:
        config.parse(doc)
    assert str(error.value) == (
        "train.recipe original sets train.batch_size to 1 itself; leave "
        "train.batch_size at 16, or use train.recipe fast"
    )


# --- issue 18: channels, colour kernels, activations, banks ---------------------------


def test_the_defaults_are_one_gray_linear_kernel_at_full_resolution():
    params = config.parse(defaults())
    assert params.data.channels == 1 and params.filter.activation == "linear"
    assert params.filter.rescale == 1 and params.linear
    assert params.kernel_names == ("sobel_x",) and params.filter_names == ["sobel_x"]


def test_a_bank_is_a_list_of_kernels_centred_in_the_largest_size():
    params = config.parse(with_change("kernel", ["smiley", "sobel_x", "edge"]))
    assert params.kernel_names == ("smiley", "sobel_x", "edge")
    assert params.kernel_label == "smiley,sobel_x,edge"
    bank = params.true_kernel()
    assert bank.shape == (32, 32, 1, 3)
    np.testing.assert_array_equal(bank[14:17, 14:17, 0, 1], kernels.SOBEL_X)
    np.testing.assert_array_equal(bank[15:17, 15:17, 0, 2], kernels.EDGE)  # offset (32-2)//2
    assert np.count_nonzero(bank[..., 1]) == 6 and np.count_nonzero(bank[..., 2]) == 4


def test_colour_kernels_take_three_channels():
    doc = with_change("kernel", ["red", "green", "blue"])
    doc["data"]["channels"] = 3
    bank = config.parse(doc).true_kernel()
    assert bank.shape == (3, 3, 3, 3)
    np.testing.assert_array_equal(bank[..., 0, 0], np.full((3, 3), 1.5))
    np.testing.assert_array_equal(bank[..., 1, 0], np.full((3, 3), -1.5))


def test_a_colour_file_kernel_is_named_by_its_stem(tmp_path):
    path = tmp_path / "warm.npy"
    np.save(path, np.arange(27.0).reshape(3, 3, 3) + 1)
    doc = with_change("kernel", [f"file:{path}", "red"])
    doc["data"]["channels"] = 3
    params = config.parse(doc)
    assert params.filter_names == ["warm", "red"] and params.true_kernel().shape == (3, 3, 3, 2)


def _error(doc) -> str:
    with pytest.raises(UserError) as error:
        config.parse(doc)
    message = str(error.value)
    assert message and "\n" not in message
    return message


def _with(**changes) -> dict:
    doc = defaults()
    for path, value in changes.items():
        *parents, key = path.split("__")
        node = doc
        for name in parents:
            node = node[name]
        node[key] = value
    return doc


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"filter__activation": "sigmod"},
            "filter.activation: unknown 'sigmod'; did you mean sigmoid? choose from linear, "
            "relu, sigmoid, tanh",
        ),
        (
            {"data__channels": 3},
            "kernel: sobel_x is a 2-D gray kernel (it takes 1 channel), but data.channels is 3; "
            "set data.channels 1, or use a (k, k, 3) kernel such as red",
        ),
        (
            {"kernel": "red"},
            "kernel: red is a colour kernel (it takes 3 channels), but data.channels is 1; "
            "set data.channels 3, or choose a gray kernel",
        ),
        (
            {"kernel": ["sobel_x", "red"]},
            "kernel: the bank mixes gray and colour kernels (sobel_x takes 1 channel, red "
            "takes 3); list kernels of one channel count",
        ),
        (
            {"kernel": []},
            "kernel: the list is empty; name at least one kernel, e.g. kernel: sobel_x",
        ),
        (
            {"kernel": [f"file:k{i}.npy" for i in range(65)]},  # refused before any file is read
            "kernel: a bank of 65 filters, more than the 64 allowed; list at most 64",
        ),
        ({"kernel": ["sobel_x", "sobel_x"]}, "kernel: sobel_x is listed twice"),
        ({"data__channels": 2}, "data.channels must be 1 (grayscale) or 3 (RGB); got 2"),
        # issue 19
        ({"filter__rescale": 3}, "filter.rescale must be 1, 2 or 4"),
        (
            {"kernel": "median", "kernels__median__size": 4},
            "kernels.median.size must be odd (3, 5, 7, …) so that the window has a centre "
            "pixel; got 4: use 3 or 5",
        ),
        ({"kernels__max__size": 1}, "kernels.max.size must be at least 3, got 1"),
        ({"kernel": ["median", "sobel_x"]}, "kernel: median is a non-linear filter and cannot"),
        (
            {"kernel": "median", "filter__activation": "relu"},
            "filter.activation relu after median, which is already non-linear, is refused",
        ),
        (
            {"kernel": "median", "data__channels": 3},
            "kernel: median filters gray images; set data.channels 1",
        ),
        ({"kernel": "edge", "filter__rescale": 2}, "filter.rescale 2 needs an odd-sized kernel"),
        # issue 22, item 8: the filter stage stays under 4 GB at any allowed size
        (
            {
                "data__size": 4096,
                "kernel": [
                    "sobel_x",
                    "sobel_y",
                    "laplacian",
                    "prewitt_x",
                    "prewitt_y",
                    "gaussian",
                    "edge",
                    "smiley",
                ],
            },
            "kernel: a bank of 8 filters on 4096×4096 images needs 3.6 GB per image in the "
            "filter stage; list at most 6 at this size, or lower data.size",
        ),
        (
            {"data__size": 2048, "filter__rescale": 4},
            "filter.rescale 4 makes the targets at 8192² pixels, more than the 4096²",
        ),
    ],
)
def test_each_wrong_new_value_is_one_line_naming_the_key_and_the_fix(changes, message):
    assert _error(_with(**changes)).startswith(message)
