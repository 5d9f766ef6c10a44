"""`make bench`: one run, one machine, one data set; writes BENCHMARKS.md and a JSON twin.

    python -m benchmarks.bench            # the full run (~20 min on 2 shared cores)
    python -m benchmarks.bench --quick    # 8 images of 64×64: a smoke run (~4 min), written
                                          # to benchmarks/quick/ (git-ignored), not BENCHMARKS.md
    python -m benchmarks.bench --only families --cases bank3    # one case, full size, also
                                          # to benchmarks/quick/ (see benchmarks/cases.py)

BENCHMARKS.md and results.json are written together, when the run ends: Ctrl-C leaves them
as they were, with one line to say so.

Sections, in the order they run:
  stages       every stage as `python -m stages.<name>` in a temporary git + DVC copy of
               the repo, at each --scales image count: wall time and peak memory
  dvc          `dvc repro` from scratch and as a no-op, `dvc exp run -S kernel=smiley`,
               disk use, and the cache link types; each run's metrics/train.json and the
               distinct frames of its convergence GIF
               (each run's stages timed next to their import floor, and the floor of
               `python -c "import keras, mlflow, matplotlib.pyplot, scipy.ndimage"`)
  samples      data.source samples (13 real photographs): the stages up to filter for each
               --samples-kernels kernel in a copy, then src.training.train on each, and the
               original recipe (train.recipe original) on smiley for --samples-original-steps
  families     issue 18: colour, activations, banks and their one-line errors, each a run
               of the real stages in a copy (benchmarks/cases.py)
  noise        issue 19: the noise floor against the closed form on synthetic data and on
               ../shared/data/bsds500 (if present), median, rescale, their errors
  mixed        issue 20: smiley on a built collection whose gradient energy spans ≥ 300×
  ours         src.training.train on the largest scale's stage outputs, error read between batches
  learning_scale  the same for smiley on the first --small-images of them
  closed_form  the least-squares kernel on the same data
  original     the original recipe under a time budget (and, for big kernels, its projection)
  steps        train step time against kernel size, direct vs FFT
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import psutil
import yaml

from benchmarks import report
from benchmarks.workspace import Measured, Workspace, disk_usage, filesystem, repeat_median
from devtools.repo_copy import BIN, REPO
from src import atomic, interrupts
from src.stack import Stack  # light: numpy only, unlike the TensorFlow modules imported late

log = logging.getLogger("bench")

# on the largest scale's stage outputs
LEARNING = ("ours", "learning_scale", "closed_form", "original", "steps")
CASES = ("families", "noise", "mixed")  # issues 18–20, benchmarks/cases.py
SECTIONS = ("stages", "dvc", "samples", *CASES, *LEARNING)
OURS_THRESHOLDS = (1e-2, 1e-3, 1e-4, 1e-8)  # 1e-8: issue 20's learning-time target
# the imports the pipeline cannot avoid (issue 20): the floor its times are taken against
FLOOR_IMPORTS = "import keras, mlflow, matplotlib.pyplot, scipy.ndimage"
PIPELINE_STAGES = ("fingerprint", "download", "grayscale", "filter", "train", "visualize")
SAMPLE_KERNELS = ("sobel_x", "sobel_y", "laplacian", "gaussian", "smiley")
SAMPLE_THRESHOLDS = (1e-4, 1e-6, 1e-8)
STAGE_KERNELS = ("smiley", "sobel_x")  # the filter stage at 32×32 and 3×3; sobel_x last, as
# params.yaml's default, so train sees its targets
QUICK = dict(
    images=8,
    size=64,
    scales=[8],
    kernels=["sobel_x"],
    original_budget=3.0,
    projection_budget=3.0,
    step_sizes=[3, 9],
    step_crop=32,
    step_repeats=3,
    noop_repeats=1,
    dvc_images=8,
    samples_kernels=["sobel_x", "smiley"],
    samples_original_steps=20,
    case_images=16,
    small_images=4,
    mixed_images=16,
    bsds_limit=8,
    cases=["sobel_x", "bank2", "err_activation", "noise_0.01_sobel_x", "mixed_smiley"],
)
OUT_MD, OUT_JSON = REPO / "BENCHMARKS.md", REPO / "benchmarks" / "results.json"  # committed
QUICK_OUT = REPO / "benchmarks" / "quick"  # git-ignored: a smoke run is not the record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--images", type=int, default=2688, help="images in the largest run (the MIT scenes' count)"
    )
    parser.add_argument("--size", type=int, default=256, help="data.size of the images")
    parser.add_argument(
        "--scales",
        type=_ints,
        default=[1024, 2688],
        help="image counts the stages run at (the --images count is added)",
    )
    parser.add_argument("--kernels", type=_names, default=["sobel_x", "sobel_y", "smiley"])
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a local folder or .zip of images instead of synthetic dead leaves",
    )
    parser.add_argument(
        "--original-budget",
        type=float,
        default=90.0,
        help="seconds the original recipe may train, per kernel (smiley's is cut short "
        "by it, then projected)",
    )
    parser.add_argument(
        "--reference-kernels",
        type=_names,
        default=["sobel_x", "smiley"],
        help="kernels (of --kernels) the closed form and the original recipe run on",
    )
    parser.add_argument(
        "--projection-budget",
        type=float,
        default=150.0,
        help="seconds for the FFT projection of the original, per big kernel",
    )
    parser.add_argument(
        "--refinements",
        type=int,
        default=1,
        help="closed form: refinement passes after the Toeplitz solve",
    )
    parser.add_argument("--step-sizes", type=_ints, default=[3, 5, 7, 9, 11, 13, 15, 17, 32, 64])
    parser.add_argument("--step-crop", type=int, default=128)
    parser.add_argument("--step-repeats", type=int, default=7)
    parser.add_argument("--noop-repeats", type=int, default=3)
    parser.add_argument(
        "--dvc-images",
        type=int,
        default=None,
        help="data.count for the dvc section (default: params.yaml's)",
    )
    parser.add_argument(
        "--samples-kernels",
        type=_names,
        default=list(SAMPLE_KERNELS),
        help="kernels the samples section learns from data.source samples",
    )
    parser.add_argument(
        "--samples-original-steps",
        type=int,
        default=600,
        help="train.max_steps of the original recipe on samples (smiley)",
    )
    parser.add_argument(
        "--case-images",
        type=int,
        default=None,
        help="data.count of the synthetic data the cases run on (default: params.yaml's)",
    )
    parser.add_argument(
        "--small-images",
        type=int,
        default=512,
        help="learning_scale: smiley on this many of the largest scale's images",
    )
    parser.add_argument(
        "--mixed-images", type=int, default=512, help="photos in the mixed collection"
    )
    parser.add_argument(
        "--bsds-limit", type=int, default=0, help="data.limit on the BSDS500 photos (0: all)"
    )
    parser.add_argument(
        "--cases",
        type=_names,
        default=["*"],
        help="the cases of families, noise and mixed to run (ids, or patterns like noise_*)",
    )
    parser.add_argument("--skip", type=_names, default=[], help=f"any of {', '.join(SECTIONS)}")
    parser.add_argument(
        "--only",
        type=_names,
        default=[],
        help="run only these sections, e.g. --only families --cases bank3 for one case",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()),
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the repo copies go (default: a new temporary directory)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the workdir afterwards")
    parser.add_argument(
        "--out-md", type=Path, default=None, help=f"default {OUT_MD.name}; --quick: in {QUICK_OUT}"
    )
    parser.add_argument(
        "--out-json",
        type=Path,
        default=None,
        help=f"default {OUT_JSON.relative_to(REPO)}; --quick: in {QUICK_OUT}",
    )
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="only rewrite --out-md from a saved results JSON",
    )
    args = parser.parse_args(argv)
    if args.quick:  # its settings, where the command line left the default
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    # a smoke run, or one section or case, is not the record: benchmarks/quick/ unless asked
    partial = args.quick or args.only or args.cases != parser.get_default("cases")
    out = QUICK_OUT if partial else None
    args.out_md = args.out_md or (out / OUT_MD.name if out else OUT_MD)
    args.out_json = args.out_json or (out / OUT_JSON.name if out else OUT_JSON)
    for option in ("skip", "only"):
        unknown = set(getattr(args, option)) - set(SECTIONS)
        if unknown:
            parser.error(
                f"--{option}: unknown {', '.join(sorted(unknown))}; use {', '.join(SECTIONS)}"
            )
    if args.only:
        args.skip = sorted(set(args.skip) | (set(SECTIONS) - set(args.only)))
    args.scales = sorted(set(args.scales) | {args.images})
    return args


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


# --- the machine -------------------------------------------------------------------


def machine() -> dict:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    versions = {
        name: metadata.version(name)
        for name in ("tensorflow-cpu", "keras", "dvc", "mlflow", "numpy", "scipy", "psutil")
    }
    return {
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
    }


def code_state() -> dict:
    """The commit measured, and which of its files were edited but not committed."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout

    changed = [
        line.split(maxsplit=1)[1]
        for line in git(
            "status", "--porcelain", "--", "src", "stages", "params.yaml", "dvc.yaml"
        ).splitlines()
    ]
    diff = git("diff", "HEAD", "--", "src", "stages", "params.yaml", "dvc.yaml")
    return {
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        "uncommitted": changed,
        "uncommitted_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12],
    }


def baseline(path: Path) -> dict | None:
    """What our training is compared with: the previous results' own baseline, carried
    over, or else, from a full-size run, that run's ours section (the first time: the
    8-epoch trainer's). Delete "before" from the results JSON to take a new baseline."""
    if not path.exists():
        return None
    previous = json.loads(path.read_text())
    if previous.get("before"):
        return previous["before"]
    settings, ours = previous["settings"], previous["sections"].get("ours", {})
    full = (settings["images"], settings["size"]) == (report.FULL_IMAGES, report.FULL_SIZE)
    if not full or not ours or ours.get("skipped"):
        return None
    return {
        "date": previous["date"],
        "commit": previous["code"]["commit"],
        "images": settings["images"],
        "size": settings["size"],
        "data": settings["data"],
        "ours": {
            kernel: {key: run[key] for key in ("final_error", "steps", "total_s", "config")}
            for kernel, run in ours.items()
        },
    }


# --- sections ----------------------------------------------------------------------


def data_params(args: argparse.Namespace, count: int) -> dict:
    if args.data:
        return {"data": {"source": str(args.data.resolve()), "limit": count, "size": args.size}}
    return {"data": {"source": "synthetic", "count": count, "limit": 0, "size": args.size}}


def run_stages(args, workdir: Path) -> tuple[dict, Workspace]:
    """Every stage at every scale; the largest scale's copy is kept for the learning sections,
    with data/filtered-<kernel>/ holding each kernel's stage-made targets."""
    scales = {}
    largest = None
    for count in args.scales:
        ws = Workspace(workdir / f"stages-{count}")
        ws.set_params(data_params(args, count))
        ws.commit("bench")
        kernels = list(STAGE_KERNELS)
        if count == args.images:
            kernels = [k for k in args.kernels if k not in kernels] + kernels
        stages = {"download": ws.stage("download"), "grayscale": ws.stage("grayscale")}
        stages.update(filter_each(ws, kernels))
        stages["train"] = ws.stage("train")
        stages["visualize"] = ws.stage("visualize")
        scales[str(count)] = {name: m.as_dict() for name, m in stages.items()}
        if count == args.images:
            largest = ws
        else:
            shutil.rmtree(ws.root)
    return {"scales": scales, "train_kernel": STAGE_KERNELS[-1]}, largest


def filter_each(ws: Workspace, kernels: list[str]) -> dict[str, Measured]:
    """The filter stage once per kernel, each one's targets kept in data/filtered-<kernel>/;
    the last kernel's stay in data/filtered/ too (hard links), where train looks."""
    measured = {}
    for kernel in kernels:
        ws.set_params({"kernel": kernel})
        measured[f"filter:{kernel}"] = ws.stage("filter", f"filter {kernel}")
        kept = ws.root / f"data/filtered-{kernel}"
        if kernel == kernels[-1]:
            shutil.copytree(ws.root / "data/filtered", kept, copy_function=os.link)
        else:
            os.rename(ws.root / "data/filtered", kept)
    return measured


def run_dvc(args, workdir: Path) -> dict:
    """The default pipeline from scratch, as a no-op, with a second kernel, and relinked."""
    ws = Workspace(workdir / "dvc")
    data = {"size": args.size}
    if args.data:
        data["source"] = str(args.data.resolve())
    if args.dvc_images is not None:
        data["limit" if args.data else "count"] = args.dvc_images
    ws.set_params({"data": data})
    ws.commit("bench")
    dvc = str(BIN / "dvc")
    result = {"data_params": yaml.safe_load((ws.root / "params.yaml").read_text())["data"]}
    floor = [import_time(ws, FLOOR_IMPORTS)]  # three times, between the runs it measures
    result["full_repro"] = {**ws.dvc("repro").as_dict(), "outputs": run_outputs(ws.root)}
    floor.append(import_time(ws, FLOOR_IMPORTS))
    # each stage's own floor, `python -c "import stages.<name>"` (its module and what it
    # imports): after the fresh repro (which compiled them, as a fresh clone does) and after
    # the experiment, the faster of the two (the machine is shared)
    stage_floors = [stage_import_times(ws)]
    ws.commit("first run")
    median, runs = repeat_median(lambda: ws.dvc("repro"), args.noop_repeats)
    result["noop_repro"] = {"median_s": round(median, 3), "runs_s": [round(s, 3) for s in runs]}
    result["disk_after_run"] = disk(ws.root)
    result["exp_run_smiley"] = {
        **ws.dvc("exp", "run", "-S", "kernel=smiley").as_dict(),
        "outputs": run_outputs(ws.root),
    }
    floor.append(import_time(ws, FLOOR_IMPORTS))
    stage_floors.append(stage_import_times(ws))
    result["import_floor"] = {
        "imports": FLOOR_IMPORTS,
        "median_s": round(float(np.median(floor)), 3),
        "runs_s": [round(t, 3) for t in floor],
        "stages_s": {
            name: round(min(times[name] for times in stage_floors), 3) for name in PIPELINE_STAGES
        },
    }
    log.info("import floor %.2f s (%s)", result["import_floor"]["median_s"], floor)
    result["disk_after_second_kernel"] = disk(ws.root)
    result["filesystem"] = filesystem(ws.root)
    result["cache_type_default"] = (
        ws.run(dvc, "config", "cache.type", check=False).stdout.strip()
        or "unset: reflink, else copy"
    )
    ws.run(dvc, "config", "cache.type", "hardlink,symlink")
    result["relink_hardlink"] = ws.dvc("checkout", "--relink").as_dict()
    result["disk_hardlink"] = disk(ws.root)
    result["noop_repro_hardlink"] = ws.dvc("repro").as_dict()
    ws.commit("second kernel")
    result["exp_run_hardlink"] = {
        **ws.dvc("exp", "run", "-S", "kernel=sobel_y").as_dict(),
        "outputs": run_outputs(ws.root),
    }
    result["disk_hardlink_third_kernel"] = disk(ws.root)
    shutil.rmtree(ws.root)
    return result


def import_time(ws: Workspace, imports: str) -> float:
    """Wall seconds of `python -c "<imports>"` in the workspace: start-up and imports."""
    return ws.measure(str(BIN / "python"), "-c", imports).seconds


def stage_import_times(ws: Workspace) -> dict[str, float]:
    return {name: import_time(ws, f"import stages.{name}") for name in PIPELINE_STAGES}


def run_outputs(root: Path) -> dict:
    """What a run left in the workspace: its kernel, metrics/train.json, the first step of
    metrics/steps.csv, and how many of figures/convergence.gif's frames differ."""
    from PIL import Image, ImageSequence

    from src import paths, stage_files

    with contextlib.chdir(root):  # stage outputs are named relative to the repo root
        steps = stage_files.read_steps()
    with Image.open(root / paths.FIGURES / "convergence.gif") as gif:
        # each frame as displayed (Pillow composites a frame onto the ones before it)
        frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)]
    distinct = {hashlib.sha1(frame.tobytes()).hexdigest() for frame in frames}
    return {
        "kernel": yaml.safe_load((root / "params.yaml").read_text())["kernel"],
        "train": json.loads((root / paths.TRAIN_METRICS).read_text()),
        "snapshots": len(steps),
        "first_step": int(steps["step"].iloc[0]),
        "gif_frames": len(frames),
        "gif_distinct_frames": len(distinct),
    }


def disk(root: Path) -> dict:
    """MB on disk of each part of a workspace, and of all of it (hard links counted once)."""
    outputs = [root / p for p in ("data", "model", "figures", "metrics")]
    return {
        "workspace_outputs": disk_usage(*outputs),
        "dvc_cache": disk_usage(root / ".dvc" / "cache"),
        "mlflow": disk_usage(root / "mlflow.db", root / "mlartifacts"),
        "git": disk_usage(root / ".git"),
        "outputs_and_cache": disk_usage(*outputs, root / ".dvc" / "cache"),
        "total": disk_usage(root),
    }


class Data:
    """The largest scale's stage outputs, read as the train stage reads them."""

    def __init__(self, ws: Workspace):
        from src import config, stage_files

        self.root = ws.root
        with contextlib.chdir(ws.root):  # stage outputs are named relative to the repo root
            self.params = config.load()
            self.images = stage_files.open_gray_images()
            self.split = stage_files.read_index()["split"].to_numpy()
        self.train_rows = np.flatnonzero(self.split == "train")

    def targets(self, kernel: str) -> tuple[np.ndarray, np.ndarray]:
        folder = self.root / f"data/filtered-{kernel}"
        return (Stack(folder / "targets.npy"), np.load(folder / "kernel.npy").astype(np.float64))


def run_samples(args, workdir: Path) -> dict:
    """The few-real-photos case: data.source samples at --size, the stages up to filter for
    each kernel, then src.training.train with the default params on each, and with
    train.recipe original on smiley (or the last kernel) for --samples-original-steps."""
    from benchmarks import learning

    ws = Workspace(workdir / "samples")
    ws.set_params({"data": {"source": "samples", "size": args.size}})
    ws.commit("bench")
    stages = {"download": ws.stage("download"), "grayscale": ws.stage("grayscale")}
    stages.update(filter_each(ws, args.samples_kernels))
    data = Data(ws)
    warm_up(data, args.samples_kernels[0])  # untimed, as before section ours

    def learn(kernel: str, cfg) -> dict:
        targets, true_kernel = data.targets(kernel)
        log.info("samples: %s, train.recipe %s", kernel, cfg.recipe)
        return learning.ours(
            data.images,
            targets,
            true_kernel,
            data.split,
            data.params.filter.padding,
            cfg,
            data.params.seed,
            SAMPLE_THRESHOLDS,
        )

    cfg = data.params.train
    fast = {kernel: learn(kernel, cfg) for kernel in args.samples_kernels}
    slow = "smiley" if "smiley" in args.samples_kernels else args.samples_kernels[-1]
    original = cfg.model_copy(
        update={"recipe": "original", "max_steps": args.samples_original_steps}
    )
    result = {
        "data_params": data.params.data.model_dump(),
        "images": {split: int(np.sum(data.split == split)) for split in ("train", "val")},
        "stages": {name: m.as_dict() for name, m in stages.items()},
        "fast": fast,
        "original": {slow: learn(slow, original)},
    }
    shutil.rmtree(ws.root)
    return result


def case_data(args) -> dict:
    """The synthetic data of the cases: params.yaml's (512 images), unless --case-images."""
    data = {"source": "synthetic", "limit": 0, "size": args.size}
    if args.case_images is not None:
        data["count"] = args.case_images
    return data


def run_case_group(args, workdir: Path, name: str, data: dict, group: list) -> dict:
    """The selected cases of one group in a fresh copy, one after another."""
    from benchmarks import cases

    chosen = cases.selected(group, args.cases)
    if not chosen:
        return {}
    ws = Workspace(workdir / name)
    ws.commit("bench")
    try:
        return cases.run_cases(ws, data, chosen)
    finally:
        shutil.rmtree(ws.root, ignore_errors=True)


def run_families(args, workdir: Path) -> dict:
    from benchmarks import cases

    samples = {"source": "samples", "limit": 0, "size": args.size}
    data = {"synthetic": case_data(args), "samples": samples}
    return {
        "data": data,
        "cases": {
            **run_case_group(args, workdir, "families", data["synthetic"], cases.FAMILIES),
            **run_case_group(args, workdir, "families-samples", samples, cases.FAMILIES_SAMPLES),
        },
    }


def run_noise(args, workdir: Path) -> dict:
    from benchmarks import cases

    data = {"synthetic": case_data(args)}
    found = run_case_group(args, workdir, "noise", data["synthetic"], cases.NOISE)
    bsds = {"source": str(cases.BSDS500), "limit": args.bsds_limit, "size": args.size}
    if cases.BSDS500.is_dir() and cases.selected(cases.NOISE_BSDS, args.cases):
        data["bsds500"] = bsds
        found.update(run_case_group(args, workdir, "noise-bsds", bsds, cases.NOISE_BSDS))
    return {"data": data, "bsds500_present": cases.BSDS500.is_dir(), "cases": found}


def run_mixed(args, workdir: Path) -> dict:
    """Smiley on a collection built here whose photos' gradient energy spans ≥ 300×."""
    from benchmarks import cases

    chosen = cases.selected(cases.MIXED, args.cases)
    if not chosen:
        return {"cases": {}}
    folder = workdir / "mixed-photos"
    start = time.perf_counter()
    cases.mixed_collection(folder, args.mixed_images, args.size)
    built = time.perf_counter() - start
    data = {"source": str(folder), "limit": 0, "size": args.size}
    ws = Workspace(workdir / "mixed")
    ws.commit("bench")
    try:
        found = cases.run_cases(ws, data, chosen)
        span = cases.gray_span(ws.root) if (ws.root / "data/gray/images.npy").exists() else None
    finally:
        shutil.rmtree(ws.root, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    if span:
        log.info("mixed collection: gradient energy spans %.0f×", span["span"])
    return {"data": data, "build_s": round(built, 1), "span": span, "cases": found}


def run_ours(args, data: Data) -> dict:
    from benchmarks import learning

    results = {}
    for kernel in args.kernels:
        targets, true_kernel = data.targets(kernel)
        log.info("ours: %s", kernel)
        results[kernel] = learning.ours(
            data.images,
            targets,
            true_kernel,
            data.split,
            data.params.filter.padding,
            data.params.train,
            data.params.seed,
            OURS_THRESHOLDS,
        )
    return results


def run_learning_scale(args, data: Data) -> dict:
    """Smiley on the first --small-images images (their own split), as ours runs it on all:
    issue 20's learning time to 1e-8 on 2688 images against 512."""
    from benchmarks import learning

    kernel = report.FAST_KERNEL
    if kernel not in args.kernels:
        return {}
    rows = np.arange(min(args.small_images, len(data.split)))
    targets, true_kernel = data.targets(kernel)
    log.info("learning_scale: %s on %d images", kernel, len(rows))
    run = learning.ours(
        data.images[rows],
        targets[rows],
        true_kernel,
        data.split[rows],
        data.params.filter.padding,
        data.params.train,
        data.params.seed,
        OURS_THRESHOLDS,
    )
    return {"kernel": kernel, "images": len(rows), "small": run}


def run_closed_form(args, data: Data) -> dict:
    from benchmarks import learning

    results = {}
    for kernel in [k for k in args.kernels if k in args.reference_kernels]:
        targets, true_kernel = data.targets(kernel)
        results[kernel] = learning.closed_form(
            data.images, targets, data.train_rows, true_kernel, args.refinements
        )
    return results


def run_original(args, data: Data, workdir: Path) -> dict:
    from benchmarks import learning
    from src import layers

    results = {}
    rows = data.train_rows
    for kernel in [k for k in args.kernels if k in args.reference_kernels]:
        _, true_kernel = data.targets(kernel)
        path = workdir / f"same-{kernel}.npy"
        start = time.perf_counter()
        same = np.lib.format.open_memmap(
            path, mode="w+", dtype=np.float32, shape=(len(rows), *data.images.shape[1:3])
        )
        learning.same_targets(data.images, rows, true_kernel, same)
        same.flush()
        prep = time.perf_counter() - start
        same = np.load(path, mmap_mode="r")
        log.info("original: %s ('same' targets of %d images in %.1f s)", kernel, len(rows), prep)
        run = learning.original(
            data.images, rows, same, true_kernel, args.original_budget, data.params.seed
        )
        initial = run.pop("_initial")
        entry = {"same_targets_s": round(prep, 3), "measured": run}
        short = run["stopped_by"] == "budget"
        if short and layers.choose_conv(learning.plane(true_kernel).shape, "auto") == "fft":
            log.info("original: %s projection with FFTConv2D", kernel)
            fft_run = learning.original(
                data.images,
                rows,
                same,
                true_kernel,
                args.projection_budget,
                data.params.seed,
                conv="fft",
                initial=initial,
            )
            fft_run.pop("_initial")
            entry["projection_run"] = fft_run
            entry["projection"] = learning.project(run, fft_run)
        results[kernel] = entry
        del same
        path.unlink()
    return results


def run_steps(args, data: Data) -> dict:
    from benchmarks import steps
    from src import layers

    cfg = data.params.train
    rows = steps.step_times(
        data.images,
        args.step_sizes,
        cfg,
        args.step_crop,
        args.step_repeats,
        data.params.seed,
    )
    return {
        "rows": rows,
        "batch_size": cfg.batch_size,
        "precondition": cfg.precondition if cfg.optimizer == "sgd" else "none",
        "crop": args.step_crop,
        "repeats": args.step_repeats,
        "direct_max_taps": layers.DIRECT_MAX_TAPS,
    }


def warm_up(data: Data, kernel: str = STAGE_KERNELS[-1]) -> None:
    """The first training in a process pays one-time start-up costs (seen: ~1.5 s); the
    contenders then share a warm process. 16 steps on a few images, untimed."""
    from benchmarks import learning

    targets, true_kernel = data.targets(kernel)
    cfg = data.params.train.model_copy(update={"max_steps": 16})
    rows = np.sort(np.concatenate([data.train_rows[:6], np.flatnonzero(data.split == "val")[:2]]))
    learning.train(
        data.images[rows],
        targets[rows],
        true_kernel,
        data.split[rows],
        data.params.filter.padding,
        cfg,
        data.params.seed,
    )


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = parse_args(argv)
    try:
        return measure(args, argv)
    except KeyboardInterrupt:  # Ctrl-C, also in a stage or dvc the run started
        outputs = " and ".join(str(_shown(path)) for path in (args.out_md, args.out_json))
        print(
            f"error: interrupted; {outputs} are as they were (a run writes them when it ends), "
            "rerun to measure",
            file=sys.stderr,
        )
        sys.exit(130)


def failure_line(exc: Exception) -> str:
    """A failed section's one line: the error line of the stage or dvc it ran, else the
    exception's own."""
    from benchmarks import cases

    return cases.error_line(f"{type(exc).__name__}: {exc}")


def _shown(path: Path) -> Path:
    path = path.resolve()
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def measure(args: argparse.Namespace, argv: list[str] | None) -> dict:
    if args.render:
        render(args.render, args.out_md)
        return json.loads(args.render.read_text())
    started = time.perf_counter()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="llf-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(
            ["python -m benchmarks.bench", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine(),
        "code": code_state(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "before": baseline(args.out_json),  # read before this run overwrites it
        "sections": {},
        "section_seconds": {},
    }
    sections = results["sections"]

    def timed(name: str, run) -> None:
        if name in args.skip:
            sections[name] = {"skipped": True}
            return
        start = time.perf_counter()
        log.info("== %s", name)
        try:
            sections[name] = run()
        except Exception as exc:  # reported as not measured, with its line; the rest still run
            log.exception("section %s failed", name)
            sections[name] = {"error": failure_line(exc)}
        results["section_seconds"][name] = round(time.perf_counter() - start, 1)

    try:
        largest: list[Workspace] = []

        def stages() -> dict:
            result, ws = run_stages(args, workdir)
            largest.append(ws)
            return result

        timed("stages", stages)
        timed("dvc", lambda: run_dvc(args, workdir))
        timed("samples", lambda: run_samples(args, workdir))
        timed("families", lambda: run_families(args, workdir))
        timed("noise", lambda: run_noise(args, workdir))
        timed("mixed", lambda: run_mixed(args, workdir))
        data = None
        if set(LEARNING) - set(args.skip):
            try:
                if not largest:  # stages skipped: make only the data the learning sections use
                    only = argparse.Namespace(**{**vars(args), "scales": [args.images]})
                    largest.append(run_stages(only, workdir)[1])
                data = Data(largest[0])
                warm_up(data)
            except Exception as exc:  # each learning section then says why it is missing
                log.exception("the learning sections' data")
                failed = {"error": failure_line(exc)}
                data = None
        learning = {
            "ours": lambda: run_ours(args, data),
            "learning_scale": lambda: run_learning_scale(args, data),
            "closed_form": lambda: run_closed_form(args, data),
            "original": lambda: run_original(args, data, workdir),
            "steps": lambda: run_steps(args, data),
        }
        for name, run in learning.items():
            if data is None and name not in args.skip:
                sections[name] = dict(failed)
            else:
                timed(name, run)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results["total_s"] = round(time.perf_counter() - started, 1)
    results["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    results["code_changed_during_run"] = code_state() != results["code"]
    results = write(json.loads(json.dumps(results, default=_plain)), args.out_json, args.out_md)
    log.info("wrote %s and %s in %.0f s", args.out_md, args.out_json, results["total_s"])
    return results


def render(json_path: Path, md_path: Path) -> dict:
    """Check the targets and write the markdown from a results JSON (also after the fact:
    `python -m benchmarks.bench --render benchmarks/results.json`)."""
    return write(json.loads(json_path.read_text()), json_path, md_path)


def write(results: dict, json_path: Path, md_path: Path) -> dict:
    """The results with their targets checked, as JSON and markdown: both made first, then
    each file replaced whole, Ctrl-C held back in between, so the two always match."""
    results["targets"] = report.targets(results)
    texts = {json_path: json.dumps(results, indent=1) + "\n", md_path: report.markdown(results)}
    with interrupts.uninterrupted():
        for path, text in texts.items():
            with atomic.atomic_file(path) as handle:
                handle.write(text)
    return results


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON: {type(value).__name__}")


if __name__ == "__main__":
    main()
