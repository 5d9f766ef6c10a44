"""Image sources and the seeded split: synthetic, a local folder or .zip, scikit-image's
photographs, and mit_scenes against an HTTP server on 127.0.0.1 (never the real network);
then the download stage."""

from __future__ import annotations

import csv
import functools
import importlib.metadata
import io
import shutil
import subprocess
import sys
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from src import config, dead_leaves, images, paths, sources
from src.errors import UserError
from stages import download

REPO = Path(__file__).resolve().parents[1]


def data_config(**changes) -> config.DataConfig:
    return config.DataConfig(**changes)


def png_bytes(seed: int, size: tuple[int, int] = (24, 16), fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def read_manifest(root: Path) -> list[dict]:
    with open(root / "data/raw/manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


# --- split and subset -------------------------------------------------------------


@pytest.mark.parametrize(
    "count, fraction, expected",
    [
        (10, 0.2, 2),
        (11, 0.2, 2),
        (13, 0.5, 7),
        (2, 0.2, 1),
        (1, 0.5, 0),
        (10, 0.0, 0),
        (5, 0.9, 4),
        (2688, 0.2, 538),
    ],
)
def test_val_count(count, fraction, expected):
    assert sources.val_count(count, fraction) == expected


def test_split_is_seeded_and_exact():
    a = sources.split(50, 0.2, seed=0)
    assert a == sources.split(50, 0.2, seed=0)
    assert a != sources.split(50, 0.2, seed=1)
    assert a.count("val") == 10 and a.count("train") == 40


def test_subset():
    assert list(sources.subset(5, 0, seed=0)) == [0, 1, 2, 3, 4]
    assert list(sources.subset(5, 9, seed=0)) == [0, 1, 2, 3, 4]
    keep = sources.subset(100, 7, seed=0)
    assert len(set(keep)) == 7 and list(keep) == sorted(keep) and keep.max() < 100
    assert np.array_equal(keep, sources.subset(100, 7, seed=0))
    assert not np.array_equal(keep, sources.subset(100, 7, seed=1))


# --- synthetic --------------------------------------------------------------------


def test_synthetic_images_are_the_dead_leaves_of_their_index(tmp_path):
    names = sources.gather(data_config(count=4), seed=5, images_dir=tmp_path / "all")
    assert names == [f"leaves_0000{i}.png" for i in range(4)]
    for i, name in enumerate(names):
        pixels = np.asarray(Image.open(tmp_path / "all" / name))
        assert np.array_equal(pixels, dead_leaves.render(i, sources.SYNTHETIC_SIZE, seed=5))
    some = sources.gather(data_config(count=4, limit=2), seed=5, images_dir=tmp_path / "some")
    assert len(some) == 2 and set(some) <= set(names)
    for name in some:  # a subset holds the very same images
        assert (tmp_path / "some" / name).read_bytes() == (tmp_path / "all" / name).read_bytes()


# --- a local folder or .zip --------------------------------------------------------


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "photos"
    files = {
        "b.png": png_bytes(1),
        "a.JPG": png_bytes(2, fmt="JPEG"),
        "trip/day 1/c.tiff": png_bytes(3, fmt="TIFF"),
        "trip/d.jpeg": png_bytes(4, fmt="JPEG"),
        "trip/notes.txt": b"not an image",
        ".hidden/e.png": png_bytes(5),
        "._b.png": b"macOS fork",
        "empty/.keep": b"",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


EXPECTED = ["a.JPG", "b.png", "trip/d.jpeg", "trip/day 1/c.tiff"]


def test_local_folder_nested_mixed_formats(folder, tmp_path):
    names = sources.gather(data_config(source=str(folder)), seed=0, images_dir=tmp_path / "out")
    assert names == EXPECTED
    for name in names:
        assert (tmp_path / "out" / name).read_bytes() == (folder / name).read_bytes()
    assert (
        sorted(
            p.relative_to(tmp_path / "out").as_posix()
            for p in (tmp_path / "out").rglob("*")
            if p.is_file()
        )
        == EXPECTED
    )


def test_an_animated_gif_is_one_of_the_images(folder, tmp_path):
    frames = [Image.fromarray(np.full((40, 40), v, dtype=np.uint8)) for v in (10, 128, 250)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    names = sources.gather(data_config(source=str(folder)), seed=0, images_dir=tmp_path / "out")
    assert names == sorted([*EXPECTED, "anim.gif"])
    assert (tmp_path / "out/anim.gif").read_bytes() == (folder / "anim.gif").read_bytes()


def test_local_folder_limit(folder, tmp_path):
    names = sources.gather(
        data_config(source=str(folder), limit=2), seed=0, images_dir=tmp_path / "out"
    )
    assert len(names) == 2 and set(names) <= set(EXPECTED)


def test_local_zip(folder, tmp_path):
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, f"photos/{path.relative_to(folder).as_posix()}")
    names = sources.gather(data_config(source=str(archive)), seed=0, images_dir=tmp_path / "out")
    assert names == [f"photos/{n}" for n in EXPECTED]
    for name in EXPECTED:
        assert (tmp_path / "out/photos" / name).read_bytes() == (folder / name).read_bytes()
    assert not (tmp_path / "out/photos/trip/notes.txt").exists()


# Archive order; the same path written three ways, and the same bytes under two names.
REPEATS = [
    ("a.png", 1),
    ("x//b.png", 2),
    ("a.png", 1),
    ("c.png", 3),
    ("./a.png", 1),
    ("x/b.png", 2),
    ("copy/c.png", 3),
    ("d.png", 4),
    ("e.png", 5),
]
DISTINCT = ["a.png", "c.png", "d.png", "e.png", "x/b.png"]


@pytest.fixture
def repeats_zip(tmp_path) -> Path:
    archive = tmp_path / "repeats.zip"
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(archive, "w") as zf:
        for name, seed in REPEATS:
            zf.writestr(name, png_bytes(seed, (40, 40)))
    return archive


def test_a_zip_keeps_each_path_and_each_image_once(repeats_zip, tmp_path, caplog):
    names = sources.gather(data_config(source=str(repeats_zip)), 0, tmp_path / "out")
    assert names == DISTINCT
    files = sorted(p for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert [p.relative_to(tmp_path / "out").as_posix() for p in files] == DISTINCT
    assert len({p.read_bytes() for p in files}) == len(DISTINCT)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "dropped 4 repeated image(s)" in warnings[0]
    assert "copy/c.png" in warnings[0] and "x/b.png" in warnings[0]
    # data.limit picks among the distinct images only
    some = sources.gather(data_config(source=str(repeats_zip), limit=4), 0, tmp_path / "some")
    assert len(some) == 4 and set(some) <= set(DISTINCT)


def test_a_folder_keeps_each_image_once(folder, tmp_path):
    (folder / "trip/b copy.png").write_bytes((folder / "b.png").read_bytes())
    (folder / "zz").mkdir()
    (folder / "zz/b.png").symlink_to("../b.png")  # a link within the folder is kept, once
    names = sources.gather(data_config(source=str(folder)), 0, tmp_path / "out")
    assert names == EXPECTED  # the first name in sorted order stays
    assert sources.gather(data_config(source=str(folder), limit=3), 0, tmp_path / "b") == [
        EXPECTED[i] for i in sources.subset(len(EXPECTED), 3, 0)
    ]


def test_download_stage_puts_no_image_on_both_sides(repeats_zip, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, source=str(repeats_zip), val_fraction=0.5)
    download.main()
    rows = read_manifest(tmp_path)
    assert sorted(r["name"] for r in rows) == DISTINCT
    images = tmp_path / "data/raw/images"
    sides = {
        split: {(images / r["name"]).read_bytes() for r in rows if r["split"] == split}
        for split in ("train", "val")
    }
    assert sides["train"] and sides["val"] and not sides["train"] & sides["val"]


@pytest.mark.parametrize("link, target", [("trip/leak.jpg", "secret.png"), ("more", "")])
def test_a_symlink_out_of_the_folder_is_refused(folder, tmp_path, link, target):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png_bytes(9))  # could be /etc/passwd renamed
    (folder / link).symlink_to(outside / target)
    with pytest.raises(UserError, match=f"{link} .*symbolic link .*outside") as caught:
        sources.gather(data_config(source=str(folder)), 0, tmp_path / "out")
    assert "\n" not in str(caught.value) and "cp -L" in str(caught.value)
    assert not [p for p in tmp_path.joinpath("out").rglob("*") if p.is_file()]  # nothing copied


def test_a_folder_holding_the_output_is_refused(folder, tmp_path):
    with pytest.raises(UserError, match="own output"):
        sources.gather(data_config(source=str(tmp_path)), 0, tmp_path / "data/.raw.tmp/images")


def test_empty_folder_and_imageless_zip(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="holds no images"):
        sources.gather(data_config(source=str(tmp_path / "empty")), 0, tmp_path / "out")
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as zf:
        zf.writestr("readme.txt", "no images here")
    with pytest.raises(UserError, match="holds no images"):
        sources.gather(data_config(source=str(tmp_path / "empty.zip")), 0, tmp_path / "out")


def test_unknown_source_names_the_options(tmp_path):
    with pytest.raises(UserError) as caught:
        sources.gather(data_config(source=str(tmp_path / "nowhere")), 0, tmp_path / "out")
    message = str(caught.value)
    assert all(word in message for word in ("synthetic", "mit_scenes", "samples", "folder", ".zip"))
    (tmp_path / "pics.tar").write_bytes(b"tar")
    with pytest.raises(UserError, match="not a .zip"):
        sources.gather(data_config(source=str(tmp_path / "pics.tar")), 0, tmp_path / "out")
    (tmp_path / "broken.zip").write_bytes(b"PK but not really")
    with pytest.raises(UserError, match="not a readable zip"):
        sources.gather(data_config(source=str(tmp_path / "broken.zip")), 0, tmp_path / "out")


# --- samples: the photographs in scikit-image's wheel --------------------------------

# (width, height, Pillow mode) of each, in scikit-image 0.26.0
SAMPLE_SIZES = {
    "astronaut.png": (512, 512, "RGB"),
    "brick.png": (512, 512, "L"),
    "camera.png": (512, 512, "L"),
    "chelsea.png": (451, 300, "RGB"),
    "coffee.png": (600, 400, "RGB"),
    "coins.png": (384, 303, "L"),
    "grass.png": (512, 512, "L"),
    "gravel.png": (512, 512, "L"),
    "hubble_deep_field.jpg": (1000, 872, "RGB"),
    "moon.png": (512, 512, "L"),
    "motorcycle_left.png": (741, 500, "RGB"),
    "motorcycle_right.png": (741, 500, "RGB"),
    "rocket.jpg": (640, 427, "RGB"),
}
NOT_PHOTOS = (  # in the same folder of the wheel, and never copied
    "cell.png",
    "chessboard_GRAY.png",
    "chessboard_RGB.png",
    "clock_motion.png",
    "color.png",
    "horse.png",
    "ihc.png",
    "logo.png",
    "microaneurysms.png",
    "multipage.tif",
    "multipage_rgb.tif",
    "no_time_for_that_tiny.gif",
    "page.png",
    "phantom.png",
    "retina.jpg",
    "text.png",
)


@functools.cache
def wheel_data() -> dict[str, Path]:
    """skimage/data/<name> -> its installed file, from the wheel's RECORD: found another
    way than the code under test finds it."""
    found = {}
    for file in importlib.metadata.files("scikit-image"):
        if file.parent.as_posix() == "skimage/data":
            found[file.name] = Path(file.locate())
    return found


def test_samples_copies_exactly_the_listed_photos(tmp_path):
    assert list(sources.SAMPLE_PHOTOS) == sorted(SAMPLE_SIZES)
    assert set(SAMPLE_SIZES) | set(NOT_PHOTOS) <= set(wheel_data())
    out = tmp_path / "out"
    names = sources.gather(data_config(source="samples"), 0, out)
    assert names == sorted(SAMPLE_SIZES)
    assert sorted(p.name for p in out.iterdir()) == names  # flat, and nothing else
    for name in names:
        assert (out / name).read_bytes() == wheel_data()[name].read_bytes()


def test_samples_are_found_without_importing_scikit_image():
    check = (
        "import sys; from src import sources; sources.sample_photos(); "
        "print('skimage' in sys.modules)"
    )
    found = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True)
    assert found.stdout.strip() == "False", found.stderr  # importing it takes seconds


def test_samples_limit_is_a_seeded_subset(tmp_path):
    def kept(seed: int, where: str) -> list[str]:
        return sources.gather(data_config(source="samples", limit=5), seed, tmp_path / where)

    first = kept(0, "a")
    assert len(first) == 5 and first == sorted(first) and set(first) <= set(SAMPLE_SIZES)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == first
    assert kept(0, "b") == first
    assert kept(1, "c") != first


def test_the_image_reader_reads_every_sample_photo(tmp_path):
    names = sources.gather(data_config(source="samples"), 0, tmp_path)
    for name in names:
        width, height, mode = SAMPLE_SIZES[name]
        image = images.read_image(tmp_path / name)
        assert image.shape == ((height, width, 3) if mode == "RGB" else (height, width)), name
        assert image.dtype == np.float32 and 0 <= image.min() < image.max() <= 1, name
        gray = images.read_gray_fitted(tmp_path / name, 64)  # as the grayscale stage stores it
        assert gray.shape == (64, 64) and gray.std() > 0.01, name
    assert {m for *_, m in SAMPLE_SIZES.values()} == {"RGB", "L"}


def test_samples_without_scikit_image_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "skimage_folder", lambda: None)
    with pytest.raises(UserError, match="not installed") as caught:
        sources.gather(data_config(source="samples"), 0, tmp_path / "out")
    message = str(caught.value)
    assert "\n" not in message and "pip install -r requirements.lock" in message

    (tmp_path / "skimage/data").mkdir(parents=True)  # a scikit-image without them
    shutil.copyfile(wheel_data()["camera.png"], tmp_path / "skimage/data/camera.png")
    monkeypatch.setattr(sources, "skimage_folder", lambda: tmp_path / "skimage")
    with pytest.raises(UserError, match="astronaut.png, brick.png, chelsea.png") as caught:
        sources.gather(data_config(source="samples"), 0, tmp_path / "out")
    message = str(caught.value)
    assert "camera.png" not in message and "pip install -r requirements.lock" in message
    assert not list((tmp_path / "out").iterdir())  # nothing copied


# --- mit_scenes against 127.0.0.1 -----------------------------------------------------

MIT_DIR = "spatial_envelope_256x256_static_8outdoorcategories"
MIT_FILES = [
    f"{category}_{tag}{i}.jpg"
    for category, tag in (
        ("coast", "n"),
        ("forest", "nat"),
        ("street", "par"),
        ("tallbuilding", "a"),
    )
    for i in range(3)
]


class Server:
    """A static file server on 127.0.0.1 that counts the requests it answers."""

    def __init__(self, root: Path):
        self.requests = 0

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(inner):
                self.requests += 1
                super().do_GET()

            def log_message(inner, *args):
                pass

        self.httpd = ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
        )
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def mit_server(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "scenes.zip", "w") as zf:
        zf.writestr(f"{MIT_DIR}/", "")
        for i, name in enumerate(MIT_FILES):
            zf.writestr(f"{MIT_DIR}/{name}", png_bytes(i, (32, 32), fmt="JPEG"))
        zf.writestr(f"{MIT_DIR}/Thumbs.db", b"not an image")
    server = Server(served)
    monkeypatch.setenv(paths.MIT_URL_ENV, f"{server.url}/scenes.zip")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # not a git repo: the download cache lands here
    yield server
    server.stop()


def test_mit_scenes_category_subset_is_downloaded_once(mit_server, tmp_path):
    data = data_config(source="mit_scenes", categories=("coast", "street"))
    names = sources.gather(data, 0, tmp_path / "a")
    assert names == sorted(n for n in MIT_FILES if n.startswith(("coast_", "street_")))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == names  # flat, nothing else
    assert (tmp_path / "work/.cache/downloads/scenes.zip").is_file()
    assert mit_server.requests == 1
    mit_server.stop()  # a second run must not need the network
    all_names = sources.gather(data_config(source="mit_scenes", limit=5), 0, tmp_path / "b")
    assert len(all_names) == 5 and set(all_names) <= set(MIT_FILES)
    assert mit_server.requests == 1


def test_mit_scenes_keeps_each_image_once(mit_server, tmp_path):
    with zipfile.ZipFile(tmp_path / "served/scenes.zip", "a") as zf:
        zf.writestr(f"{MIT_DIR}/street_copy.jpg", zf.read(f"{MIT_DIR}/{MIT_FILES[0]}"))
        zf.writestr(f"again/{MIT_FILES[1]}", png_bytes(99, (32, 32), fmt="JPEG"))
    names = sources.gather(data_config(source="mit_scenes"), 0, tmp_path / "a")
    assert names == sorted(MIT_FILES)
    files = list((tmp_path / "a").iterdir())
    assert len({p.read_bytes() for p in files}) == len(files) == len(MIT_FILES)


def test_mit_scenes_sha256_pin_mismatch(mit_server, tmp_path):
    data = data_config(source="mit_scenes", sha256="0" * 64)
    with pytest.raises(UserError, match="sha256"):
        sources.gather(data, 0, tmp_path / "a")


# --- the stage --------------------------------------------------------------------------


def write_params(root: Path, **data) -> None:
    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    doc["data"].update(data)
    (root / "params.yaml").write_text(yaml.safe_dump(doc))


def test_download_stage_records_a_reproducible_split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, count=10, val_fraction=0.3)
    download.main()
    rows = read_manifest(tmp_path)
    assert [r["name"] for r in rows] == [f"leaves_{i:05d}.png" for i in range(10)]
    assert sum(r["split"] == "val" for r in rows) == 3
    assert {r["split"] for r in rows} == {"train", "val"}
    assert sorted(p.name for p in (tmp_path / "data/raw/images").iterdir()) == [
        r["name"] for r in rows
    ]
    download.main()  # again: the same split, and nothing left beside data/raw
    assert read_manifest(tmp_path) == rows
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw"]


def test_download_stage_splits_the_samples(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "samples").mkdir()  # a folder of that name is not what is read
    write_params(tmp_path, source="samples", val_fraction=0.2)
    download.main()
    rows = read_manifest(tmp_path)
    assert [r["name"] for r in rows] == sorted(SAMPLE_SIZES)
    assert [r["split"] for r in rows] == sources.split(len(SAMPLE_SIZES), 0.2, seed=0)
    assert [r["split"] for r in rows].count("val") == 3


def test_download_stage_failure_keeps_the_old_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, count=3)
    download.main()
    before = read_manifest(tmp_path)
    write_params(tmp_path, source=str(tmp_path / "missing"))
    with pytest.raises(UserError):
        download.main()
    assert read_manifest(tmp_path) == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw"]


def test_download_stage_from_a_folder_with_limit(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, source="photos", limit=3, val_fraction=0.34)
    download.main()
    rows = read_manifest(tmp_path)
    assert len(rows) == 3 and {r["name"] for r in rows} <= set(EXPECTED)
    assert [r["split"] for r in rows].count("val") == 1
    shutil.rmtree(tmp_path / "data")
    download.main()
    assert read_manifest(tmp_path) == rows
