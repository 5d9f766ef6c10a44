"""Fingerprints of data.source and the kernel: they change exactly when the content does,
and never with where the repo or the folder lies; then the fingerprint stage."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from src import config, fingerprint, sources
from stages import fingerprint as fingerprint_stage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def photos(tmp_path) -> Path:
    root = tmp_path / "photos"
    for name, data in {"a.png": b"aaaa", "trip/b.jpg": b"bbbb", ".DS_Store": b"x"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_a_folder_is_hashed_by_its_names_and_bytes_not_its_place(photos, tmp_path):
    first = fingerprint.source(str(photos))
    assert first["files"] == 3 and fingerprint.source(str(photos)) == first

    moved = shutil.copytree(photos, tmp_path / "elsewhere" / "photos")
    assert fingerprint.source(str(moved))["sha256"] == first["sha256"]

    seen = {first["sha256"]}
    for change in (
        lambda: (photos / "trip/c.png").write_bytes(b"cccc"),  # a new photo
        lambda: (photos / "a.png").write_bytes(b"aaab"),  # edited bytes, same size
        lambda: (photos / "a.png").rename(photos / "z.png"),  # renamed
        lambda: (photos / "trip/c.png").unlink(),  # removed
    ):
        change()
        digest = fingerprint.source(str(photos))["sha256"]
        assert digest not in seen
        seen.add(digest)


def test_a_zip_is_hashed_by_its_bytes(photos, tmp_path):
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(photos / "a.png", "a.png")
    first = fingerprint.source(str(archive))
    with zipfile.ZipFile(archive, "a") as zf:
        zf.write(photos / "trip/b.jpg", "b.jpg")
    assert fingerprint.source(str(archive))["sha256"] != first["sha256"]


@pytest.mark.parametrize("name", ["synthetic", "mit_scenes"])
def test_generated_sources_have_nothing_to_hash(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).mkdir()  # a folder of that name is not what download reads
    assert fingerprint.source(name) == {"source": name}


def test_samples_are_hashed_by_the_photos_bytes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "samples").mkdir()  # a folder of that name is not what download reads
    first = fingerprint.source("samples")
    assert first["files"] == len(sources.SAMPLE_PHOTOS) and fingerprint.source("samples") == first

    # The same photos in a plain folder: the same names and bytes, the same hash.
    package = tmp_path / "site-packages/skimage"
    (package / "data").mkdir(parents=True)
    for photo in sources.sample_photos():
        shutil.copyfile(photo, package / "data" / photo.name)
    assert fingerprint.source(str(package / "data"))["sha256"] == first["sha256"]

    # Another scikit-image: other bytes in one photo, or a photo missing.
    monkeypatch.setattr(sources, "skimage_folder", lambda: package)
    assert fingerprint.source("samples") == first
    (package / "data/camera.png").write_bytes(b"not the cameraman")
    assert fingerprint.source("samples")["sha256"] != first["sha256"]
    (package / "data/camera.png").unlink()
    assert fingerprint.source("samples") == {"source": "samples", "missing": True}


def test_a_relative_source_is_found_from_the_main_root(photos, tmp_path, monkeypatch):
    """As in a queued experiment: the cwd is a copy without the folder, DVC_ROOT the main root."""
    copy = tmp_path / "repo/.dvc/tmp/exps/tmpabc"
    copy.mkdir(parents=True)
    shutil.copytree(photos, tmp_path / "repo/photos")
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    found = fingerprint.source("photos")
    assert found == {**fingerprint.source(str(photos)), "source": "photos"}
    assert fingerprint.source("nowhere") == {"source": "nowhere", "missing": True}


def params(**changes) -> config.Params:
    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    return config.parse({**doc, **changes})


def test_a_file_kernel_is_hashed_by_its_values(tmp_path):
    path = tmp_path / "k.npy"
    np.save(path, np.eye(3))
    first = fingerprint.kernel(params(kernel=f"file:{path}"))
    assert first["shape"] == [3, 3, 1, 1]
    np.save(path, np.eye(3, dtype=np.float32))  # other bytes, the same kernel
    assert fingerprint.kernel(params(kernel=f"file:{path}")) == first
    np.save(path, 2 * np.eye(3))
    assert fingerprint.kernel(params(kernel=f"file:{path}"))["sha256"] != first["sha256"]


def test_a_built_in_kernel_always_has_the_same_fingerprint():
    smiley = fingerprint.kernel(params(kernel="smiley"))
    assert fingerprint.kernel(params(kernel="smiley")) == smiley
    assert fingerprint.kernel(params())["sha256"] != smiley["sha256"]


def test_the_stage_writes_the_same_files_until_an_input_changes(photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    doc["data"]["source"] = "photos"  # relative, from the working directory
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))

    def written() -> tuple[bytes, bytes]:
        fingerprint_stage.main()
        return fingerprint.SOURCE.read_bytes(), fingerprint.KERNEL.read_bytes()

    first = written()
    assert written() == first
    assert json.loads(first[0])["files"] == 3
    (photos / "new.png").write_bytes(b"new")
    source, kernel = written()
    assert source != first[0] and kernel == first[1]
    assert sorted(p.name for p in (tmp_path / "data/fingerprints").iterdir()) == [
        "kernel.json",
        "source.json",
    ]
