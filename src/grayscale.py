"""Turn the downloaded images into one (N, S, S, C) float32 stack: luma (C = 1) or RGB (3).

Each image is decoded, converted to luma (or kept in RGB) and fitted to S×S (src/images.py),
then appended straight to the .npy on disk (src/stack.py): memory stays at one
image however many there are. Unreadable images are skipped and named, up to
data.max_bad_fraction of them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from src import images
from src.errors import UserError
from src.stack import write_stack

log = logging.getLogger(__name__)

WARN_MAX = 10  # skipped files named one by one; the rest are counted


@dataclass
class Conversion:
    """What `convert` kept (rows of the stack, in order) and what it skipped, with why."""

    kept: list[tuple[str, str]] = field(default_factory=list)  # (name, split)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)


def convert(
    rows: list[tuple[str, str]],
    images_dir: Path,
    size: int,
    out_path: Path,
    max_bad_fraction: float,
    channels: int = 1,
) -> Conversion:
    """Convert every manifest row into `out_path` (N_kept, size, size, channels), skipping
    the unreadable; UserError as soon as more than max_bad_fraction of all rows are."""
    result = Conversion()

    def grays() -> Iterator[np.ndarray]:
        for number, (name, split) in enumerate(rows, 1):
            try:
                gray = images.read_fitted(images_dir / name, size, channels)
            except images.BadImage as exc:
                result.skipped.append((name, str(exc)))
                if len(result.skipped) <= WARN_MAX:
                    log.warning("skipping %s", exc)
                if len(result.skipped) > max_bad_fraction * len(rows):
                    bad = too_many_bad(result.skipped, number, len(rows), max_bad_fraction)
                    raise bad from None
                continue
            result.kept.append((name, split))
            yield gray

    write_stack(out_path, grays(), len(rows), (size, size, channels))
    if not result.kept:
        raise UserError(f"none of the {len(rows)} images could be read; check data.source")
    return result


def too_many_bad(
    skipped: list[tuple[str, str]], seen: int, total: int, max_bad_fraction: float
) -> UserError:
    count = "" if seen == total else "at least "
    return UserError(
        f"{count}{len(skipped)} of {total} images ({len(skipped) / total:.1%}) "
        f"cannot be read, more than data.max_bad_fraction={max_bad_fraction:g} "
        f"allows (first: {skipped[0][1]}); replace or remove them in data.source, "
        "or raise data.max_bad_fraction"
    )
