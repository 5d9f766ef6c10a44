"""Fetch an image archive over HTTP and unpack it safely.

`download` streams to `<dest>.part`, resumes it with an HTTP Range request after
a cut, Ctrl-C or full disk, and renames it to `dest` only once the whole body
has arrived (and matched the sha256 pin, if any). `extract_zip` unpacks an
archive while refusing zip slip, symlinks and zip bombs.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import stat
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import requests
from filelock import FileLock, Timeout
from tqdm import tqdm

from src.atomic import atomic_file
from src.errors import UserError

log = logging.getLogger(__name__)

CHUNK = 1 << 16
OFFLINE_HINT = (
    "use data.source=synthetic (the default, no network), data.source=samples (13 photos "
    "in the scikit-image wheel, no network) or a path to your own folder or .zip of images"
)


def _size(n: int | None) -> str:
    return "an unknown size" if n is None else tqdm.format_sizeof(n, "B", 1024)


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# --- download ------------------------------------------------------------------


def download(
    url: str, dest: Path, *, sha256: str = "", progress: bool = True, timeout: float = 30
) -> Path:
    """Download `url` to `dest`, resuming a partial `.part`; nothing half-written is ever at `dest`.

    An existing `dest` that matches `sha256` (or any, with no pin) is returned
    without touching the network. `timeout` is per connect and per read, in seconds.
    """
    dest = Path(dest)
    sha256 = sha256.strip().lower()
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Two runs sharing the cache (e.g. queued experiments) must not append to one .part.
    with _exclusive(dest.with_name(dest.name + ".lock")):
        if dest.exists():
            if not sha256 or file_sha256(dest) == sha256:
                log.info("using %s, already downloaded", dest)
                return dest
            log.warning("%s does not match the sha256 pin; downloading it again", dest)
            dest.unlink()
        _fetch(url, part, progress=progress, timeout=timeout)
        if sha256:
            actual = file_sha256(part)
            if actual != sha256:
                part.unlink()
                raise UserError(
                    f"{url} downloaded with sha256 {actual}, but data.sha256 pins "
                    f"{sha256}; re-run to download it again, or correct data.sha256 "
                    "if the archive changed upstream"
                )
        os.replace(part, dest)
    log.info("downloaded %s (%s)", dest, _size(dest.stat().st_size))
    return dest


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold a file lock, saying so if another process has it first."""
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another run to finish downloading (%s)", lock_path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _unreachable(url: str, exc: Exception, timeout: float) -> UserError:
    parts = urlsplit(url)
    host = parts.hostname or url
    if parts.port:
        host = f"{host}:{parts.port}"
    text = str(exc)
    if isinstance(exc, requests.Timeout):
        why = f"no answer within {timeout:g} s"
    elif isinstance(exc, requests.exceptions.SSLError):
        why = "the TLS handshake failed"
    elif "NameResolution" in text or "resolve" in text:
        why = "the host name did not resolve"
    elif "refused" in text:
        why = "the connection was refused"
    else:
        why = "no connection"
    return UserError(f"cannot reach {host} ({why}); you may be offline: {OFFLINE_HINT}")


def _content_range(resp: requests.Response) -> tuple[int | None, int | None]:
    """(first byte, total) from `Content-Range: bytes a-b/total` or `bytes */total`."""
    match = re.fullmatch(
        r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", resp.headers.get("Content-Range", "")
    )
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def _fetch(url: str, part: Path, *, progress: bool, timeout: float) -> None:
    """Bring `part` to the full body of `url`, appending to what it already holds."""
    offset = part.stat().st_size if part.exists() else 0
    # identity: Content-Length and Range must count the bytes we store, not gzip's.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = requests.get(url, headers=headers, stream=True, timeout=timeout)
    except (
        requests.exceptions.MissingSchema,
        requests.exceptions.InvalidSchema,
        requests.exceptions.InvalidURL,
    ) as exc:
        raise UserError(
            f"cannot download {url!r}: not a valid http(s) URL ({exc}); fix the URL"
        ) from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise _unreachable(url, exc, timeout) from None

    with resp:
        start, total = _content_range(resp)
        if resp.status_code == 416 and offset:
            if total == offset:
                log.info("%s is already complete", part)
                return
            # The partial file is longer than the remote one, so it is not a prefix of it.
            log.warning("%s does not fit %s (%s remote); starting over", part, url, _size(total))
            part.unlink()
            return _fetch(url, part, progress=progress, timeout=timeout)
        if resp.status_code == 206:
            if start != offset:
                if not offset:
                    raise UserError(
                        f"{url} answered a request for the whole file with a part "
                        f"of it (from byte {start}); check the URL"
                    )
                log.warning("%s answered the wrong range (from %s); starting over", url, start)
                part.unlink()
                return _fetch(url, part, progress=progress, timeout=timeout)
            mode = "ab"
            if total is None and "Content-Length" in resp.headers:
                total = offset + int(resp.headers["Content-Length"])
        elif resp.status_code == 200:
            if offset:
                log.info("%s does not support resuming; starting over", url)
            mode, offset = "wb", 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length else None
        else:
            raise UserError(
                f"download failed: HTTP {resp.status_code} {resp.reason} for {url}; "
                f"check the URL or try again later, or {OFFLINE_HINT}"
            )
        done = _stream(resp, part, mode, offset, total, url, progress)

    if total is not None and done < total:
        raise UserError(
            f"download of {url} ended early at {_size(done)} of {_size(total)}; "
            f"re-run to resume, the partial file {part} is kept"
        )
    if total is not None and done > total:
        part.unlink()
        raise UserError(
            f"{url} sent {_size(done)}, more than the {_size(total)} it announced; "
            "re-run to download it again"
        )


def _stream(
    resp: requests.Response,
    part: Path,
    mode: str,
    offset: int,
    total: int | None,
    url: str,
    progress: bool,
) -> int:
    """Write the body to `part` with a progress bar; return the bytes `part` now holds."""
    done = offset
    # Off a terminal, tqdm's redraws become log lines: draw rarely there.
    interval = 0.5 if sys.stderr.isatty() else 30
    try:
        with (
            open(part, mode) as out,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                mininterval=interval,
                disable=not progress,
            ) as bar,
        ):
            for chunk in resp.iter_content(CHUNK):
                out.write(chunk)
                done += len(chunk)
                bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    except requests.RequestException as exc:
        raise UserError(
            f"download of {url} was cut at {_size(done)} of {_size(total)} "
            f"({type(exc).__name__}); re-run to resume, the partial file {part} "
            "is kept"
        ) from None
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        free = shutil.disk_usage(part.parent).free
        needs = (
            f"needs {_size(total - done)} ({total - done} bytes) more"
            if total is not None
            else "needs more"
        )
        raise UserError(
            f"no space left on the device holding {part.parent}: the download "
            f"{needs} and {_size(free)} ({free} bytes) are free; free up space and "
            "re-run to resume, the partial file is kept"
        ) from None
    return done


# --- extract -------------------------------------------------------------------


class _OverCap(Exception):
    pass


class _CappedWriter:
    """Counts the bytes on their way to `out` and stops past `limit`: declared sizes can lie."""

    def __init__(self, out, limit: int):
        self.out, self.limit, self.written = out, limit, 0

    def write(self, data: bytes) -> int:
        self.written += len(data)
        if self.written > self.limit:
            raise _OverCap
        return self.out.write(data)


_DRIVE = re.compile(r"^[A-Za-z]:")


def entry_path(name: str) -> str:
    """Where extract_zip puts entry `name`, relative to its folder: `./a.png` and `a.png`
    both land on `a.png`, `x//b.png` and `x\\b.png` on `x/b.png`."""
    return "/".join(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))


def _entry_parts(archive: Path, info: zipfile.ZipInfo) -> list[str]:
    """The entry's path components, or UserError if it could land outside the folder."""
    name = info.filename.replace("\\", "/")
    parts = [p for p in entry_path(name).split("/") if p]
    if name.startswith("/") or _DRIVE.match(name) or ".." in parts:
        raise UserError(
            f"{archive}: entry {info.filename!r} points outside the extraction folder "
            "(zip slip); refusing the archive, use one from a trusted source"
        )
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UserError(
            f"{archive}: entry {info.filename!r} is a symbolic link; refusing the "
            "archive, repack it with plain files"
        )
    return parts


def extract_zip(
    archive: Path,
    dest_dir: Path,
    *,
    members: Callable[[str], bool] | None = None,
    max_entries: int = 100_000,
    max_total_bytes: int = 4 * 2**30,
) -> list[Path]:
    """Unpack the files of `archive` that `members(name)` accepts under `dest_dir`; return them.

    Refuses the whole archive if any entry escapes `dest_dir` or is a symlink, if it
    has more than `max_entries` entries, or if the chosen files would unpack to more
    than `max_total_bytes`. Of chosen entries that land on one path (see entry_path),
    the first in the archive is written and the rest skipped, never overwriting it.
    Each file is written atomically, but files extracted before an error stay:
    extract into `src.atomic.atomic_dir` for all or nothing.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    fix = "delete it and re-run to download it again, or point data.source at a valid .zip"
    try:
        zf = zipfile.ZipFile(archive)
    except FileNotFoundError:
        raise UserError(f"{archive} not found; check the path in data.source") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as exc:
        raise UserError(f"{archive} is not a readable zip archive ({exc}); {fix}") from None

    with zf:
        infos = zf.infolist()
        if len(infos) > max_entries:
            raise UserError(
                f"{archive} has {len(infos)} entries, more than the {max_entries} "
                "allowed; it is not the expected image archive, check where it "
                "came from"
            )
        root = dest_dir.resolve()
        chosen, taken = [], set()
        for info in infos:
            parts = _entry_parts(archive, info)
            if info.is_dir() or not parts or (members is not None and not members(info.filename)):
                continue
            target = dest_dir.joinpath(*parts)
            if target in taken:
                continue
            taken.add(target)
            if not target.resolve().is_relative_to(root):  # e.g. through a symlinked subfolder
                raise UserError(
                    f"{archive}: entry {info.filename!r} would land outside "
                    f"{dest_dir}; remove the symlink inside {dest_dir}"
                )
            chosen.append((info, target))
        declared = sum(info.file_size for info, _ in chosen)
        if declared > max_total_bytes:
            raise UserError(
                f"{archive} would unpack to {_size(declared)}, more than the "
                f"{_size(max_total_bytes)} allowed (a zip bomb?); check where it "
                "came from"
            )

        budget = max_total_bytes
        extracted = []
        for info, target in chosen:
            try:
                with zf.open(info) as src, atomic_file(target, "wb") as out:
                    writer = _CappedWriter(out, budget)
                    shutil.copyfileobj(src, writer, CHUNK)
            except _OverCap:
                raise UserError(
                    f"{archive}: entry {info.filename!r} unpacks past the "
                    f"{_size(max_total_bytes)} limit although its header says less "
                    "(a zip bomb?); check where it came from"
                ) from None
            except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                raise UserError(
                    f"{archive} is corrupt at entry {info.filename!r} ({exc}); {fix}"
                ) from None
            except (RuntimeError, NotImplementedError) as exc:  # encrypted, unknown compression
                raise UserError(
                    f"{archive}: cannot unpack entry {info.filename!r} ({exc}); "
                    "repack it without a password, with deflate or no "
                    "compression"
                ) from None
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                raise UserError(
                    f"no space left on the device holding {dest_dir} while "
                    f"unpacking {archive} ({_size(declared)} in all); free up "
                    "space and re-run"
                ) from None
            budget -= writer.written
            extracted.append(target)
    log.info("extracted %d files from %s to %s", len(extracted), archive, dest_dir)
    return extracted
