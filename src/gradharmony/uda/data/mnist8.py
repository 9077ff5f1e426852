"""MNIST in the 8x8 representation of the UCI digits, so the two can be paired as domains.

The UCI optdigits images were made from size-normalised 32x32 binary bitmaps by counting the
"on" pixels in each non-overlapping 4x4 block (giving 0..16).  Their digits fill the bitmap's
height and are centred horizontally (every row of the 8x8 images is used, the outer columns
rarely), unlike MNIST's 20x20 box inside a 28x28 frame.  So each MNIST digit is:

1. cropped to the bounding box of its non-zero pixels;
2. scaled (bilinear) by one factor for both axes so that the box fills 32 pixels in its longer
   dimension (the height, for nearly every digit), centred in a 32x32 frame;
3. binarised: on where the scaled gray value is at least 128;
4. reduced to 8x8 by counting on-pixels per 4x4 block, then scaled to bytes like ``uci8``
   (``round(count * 255 / 16)``).

Deterministic (no randomness; ``seed`` is ignored).  Train: the 60,000 MNIST train digits,
test: the 10,000 MNIST test digits, in MNIST order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gradharmony.uda.data import mnist
from gradharmony.uda.data.sources import Found
from gradharmony.uda.data.uci8 import counts_to_bytes

BITMAP = 32
BLOCK = 4
_CHUNK = 8192


def locate(split: str, data_root: Path) -> Found:
    digits = mnist.locate(split, data_root)
    return Found("mnist8", digits.files, f"MNIST as UCI 8x8 counts: {digits.description}", digits)


def normalised_bitmaps(digits: np.ndarray) -> np.ndarray:
    """Gray digits ``[N, H, W]`` -> size-normalised binary bitmaps ``bool [N, 32, 32]``."""
    n, height, width = digits.shape
    ink = digits > 0
    rows, cols = ink.any(2), ink.any(1)
    has_ink = rows.any(1)
    top = rows.argmax(1)
    bottom = height - rows[:, ::-1].argmax(1)  # exclusive
    left = cols.argmax(1)
    right = width - cols[:, ::-1].argmax(1)
    box_h = np.maximum(bottom - top, 1)
    box_w = np.maximum(right - left, 1)
    scale = BITMAP / np.maximum(box_h, box_w)  # input pixels -> bitmap pixels
    centre_x = (left + right) / 2.0
    centre_y = (top + bottom) / 2.0

    # Sampling grid in grid_sample's normalised coordinates (align_corners=False: pixel i spans
    # [i, i+1), so a continuous coordinate u is 2u/size - 1).  Output pixel centre v + 0.5 maps
    # back to input coordinate centre + (v + 0.5 - 16) / scale.  No rotation, so x depends only
    # on the column and y only on the row: built by broadcasting (affine_grid is far slower).
    offsets = (np.arange(BITMAP) + 0.5 - BITMAP / 2)[None, :] / scale[:, None]  # [N, 32]
    grid_x = (2 * (centre_x[:, None] + offsets) / width - 1).astype(np.float32)
    grid_y = (2 * (centre_y[:, None] + offsets) / height - 1).astype(np.float32)
    out = np.empty((n, BITMAP, BITMAP), dtype=bool)
    for start in range(0, n, _CHUNK):
        stop = start + _CHUNK
        chunk = torch.tensor(digits[start:stop], dtype=torch.float32)[:, None]
        gx = torch.from_numpy(grid_x[start:stop])[:, None, :].expand(-1, BITMAP, -1)
        gy = torch.from_numpy(grid_y[start:stop])[:, :, None].expand(-1, -1, BITMAP)
        grid = torch.stack([gx, gy], dim=-1)  # [n, 32, 32, (x, y)]
        scaled = F.grid_sample(chunk, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out[start:stop] = (scaled[:, 0] >= 128).numpy()
    out[~has_ink] = False
    return out


def block_counts(bitmaps: np.ndarray) -> np.ndarray:
    """Binary ``[N, 32, 32]`` -> counts of on-pixels per 4x4 block, ``[N, 8, 8]`` in 0..16."""
    n = bitmaps.shape[0]
    side = BITMAP // BLOCK
    return bitmaps.reshape(n, side, BLOCK, side, BLOCK).sum(axis=(2, 4))


def read(found: Found, split: str, seed: int, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    digits, labels = mnist.read_gray(found.payload, split, limit)
    counts = block_counts(normalised_bitmaps(digits))
    return counts_to_bytes(counts)[:, None], labels
