"""A stack: equally-sized finite float32 images, one after another in one (N, H, W, C) .npy
file (or (N, H, W), as earlier versions wrote).

The grayscale images and the targets are stacks of up to a few GB. They are read
and written with plain file I/O at computed offsets, never memory-mapped: the
resident pages of a memory map count in the process's RSS (a stage that reads
700 MB of images through one looks 700 MB bigger, and grows with the data set),
while pages read with pread or written with write stay in the OS page cache,
which the kernel shares and frees at will. Memory stays at the rows asked for.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from src.errors import UserError

DTYPE = np.dtype("<f4")  # little-endian float32, C order: what write_stack writes


class StackWriter:
    """Appends float32 arrays of `shape`, one row at a time, to an .npy of up to `capacity`
    rows; on closing, fewer than `capacity` shrinks the file to fit. Use it in a `with`."""

    def __init__(self, path: Path, capacity: int, shape: tuple[int, ...]):
        self.capacity, self.shape, self.count = capacity, tuple(shape), 0
        self._header = {"descr": DTYPE.str, "fortran_order": False, "shape": (capacity, *shape)}
        self._row_bytes = int(np.prod(shape)) * DTYPE.itemsize
        self._out = open(path, "wb")  # noqa: SIM115 -- closed by close()
        np.lib.format.write_array_header_1_0(self._out, self._header)
        self._data_start = self._out.tell()

    def append(self, array: np.ndarray) -> None:
        if self.count == self.capacity or array.shape != self.shape:
            raise ValueError(
                f"row {self.count} has shape {array.shape}, not {self.shape}, or "
                f"exceeds the capacity {self.capacity}"
            )
        self._out.write(np.ascontiguousarray(array, dtype=DTYPE).data)
        self.count += 1

    def close(self) -> None:
        out = self._out
        if out.closed:
            return
        with out:
            if self.count < self.capacity:
                # numpy pads the header so the row count can change without moving the data.
                out.seek(0)
                header = {**self._header, "shape": (self.count, *self.shape)}
                np.lib.format.write_array_header_1_0(out, header)
                if out.tell() != self._data_start:
                    raise RuntimeError("the .npy header changed length; cannot shrink in place")
                out.truncate(self._data_start + self.count * self._row_bytes)

    def __enter__(self) -> StackWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_stack(
    path: Path, arrays: Iterable[np.ndarray], capacity: int, shape: tuple[int, ...]
) -> int:
    """Write float32 arrays of `shape` one after another as an .npy of up to `capacity`
    rows; return how many were written. Fewer than `capacity` shrinks the file to fit."""
    with StackWriter(path, capacity, shape) as writer:
        for array in arrays:
            writer.append(array)
    return writer.count


class Stack:
    """An (N, H, W, C) (or (N, H, W)) stack on disk, read only where it is indexed.

    Indexing reads the rows asked for into a new array: `stack[i]`, `stack[i, a:b, c:d]`
    (only lines a:b of row i are read), `stack[start:stop]`, `stack[row_array]`. Only
    the row index may be an array. Reads are positional (pread), so threads, such as
    tf.data's and Keras's, can share one Stack. Every value read is checked to be finite.
    Close it, or use it in a `with`.
    """

    def __init__(self, path: Path, fix: str = "rerun the stage that writes it with `dvc repro -f`"):
        self.path, self.fix = Path(path), fix
        try:
            self._file = open(self.path, "rb", buffering=0)
        except FileNotFoundError:
            raise UserError(f"{self.path} not found; {fix}") from None
        try:
            self.shape, self._start = self._read_header()
        except BaseException:
            self._file.close()
            raise
        self.dtype = DTYPE
        self._line_bytes = int(np.prod(self.shape[2:])) * DTYPE.itemsize
        self._row_bytes = self.shape[1] * self._line_bytes

    def _read_header(self) -> tuple[tuple[int, ...], int]:
        """(shape, where the data starts), parsed by numpy's own .npy header readers."""

        def wrong(what: str) -> UserError:
            return UserError(f"{self.path} is not a stack of float32 images ({what}); {self.fix}")

        try:
            version = np.lib.format.read_magic(self._file)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(self._file)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(self._file)
            else:
                raise wrong(f".npy format version {version[0]}.{version[1]}")
        except ValueError as exc:
            raise wrong(str(exc)) from None
        if dtype != DTYPE:
            raise wrong(f"dtype {dtype.str}, not {DTYPE.str}")
        if fortran_order:
            raise wrong("Fortran order")
        if len(shape) not in (3, 4):
            raise wrong(f"shape {shape}, not (N, H, W, C)")
        start = self._file.tell()
        needed = start + int(np.prod(shape)) * DTYPE.itemsize
        size = os.fstat(self._file.fileno()).st_size
        if size < needed:
            raise wrong(f"{size} bytes, its header needs {needed}")
        return tuple(shape), start

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"Stack({str(self.path)!r}, shape={self.shape})"

    def __getitem__(self, key) -> np.ndarray:
        row, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if not all(isinstance(k, (int, np.integer, slice)) for k in rest):
            raise TypeError(f"only the row index of a stack may be an array, got {key!r}")
        rows = np.arange(len(self))[row]  # numpy's own rules: negatives, bounds, slices
        if rows.ndim == 0:
            return self._row(int(rows), rest)
        if rows.ndim != 1:
            raise TypeError(f"row indices must be 1-D, got shape {rows.shape}")
        out = np.empty((len(rows), *self.shape[1:]), DTYPE)
        # one read per run of consecutive rows: a slice of rows is one read
        for run in np.split(np.arange(len(rows)), np.flatnonzero(np.diff(rows) != 1) + 1):
            if len(run):
                self._read(out[run[0] : run[-1] + 1], int(rows[run[0]]))
        return out[(slice(None), *rest)]

    def _row(self, i: int, rest: tuple) -> np.ndarray:
        """Row i indexed by `rest`, reading only the lines a leading a:b slice keeps."""
        first, stop = 0, self.shape[1]
        if rest and isinstance(rest[0], slice) and rest[0].step in (None, 1):
            first, stop, _ = rest[0].indices(self.shape[1])
            rest = (slice(None), *rest[1:])
        out = np.empty((max(stop - first, 0), *self.shape[2:]), DTYPE)
        self._read(out, i, first)
        return out[rest]

    def _read(self, out: np.ndarray, row: int, line: int = 0) -> None:
        """Fill the contiguous `out` from `row`, line `line`, on."""
        if out.size == 0:
            return  # memoryview cannot cast an empty view
        view = memoryview(out).cast("B")
        offset = self._start + row * self._row_bytes + line * self._line_bytes
        while view:
            got = os.preadv(self._file.fileno(), [view], offset)
            if got == 0:
                raise UserError(f"{self.path} got shorter while being read; {self.fix}")
            view, offset = view[got:], offset + got
        # A stage's images are finite: a NaN would surface far from here, as a LinAlgError
        # or a "diverged" loss in training. Checking what is read costs ~1/4 of the read.
        if not np.isfinite(out).all():
            many = out.ndim == len(self.shape)  # rows, not lines of one row
            bad = row + (int(np.argwhere(~np.isfinite(out))[0, 0]) if many else 0)
            raise UserError(
                f"{self.path} holds NaN or infinity (row {bad}): it is corrupted; {self.fix}"
            )

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
