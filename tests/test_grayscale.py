"""The grayscale stack: streamed row by row into an .npy of exactly the readable images,
with the unreadable ones skipped and counted, up to data.max_bad_fraction.
(write_stack itself is tested in test_stack.py.)"""

from __future__ import annotations

import csv
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from src import grayscale, images
from src.errors import UserError
from stages import grayscale as stage

REPO = Path(__file__).resolve().parents[1]


def make_raw(root: Path, good: int, bad: int = 0) -> list[tuple[str, str]]:
    """data/raw with `good` images of mixed sizes and formats, then `bad` broken files."""
    rng = np.random.default_rng(0)
    folder = root / "data/raw/images"
    (folder / "sub").mkdir(parents=True)
    rows = []
    shapes = [(48, 64, 3), (40, 40), (70, 36, 3), (32, 32, 3)]
    for i in range(good):
        shape = shapes[i % len(shapes)]
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        name = f"sub/good{i:03d}.jpg" if i % 2 else f"good{i:03d}.png"
        Image.fromarray(pixels).save(folder / name)
        rows.append((name, "val" if i % 4 == 0 else "train"))
    broken = [b"", b"this is text, not a picture", b"\x89PNG\r\n\x1a\n" + b"\0" * 20]
    for i in range(bad):
        name = f"bad{i:03d}.jpg"
        (folder / name).write_bytes(broken[i % len(broken)])
        rows.append((name, "train"))
    rows.sort()
    with open(root / "data/raw/manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "split"])
        writer.writerows(rows)
    return rows


def read_index(root: Path) -> list[tuple[str, str]]:
    with open(root / "data/gray/index.csv", newline="") as handle:
        return [(r["name"], r["split"]) for r in csv.DictReader(handle)]


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_params(root: Path, **data) -> None:
    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    doc["data"].update(data)
    (root / "params.yaml").write_text(yaml.safe_dump(doc))


# --- convert ----------------------------------------------------------------------


def test_convert_streams_the_readable_images(workdir):
    rows = make_raw(workdir, good=6, bad=2)
    out = workdir / "images.npy"
    result = grayscale.convert(rows, workdir / "data/raw/images", 32, out, max_bad_fraction=0.25)
    stack = np.load(out)
    assert stack.shape == (6, 32, 32, 1) and stack.dtype == np.float32
    assert 0.0 <= stack.min() and stack.max() <= 1.0
    assert [name for name, _ in result.skipped] == ["bad000.jpg", "bad001.jpg"]
    assert result.kept == [row for row in rows if row[0].startswith(("good", "sub/"))]
    for i, (name, _) in enumerate(result.kept):
        decoded = images.read_image(workdir / "data/raw/images" / name)
        assert np.array_equal(stack[i][..., 0], images.fit(images.luma(decoded), 32))


def peak_bytes(rows, root: Path) -> int:
    tracemalloc.start()
    grayscale.convert(rows, root / "data/raw/images", 32, root / "s.npy", 0.0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_convert_memory_stays_flat(workdir):
    # Ten times the images may not raise the peak by even ten rows: nothing piles up.
    rows = make_raw(workdir, good=80)
    few, many = peak_bytes(rows[:8], workdir), peak_bytes(rows, workdir)
    assert many < few + 10 * 32 * 32 * 4, (few, many)


def test_convert_too_many_bad_images(workdir):
    rows = make_raw(workdir, good=4, bad=2)
    with pytest.raises(UserError) as caught:
        grayscale.convert(rows, workdir / "data/raw/images", 16, workdir / "s.npy", 0.25)
    message = str(caught.value)
    assert "2 of 6" in message and "33.3%" in message and "data.max_bad_fraction" in message
    assert "\n" not in message


# --- the stage --------------------------------------------------------------------


def test_stage_writes_stack_index_and_metrics(workdir):
    rows = make_raw(workdir, good=9, bad=1)
    write_params(workdir, size=24, max_bad_fraction=0.1)
    stage.main()
    stack = np.load(workdir / "data/gray/images.npy", mmap_mode="r")
    index = read_index(workdir)
    assert stack.shape == (9, 24, 24, 1) and stack.dtype == np.float32
    assert index == [row for row in rows if row[0] != "bad000.jpg"]
    metrics = json.loads((workdir / "metrics/grayscale.json").read_text())
    assert metrics == {
        "images": 9,
        "train": sum(s == "train" for _, s in index),
        "val": sum(s == "val" for _, s in index),
        "skipped": 1,
        "skipped_names": ["bad000.jpg"],
    }
    assert sorted(p.name for p in (workdir / "data").iterdir()) == ["gray", "raw"]


def test_stage_over_the_bad_limit_leaves_no_output(workdir):
    make_raw(workdir, good=7, bad=3)
    write_params(workdir, size=24, max_bad_fraction=0.2)
    with pytest.raises(UserError, match=r"3 of 10 images \(30\.0%\)"):
        stage.main()
    assert sorted(p.name for p in (workdir / "data").iterdir()) == ["raw"]
    assert not (workdir / "metrics/grayscale.json").exists()


def test_stage_without_a_manifest(workdir):
    write_params(workdir)
    with pytest.raises(UserError, match="manifest.csv not found"):
        stage.main()


def test_three_channels_keep_the_rgb_and_a_gray_file_gives_three_equal_planes(tmp_path):
    rng = np.random.default_rng(5)
    colour = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "c.png")
    Image.fromarray(colour[..., 0]).save(tmp_path / "g.png")
    out = tmp_path / "images.npy"
    rows = [("c.png", "train"), ("g.png", "val")]
    grayscale.convert(rows, tmp_path, 32, out, 0.0, channels=3)
    stack = np.load(out)
    assert stack.shape == (2, 32, 32, 3) and stack.dtype == np.float32
    np.testing.assert_array_equal(stack[0], images.fit(colour.astype(np.float32) / 255, 32))
    np.testing.assert_array_equal(stack[1, ..., 0], stack[1, ..., 2])


def test_stage_writes_the_fine_colour_images_with_rescale(workdir):
    make_raw(workdir, good=3, bad=0)
    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    doc["data"].update(size=16, channels=3)
    doc["filter"]["rescale"], doc["kernel"] = 2, "red"
    (workdir / "params.yaml").write_text(yaml.safe_dump(doc))
    stage.main()
    stack = np.load(workdir / "data/gray/images.npy")
    assert stack.shape == (3, 32, 32, 3)  # data.size × filter.rescale, RGB
