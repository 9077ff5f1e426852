"""Resizing and channel conversion into the shared input space."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gradharmony.uda.data.transforms import resize, to_channels, to_input_space


def test_gray_to_rgb_repeats_the_channel():
    gray = torch.randint(0, 256, (5, 1, 6, 6), dtype=torch.uint8)
    rgb = to_channels(gray, 3)
    assert rgb.shape == (5, 3, 6, 6) and rgb.dtype == torch.uint8 and rgb.is_contiguous()
    assert torch.equal(rgb[:, 0], gray[:, 0]) and torch.equal(rgb[:, 2], gray[:, 0])


def test_rgb_to_gray_uses_luminance():
    rgb = torch.zeros(3, 3, 2, 2, dtype=torch.uint8)
    rgb[0, 0], rgb[1, 1], rgb[2, 2] = 255, 255, 255
    gray = to_channels(rgb, 1)
    assert gray.shape == (3, 1, 2, 2)
    assert gray[:, 0, 0, 0].tolist() == [76, 150, 29]  # round(255 * (0.299, 0.587, 0.114))
    white = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert to_channels(white, 1).unique().tolist() == [255]


def test_resize_keeps_constant_images_and_range():
    flat = torch.full((2, 1, 28, 28), 200, dtype=torch.uint8)
    assert torch.equal(resize(flat, 16), torch.full((2, 1, 16, 16), 200, dtype=torch.uint8))
    noise = torch.randint(0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    small = resize(noise, 8)
    assert small.shape == (3, 3, 8, 8) and small.dtype == torch.uint8
    # A resize keeps each image's mean brightness (to within one level), channel by channel.
    assert (small.float().mean((2, 3)) - noise.float().mean((2, 3))).abs().max() <= 1.0


def test_resize_antialiases_when_shrinking():
    stripes = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    stripes[..., ::2] = 255  # one-pixel stripes: without antialiasing bilinear would alias
    small = resize(stripes, 8)
    assert (small.float() - 127.5).abs().max() < 20


def test_same_size_is_returned_unchanged():
    images = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    assert to_input_space(images, 16, 1) is images


def test_to_input_space_combines_both():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    out = to_input_space(images, 28, 1)
    assert out.shape == (4, 1, 28, 28)
    # Both steps are linear, so the order (gray first, for speed) changes only the rounding.
    other_order = to_channels(resize(images, 28), 1)
    assert (out.int() - other_order.int()).abs().max() <= 2
    gray = torch.randint(0, 256, (4, 1, 16, 16), generator=g, dtype=torch.uint8)
    out = to_input_space(gray, 32, 3)
    assert out.shape == (4, 3, 32, 32)
    assert all(torch.equal(out[:, i : i + 1], resize(gray, 32)) for i in range(3))


@pytest.mark.parametrize(("channels", "size_in", "size_out"), [(1, 16, 28), (3, 32, 28)])
def test_bicubic_is_pillows_default_resize_pixel_for_pixel(channels, size_in, size_out):
    """What TLlib's ``ResizeImage`` gives: ``Image.resize`` with Pillow's default filter, gray or RGB."""
    images = torch.randint(
        0, 256, (4, channels, size_in, size_in), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    ours = resize(images, size_out, "bicubic")
    for image, resized in zip(images, ours, strict=True):
        array = image.permute(1, 2, 0).numpy().squeeze(-1) if channels == 1 else image.permute(1, 2, 0).numpy()
        pillow = np.asarray(Image.fromarray(array).resize((size_out, size_out))).reshape(size_out, size_out, channels)
        assert np.array_equal(resized.permute(1, 2, 0).numpy(), pillow)
    assert not torch.equal(ours, resize(images, size_out))  # a different filter from the default


def test_an_unknown_resize_filter_is_refused():
    with pytest.raises(ValueError, match="resize_filter must be one of bilinear, bicubic, got 'nearest'"):
        resize(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), 8, "nearest")
