"""A git + DVC copy of the repo in a temporary directory, with stages run and measured there.

Each stage runs as the real `python -m stages.<name>` subprocess. A thread polls the
whole process tree (the download stage forks workers) for its resident memory:

  rss   VmRSS summed over the tree: what `top` shows. It also counts the resident pages
        of memory-mapped files, which the kernel can drop (clean) or must write back
        (dirty) before it reclaims them.
  anon  RssAnon summed over the tree: the private heap, what the stage really holds.
  uss   psutil's unique set size (private pages, file-backed included), sampled less often.
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import yaml

from devtools.repo_copy import BIN, REPO, clean_env, copy_repo, merge

log = logging.getLogger("bench.workspace")

POLL_S = 0.05  # rss/anon sampling period
USS_EVERY = 4  # one uss sample per this many polls: smaps_rollup is slower to read


@dataclass
class Measured:
    """One subprocess: wall time and the peaks of its process tree's memory, in MB."""

    command: str
    seconds: float
    peak_rss_mb: float
    peak_anon_mb: float
    peak_uss_mb: float
    returncode: int
    # each stage process seen in the tree: [first seen, last seen], seconds from the start
    stage_spans: dict = field(default_factory=dict)
    # DVC's "Running stage" and "Updating lock file" lines, as [seconds from the start, line]
    marks: list = field(default_factory=list)
    output: str = field(default="", repr=False)  # what it printed; not kept in the results

    def as_dict(self) -> dict:
        out = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        del out["output"]
        out["stage_spans"] = {k: [round(t, 2) for t in v] for k, v in self.stage_spans.items()}
        out["marks"] = [[round(t, 2), line] for t, line in self.marks]
        if not out["stage_spans"]:
            del out["stage_spans"]
        if not out["marks"]:
            del out["marks"]
        return out


def _status_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of one process in kB, from /proc/<pid>/status (cheap to read)."""
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return rss, anon


STAGE_PROCESS = re.compile(r"-m\s+stages\.(\w+)")  # a stage's command line, as DVC runs it
# DVC's lines that start, skip or end a stage
DVC_MARK = re.compile(r"(Running stage '|Updating lock file|Stage '.*' (didn't change|is cached))")


class TreeMemory:
    """Polls a process and its descendants until stopped; keeps the peaks of the sums, and
    when each `python -m stages.<name>` in the tree was first and last seen (seconds from
    the start, to within a poll)."""

    def __init__(self, pid: int, start: float | None = None):
        self.root = psutil.Process(pid)
        self.peak_rss = self.peak_anon = self.peak_uss = 0
        self.stages: dict[str, list[float]] = {}  # name: [first seen, last seen]
        self._names: dict[int, str | None] = {}
        self._start = time.perf_counter() if start is None else start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return []

    def _poll(self) -> None:
        polls = 0
        while not self._stop.is_set():
            tree = self._tree()
            self._see_stages(tree)
            sums = [_status_kb(p.pid) for p in tree]
            self.peak_rss = max(self.peak_rss, sum(r for r, _ in sums) * 1024)
            self.peak_anon = max(self.peak_anon, sum(a for _, a in sums) * 1024)
            if polls % USS_EVERY == 0:
                uss = 0
                for p in tree:
                    try:
                        uss += p.memory_full_info().uss
                    except psutil.Error:
                        pass
                self.peak_uss = max(self.peak_uss, uss)
            polls += 1
            self._stop.wait(POLL_S)

    def _see_stages(self, tree: list[psutil.Process]) -> None:
        now = time.perf_counter() - self._start
        for p in tree:
            if p.pid not in self._names:
                try:
                    found = STAGE_PROCESS.search(" ".join(p.cmdline()))
                except psutil.Error:
                    found = None
                self._names[p.pid] = found and found.group(1)
            name = self._names[p.pid]
            if name:
                span = self.stages.setdefault(name, [now, now])
                span[1] = now


class Workspace:
    """A copy of this repo's files (tracked, and untracked but not ignored) in `root`,
    as a fresh git repo, its MLflow store a SQLite file inside it."""

    def __init__(self, root: Path, source: Path = REPO):
        self.root = copy_repo(root, source)
        self.env = clean_env(MLFLOW_TRACKING_URI=f"sqlite:///{self.root / 'mlflow.db'}")

    def run(
        self, *args: str, check: bool = True, timeout: float = 1800
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            list(args), cwd=self.root, env=self.env, text=True, capture_output=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} exited {result.returncode} in {self.root}\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def measure(self, *args: str, timeout: float = 1800, check: bool = True) -> Measured:
        """Run a command; its wall time, its process tree's memory peaks, when each stage
        process ran, and DVC's stage lines, stamped as they came. Fails loudly unless
        `check` is False (then `output` holds what it printed)."""
        start = time.perf_counter()
        lines: list[tuple[float, str]] = []
        env = {**self.env, "PYTHONUNBUFFERED": "1"}  # lines stamped when printed, not flushed
        with subprocess.Popen(
            list(args),
            cwd=self.root,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        ) as proc:
            killer = threading.Timer(timeout, proc.kill)
            killer.start()
            try:
                with TreeMemory(proc.pid, start) as memory:
                    for line in proc.stdout:
                        lines.append((time.perf_counter() - start, line.rstrip("\n")))
                    proc.wait()
            finally:
                killer.cancel()
        seconds = time.perf_counter() - start
        output = "\n".join(line for _, line in lines)
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} exited {proc.returncode} in {self.root}\n{output[-4000:]}"
            )
        mb = 1024 * 1024
        return Measured(
            " ".join(args),
            seconds,
            memory.peak_rss / mb,
            memory.peak_anon / mb,
            memory.peak_uss / mb,
            proc.returncode,
            stage_spans=memory.stages,
            marks=[(t, line) for t, line in lines if DVC_MARK.match(line)],
            output=output,
        )

    def stage(self, name: str, label: str = "", check: bool = True) -> Measured:
        measured = self.measure(str(BIN / "python"), "-m", f"stages.{name}", check=check)
        log.info(
            "stage %-16s %6.1f s  peak rss %6.0f MB, anon %5.0f MB  (%s)",
            label or name,
            measured.seconds,
            measured.peak_rss_mb,
            measured.peak_anon_mb,
            self.root.name,
        )
        return measured

    def dvc(self, *args: str) -> Measured:
        measured = self.measure(str(BIN / "dvc"), *args)
        log.info("dvc %-22s %6.1f s", " ".join(args), measured.seconds)
        return measured

    def set_params(self, changes: dict) -> None:
        path = self.root / "params.yaml"
        doc = merge(yaml.safe_load(path.read_text()), changes)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))

    def commit(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-qm", message)


def repeat_median(run, times: int) -> tuple[float, list[float]]:
    seconds = [run().seconds for _ in range(times)]
    return statistics.median(seconds), seconds


def filesystem(path: Path) -> str:
    """The type of the filesystem holding `path`, from /proc/mounts (ext4, xfs, btrfs...)."""
    path = Path(path).resolve()
    best, kind = "", "unknown"
    with open("/proc/mounts") as handle:
        for line in handle:
            fields = line.split()
            mount = fields[1]
            inside = path == Path(mount) or Path(mount) in path.parents
            if inside and len(mount) > len(best):
                best, kind = mount, fields[2]
    return kind


def disk_usage(*paths: Path) -> dict[str, float]:
    """MB on disk (allocated blocks) and apparent, over all `paths` together; a file
    hard-linked from several places counts once, as `du` counts it."""
    seen: set[tuple[int, int]] = set()
    blocks = apparent = 0
    for top in paths:
        if not top.exists():
            continue
        for folder, _, files in os.walk(top):
            for name in files:
                try:
                    st = os.lstat(os.path.join(folder, name))
                except FileNotFoundError:
                    continue
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                blocks += st.st_blocks * 512
                apparent += st.st_size
    mb = 1024 * 1024
    return {"on_disk_mb": round(blocks / mb, 1), "apparent_mb": round(apparent / mb, 1)}
