"""The targets of issues 18–20 and their sections of BENCHMARKS.md, from one run's results.

Pure formatting: every number comes from the results JSON. A case whose stage failed is
"not measured" with its error line; a key missing from metrics/train.json likewise.
"""

from __future__ import annotations

import math

from benchmarks.report import (
    FAIL,
    FAST_KERNEL,
    FULL_SIZE,
    NOT_APPLICABLE,
    PASS,
    mb,
    power,
    sci,
    seconds,
    table,
)

# issue 18
FAMILY_LIMITS = {  # case: kernel_rel_error at most
    "red_sigmoid": 1e-4,
    "red_sigmoid_samples": 1e-4,
    "edge_relu": 1e-8,
    "sobel_x_tanh": 1e-8,
}
BANK_LIMITS = {"bank3": 1e-12, "bank2": 1e-10}  # each filter's kernel_rel_error/<name>
BANK_TIME_MAX = 1.5  # bank3's training time over sobel_x alone's
FAMILY_EPOCHS = 3
RULE_REASONS = ("optimum", "noise floor")  # stopped by the stopping rule
# issue 19
FLOOR_RATIO_MAX = 1.1  # learned kernel error over the closed form's
NO_NOISE = {"full_repro": ("sobel_x", 1e-17), "exp_run_smiley": ("smiley", 1e-12)}
NO_NOISE_EPOCHS = 2
LSTSQ_LIMIT_S = {"full_repro": ("3×3", 1.0), "exp_run_smiley": ("32×32", 3.0)}
R2_WITHIN = 0.01  # median: learned R² within 1% of the closed form's
# issue 20
EXP_RUN_FLOOR_MAX, REPRO_FLOOR_MAX = 3.0, 5.0  # × the import floor
MIXED_SPAN_MIN, MIXED_ERROR, MIXED_EPOCHS = 300.0, 1e-8, 4
SCALE_TIME_MAX = 1.5  # learning to 1e-8 on all the images over on --small-images
EXP_STAGES = ("filter", "train", "visualize")  # what `dvc exp run -S kernel=smiley` re-runs
MISSING_FEATURE = ("unknown setting", "unknown kernel")  # benchmarks/cases.py's


# --- reading a case ------------------------------------------------------------------


def problem(case: dict | None, *keys: str) -> str | None:
    """Why a case gives no number: not run, its stage failed, or train.json lacks a key."""
    if case is None:
        return "not measured (not run)"
    if "error" in case:
        return f"not measured ({case['error']})"
    missing = [k for k in keys if _number(case.get("train", {}).get(k)) is None]
    if missing:
        return f"not measured (no {', '.join(missing)} in metrics/train.json)"
    return None


def _number(value):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return value if ok and math.isfinite(value) else None


def per_filter(case: dict) -> dict[str, float]:
    """kernel_rel_error/<name> of each filter of a bank, from metrics/train.json."""
    prefix = "kernel_rel_error/"
    train = case.get("train", {})
    return {k[len(prefix) :]: v for k, v in train.items() if k.startswith(prefix)}


def _epochs(count) -> str:
    return f"{count} epoch{'' if count == 1 else 's'}"


def stopped(case: dict) -> str:
    t = case["train"]
    return f"{_epochs(t.get('epochs'))}, {t.get('stop_reason', 'no stop_reason')}"


def by_rule(case: dict, epochs: int) -> bool:
    t = case["train"]
    return (
        bool(t.get("converged")) and t.get("stop_reason") in RULE_REASONS and t["epochs"] <= epochs
    )


def first_epoch(history: list[dict], key: str, threshold: float) -> int | None:
    """The first epoch whose `key` is at most `threshold` (history.csv or ours' epochs)."""
    return next(
        (
            int(row["epoch"])
            for row in history
            if _number(row.get(key)) is not None and row[key] <= threshold
        ),
        None,
    )


def error_check(case: dict | None) -> tuple[object, str, object]:
    """(measured, shown, ok) of an error case: one `error:` line naming its key, no
    traceback; not measured while the key or kernel is unknown to the code."""
    if case is None:
        return None, "not measured (not run)", False
    line = case.get("error")
    if line is None:
        return "accepted", "accepted: the stages ran without an error", False
    if any(marker in line for marker in MISSING_FEATURE):
        return None, f"not measured ({line})", False
    keys = case["error_key"]
    named = any(key in line for key in ([keys] if isinstance(keys, str) else keys))
    ok = case["one_line"] and named and not case["traceback"]
    return line, _short(line), ok


def _error_status(case: dict) -> str:
    measured, _, ok = error_check(case)
    return NOT_APPLICABLE if measured is None else PASS if ok else FAIL


def _short(line: str, width: int = 110) -> str:
    line = line.replace("|", "\\|")
    return line if len(line) <= width else line[: width - 1] + "…"


def settings_of(case: dict) -> str:
    """A case's params as `-S` settings."""

    def flat(doc: dict, prefix: str = ""):
        for key, value in doc.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            elif isinstance(value, list):
                shown = value if len(value) <= 4 else [*value[:2], "…", value[-1]]
                yield f"{prefix}{key}=[{','.join(map(str, shown))}]"
            else:
                yield f"{prefix}{key}={value}"

    return " ".join(f"`{s}`" for s in flat(case.get("params", {})))


def case_label(cid: str, case: dict | None) -> str:
    from benchmarks import cases

    if case:
        return case["label"]
    return next((c.label for c in cases.ALL if c.id == cid), cid)


def _cases(results: dict, section: str) -> dict:
    found = results["sections"].get(section) or {}
    return found.get("cases") or {}


# --- the targets -------------------------------------------------------------------


def targets(results: dict, add) -> None:
    """Append issues 18–20's targets through report.targets' add(target, measured, shown,
    ok, applies)."""
    settings, sections = results["settings"], results["sections"]
    default = settings.get("case_images") is None and settings["size"] == FULL_SIZE
    families = _cases(results, "families")
    for cid, limit in FAMILY_LIMITS.items():
        case = families.get(cid)
        why = problem(case, "kernel_rel_error")
        err = None if why else case["train"]["kernel_rel_error"]
        add(
            f"{case_label(cid, case)}: kernel_rel_error ≤ {power(limit)}",
            err,
            why or f"{sci(err)}, {stopped(case)}",
            err is not None and err <= limit,
            default,
        )
    for cid, limit in BANK_LIMITS.items():
        case = families.get(cid)
        why = problem(case, "kernel_rel_error")
        errors = {} if why else per_filter(case)
        if not why and not errors:
            why = "not measured (no kernel_rel_error/<name> in metrics/train.json)"
        worst = max(errors.values()) if errors else None
        add(
            f"{case_label(cid, case)}: each filter's kernel_rel_error ≤ {power(limit)}",
            worst,
            why or ", ".join(f"{n} {sci(e)}" for n, e in errors.items()),
            worst is not None and worst <= limit,
            default,
        )
    bank, alone = families.get("bank3"), families.get("sobel_x")
    why = problem(bank, "train_seconds") or problem(alone, "train_seconds")
    ratio = None if why else bank["train"]["train_seconds"] / alone["train"]["train_seconds"]
    add(
        f"bank [sobel_x, sobel_y, laplacian]: training ≤ {BANK_TIME_MAX}× sobel_x alone",
        ratio,
        why
        or f"{ratio:.2f}× ({seconds(bank['train']['train_seconds'])} / "
        f"{seconds(alone['train']['train_seconds'])})",
        ratio is not None and ratio <= BANK_TIME_MAX,
        default,
    )
    for cid in (*FAMILY_LIMITS, *BANK_LIMITS):
        case = families.get(cid)
        why = problem(case, "epochs") or (
            None if case.get("train", {}).get("stop_reason") else "not measured (no stop_reason)"
        )
        add(
            f"{case_label(cid, case)}: stopped by the rule (optimum or noise floor) "
            f"in ≤ {FAMILY_EPOCHS} epochs",
            None if why else case["train"]["epochs"],
            why or stopped(case),
            not why and by_rule(case, FAMILY_EPOCHS),
            default,
        )
    for case in families.values():
        if case.get("error_key"):
            measured, shown, ok = error_check(case)
            add(f"one-line error: {case['label']}", measured, shown, ok, True)

    noise = sections.get("noise") or {}
    bsds = (noise.get("data") or {}).get("bsds500", {})
    bsds_full = bsds.get("limit") == 0 and bsds.get("size") == FULL_SIZE
    for cid, case in _cases(results, "noise").items():
        if not cid.startswith("noise_"):
            continue
        level = case["params"]["filter"]["noise_std"]
        epochs = 3 if level >= 0.01 else 2
        why = problem(case, "kernel_rel_error", "lstsq_kernel_rel_error", "epochs")
        ratio = None
        if not why:
            t = case["train"]
            ratio = t["kernel_rel_error"] / t["lstsq_kernel_rel_error"]
            why = None if t.get("stop_reason") else "not measured (no stop_reason)"
        add(
            f"{case['label']}: ≤ {FLOOR_RATIO_MAX}× the closed form's error, ≤ {epochs} epochs, "
            "stopped by the rule",
            ratio,
            why
            or f"{ratio:.2f}× ({sci(case['train']['kernel_rel_error'])} / "
            f"{sci(case['train']['lstsq_kernel_rel_error'])}), {stopped(case)}",
            ratio is not None and ratio <= FLOOR_RATIO_MAX and by_rule(case, epochs),
            bsds_full if cid.endswith("_bsds500") else default,
        )
    noise_cases = _cases(results, "noise")
    median = noise_cases.get("median")
    why = problem(median, "explained_variance", "lstsq_explained_variance")
    gap = None
    if not why:
        r2, ref = median["train"]["explained_variance"], median["train"]["lstsq_explained_variance"]
        gap = (ref - r2) / abs(ref)
    add(
        f"median 5×5: learned R² within {R2_WITHIN:.0%} of the closed form's",
        gap,
        why
        or f"{median['train']['explained_variance']:.4f} vs "
        f"{median['train']['lstsq_explained_variance']:.4f} ({gap:+.2%} below)",
        gap is not None and gap <= R2_WITHIN,
        default,
    )
    rescale = noise_cases.get("rescale2")
    keys = ("explained_variance", "lstsq_explained_variance", "val_loss", "lstsq_val_loss")
    why = problem(rescale, *keys)
    add(
        "rescale 2, sobel_x: R², val_loss and the closed-form reference reported",
        None if why else rescale["train"]["explained_variance"],
        why
        or f"R² {rescale['train']['explained_variance']:.4f} (closed form "
        f"{rescale['train']['lstsq_explained_variance']:.4f}), val_loss "
        f"{sci(rescale['train']['val_loss'])} ({sci(rescale['train']['lstsq_val_loss'])})",
        not why,
        default,
    )
    for case in noise_cases.values():
        if case.get("error_key"):
            measured, shown, ok = error_check(case)
            add(f"one-line error: {case['label']}", measured, shown, ok, True)

    dvc = sections.get("dvc") or {}
    dvc_default = (
        settings.get("dvc_images") is None
        and settings["size"] == FULL_SIZE
        and not settings["data"]
    )
    for key, (kernel, limit) in NO_NOISE.items():
        run = (dvc.get(key) or {}).get("outputs")
        case = {"train": run["train"]} if run and "train" in run else None
        why = problem(case, "kernel_rel_error", "epochs")
        add(
            f"no noise, {kernel} on the default data: ≤ {power(limit)} in ≤ {NO_NOISE_EPOCHS} "
            "epochs (as before)",
            None if why else run["train"]["kernel_rel_error"],
            why or f"{sci(run['train']['kernel_rel_error'])}, {_epochs(run['train']['epochs'])}",
            not why
            and run["train"]["kernel_rel_error"] <= limit
            and run["train"]["epochs"] <= NO_NOISE_EPOCHS,
            dvc_default,
        )
    for key, (size, limit) in LSTSQ_LIMIT_S.items():
        run = (dvc.get(key) or {}).get("outputs")
        case = {"train": run["train"]} if run and "train" in run else None
        why = problem(case, "lstsq_seconds")
        spent = None if why else run["train"]["lstsq_seconds"]
        add(
            f"closed form {size} on the default data (lstsq_seconds) ≤ {limit:.0f} s",
            spent,
            why or seconds(spent),
            spent is not None and spent <= limit,
            dvc_default,
        )

    floor = (dvc.get("import_floor") or {}).get("median_s")
    for key, label, limit in (
        ("exp_run_smiley", "`dvc exp run -S kernel=smiley`", EXP_RUN_FLOOR_MAX),
        ("full_repro", "a fresh default `dvc repro`", REPRO_FLOOR_MAX),
    ):
        run = dvc.get(key)
        ratio = run["seconds"] / floor if run and floor else None
        rerun = ran_stages(run) if run else []
        shown = f"{ratio:.1f}× ({seconds(run['seconds'])} / {seconds(floor)})" if ratio else "—"
        valid = key != "exp_run_smiley" or all(s in rerun for s in EXP_STAGES)
        if ratio and not valid:
            shown += f"; only {', '.join(rerun) or 'no stage'} re-ran"
        add(
            f'{label} ≤ {limit}× the import floor (`python -c "{_floor_imports(dvc)}"`)',
            ratio if valid else None,
            shown,
            ratio is not None and ratio <= limit,
            dvc_default,
        )
    mixed = sections.get("mixed") or {}
    case = _cases(results, "mixed").get("mixed_smiley")
    span = (mixed.get("span") or {}).get("span")
    why = problem(case, "kernel_rel_error")
    epoch = None if why else first_epoch(case["history"], "kernel_rel_error", MIXED_ERROR)
    shown = why or (
        f"epoch {epoch}" if epoch else f"never (final {sci(case['train']['kernel_rel_error'])})"
    )
    if span is not None:
        shown += f"; gradient energy spans {span:,.0f}×"
    add(
        f"smiley ≤ {power(MIXED_ERROR)} within {MIXED_EPOCHS} epochs on a collection spanning "
        f"≥ {MIXED_SPAN_MIN:.0f}× in gradient energy",
        None if why else (epoch or "never"),
        shown,
        epoch is not None and epoch <= MIXED_EPOCHS,
        default and span is not None and span >= MIXED_SPAN_MIN,
    )
    full = settings["images"] == 2688 and settings["size"] == FULL_SIZE
    ours = (sections.get("ours") or {}).get(FAST_KERNEL)
    if ours and "epochs" in ours:
        epoch = first_epoch(ours["epochs"], "kernel_rel_error", MIXED_ERROR)
        add(
            f"smiley ≤ {power(MIXED_ERROR)} within {MIXED_EPOCHS} epochs on "
            f"{settings['images']} synthetic images",
            epoch or "never",
            f"epoch {epoch}" if epoch else f"never (final {sci(ours['final_error'])})",
            epoch is not None and epoch <= MIXED_EPOCHS,
            full,
        )
    scale = sections.get("learning_scale") or {}
    small = scale.get("small")
    if ours and small:
        big_s, small_s = _first_s(ours, MIXED_ERROR), _first_s(small, MIXED_ERROR)
        ratio = big_s / small_s if big_s and small_s else None
        add(
            f"learning time to {power(MIXED_ERROR)}: {settings['images']} images ≤ "
            f"{SCALE_TIME_MAX}× {scale['images']}",
            ratio,
            f"{ratio:.2f}× ({seconds(big_s)} / {seconds(small_s)})"
            if ratio
            else f"never reached ({seconds(big_s)} / {seconds(small_s)})",
            ratio is not None and ratio <= SCALE_TIME_MAX,
            full and scale["images"] == 512,
        )


def _first_s(run: dict, threshold: float):
    found = [r for r in run.get("reached", []) if math.isclose(r["threshold"], threshold)]
    return found[0]["first_s"] if found else None


def _floor_imports(dvc: dict) -> str:
    return (dvc.get("import_floor") or {}).get("imports", "import keras, mlflow, …")


def dvc_spans(run: dict) -> dict[str, float]:
    """Each stage's span in DVC's stamped output: from its "Running stage" line to the
    next "Updating lock file" (its process, then DVC caching its outputs)."""
    prefix, spans, started = "Running stage '", {}, None
    for t, line in run.get("marks", []):
        if line.startswith(prefix):
            started = (line[len(prefix) :].split("'")[0], t)
        elif line.startswith("Updating lock file") and started:
            spans[started[0]] = t - started[1]
            started = None
    return spans


def ran_stages(run: dict) -> list[str]:
    """The stages a dvc command ran, from its "Running stage" lines."""
    prefix = "Running stage '"
    return [
        line[len(prefix) :].split("'")[0]
        for _, line in run.get("marks", [])
        if line.startswith(prefix)
    ]


# --- the markdown --------------------------------------------------------------------


def markdown(results: dict) -> list[str]:
    return [*_families(results), *_noise(results), *_end_to_end(results)]


def _not_run(title: str, section: dict | None) -> list[str] | None:
    if not section or section.get("skipped"):
        return [f"## {title}", "", "Skipped in this run.", ""]
    if "error" in section:
        return [f"## {title}", "", f"Not measured: `{section['error']}`", ""]
    return None


def _case_row(case: dict) -> list:
    if "error" in case:
        return [case["label"], settings_of(case), f"not measured: `{_short(case['error'])}`"]
    t = case["train"]
    errors = per_filter(case)
    shown = sci(t.get("kernel_rel_error"))
    if errors:
        shown += " (" + ", ".join(f"{n} {sci(e)}" for n, e in errors.items()) + ")"
    extra = []
    if _number(t.get("lstsq_kernel_rel_error")) is not None:
        extra.append(f"closed form {sci(t['lstsq_kernel_rel_error'])}")
    if _number(t.get("explained_variance")) is not None:
        ref = t.get("lstsq_explained_variance")
        extra.append(
            f"R² {t['explained_variance']:.4f}"
            + (f" (closed form {ref:.4f})" if _number(ref) is not None else "")
        )
    train_s = case["stages"].get("train", {})
    return [
        case["label"],
        settings_of(case),
        f"{shown}; {stopped(case)}; {t.get('steps')} steps; training "
        f"{seconds(t.get('train_seconds'))}"
        + (f", closed form {seconds(t['lstsq_seconds'])}" if "lstsq_seconds" in t else "")
        + (f"; {'; '.join(extra)}" if extra else "")
        + f"; train stage {seconds(train_s.get('seconds'))}, {mb(train_s.get('peak_rss_mb'))}",
    ]


def _cases_tables(cases: dict) -> list[str]:
    runs = [_case_row(c) for c in cases.values() if not c.get("error_key")]
    errors = [
        [c["label"], settings_of(c), f"`{_short(c['error'])}`" if "error" in c else "accepted"]
        + [_error_status(c)]
        for c in cases.values()
        if c.get("error_key")
    ]
    out = []
    if runs:
        out += [table(runs, ["case", "params", "metrics/train.json"]), ""]
    if errors:
        out += [
            "Refused params: the stage's one line (✅: exactly one `error:` line naming the "
            "key, no traceback):",
            "",
            table(errors, ["case", "params", "error line", ""]),
            "",
        ]
    return out


def _families(results: dict) -> list[str]:
    title = "8. Colour, activations and filter banks (issue 18)"
    section = results["sections"].get("families")
    skipped = _not_run(title, section)
    if skipped:
        return skipped
    data = section["data"]
    return [
        f"## {title}",
        "",
        f"Each case is params.yaml changed in a fresh copy of the repo, then the stages the "
        f"change needs (by dvc.yaml's params lists), run as `python -m stages.<name>`; the "
        f"numbers are the stage's own metrics/train.json. Data: {_data(data['synthetic'])}, "
        f"and {_data(data['samples'])}.",
        "",
        *_cases_tables(section["cases"]),
    ]


def _noise(results: dict) -> list[str]:
    title = "9. Noise floor, closed form, non-linear filters and rescaling (issue 19)"
    section = results["sections"].get("noise")
    skipped = _not_run(title, section)
    if skipped:
        return skipped
    data = section["data"]
    where = _data(data["synthetic"])
    if "bsds500" in data:
        where += f", and {_data(data['bsds500'])}"
    else:
        where += "; ../shared/data/bsds500 is not here, so its cases did not run"
    return [
        f"## {title}",
        "",
        f"As section 8. Data: {where}. The closed form is the train stage's own least-squares "
        "filter on all training images (`lstsq_*` in metrics/train.json); the floor ratio is "
        "the learned kernel_rel_error over the closed form's.",
        "",
        *_cases_tables(section["cases"]),
    ]


def _data(data: dict) -> str:
    source = data.get("source")
    count = f"{data['count']} " if source == "synthetic" and "count" in data else ""
    limit = f", data.limit {data['limit']}" if data.get("limit") else ""
    name = "synthetic images (params.yaml's count)" if source == "synthetic" and not count else ""
    return f"{count}{name or source}{limit} at {data.get('size')}²"


def _end_to_end(results: dict) -> list[str]:
    out = ["## 10. End to end against the import floor, and mixed collections (issue 20)", ""]
    dvc = results["sections"].get("dvc") or {}
    floor = dvc.get("import_floor")
    if floor:
        imports = floor["stages_s"]
        out += [
            f'Import floor: `python -c "{floor["imports"]}"` took '
            f"{', '.join(seconds(s) for s in floor['runs_s'])} (before the default repro, after "
            f"it, after the smiley experiment): median **{seconds(floor['median_s'])}**. Each "
            'stage\'s own floor is `python -c "import stages.<name>"` (start-up and the '
            "imports of its module). A stage's wall time is from when its process was first "
            "to last seen (polled every 50 ms); *DVC's span* is from DVC's stamped `Running "
            "stage` line to its next `Updating lock file` (the process, then DVC caching its "
            "outputs); *DVC (outside the stages)* is the rest of the command's time.",
            "",
        ]
        rows = []
        for key, label in (
            ("full_repro", "fresh `dvc repro`"),
            ("exp_run_smiley", "`dvc exp run -S kernel=smiley`"),
        ):
            run = dvc.get(key)
            if not run:
                continue
            spans = run.get("stage_spans", {})
            stamped = dvc_spans(run)
            total_stages = 0.0
            for name, (first, last) in spans.items():
                wall = last - first
                total_stages += wall
                own = imports.get(name)
                rows.append(
                    [
                        label,
                        name,
                        seconds(wall),
                        seconds(own),
                        seconds(wall - own) if own is not None else "—",
                        seconds(stamped.get(name)),
                    ]
                )
            outside = seconds(run["seconds"] - total_stages)
            rows.append([label, "DVC (outside the stages)", outside, "", "", ""])
            rows.append(
                [
                    label,
                    "**total**",
                    f"**{seconds(run['seconds'])}** = {run['seconds'] / floor['median_s']:.1f}× "
                    "the floor",
                    "",
                    "",
                    "",
                ]
            )
        headers = ["command", "stage", "wall", "import floor", "above it", "DVC's span"]
        out += [table(rows, headers), ""]
    else:
        out += ["The DVC section did not run: no import floor or per-stage table.", ""]
    mixed = results["sections"].get("mixed") or {}
    span = mixed.get("span")
    if span:
        out += [
            f"Mixed collection: {span['images']} PNGs built in the bench "
            f"({seconds(mixed.get('build_s'))}), a folder per kind as a collection's "
            "categories are, so they come in blocks by name: dead-leaves images heavily "
            "blurred at low contrast (1-sky), mildly blurred (2-haze), as they are (3-plain), "
            "and dense (4×4 tiles of small ones: 4-forest), a quarter each. Per-image gradient "
            "energy (mean squared finite difference of data/gray) "
            f"from {sci(span['min'])} to {sci(span['max'])} (median {sci(span['median'])}): "
            f"a span of **{span['span']:,.0f}×**.",
            "",
        ]
    if mixed.get("cases"):
        out += _cases_tables(mixed["cases"])
    scale = results["sections"].get("learning_scale") or {}
    ours = (results["sections"].get("ours") or {}).get(FAST_KERNEL)
    if scale.get("small") and ours:
        rows = [
            [
                f"{n} images",
                seconds(_first_s(run, MIXED_ERROR)),
                seconds(run.get("setup_s")),
                sci(run["final_error"]),
                len(run.get("epochs", [])),
                seconds(run["total_s"]),
            ]
            for n, run in ((scale["images"], scale["small"]), ("all", ours))
        ]
        out += [
            f"Learning {FAST_KERNEL} in this process (as section 1) on the first "
            f"{scale['images']} images and on all of them:",
            "",
            table(
                rows,
                ["data", f"to {power(MIXED_ERROR)}", "first step", "final", "epochs", "total"],
            ),
            "",
        ]
    return out
