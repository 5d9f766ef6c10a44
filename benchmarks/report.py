"""The targets, checked against one run's results, and BENCHMARKS.md rendered from them."""

from __future__ import annotations

import math

from tabulate import tabulate

THRESHOLDS = (1e-2, 1e-3, 1e-4)
FULL_IMAGES, FULL_SIZE = 2688, 256
TRAIN_LIMIT_S = {"smiley": 60.0, "sobel_x": 20.0, "sobel_y": 20.0}
SPEEDUP_KERNELS, SPEEDUP_AT, SPEEDUP_MIN = ("smiley", "sobel_x"), 1e-3, 100.0
RSS_LIMIT_MB = 2048.0
FLAT_MAX = 1.2  # "flat": peak RSS at the largest scale within 20% of that at 1024 images
FILTER_32_LIMIT_S, NOOP_LIMIT_S, REPRO_LIMIT_S = 20.0, 3.0, 25.0
TOTAL_LIMIT_S = 1500.0  # with issues 18–20's cases: about 25 min on 2 cores
EXP_RUN_LIMIT_S = 12.0  # `dvc exp run -S kernel=smiley` after a default `dvc repro`
SAMPLES_ERROR_MAX = 1e-6  # every kernel on data.source samples, converged
FAST_ERROR, FAST_LIMIT_S, FAST_KERNEL = 1e-8, 3.0, "smiley"  # ... within this much training
GIF_MIN_FRAMES = 15  # distinct frames of a default run's convergence.gif
# Issue 10's measurements, with the fixed 8-epoch trainer: the "before" of its table
ISSUE_BEFORE = {
    "few_photos": 24,
    "few_photos_error": 0.30,
    "many_photos": 600,
    "many_photos_error": 2.9e-5,
    "many_photos_epochs": 8,
    "exp_run_smiley_s": 32.0,
    "full_repro_s": 43.0,
    "gif_frames": 8,
}
PASS, FAIL, NOT_APPLICABLE = "✅", "❌", "–"
PROJECTED = "⚠️"  # met only by projection: the measured lower bound alone falls short


# --- formatting --------------------------------------------------------------------


def seconds(value) -> str:
    return "—" if value is None else f"{value:.1f} s" if value >= 1 else f"{value:.2f} s"


def sci(value) -> str:
    return (
        "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1e}"
    )


def mb(value) -> str:
    return "—" if value is None else f"{value:,.0f} MB"


def table(rows: list[list], headers: list[str]) -> str:
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def stage_label(name: str) -> str:
    if name.startswith("filter:"):
        kernel = name.split(":", 1)[1]
        return f"filter ({kernel}, {'32×32' if kernel == 'smiley' else '3×3'})"
    return name


# --- the speed-ups -------------------------------------------------------------------


def speedups(results: dict) -> list[dict]:
    """Ours against the original to each threshold: measured where the original got there
    within its budget, else a lower bound (its budget / ours) and, for big kernels, the
    projection. Ratios use the time from which ours *stays* at the error (the stricter)."""
    sections = results["sections"]
    ours, original = sections.get("ours", {}), sections.get("original", {})
    rows = []
    for kernel, entry in original.items():
        if kernel == "skipped" or kernel not in ours or ours.get("skipped"):
            continue
        measured = entry["measured"]
        projection = entry.get("projection", {})
        for i, threshold in enumerate(THRESHOLDS):
            mine = ours[kernel]["reached"][i]
            mine_s = mine["settled_s"]
            theirs = measured["reached"][i]["first_s"]
            projected = projection["reached"][i]["projected_s"] if projection else None
            row = {
                "kernel": kernel,
                "threshold": threshold,
                "ours_first_s": mine["first_s"],
                "ours_settled_s": mine_s,
                "projected_s": projected,
                "projected_ratio": _ratio(projected, mine_s),
            }
            if theirs is not None:
                row.update(
                    kind="measured",
                    original_s=theirs,
                    ratio=_ratio(theirs, mine_s),
                    ratio_first=_ratio(theirs, mine["first_s"]),
                )
            else:
                cap = measured["total_s"]
                row.update(
                    kind="lower bound",
                    original_s=cap,
                    ratio=_ratio(cap, mine_s),
                    ratio_first=_ratio(cap, mine["first_s"]),
                )
            rows.append(row)
    return rows


def _times(a, b) -> str:
    ratio = _ratio(a, b)
    return "—" if ratio is None else f"{ratio}×"


def _ratio(a, b):
    return None if a is None or not b else round(a / b, 1)


# --- the targets ---------------------------------------------------------------------


def targets(results: dict) -> list[dict]:
    """Every target with its measured figure and a status: ✅ met, ❌ missed, ⚠️ met only
    by projection, – not applicable to this run's size (a smoke run) or not measured."""
    from benchmarks import report_cases

    results = measured_only(results)
    sections, settings = results["sections"], results["settings"]
    full = settings["images"] == FULL_IMAGES and settings["size"] == FULL_SIZE
    # the dvc section runs params.yaml's data unless --dvc-images, --size or --data change it
    dvc_default = (
        settings.get("dvc_images") is None
        and settings["size"] == FULL_SIZE
        and not settings["data"]
    )
    out: list[dict] = []

    def add(target: str, measured, shown: str, ok, applies: bool | None = None) -> None:
        if measured is None or not (full if applies is None else applies):
            status = NOT_APPLICABLE
        elif isinstance(ok, str):
            status = ok
        else:
            status = PASS if ok else FAIL
        out.append({"target": target, "measured": measured, "shown": shown, "status": status})

    ours = sections.get("ours", {})
    for kernel, run in ours.items():
        if kernel == "skipped":
            continue
        add(
            f"ours, {kernel}: final kernel error ≤ 1e-4",
            run["final_error"],
            sci(run["final_error"]),
            run["final_error"] <= 1e-4,
        )
        if kernel in TRAIN_LIMIT_S:
            limit = TRAIN_LIMIT_S[kernel]
            add(
                f"ours, {kernel}: default training ≤ {limit:.0f} s",
                run["total_s"],
                f"{seconds(run['total_s'])} (stays ≤ 1e-4 from "
                f"{seconds(run['reached'][2]['settled_s'])})",
                run["total_s"] <= limit,
            )
    before = results.get("before") or {}
    like_for_like = (before.get("images"), before.get("size"), before.get("data")) == (
        settings["images"],
        settings["size"],
        settings["data"],
    )
    for kernel, was in before.get("ours", {}).items():
        run = ours.get(kernel)
        if not run or ours.get("skipped"):
            continue
        add(
            f"ours, {kernel}: final kernel error ≤ before ({sci(was['final_error'])}, "
            f"{_before_label(before, kernel)}), converged",
            run["final_error"],
            f"{sci(run['final_error'])}, {_converged(run['converged'])}",
            run["final_error"] <= was["final_error"] and run["converged"],
            full and like_for_like,
        )
    for row in speedups(results):
        if row["kernel"] not in SPEEDUP_KERNELS or row["threshold"] != SPEEDUP_AT:
            continue
        ratio, kind = row["ratio"], row["kind"]
        ok = ratio is not None and ratio >= SPEEDUP_MIN
        shown = f"{ratio}× ({kind})" if ratio is not None else "—"
        if not ok and kind == "lower bound" and (row["projected_ratio"] or 0) >= SPEEDUP_MIN:
            ok = PROJECTED
            shown += f"; projected {row['projected_ratio']}×"
        add(
            f"speed-up vs the original to 1e-3, {row['kernel']} ≥ {SPEEDUP_MIN:.0f}×",
            ratio,
            shown,
            ok,
        )

    stages = sections.get("stages", {})
    scales = stages.get("scales", {})
    if scales:
        largest = scales[str(max(int(n) for n in scales))]
        smiley = largest.get("filter:smiley")
        add(
            f"filter stage, 32×32, {settings['images']} images ≤ {FILTER_32_LIMIT_S:.0f} s",
            smiley and smiley["seconds"],
            seconds(smiley and smiley["seconds"]),
            smiley is not None and smiley["seconds"] <= FILTER_32_LIMIT_S,
        )
        middle = scales.get("1024")
        for name, m in largest.items():
            add(
                f"{stage_label(name)}: peak RSS ≤ 2 GB",
                m["peak_rss_mb"],
                f"{mb(m['peak_rss_mb'])} (anon {mb(m['peak_anon_mb'])})",
                m["peak_rss_mb"] <= RSS_LIMIT_MB,
            )
            if middle and name in middle:
                growth = m["peak_rss_mb"] / middle[name]["peak_rss_mb"]
                anon = m["peak_anon_mb"] / max(middle[name]["peak_anon_mb"], 1e-9)
                add(
                    f"{stage_label(name)}: peak RSS flat 1024 → {settings['images']} images "
                    f"(≤ {FLAT_MAX}×)",
                    round(growth, 2),
                    f"{growth:.2f}× (anon {anon:.2f}×)",
                    growth <= FLAT_MAX,
                )
    samples = sections.get("samples", {})
    on_samples = settings["size"] == FULL_SIZE
    for kernel, run in samples.get("fast", {}).items():
        add(
            f"samples, {kernel}: kernel error ≤ {power(SAMPLES_ERROR_MAX)}, converged",
            run["final_error"],
            f"{sci(run['final_error'])}, {_converged(run['converged'])} after "
            f"{run['trainer_steps']} steps, {seconds(run['total_s'])}",
            run["final_error"] <= SAMPLES_ERROR_MAX and run["converged"],
            on_samples,
        )
    fast = samples.get("fast", {}).get(FAST_KERNEL)
    if fast:
        reached = _reached(fast, FAST_ERROR)
        add(
            f"samples, {FAST_KERNEL}: kernel error ≤ {power(FAST_ERROR)} within "
            f"{FAST_LIMIT_S:.0f} s of training",
            reached["first_s"] if reached["first_s"] is not None else "never",
            f"{seconds(reached['first_s'])}, step {reached['first_step']}"
            if reached["first_s"] is not None
            else f"never (final {sci(fast['final_error'])} at {seconds(fast['total_s'])})",
            reached["first_s"] is not None and reached["first_s"] <= FAST_LIMIT_S,
            on_samples,
        )

    dvc = sections.get("dvc", {})
    if "noop_repro" in dvc:
        noop = dvc["noop_repro"]["median_s"]
        add(
            f"no-op dvc repro ≤ {NOOP_LIMIT_S:.0f} s",
            noop,
            seconds(noop),
            noop <= NOOP_LIMIT_S,
            applies=True,
        )
        full_repro = dvc["full_repro"]["seconds"]
        add(
            f"fresh default dvc repro ≤ {REPRO_LIMIT_S:.0f} s "
            f"(was {ISSUE_BEFORE['full_repro_s']:.0f} s)",
            full_repro,
            seconds(full_repro),
            full_repro <= REPRO_LIMIT_S,
            dvc_default,
        )
        smiley = dvc["exp_run_smiley"]["seconds"]
        add(
            f"`dvc exp run -S kernel=smiley` after it ≤ {EXP_RUN_LIMIT_S:.0f} s "
            f"(was {ISSUE_BEFORE['exp_run_smiley_s']:.0f} s)",
            smiley,
            seconds(smiley),
            smiley <= EXP_RUN_LIMIT_S,
            dvc_default,
        )
        for key in ("full_repro", "exp_run_smiley"):
            run = dvc[key].get("outputs")
            if run:
                add(
                    f"GIF of a default {run['kernel']} run: ≥ {GIF_MIN_FRAMES} distinct "
                    "frames, the first at step 0",
                    run["gif_distinct_frames"],
                    f"{run['gif_distinct_frames']} distinct of {run['gif_frames']} frames, "
                    f"first step {run['first_step']}",
                    run["gif_distinct_frames"] >= GIF_MIN_FRAMES and run["first_step"] == 0,
                    dvc_default,
                )
    report_cases.targets(results, add)
    total = results.get("total_s")
    add(
        f"make bench ≤ {TOTAL_LIMIT_S / 60:.0f} min",
        total,
        seconds(total),
        total is not None and total <= TOTAL_LIMIT_S,
    )
    return out


def measured_only(results: dict) -> dict:
    """The results with each section that failed as a whole ({"error": line}) left empty:
    its targets are then not measured. failed_sections() lists them with their lines."""
    sections = {
        name: {} if isinstance(found, dict) and "error" in found else found
        for name, found in results["sections"].items()
    }
    return {**results, "sections": sections}


def failed_sections(results: dict) -> list[tuple[str, str]]:
    return [
        (name, found["error"])
        for name, found in results["sections"].items()
        if isinstance(found, dict) and "error" in found
    ]


def power(value: float) -> str:
    """1e-06 as 1e-6, the way the targets are written."""
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _reached(run: dict, threshold: float) -> dict:
    return next(r for r in run["reached"] if math.isclose(r["threshold"], threshold))


def _converged(flag: bool) -> str:
    return "converged" if flag else "not converged"


def _before_label(before: dict, kernel: str) -> str:
    epochs = before["ours"][kernel].get("config", {}).get("epochs")
    trainer = f"{epochs}-epoch trainer, " if epochs else ""
    return f"{trainer}commit {before['commit']}"


# --- the markdown --------------------------------------------------------------------


def markdown(results: dict) -> str:
    from benchmarks import report_cases

    failed = failed_sections(results)
    results = measured_only(results)
    sections = results["sections"]
    machine = results["machine"]
    settings = results["settings"]
    v = machine["versions"]
    parts = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` on {results['date']} in {results['total_s'] / 60:.1f} min. "
        "Everything below comes from that one run on one machine and one data set; do not "
        "edit by hand.",
        "",
        f"    {results['command']}",
        "",
        _code(results.get("code")),
        "",
        *(
            ["**The code changed while this ran**: its sections may mix two versions.", ""]
            if results.get("code_changed_during_run")
            else []
        ),
        f"Data: {_data(settings)}, made by the real download stage. "
        "The machine is shared and noisy: the load average is given, single timings can be "
        "off by tens of percent, and ratios are taken within this run.",
        "",
        "## Machine",
        "",
        table(
            [
                ["CPUs", f"{machine['cpus']} ({machine['usable_cpus']} usable)"],
                ["CPU model", machine["cpu_model"]],
                ["memory", f"{machine['memory_gb']} GB"],
                ["Python", machine["python"]],
                ["TensorFlow / Keras", f"{v['tensorflow-cpu']} / {v['keras']}"],
                ["DVC / MLflow", f"{v['dvc']} / {v['mlflow']}"],
                ["NumPy / SciPy", f"{v['numpy']} / {v['scipy']}"],
                [
                    "load average, start → end",
                    f"{machine['load_average_start']} → {machine.get('load_average_end')}",
                ],
            ],
            ["", ""],
        ),
        "",
        "## Targets",
        "",
        table(
            [[t["target"], t["shown"], t["status"]] for t in results["targets"]],
            ["target", "measured", ""],
        ),
        "",
        f"{PASS} met, {FAIL} missed, {PROJECTED} met only by the projection (the measured "
        f"lower bound falls short), {NOT_APPLICABLE} not applicable to this run's size, or "
        "not measured (the line says why).",
        "",
        *(
            [
                "Sections that failed as a whole (their targets are not measured):",
                "",
                *[f"- **{name}**: `{line}`" for name, line in failed],
                "",
            ]
            if failed
            else []
        ),
    ]
    parts += _before_after(results)
    parts += _ours(sections.get("ours", {}))
    parts += _original(results)
    parts += _closed_form(sections.get("closed_form", {}), sections.get("ours", {}))
    parts += _stages(sections.get("stages", {}), sections.get("dvc", {}))
    parts += _scaling(sections.get("stages", {}), sections.get("steps", {}))
    parts += _disk(sections.get("dvc", {}))
    parts += _samples(sections.get("samples", {}))
    parts += report_cases.markdown(results)
    parts += [
        "## Section times",
        "",
        table(
            [[name, seconds(s)] for name, s in results["section_seconds"].items()],
            ["section", "wall"],
        ),
        "",
    ]
    return "\n".join(parts)


def _code(code: dict | None) -> str:
    if not code:
        return "Code: not recorded."
    edited = code["uncommitted"]
    return (
        f"Code: commit {code['commit']}"
        + (
            f", with uncommitted edits to "
            f"{', '.join(edited)} (diff sha1 {code['uncommitted_diff_sha1']})"
            if edited
            else ", no uncommitted edits to src/ or stages/"
        )
        + "."
    )


def _data(settings: dict) -> str:
    count, size = settings["images"], settings["size"]
    if settings["data"]:
        return f"{count} images from {settings['data']}, fitted to {size}×{size}"
    mit = " (as many as the MIT scenes)" if count == FULL_IMAGES else ""
    return f"{count} synthetic dead-leaves colour images{mit}, {size}×{size}"


def _skipped(name: str) -> list[str]:
    return [f"## {name}", "", "Skipped in this run.", ""]


def _ours(ours: dict) -> list[str]:
    title = "1. Our training (src.training.train, params.yaml defaults)"
    if not ours or ours.get("skipped"):
        return _skipped(title)
    rows, notes = [], []
    for kernel, run in ours.items():
        reached = run["reached"]

        def when(r) -> str:
            if r["first_s"] is None:
                return "never"
            text = f"{seconds(r['first_s'])}, step {r['first_step']}"
            if r["settled_s"] is not None and r["settled_s"] > r["first_s"]:
                text += f" (stays from {seconds(r['settled_s'])}, step {r['settled_step']})"
            return text

        per_epoch = run["per_epoch_reached"][2]["seconds"]
        rows.append(
            [
                kernel,
                "×".join(map(str, run["kernel_shape"])),
                run["steps"],
                _yes(run.get("converged")),
                seconds(run["setup_s"]),
                *[when(r) for r in reached],
                seconds(per_epoch),
                sci(run["final_error"]),
                seconds(run["total_s"]),
            ]
        )
        if (run.get("after_fit_s") or 0) > 1:
            notes.append(
                f"- **{kernel}**: `train()` returned {seconds(run['after_fit_s'])} "
                "after `fit()` ended; that time is in its total."
            )
        rise = run.get("max_error_after_1e-2")
        if rise is not None and rise > THRESHOLDS[0]:
            notes.append(
                f"- **{kernel}**: after first reaching 1e-2 at "
                f"{seconds(reached[0]['first_s'])} the error rose again to "
                f"{sci(rise)} (largest |bias| {sci(run['max_abs_bias'])}), and only "
                f"stayed ≤ 1e-4 from {seconds(reached[2]['settled_s'])}."
            )
    cfg = next(iter(ours.values()))["config"]
    return [
        f"## {title}",
        "",
        "On the largest scale's grayscale images and stage-made targets, read as the train "
        "stage reads them, in a process that has trained once already (as the original "
        f"below). Config: {', '.join(f'{k}={v}' for k, v in cfg.items())}. Times are wall seconds "
        "from the call of `train()`, so they include the curvature probe, tf.data start-up "
        "and graph tracing. It trains until converged (the Newton-step rule) or max_steps. "
        "The error ‖w−k‖²/‖k‖² is read between batches (at most every "
        "10 ms, i.e. every batch here); *stays from* is when it fell to the threshold for "
        "good. *per-epoch* is what the epoch callback alone would show.",
        "",
        table(
            rows,
            [
                "kernel",
                "size",
                "steps",
                "converged",
                "first step done",
                *[f"to {power(r['threshold'])}" for r in next(iter(ours.values()))["reached"]],
                "to 1e-4 per-epoch",
                "final error",
                "total",
            ],
        ),
        "",
        *notes,
        "",
    ]


def _yes(flag) -> str:
    return "—" if flag is None else "yes" if flag else "no"


def _before_after(results: dict) -> list[str]:
    """Issue 10's table: its measurements with the 8-epoch trainer, and this run's."""
    sections, settings = results["sections"], results["settings"]
    b = ISSUE_BEFORE
    samples = sections.get("samples", {})
    fast = samples.get("fast", {}).get(FAST_KERNEL)
    slow = samples.get("original", {}).get(FAST_KERNEL)
    ours = sections.get("ours", {}).get(FAST_KERNEL)
    dvc = sections.get("dvc", {})
    dvc = {} if dvc.get("skipped") else dvc

    def trained(run: dict | None, where: str) -> str:
        if not run:
            return "not measured in this run"
        if "converged" not in run:  # a results JSON of the fixed-epoch trainer
            return f"{sci(run['final_error'])} on {where}, {run['steps']} steps"
        return (
            f"{sci(run['final_error'])} on {where}, {_converged(run['converged'])} after "
            f"{run['trainer_steps']} steps ({seconds(run['total_s'])})"
        )

    def gif(key: str) -> str:
        run = dvc.get(key, {}).get("outputs")
        if not run:
            return "not measured in this run"
        return (
            f"{run['kernel']}: {run['gif_distinct_frames']} distinct of {run['gif_frames']}, "
            f"from step {run['first_step']}"
        )

    photos = samples.get("images", {})
    few = f"the {sum(photos.values())} `samples` photos" if photos else "the `samples` photos"
    many = _data(settings) if settings["data"] else f"{settings['images']} synthetic images"
    rows = [
        [
            "smiley on a few real photos: final `kernel_rel_error`",
            f"{b['few_photos_error']:.2f} ({b['few_photos']} photos), exit 0, nothing said",
            trained(fast, few),
        ],
        [
            "the same, the original recipe (`train.recipe original`)",
            "—",
            trained(slow, few),
        ],
        [
            "smiley on many photos: final `kernel_rel_error`",
            f"{b['many_photos_error']:.1e} ({b['many_photos']} real photos, "
            f"{b['many_photos_epochs']} epochs)",
            trained(ours, many),
        ],
        [
            "`dvc exp run -S kernel=smiley` after a default `dvc repro`",
            seconds(b["exp_run_smiley_s"]),
            seconds(dvc["exp_run_smiley"]["seconds"]) if dvc else "not measured in this run",
        ],
        [
            "a fresh default `dvc repro`",
            seconds(b["full_repro_s"]),
            seconds(dvc["full_repro"]["seconds"]) if dvc else "not measured in this run",
        ],
        [
            "frames of `figures/convergence.gif` (distinct, first step)",
            f"{b['gif_frames']}, all identical",
            f"{gif('full_repro')}; {gif('exp_run_smiley')}",
        ],
    ]
    return [
        "## Before and after (issue 10)",
        "",
        "*Before*: issue 10's measurements, with the fixed 8-epoch trainer. *After*: this "
        "run, the trainer that stops when converged. The few-photos row is `data.source: "
        "samples` (section 7); the many-photos row is section 1's data"
        + (
            ""
            if settings["data"]
            else ", synthetic (no collection of real photos comes without a download)"
        )
        + ".",
        "",
        table(rows, ["", "before", "after"]),
        "",
    ]


def _samples(samples: dict) -> list[str]:
    title = "7. A few real photos (data.source: samples)"
    if not samples or samples.get("skipped"):
        return _skipped(title)
    thresholds = [r["threshold"] for r in next(iter(samples["fast"].values()))["reached"]]
    runs = [(kernel, "fast", run) for kernel, run in samples["fast"].items()]
    runs += [(kernel, "original", run) for kernel, run in samples["original"].items()]
    rows = []
    for kernel, recipe, run in runs:
        cfg = run["config"]
        rows.append(
            [
                kernel,
                "×".join(map(str, run["kernel_shape"])),
                recipe,
                f"{run['trainer_steps']} / {cfg['max_steps']}",
                _yes(run["converged"]),
                seconds(run["setup_s"]),
                *[
                    f"{seconds(r['first_s'])}, step {r['first_step']}"
                    if r["first_s"] is not None
                    else "never"
                    for r in run["reached"]
                ],
                sci(run["final_error"]),
                sci(run["newton_step"]),
                seconds(run["total_s"]),
            ]
        )
    d, images = samples["data_params"], samples["images"]
    filters = [m["seconds"] for name, m in samples["stages"].items() if name.startswith("filter")]
    stage_times = (
        f"download {seconds(samples['stages']['download']['seconds'])}, grayscale "
        f"{seconds(samples['stages']['grayscale']['seconds'])}, filter "
        f"{seconds(min(filters))} to {seconds(max(filters))} per kernel"
    )
    return [
        f"## {title}",
        "",
        f"The {images['train'] + images['val']} photographs of scikit-image's wheel "
        f"({images['train']} train, {images['val']} held out), {d['size']}×{d['size']}, "
        f"made by the real stages in a copy of the repo ({stage_times}), then "
        "`src.training.train` in this process as the train stage calls it, after one "
        "untimed warm-up training: the default params (*fast*), and `train.recipe: "
        "original` (Adam 1e-3, batch 1, whole images, no whitening or preconditioning) "
        "with its max_steps. Times from the call of `train()`; the error is read between "
        "batches as in section 1 (*to* = first reached). *Newton step* is what the "
        "stopping rule saw last (converged below train.tolerance).",
        "",
        table(
            rows,
            [
                "kernel",
                "size",
                "recipe",
                "steps / max",
                "converged",
                "first step done",
                *[f"to {power(t)}" for t in thresholds],
                "final error",
                "Newton step",
                "train time",
            ],
        ),
        "",
    ]


def _original(results: dict) -> list[str]:
    title = "2. The original recipe (Conv2D 'same', Adam 1e-3, batch 1, whole images)"
    original = results["sections"].get("original", {})
    if not original or original.get("skipped"):
        return _skipped(title)
    rows = []
    for kernel, entry in original.items():
        m = entry["measured"]
        rows.append(
            [
                kernel,
                seconds(m["budget_s"]),
                m["stopped_by"],
                m["images_seen"],
                m["epochs_seen"],
                f"{1000 * m['step_s']:.1f} ms" if m["step_s"] else "—",
                sci(m["final_error"]),
                *[
                    seconds(r["first_s"]) if r["first_s"] is not None else "not in budget"
                    for r in m["reached"]
                ],
            ]
        )
    speed = []
    for row in speedups(results):
        label = {"measured": "measured", "lower bound": "≥ (lower bound: budget / ours)"}
        speed.append(
            [
                row["kernel"],
                sci(row["threshold"]),
                seconds(row["ours_first_s"]),
                seconds(row["ours_settled_s"]),
                seconds(row["original_s"]),
                f"{row['ratio']}×" if row["ratio"] is not None else "—",
                label[row["kind"]],
                f"{seconds(row['projected_s'])} → {row['projected_ratio']}×"
                if row["projected_s"] is not None
                else "—",
            ]
        )
    notes = []
    for kernel, entry in original.items():
        p = entry.get("projection")
        if p:
            run = entry["projection_run"]
            notes.append(
                f"- **{kernel} projection**: the same recipe with FFTConv2D (same function, "
                f"gradients, initial weights and image order) made {run['steps']} steps in "
                f"{seconds(run['total_s'])}, error {sci(run['final_error'])}. Projected "
                f"original time = its start-up {seconds(p['original_setup_s'])} + steps × its "
                f"measured {1000 * (p['original_step_s'] or 0):.0f} ms/step. On the "
                f"{p['steps_compared']} steps both made, the two error curves differ by at "
                f"most {sci(p['max_log10_drift'])} in log10."
            )
    return [
        f"## {title}",
        "",
        "Keras `Conv2D(1, kernel, padding='same')` with bias, Adam(1e-3), batch size 1, MSE, "
        "on whole images and 'same' targets from `src.filtering.correlate` (made beforehand, "
        "not timed), the training images in a new seeded order each epoch. It stops at its "
        "budget or at 1e-4.",
        "",
        table(
            rows,
            [
                "kernel",
                "budget",
                "stopped by",
                "images seen",
                "epochs",
                "step",
                "error at stop",
                "to 1e-2",
                "to 1e-3",
                "to 1e-4",
            ],
        ),
        "",
        "Speed-up of ours, to the same error (ratio = original / ours-stays-from; "
        "where ours first touches the error earlier the ratio would be larger):",
        "",
        table(
            speed,
            [
                "kernel",
                "error",
                "ours first",
                "ours stays",
                "original",
                "ratio",
                "kind",
                "projected original → ratio",
            ],
        ),
        "",
        *notes,
        "",
    ]


def _closed_form(closed: dict, ours: dict) -> list[str]:
    title = "3. The closed-form least-squares kernel"
    if not closed or closed.get("skipped"):
        return _skipped(title)
    rows = []
    for kernel, run in closed.items():
        mine = ours.get(kernel, {}) if not ours.get("skipped") else {}
        for p in run["passes"]:
            rows.append(
                [
                    kernel,
                    f"{run['system']}×{run['system']}",
                    "Toeplitz solve" if p["pass"] == 0 else f"+ refinement {p['pass']}",
                    seconds(p["seconds"]),
                    sci(p["relative_error"]),
                ]
            )
        if mine:
            settled = mine["reached"][2]["settled_s"]
            rows.append(
                [
                    kernel,
                    "",
                    "ours: stays ≤ 1e-4 from / total",
                    f"{seconds(settled)} / {seconds(mine['total_s'])}",
                    f"{_times(settled, run['total_s'])} / "
                    f"{_times(mine['total_s'], run['total_s'])} the closed form's time",
                ]
            )
    return [
        f"## {title}",
        "",
        "Normal equations over every valid patch of the training images, input and target "
        "whitened with the same derivative filters as ours (the exact solution is unchanged, "
        "XᵀX becomes well conditioned). Xᵀy is exact (an FFT cross-correlation per image); "
        "XᵀX is the Toeplitz matrix of the images' patch-count-weighted FFT autocorrelation, "
        "which misses only which patches touch the border; each refinement pass solves it "
        "again for the exact residual Xᵀ(y − Xw), also by FFT. float32 FFTs, float64 sums.",
        "",
        table(rows, ["kernel", "system", "step", "time", "relative error"]),
        "",
    ]


def _stages(stages: dict, dvc: dict) -> list[str]:
    title = "4. Pipeline stages"
    out = [f"## {title}", ""]
    scales = stages.get("scales", {})
    if scales:
        largest = max(scales, key=int)
        out += [
            f"Each stage as `python -m stages.<name>` in a temporary git + DVC copy of the "
            f"repo at {largest} images, train with {stages['train_kernel']}. Peak memory is "
            "polled every 50 ms over the process tree (the download stage forks workers). "
            "**RSS** also counts the resident pages of any memory-mapped file (a stage that "
            "maps its .npy inputs looks that much bigger, and grows with the data), which "
            "the kernel reclaims at will. **anon** (RssAnon) is the private heap; **USS** "
            "(psutil, sampled every 200 ms) is private pages, mapped file pages included.",
            "",
            table(
                [
                    [
                        stage_label(n),
                        seconds(m["seconds"]),
                        mb(m["peak_rss_mb"]),
                        mb(m["peak_anon_mb"]),
                        mb(m["peak_uss_mb"]),
                    ]
                    for n, m in scales[largest].items()
                ],
                ["stage", "wall", "peak RSS", "peak anon", "peak USS"],
            ),
            "",
        ]
    elif stages.get("skipped"):
        out += ["Stage runs skipped in this run.", ""]
    if dvc and not dvc.get("skipped"):
        d = dvc["data_params"]
        out += [
            f"DVC on the default params (data.count={d.get('count')}, data.limit="
            f"{d.get('limit')}, data.size={d.get('size')}, source {d.get('source')}), in a "
            "fresh copy with MLFLOW_TRACKING_URI a SQLite file inside it. *What it trained*: "
            "its metrics/train.json, and the distinct frames of its figures/convergence.gif "
            "(with the first step of metrics/steps.csv):",
            "",
            table(
                [
                    [
                        "`dvc repro` from scratch",
                        seconds(dvc["full_repro"]["seconds"]),
                        mb(dvc["full_repro"]["peak_rss_mb"]),
                        _trained(dvc["full_repro"]),
                    ],
                    [
                        f"`dvc repro`, no-op (median of {len(dvc['noop_repro']['runs_s'])}: "
                        f"{', '.join(seconds(s) for s in dvc['noop_repro']['runs_s'])})",
                        seconds(dvc["noop_repro"]["median_s"]),
                        "",
                        "",
                    ],
                    [
                        "`dvc exp run -S kernel=smiley`",
                        seconds(dvc["exp_run_smiley"]["seconds"]),
                        mb(dvc["exp_run_smiley"]["peak_rss_mb"]),
                        _trained(dvc["exp_run_smiley"]),
                    ],
                    [
                        "`dvc checkout --relink` to hardlinks",
                        seconds(dvc["relink_hardlink"]["seconds"]),
                        "",
                        "",
                    ],
                    [
                        "`dvc repro`, no-op, hardlinked",
                        seconds(dvc["noop_repro_hardlink"]["seconds"]),
                        "",
                        "",
                    ],
                    *(
                        [
                            [
                                "`dvc exp run -S kernel=sobel_y`, hardlinked",
                                seconds(dvc["exp_run_hardlink"]["seconds"]),
                                mb(dvc["exp_run_hardlink"]["peak_rss_mb"]),
                                _trained(dvc["exp_run_hardlink"]),
                            ]
                        ]
                        if "exp_run_hardlink" in dvc
                        else []
                    ),
                ],
                ["command", "wall", "peak RSS (tree)", "what it trained"],
            ),
            "",
        ]
    elif dvc.get("skipped"):
        out += ["DVC runs skipped in this run.", ""]
    return out


def _trained(measured: dict) -> str:
    run = measured.get("outputs")
    if not run:
        return ""
    train = run["train"]
    return (
        f"{run['kernel']}: {sci(train['kernel_rel_error'])}, "
        f"{_converged(train['converged'])} after {train['steps']} steps "
        f"({seconds(train['train_seconds'])}); GIF {run['gif_distinct_frames']} distinct of "
        f"{run['gif_frames']} frames, from step {run['first_step']}"
    )


def _scaling(stages: dict, steps: dict) -> list[str]:
    out = ["## 5. Scaling", ""]
    scales = stages.get("scales", {})
    if scales:
        counts = sorted(scales, key=int)
        names = list(scales[counts[-1]])
        rows = []
        for name in names:
            cells = []
            for n in counts:
                m = scales[n].get(name)
                cells.append(
                    "—"
                    if m is None
                    else f"{seconds(m['seconds'])} · {mb(m['peak_rss_mb'])} · "
                    f"{mb(m['peak_anon_mb'])}"
                )
            rows.append([stage_label(name), *cells])
        out += [
            "Wall time · peak RSS · peak anon, per stage and image count:",
            "",
            table(rows, ["stage", *[f"{n} images" for n in counts]]),
            "",
        ]
    if steps and not steps.get("skipped"):
        optimizer = (
            "SGD, the gradient times the K-FAC inverse (the identity: same cost)"
            if steps.get("precondition") == "kfac"
            else "SGD"
        )
        rows = [
            [
                f"{r['kernel']}×{r['kernel']}",
                r["taps"],
                f"{r['direct_ms']:.1f} ms",
                f"{r['fft_ms']:.1f} ms",
                f"{r['fft_speedup']:.2f}×",
                r["faster"],
                r["auto"],
                PASS if r["auto"] == r["faster"] else FAIL,
                f"{seconds(r.get('direct_first_s'))} / {seconds(r.get('fft_first_s'))}",
            ]
            for r in steps["rows"]
        ]
        out += [
            f"One train step (`model.train_on_batch`, {optimizer} as in training) on "
            f"{steps['batch_size']} whitened random {steps['crop']}×{steps['crop']} crops, "
            f"median of {steps['repeats']} after 2 warm-up steps; `auto` is direct up to "
            f"src.layers.DIRECT_MAX_TAPS = {steps['direct_max_taps']} taps:",
            "",
            table(
                rows,
                [
                    "kernel",
                    "taps",
                    "direct",
                    "FFT",
                    "FFT speed-up",
                    "faster",
                    "auto",
                    "auto picks the faster",
                    "first step, direct / FFT",
                ],
            ),
            "",
        ]
    return out


def _reflink_note(filesystem: str) -> str:
    if filesystem.startswith("ext"):
        return ", which cannot reflink, so by default DVC copies every output into its cache"
    return ""


def _disk(dvc: dict) -> list[str]:
    out = ["## 6. Disk", ""]
    if not dvc or dvc.get("skipped"):
        return out + ["Skipped in this run.", ""]
    phases = [
        ("after one `dvc repro`", "disk_after_run"),
        ("after `dvc exp run -S kernel=smiley`", "disk_after_second_kernel"),
        ("same, relinked with cache.type hardlink,symlink", "disk_hardlink"),
        ("then `dvc exp run -S kernel=sobel_y`, hardlinked", "disk_hardlink_third_kernel"),
    ]
    phases = [(label, key) for label, key in phases if key in dvc]
    parts = ["workspace_outputs", "dvc_cache", "outputs_and_cache", "mlflow", "git", "total"]
    rows = [[label, *[mb(dvc[key][p]["on_disk_mb"]) for p in parts]] for label, key in phases]
    return out + [
        f"MB on disk (allocated blocks; a hard-linked file counts once). Outputs are data/, "
        f"model/, figures/, metrics/. Default cache.type: {dvc['cache_type_default']}; the "
        f"filesystem is {dvc.get('filesystem', 'unknown')}"
        f"{_reflink_note(dvc.get('filesystem', ''))}.",
        "",
        table(rows, ["", "outputs", "DVC cache", "outputs + cache", "MLflow", "git", "total"]),
        "",
    ]
