"""Bring uint8 image batches into one input space: a square size and 1 or 3 channels.

Resizing is bilinear with antialiasing by default (which only matters when shrinking, e.g. 32 ->
28 or MNIST -> 16 for USPS), or Pillow's bicubic filter (``resize_filter="bicubic"``), which is
what TLlib's digit scripts apply (its ``ResizeImage`` calls ``Image.resize`` with Pillow's default
filter).  The filter matters when USPS is upsampled 16 -> 28 as a *source*: MCC on USPS -> MNIST at
TLlib's recipe reaches 89.8% / 92.7% after 500 / 1000 steps with bilinear and 95.7% / 97.6% with
bicubic (seed 0, docs/results.md).  Gray becomes RGB by repeating the channel, RGB becomes gray by
ITU-R BT.601 luminance (0.299 R + 0.587 G + 0.114 B), the weights Pillow's ``convert("L")`` uses.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

LUMINANCE = (0.299, 0.587, 0.114)
#: How :func:`resize` can resize: ``bilinear`` (antialiased, PyTorch) or ``bicubic`` (Pillow's).
RESIZE_FILTERS = ("bilinear", "bicubic")
_CHUNK = 4096  # images per call: bounds the float32 working memory of the gray conversion


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert uint8 ``[N, C, H, W]`` with C in {1, 3} to ``channels`` in {1, 3}."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        weights = torch.tensor(LUMINANCE, dtype=torch.float32).view(1, 3, 1, 1)
        out = torch.empty((images.shape[0], 1, *images.shape[2:]), dtype=torch.uint8)
        for start in range(0, images.shape[0], _CHUNK):
            chunk = images[start : start + _CHUNK].float()
            out[start : start + _CHUNK] = (chunk * weights).sum(1, keepdim=True).round_().clamp_(0, 255)
        return out
    raise ValueError(f"cannot convert {c} channels to {channels}; channels must be 1 or 3")


def resize(images: torch.Tensor, size: int, resize_filter: str = "bilinear") -> torch.Tensor:
    """Resize uint8 ``[N, C, H, W]`` to ``[N, C, size, size]`` with ``resize_filter``.

    ``bilinear`` (antialiased) uses PyTorch's native uint8 bilinear kernel (fixed-point; within 1
    level of resizing in float and rounding), about twice as fast as converting to float first.
    ``bicubic`` resizes each channel of each image as a Pillow ``L`` image with
    ``Image.Resampling.BICUBIC`` (Pillow's own antialiasing when shrinking), pixel for pixel what
    TLlib's ``ResizeImage`` produces from the same uint8 image.
    """
    if resize_filter not in RESIZE_FILTERS:
        raise ValueError(f"resize_filter must be one of {', '.join(RESIZE_FILTERS)}, got {resize_filter!r}")
    if images.shape[-2:] == (size, size):
        return images
    if resize_filter == "bicubic":
        return _pillow_bicubic(images, size)
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], _CHUNK):
        out[start : start + _CHUNK] = F.interpolate(
            images[start : start + _CHUNK], size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    return out


def _pillow_bicubic(images: torch.Tensor, size: int) -> torch.Tensor:
    planes = images.reshape(-1, *images.shape[-2:]).numpy()
    resized = np.stack([np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.BICUBIC)) for p in planes])
    return torch.from_numpy(resized).reshape(*images.shape[:2], size, size)


def to_input_space(
    images: torch.Tensor, image_size: int, channels: int, resize_filter: str = "bilinear"
) -> torch.Tensor:
    """Resize and convert channels; converts to gray before resizing (3x less work) and to RGB after."""
    if channels == 1:
        return resize(to_channels(images, 1), image_size, resize_filter)
    return to_channels(resize(images, image_size, resize_filter), channels)
