"""Where a kernel's window sits: Keras's 'same' padding, and where a target starts.

Pure arithmetic, no imports: the model (src/layers.py) and the filter (src/filtering.py)
share it, and loading a saved model needs nothing heavier.
"""

from __future__ import annotations


def same_padding(kh: int, kw: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) zero padding of TensorFlow/Keras 'same' at stride 1.

    The odd pixel of an even kernel goes after, not before: scipy.ndimage centres
    an even kernel the other way, which would shift the target by one pixel.
    """
    return ((kh - 1) // 2, kh - 1 - (kh - 1) // 2), ((kw - 1) // 2, kw - 1 - (kw - 1) // 2)


def target_offset(kernel_shape: tuple[int, int], padding: str) -> tuple[int, int]:
    """Where input pixel (0, 0)'s window lands in the target: 'same' targets are
    shifted by the padding; their interior is exactly the 'valid' correlation."""
    if padding == "same":
        (top, _), (left, _) = same_padding(*kernel_shape)
        return top, left
    return 0, 0
