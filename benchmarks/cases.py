"""The cases of issues 18–20, each a real pipeline run in a copy of the repo: params.yaml
changed, then the stages that change needs, as `python -m stages.<name>`.

A case is written against params keys and the files the stages write (metrics/train.json,
metrics/history.csv, data/filtered/filter.json), not against the code behind them. Which
stages a change re-runs is read from dvc.yaml's params lists, as DVC decides it, so a
changed `filter.noise_std` re-runs filter and train, and a changed `data.channels`
grayscale too. A stage that fails leaves its one error line in the case: the report then
says "not measured" with that line, and the bench goes on.

Error cases expect a stage to refuse the params with one line (`error: ...`, exit 2, no
traceback) that names the key.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from benchmarks.workspace import Workspace
from devtools.repo_copy import REPO, merge

log = logging.getLogger("bench.cases")

STAGES = ("download", "grayscale", "filter", "train")
BSDS500 = REPO.parent / "shared" / "data" / "bsds500"  # development photos; never required
# an error line that says the key or kernel is not known yet: the feature is not there
MISSING_FEATURE = ("unknown setting", "unknown kernel")
BANK_MAX = 64  # spec: at most this many filters in one bank
MIXED_IMAGES = 512  # the mixed collection: nearly flat photos beside dense textures


@dataclass(frozen=True)
class Case:
    """One run: params on top of the workspace's, up to the stage `until`."""

    id: str
    label: str
    params: dict = field(default_factory=dict)
    until: str = "train"
    error_key: str | tuple[str, ...] | None = None  # an error case: the key (one of the
    # keys) its one line must name
    files: tuple[str, ...] = ()  # kernel files the case writes into the copy (file: kernels)


def bank(*names: str) -> list[str]:
    return list(names)


# --- the cases, per workspace, in the order they run -----------------------------------

FAMILIES = [  # issue 18, on the default synthetic data (then in colour) and samples
    Case("sobel_x", "sobel_x alone", {"kernel": "sobel_x"}),
    Case(
        "bank3",
        "bank [sobel_x, sobel_y, laplacian]",
        {"kernel": bank("sobel_x", "sobel_y", "laplacian")},
    ),
    Case("bank2", "bank [smiley, sobel_x]", {"kernel": bank("smiley", "sobel_x")}),
    Case("edge_relu", "edge + relu", {"kernel": "edge", "filter": {"activation": "relu"}}),
    Case("sobel_x_tanh", "sobel_x + tanh", {"kernel": "sobel_x", "filter": {"activation": "tanh"}}),
    Case(
        "err_activation",
        "filter.activation misspelled (sigmoidd)",
        {"filter": {"activation": "sigmoidd"}},
        "filter",
        "filter.activation",
    ),
    Case("err_empty_bank", "an empty kernel list", {"kernel": []}, "filter", "kernel"),
    Case(
        "err_65_filters",
        f"a bank of {BANK_MAX + 1} filters (file: kernels)",
        {"kernel": [f"file:bench-kernels/k{i:02d}.npy" for i in range(BANK_MAX + 1)]},
        "filter",
        "kernel",
        files=tuple(f"bench-kernels/k{i:02d}.npy" for i in range(BANK_MAX + 1)),
    ),
    Case(
        "red_sigmoid",
        "red + sigmoid, synthetic colour",
        {"data": {"channels": 3}, "kernel": "red", "filter": {"activation": "sigmoid"}},
    ),
    Case(
        "err_2d_on_colour",
        "a 2-D kernel (sobel_x) on data.channels 3",
        {"data": {"channels": 3}, "kernel": "sobel_x"},
        "filter",
        ("kernel", "data.channels"),  # "says what to set"
    ),
    Case(
        "err_mixed_bank",
        "a bank mixing channel counts ([red, sobel_x])",
        {"data": {"channels": 3}, "kernel": bank("red", "sobel_x")},
        "filter",
        "kernel",
    ),
]
FAMILIES_SAMPLES = [
    Case(
        "red_sigmoid_samples",
        "red + sigmoid, samples in colour",
        {"data": {"channels": 3}, "kernel": "red", "filter": {"activation": "sigmoid"}},
    ),
]
NOISE_KERNELS, NOISE_LEVELS = ("sobel_x", "gaussian", "smiley"), (0.01, 0.001)
NOISE_EPOCHS = {0.01: 3, 0.001: 2}  # issue 19: at most this many epochs


def noise_cases(where: str) -> list[Case]:
    suffix = "" if where == "synthetic" else f"_{where}"
    return [
        Case(
            f"noise_{noise}_{kernel}{suffix}",
            f"noise {noise}, {kernel}, {where}",
            {"kernel": kernel, "filter": {"noise_std": noise}},
        )
        for noise in NOISE_LEVELS
        for kernel in NOISE_KERNELS
    ]


NOISE = [  # issue 19, on the default synthetic data
    *noise_cases("synthetic"),
    Case("median", "median 5×5", {"kernel": "median"}),
    Case(
        "err_rescale3",
        "filter.rescale 3",
        {"filter": {"rescale": 3}},
        "grayscale",
        "filter.rescale",
    ),
    Case("err_solver", "train.solver lsq", {"train": {"solver": "lsq"}}, "train", "train.solver"),
    Case("rescale2", "rescale 2, sobel_x", {"kernel": "sobel_x", "filter": {"rescale": 2}}),
]
NOISE_BSDS = noise_cases("bsds500")
MIXED = [Case("mixed_smiley", "smiley on the mixed collection", {"kernel": "smiley"})]
ALL = [*FAMILIES, *FAMILIES_SAMPLES, *NOISE, *NOISE_BSDS, *MIXED]


def selected(cases: list[Case], patterns: list[str]) -> list[Case]:
    return [c for c in cases if any(fnmatch.fnmatchcase(c.id, p) for p in patterns)]


# --- running them ------------------------------------------------------------------


def lookup(doc: dict, dotted: str):
    value = doc
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def error_line(output: str) -> str:
    """A failed stage's error: its `error:` line, else the last line (a traceback's)."""
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    return errors[-1] if errors else lines[-1] if lines else "exited with no output"


class Pipeline:
    """A workspace whose stages re-run only when their params (dvc.yaml) or an upstream
    stage changed since they last ran here."""

    def __init__(self, ws: Workspace, data: dict):
        self.ws = ws
        self.defaults = yaml.safe_load((ws.root / "params.yaml").read_text())
        self.data = data
        stages = yaml.safe_load((ws.root / "dvc.yaml").read_text())["stages"]
        self.params = {
            name: [p for p in stages[name].get("params", []) if isinstance(p, str)]
            for name in STAGES
        }
        self.ran: dict[str, dict] = {}  # stage: its params' values when it last ran

    def run(self, case: Case) -> dict:
        doc = merge(copy.deepcopy(self.defaults), copy.deepcopy({"data": self.data}))
        doc = merge(doc, copy.deepcopy(case.params))
        (self.ws.root / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        for name in case.files:
            path = self.ws.root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(zlib.crc32(name.encode()))
            np.save(path, rng.standard_normal((3, 3)))
        result: dict = {"label": case.label, "params": case.params, "stages": {}}
        if case.error_key:
            keys = case.error_key
            result["error_key"] = [keys] if isinstance(keys, str) else list(keys)
        log.info("case %s: %s", case.id, case.label)
        upstream = False
        for name in STAGES[: STAGES.index(case.until) + 1]:
            values = {p: lookup(doc, p) for p in self.params[name]}
            if not upstream and self.ran.get(name) == values:
                continue
            for later in STAGES[STAGES.index(name) :]:
                self.ran.pop(later, None)  # its outputs are about to change, or be gone
            measured = self.ws.stage(name, f"{name} ({case.id})", check=False)
            result["stages"][name] = measured.as_dict()
            if measured.returncode != 0:
                errors = [ln for ln in measured.output.splitlines() if ln.startswith("error: ")]
                result.update(
                    error=error_line(measured.output),
                    failed_stage=name,
                    one_line=len(errors) == 1 and "Traceback" not in measured.output,
                    traceback="Traceback" in measured.output,
                )
                log.info("case %s: %s", case.id, result["error"])
                return result
            self.ran[name] = values
            upstream = True
        if case.until == "train":
            result.update(outputs(self.ws.root))
        return result


def outputs(root: Path) -> dict:
    """What a train run wrote: metrics/train.json, metrics/history.csv (NaN as None) and
    data/filtered/filter.json, as they are."""
    out: dict = {"train": json.loads((root / "metrics/train.json").read_text())}
    history = pd.read_csv(root / "metrics/history.csv")
    out["history"] = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        for row in history.to_dict("records")
    ]
    info = root / "data/filtered/filter.json"
    if info.exists():
        out["filter"] = json.loads(info.read_text())
    return out


def run_cases(ws: Workspace, data: dict, cases: list[Case]) -> dict:
    pipeline = Pipeline(ws, data)
    return {case.id: pipeline.run(case) for case in cases}


# --- the mixed collection (issue 20) ---------------------------------------------------


def gradient_energy(image: np.ndarray) -> float:
    """Mean squared finite-difference gradient of one (H, W) or (H, W, C) image."""
    a = np.asarray(image, np.float64)
    if a.ndim == 3:
        a = a.mean(axis=-1)
    return float(np.mean(np.diff(a, axis=0)[:, :-1] ** 2 + np.diff(a, axis=1)[:-1] ** 2))


KINDS = ("1-sky", "2-haze", "3-plain", "4-forest")  # folders, in the order of their names


def mixed_collection(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """PNGs like a scene collection of skies beside forests, a folder per kind as a
    collection's categories are (so they come in blocks, by name): dead-leaves images made
    nearly flat (heavily blurred, low contrast: 1-sky), mildly blurred (2-haze), as they
    are (3-plain), and dense (4×4 tiles of small ones: 4-forest), a quarter each."""
    from PIL import Image
    from scipy import ndimage

    from src import dead_leaves

    for i in range(count):
        kind = min(4 * i // count, 3)
        if kind == 3:  # dense: 16 small images tiled, so the leaves are 4× smaller
            tile = size // 4
            rows = [
                np.concatenate(
                    [dead_leaves.render(16 * i + 4 * r + c, tile, seed + 1) for c in range(4)], 1
                )
                for r in range(4)
            ]
            image = np.concatenate(rows, 0)
        else:
            image = dead_leaves.render(i, size, seed).astype(np.float64)
            if kind < 2:  # a sky, or haze
                sigma, contrast = ((3.5, 0.45), (1.5, 0.8))[kind]  # spans ~500×
                blurred = ndimage.gaussian_filter(image, (sigma, sigma, 0))
                image = image.mean() + (blurred - blurred.mean()) * contrast
            image = np.clip(np.round(image), 0, 255).astype(np.uint8)
        (folder / KINDS[kind]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / KINDS[kind] / f"{i:04d}.png")


def gray_span(root: Path) -> dict:
    """Per-image gradient energy of data/gray (what training sees): its span max/min."""
    images = np.load(root / "data/gray/images.npy", mmap_mode="r")
    energies = np.array([gradient_energy(images[i]) for i in range(len(images))])
    return {
        "images": int(len(energies)),
        "min": float(energies.min()),
        "median": float(np.median(energies)),
        "max": float(energies.max()),
        "span": float(energies.max() / energies.min()),
    }
