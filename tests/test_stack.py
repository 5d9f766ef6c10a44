"""src/stack.py: a stack written row by row, and read back row by row exactly as numpy
reads the same .npy, with file I/O that leaves nothing mapped into the process."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from src.errors import UserError
from src.stack import Stack, write_stack

RNG = np.random.default_rng(7)
ROWS = RNG.random((9, 12, 10)).astype(np.float32)
FIX = "rerun `dvc repro -f grayscale`"


@pytest.fixture(params=["write_stack", "np.save", "npy 2.0"])
def path(request, tmp_path) -> Path:
    """ROWS on disk, written by us, by numpy, and with numpy's version 2.0 header."""
    out = tmp_path / "stack.npy"
    if request.param == "write_stack":
        write_stack(out, iter(ROWS), capacity=len(ROWS), shape=ROWS.shape[1:])
    elif request.param == "np.save":
        np.save(out, ROWS)
    else:
        with open(out, "wb") as handle:
            np.lib.format.write_array(handle, ROWS, version=(2, 0))
    return out


# --- write_stack ------------------------------------------------------------------


@pytest.mark.parametrize("written", [5, 3, 0])
def test_write_stack_holds_exactly_the_rows_written(tmp_path, written):
    rows = RNG.random((written, 4, 6)).astype(np.float32)
    path = tmp_path / "stack.npy"
    assert write_stack(path, iter(rows), capacity=5, shape=(4, 6)) == written
    loaded = np.load(path, mmap_mode="r")
    assert loaded.shape == (written, 4, 6) and loaded.dtype == np.float32
    assert np.array_equal(loaded, rows)
    assert path.stat().st_size == loaded.offset + rows.nbytes


def test_write_stack_refuses_a_wrong_shape(tmp_path):
    with pytest.raises(ValueError):
        write_stack(tmp_path / "s.npy", iter([np.zeros((3, 3))]), 2, (4, 4))


# --- reading ----------------------------------------------------------------------

KEYS = [
    0,
    8,
    -1,
    np.int64(4),  # one row
    (3, slice(2, 9), slice(1, 7)),  # a crop, as training.crops cuts it
    (3, slice(None), 5),
    (2, 4),
    (5, slice(10, 2)),  # a column, a pixel, no lines
    slice(2, 6),
    slice(None),
    slice(1, 8, 3),
    slice(-3, None),
    slice(5, 5),
    np.array([0, 1, 2, 5, 6, 8]),
    np.array([7, 2, 2]),
    [4],
    np.array([], int),
    (np.array([1, 4]), slice(0, 3), slice(2, 4)),
]


@pytest.mark.parametrize("key", KEYS, ids=repr)
def test_indexing_reads_what_numpy_reads(path, key):
    expected = np.load(path)[key]
    with Stack(path) as stack:
        got = stack[key]
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_shape_dtype_len(path):
    with Stack(path) as stack:
        assert stack.shape == ROWS.shape and len(stack) == len(ROWS)
        assert stack.dtype == np.float32


def test_rows_read_are_the_callers_own(path):
    with Stack(path) as stack:
        row = stack[1]
        row[:] = 0
        np.testing.assert_array_equal(stack[1], ROWS[1])


def test_bad_indices(path):
    with Stack(path) as stack:
        for key in (9, -10, np.array([0, 9])):
            with pytest.raises(IndexError):
                stack[key]
        with pytest.raises(TypeError, match="row index"):
            stack[np.array([0, 1]), np.array([0, 1])]


def test_threads_can_share_one_stack(tmp_path):
    # tf.data's generator and the Keras epoch callback read the same stacks at once
    rows = RNG.random((64, 32, 32)).astype(np.float32)
    write_stack(tmp_path / "s.npy", iter(rows), len(rows), (32, 32))
    wrong = []
    with Stack(tmp_path / "s.npy") as stack:

        def read(seed):
            order = np.random.default_rng(seed).permutation(len(rows))
            for i in order:
                if not np.array_equal(stack[int(i), 3:20, 5:30], rows[i, 3:20, 5:30]):
                    wrong.append(i)

        threads = [threading.Thread(target=read, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not wrong


# --- not a stack ------------------------------------------------------------------


def save(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda p: save(p, ROWS.astype(np.float64)), "dtype <f8"),
        (lambda p: save(p, ROWS.astype(">f4")), "dtype >f4"),
        (lambda p: save(p, np.asfortranarray(ROWS)), "Fortran order"),
        (lambda p: save(p, ROWS[0]), "not (N, H, W, C)"),
        (lambda p: p.write_text("name,split\n"), "magic string"),
        (lambda p: p.write_bytes(b""), "magic string"),
        (lambda p: p.write_bytes(save(p, ROWS).read_bytes()[:-4]), "its header needs"),
    ],
)
def test_not_a_stack_is_a_one_line_user_error(tmp_path, make, reason):
    path = tmp_path / "images.npy"
    make(path)
    with pytest.raises(UserError) as caught:
        Stack(path, fix=FIX)
    message = str(caught.value)
    assert message.startswith(f"{path} is not a stack of float32 images (")
    assert reason in message and message.endswith(FIX) and "\n" not in message


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=f"not found; {FIX}"):
        Stack(tmp_path / "images.npy", fix=FIX)


# --- memory -----------------------------------------------------------------------


def rss_file_kb() -> int:
    """Resident pages of files mapped into this process (RssFile), in kB."""
    try:
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("RssFile:"))
    except (OSError, StopIteration):
        pytest.skip("needs Linux's /proc/self/status")


def test_reading_and_writing_map_nothing_into_the_process(tmp_path):
    # The reason this module exists: a memory map's resident pages count in our RSS,
    # so a stage reading 700 MB through one looks 700 MB bigger. 64 MB here.
    rows, shape = 256, (256, 256)
    row = RNG.random(shape).astype(np.float32)
    before = rss_file_kb()
    write_stack(tmp_path / "s.npy", (row for _ in range(rows)), rows, shape)
    with Stack(tmp_path / "s.npy") as stack:
        total = sum(float(stack[i, 10:200, 3:250].sum()) for i in range(rows))
        total += float(stack[np.arange(0, rows, 2)].sum())
    assert total > 0
    assert rss_file_kb() - before < 8 * 1024


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_nan_or_infinity_read_is_a_one_line_user_error(tmp_path, bad):
    rows = ROWS.copy()
    rows[6, 3, 4] = bad
    path = save(tmp_path / "images.npy", rows)
    expected = f"{path} holds NaN or infinity (row 6): it is corrupted; {FIX}"
    with Stack(path, fix=FIX) as stack:
        for key in (6, (6, slice(2, 5)), slice(4, 8), np.array([1, 6, 7])):
            with pytest.raises(UserError) as caught:
                stack[key]
            assert str(caught.value) == expected
        # what is read is checked, and nothing more is read to check it
        np.testing.assert_array_equal(stack[5], ROWS[5])
        np.testing.assert_array_equal(stack[6, 4:], ROWS[6, 4:])
