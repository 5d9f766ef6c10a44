"""Where the images come from, and the seeded train/val split.

data.source is one of
  synthetic   data.count dead-leaves images (src/dead_leaves.py), no network
  mit_scenes  the 2688 outdoor scenes of Oliva & Torralba (2001), downloaded once
              into .cache/downloads/; data.categories picks a subset
  samples     the 13 photographs scikit-image ships in its wheel (SAMPLE_PHOTOS), offline
  a path      a folder (searched recursively) or a .zip of your own images

`gather` copies the chosen images into an images/ folder and returns their names
relative to it, sorted. Repeats (one path written twice in a zip, or the same
bytes under two names) are dropped first, so no image is on both sides of the
split. data.limit then keeps a seeded subset; the split is made afterwards, by
image, so the manifest shows exactly which images are held out.
The MIT archive URL (src/paths.py) can be overridden with the LLF_MIT_URL environment
variable, e.g. to point at a mirror or, in tests, at a local server.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from src import dead_leaves, fetch, paths, streams
from src.config import MIT_CATEGORIES, DataConfig
from src.errors import UserError
from src.images import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

SYNTHETIC_SIZE = 256  # as the MIT scenes; the grayscale stage fits both to data.size


SOURCE_HINT = "synthetic, mit_scenes, samples, or a path to a folder or .zip of images"

# The photographs in scikit-image's wheel, in skimage/data/: colour and gray, 303 to
# 1000 px on a side, square and not. Left out, as not photographs of the world the
# experiment is about: the drawn or generated ones (chessboard_*, phantom, color, logo,
# the horse silhouette), the text ones (text, page: mostly flat paper), clock_motion
# (blurred on purpose), the microscopy and medical ones (cell, ihc, retina,
# microaneurysms), and the tiny test files (the gif, multipage*.tif).
SAMPLE_PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "rocket.jpg",
)


# --- the split and the subset: pure functions of counts and the seed ---------------


def val_count(count: int, val_fraction: float) -> int:
    """Images held out: count × val_fraction rounded half up, at least 1 (when
    val_fraction > 0 and there are 2 or more images), always leaving 1 to train on."""
    if count < 2 or val_fraction <= 0:
        return 0
    return min(count - 1, max(1, int(np.floor(count * val_fraction + 0.5))))


def split(count: int, val_fraction: float, seed: int) -> list[str]:
    """'train' or 'val' for each of `count` images, from a seeded permutation."""
    held_out = streams.rng(seed, streams.SPLIT).permutation(count)
    held_out = held_out[: val_count(count, val_fraction)]
    labels = np.full(count, "train", dtype=object)
    labels[held_out] = "val"
    return labels.tolist()


def subset(count: int, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of the images data.limit keeps: all when limit is 0 or ≥ count,
    else a seeded choice of `limit` of them."""
    if limit <= 0 or limit >= count:
        return np.arange(count)
    rng = streams.rng(seed, streams.SUBSET)
    return np.sort(rng.choice(count, size=limit, replace=False))


# --- the sources ---------------------------------------------------------------------


def gather(data: DataConfig, seed: int, images_dir: Path) -> list[str]:
    """Put the images data.source names into `images_dir`; return their sorted relative names."""
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    if data.categories and data.source != "mit_scenes":
        log.warning("data.categories only applies to mit_scenes; ignoring it for %s", data.source)
    if data.source == "synthetic":
        return synthetic(data.count, data.limit, seed, images_dir)
    if data.source == "mit_scenes":
        return mit_scenes(data.categories, data.limit, seed, data.sha256, images_dir)
    if data.source == "samples":
        return samples(data.limit, seed, images_dir)
    path = paths.source_path(data.source)
    if path.is_dir():
        return from_folder(path, data.limit, seed, images_dir)
    if path.is_file() and path.suffix.lower() == ".zip":
        return from_zip(path, data.limit, seed, images_dir)
    if path.is_file():
        raise UserError(f"data.source: {data.source} is a file but not a .zip; use {SOURCE_HINT}")
    raise UserError(
        f"data.source: {data.source!r} is not synthetic, mit_scenes, samples, or an existing "
        f"folder or .zip of images; set it to one of these"
    )


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _leaf_name(index: int, count: int) -> str:
    return f"leaves_{index:0{max(5, len(str(count - 1)))}d}.png"


def _write_leaves(job: tuple[int, int, int, Path]) -> None:
    index, seed, count, images_dir = job
    pixels = dead_leaves.render(index, SYNTHETIC_SIZE, seed)
    # Level 1: PNG stays lossless, and writing it costs less than drawing the leaves.
    Image.fromarray(pixels).save(images_dir / _leaf_name(index, count), compress_level=1)


def synthetic(count: int, limit: int, seed: int, images_dir: Path) -> list[str]:
    """Write dead-leaves images as PNGs named by their index, so a data.limit subset
    holds exactly the images the full set would."""
    indices = subset(count, limit, seed).tolist()
    jobs = [(i, seed, count, images_dir) for i in indices]
    workers = min(_usable_cpus(), max(1, len(jobs) // 64))
    if workers > 1:
        # Image i depends only on (seed, i), so the cores can share them out.
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_leaves, jobs, chunksize=16))
    else:
        for job in jobs:
            _write_leaves(job)
    return [_leaf_name(i, count) for i in indices]


def _is_hidden(name: str) -> bool:
    # Hidden files and folders (.DS_Store, macOS "._x.jpg" forks, .git) are never images.
    return any(p.startswith(".") or p == "__MACOSX" for p in PurePosixPath(name).parts)


def _is_image(name: str) -> bool:
    path = PurePosixPath(name)
    return bool(path.parts) and path.suffix.lower() in IMAGE_SUFFIXES and not _is_hidden(name)


def _none_found(where: Path) -> UserError:
    return UserError(
        f"data.source: {where} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
        "add some, or set data.source to synthetic, mit_scenes or samples"
    )


def folder_images(root: Path) -> list[str]:
    """The image files under `root`, recursively, as sorted names relative to it.

    A symlink (to a file or a folder) that leads out of `root` is refused, as a zip's
    symlink entries are: following it would copy a file from anywhere on the machine
    into data/raw, the DVC cache and any remote it is pushed to. Silently skipping it
    would instead drop photos the user linked in on purpose, so we say what to do.
    A link to a file inside `root` is read like that file.
    """
    inside = Path(os.path.realpath(root))
    names = []
    for folder, dirs, files in os.walk(root):  # does not descend into symlinked folders
        dirs[:] = [d for d in dirs if not _is_hidden(d)]
        files = [f for f in files if _is_image(f)]
        for path in (Path(folder, entry) for entry in dirs + files):
            if path.is_symlink() and not Path(os.path.realpath(path)).is_relative_to(inside):
                raise UserError(
                    f"data.source: {path.relative_to(root).as_posix()} in {root} is a symbolic "
                    f"link to {os.path.realpath(path)}, outside the folder; replace the link "
                    "with a copy of what it points to (cp -L, or cp -rL for a folder), or "
                    "remove it"
                )
        # is_file: not a broken link, a socket or a fifo that happens to end in .jpg
        images = (Path(folder, f) for f in files)
        names += [p.relative_to(root).as_posix() for p in images if p.is_file()]
    return sorted(names)


def from_folder(root: Path, limit: int, seed: int, images_dir: Path) -> list[str]:
    """Copy the images under `root` (recursively) into `images_dir`, keeping their
    relative paths, so names stay unique and say where each image came from."""
    if images_dir.resolve().is_relative_to(root.resolve()):
        raise UserError(
            f"data.source: {root} holds the pipeline's own output folder; point "
            "it at a folder of images outside data/"
        )
    names = folder_images(root)
    if not names:
        raise _none_found(root)
    names = distinct(names, root.joinpath, root)
    names = [names[i] for i in subset(len(names), limit, seed)]
    for name in names:
        target = images_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / name, target)
    return names


def skimage_folder() -> Path | None:
    """The installed scikit-image package folder, or None. Found, not imported: importing
    skimage takes seconds, and its photographs are plain PNG and JPEG files."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def sample_photos() -> list[Path]:
    """The files of SAMPLE_PHOTOS in the installed scikit-image, in sorted order."""
    package = skimage_folder()
    if package is None:
        raise UserError(
            "data.source: samples needs scikit-image, which is not installed; "
            "run `pip install -r requirements.lock`"
        )
    folder = package / "data"
    missing = [name for name in SAMPLE_PHOTOS if not (folder / name).is_file()]
    if missing:
        raise UserError(
            f"data.source: samples: {', '.join(missing)} not found in {folder}; "
            "run `pip install -r requirements.lock` for the scikit-image that has them"
        )
    return [folder / name for name in sorted(SAMPLE_PHOTOS)]


def samples(limit: int, seed: int, images_dir: Path) -> list[str]:
    """Copy scikit-image's photographs (the data.limit subset) flat into `images_dir`."""
    photos = sample_photos()
    photos = [photos[i] for i in subset(len(photos), limit, seed)]
    for photo in photos:
        shutil.copyfile(photo, images_dir / photo.name)
    return [photo.name for photo in photos]


def zip_images(
    archive: Path, rename: Callable[[str], str | None] = lambda path: path
) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The image entries of a zip archive as {name: entry}, name being `rename` of the path
    the entry unpacks to (None leaves it out), and the (entry, kept entry) pairs left out
    because an earlier entry in sorted order has the same name: `a.png` twice, `./a.png`,
    or `x//b.png` beside `x/b.png` all unpack to one file."""
    try:
        with zipfile.ZipFile(archive) as zf:
            entries = sorted(info.filename for info in zf.infolist() if not info.is_dir())
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(
            f"{archive} is not a readable zip archive ({exc}); delete it and "
            "re-run, or point data.source at a valid .zip"
        ) from None
    found, repeated = {}, []
    for entry in entries:
        path = fetch.entry_path(entry)
        name = rename(path) if _is_image(path) else None
        if name in found:
            repeated.append((entry, found[name]))
        elif name is not None:
            found[name] = entry
    return found, repeated


def from_zip(archive: Path, limit: int, seed: int, images_dir: Path) -> list[str]:
    """Safely unpack the images of a .zip into `images_dir`, keeping their paths."""
    entries, repeated = zip_images(archive)
    if not entries:
        raise _none_found(archive)
    return _unpack(archive, entries, repeated, limit, seed, images_dir)


def mit_scenes(
    categories: tuple[str, ...], limit: int, seed: int, sha256: str, images_dir: Path
) -> list[str]:
    """Download the MIT outdoor scenes once, then unpack `categories` (all when empty)
    flat into `images_dir` as <category>_<id>.jpg."""
    url = paths.mit_url()
    # Under the main root, so queued experiments (in temporary copies) share one download.
    cache = paths.repo_root() / paths.DOWNLOADS / PurePosixPath(urlsplit(url).path).name
    archive = fetch.download(url, cache, sha256=sha256)
    wanted = categories or MIT_CATEGORIES

    def flat(path: str) -> str | None:
        name = PurePosixPath(path).name
        return name if name.split("_", 1)[0] in wanted else None

    entries, repeated = zip_images(archive, flat)
    if not entries:
        raise UserError(
            f"{archive} holds no images of {', '.join(wanted)}; delete it and "
            "re-run to download it again"
        )
    return _unpack(archive, entries, repeated, limit, seed, images_dir)


def _unpack(
    archive: Path,
    entries: dict[str, str],
    repeated: list[tuple[str, str]],
    limit: int,
    seed: int,
    images_dir: Path,
) -> list[str]:
    """Unpack `entries` ({name in images_dir: archive entry}) beside `images_dir`, drop the
    repeated images, and move the data.limit subset of the rest into `images_dir`."""
    unpack = images_dir.parent / f".{images_dir.name}.unpack"
    staged = {name: unpack / fetch.entry_path(entry) for name, entry in entries.items()}
    try:
        # All of them: repeats must go before the subset is drawn, and finding them needs the bytes.
        fetch.extract_zip(archive, unpack, members=set(entries.values()).__contains__)
        names = distinct(sorted(entries), staged.__getitem__, archive, repeated)
        names = [names[i] for i in subset(len(names), limit, seed)]
        for name in names:
            (images_dir / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged[name], images_dir / name)
    finally:
        shutil.rmtree(unpack, ignore_errors=True)
    return names


# --- repeats: one image, one name, so it is never on both sides of the split -------------

SHOWN_REPEATS = 5  # named in the warning; the rest are counted


def distinct(
    names: list[str],
    path_of: Callable[[str], Path],
    source: Path,
    repeated: Iterable[tuple[str, str]] = (),
) -> list[str]:
    """The sorted `names` less those whose file holds the same bytes as an earlier one's.

    A photo saved under two names would otherwise be trained on and held out at once.
    Only files whose size another shares are hashed. One warning counts the dropped
    and names a few, together with `repeated`: (name, kept name) pairs the caller
    dropped already because their path was taken.
    """
    sizes = {name: path_of(name).stat().st_size for name in names}
    shared = Counter(sizes.values())
    kept, dropped, first = [], list(repeated), {}  # first: sha256 -> the name kept
    for name in names:
        if shared[sizes[name]] > 1:
            digest = fetch.file_sha256(path_of(name))
            if digest in first:
                dropped.append((name, first[digest]))
                continue
            first[digest] = name
        kept.append(name)
    if dropped:
        shown = ", ".join(f"{name} (same as {same})" for name, same in dropped[:SHOWN_REPEATS])
        log.warning(
            "%s: dropped %d repeated image(s) before the split, keeping the first in sorted "
            "order: %s%s",
            source,
            len(dropped),
            shown,
            ", …" if len(dropped) > SHOWN_REPEATS else "",
        )
    return kept
