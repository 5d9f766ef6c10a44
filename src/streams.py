"""The random streams. Every draw comes from np.random.default_rng([params.seed, STREAM])
(the dead leaves add the image index), one stream per use, so changing how much one use
draws never shifts another's numbers. Keras's initial weights come from
keras.utils.set_random_seed(params.seed).
"""

from __future__ import annotations

import numpy as np

CROPS = 1  # train: the crops' order and offsets; the curvature probe sees the first ones
CURVATURE = 2  # train: the start vector of the Lanczos curvature estimate
TARGET_NOISE = 3  # filter: the noise added to the targets
LEAVES = 101  # download: the dead-leaves images, one stream per image index
SUBSET = 102  # download: the data.limit subset
SPLIT = 103  # download: the train/val split
ORIGINAL_ORDER = 7  # make bench: the image order of the original recipe


def rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])
