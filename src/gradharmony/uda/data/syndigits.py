"""A SynDigits-like domain (after Ganin & Lempitsky 2015): rendered digits, 32x32 RGB.

The original SynDigits (~500,000 images from Windows fonts) is not distributed with a licence
that lets us ship it, so this renders a look-alike from the fonts installed here (see
:mod:`gradharmony.uda.data.fonts`).  Sizes: 25,000 train and 9,000 test images, labels balanced
(each digit equally often, shuffled).  Each image is, like an SVHN crop, one labelled digit in
the middle, with a neighbouring digit on either side half of the time; per image (all drawn
from ``numpy.random.default_rng`` seeded by ``(seed, split)``):

* font: uniform over the usable fonts; font size 36-63 px on a 64 px canvas (drawn at twice
  the output size, then box-downsampled for antialiasing);
* position jitter of the centre digit +-4 px horizontally, +-3 px vertically (canvas pixels),
  rotation uniform in +-15 degrees about it, neighbour gap 2-20 % of the font size;
* background colour uniform RGB plus a linear gradient of random direction and amplitude
  0-60 levels; text colour uniform RGB redrawn until its luminance differs from the
  background's by at least 64 levels;
* Gaussian blur with sigma uniform in [0, 1] output pixels, Gaussian noise with standard
  deviation uniform in [0, 6] levels.

Same seed -> identical tensor (on the same fonts and Pillow/FreeType build: the fonts' files
enter the cache key); ``limit=n`` gives the first ``n`` images of the full split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gradharmony.uda.data.fonts import SYSTEM_FONT_DIRS, candidate_font_files, digit_fonts, matplotlib_font_dir
from gradharmony.uda.data.sources import Found, not_found

SPLIT_SIZES = {"train": 25_000, "test": 9_000}
SPLIT_STREAM = {"train": 0, "test": 1}
OUT = 32
CANVAS = 2 * OUT
MIN_CONTRAST = 64.0
LUMA = np.array([0.299, 0.587, 0.114])


def locate(split: str, data_root: Path) -> Found:
    files = candidate_font_files()
    if not files:
        looked = [matplotlib_font_dir() or Path("<matplotlib>/mpl-data/fonts/ttf"), *SYSTEM_FONT_DIRS]
        raise not_found(
            "syndigits",
            looked,
            "  - TrueType/OpenType fonts (.ttf, .otf) drawing digits",
            "pip install matplotlib (bundles DejaVu fonts) or apt-get install fonts-dejavu-core",
        )
    description = f"SynDigits-like renderings from {len(files)} candidate fonts"
    return Found("syndigits-fonts", tuple(files), description, tuple(files))


def draw_parameters(count: int, num_fonts: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every random choice for ``count`` images, drawn up front (so a prefix is reproducible)."""
    p = {
        "label": rng.permutation(np.arange(count) % 10),
        "font": rng.integers(0, num_fonts, count),
        "size": rng.integers(36, 64, count),
        "dx": rng.uniform(-4, 4, count),
        "dy": rng.uniform(-3, 3, count),
        "angle": rng.uniform(-15, 15, count),
        "left": np.where(rng.random(count) < 0.5, rng.integers(0, 10, count), -1),
        "right": np.where(rng.random(count) < 0.5, rng.integers(0, 10, count), -1),
        "gap": rng.uniform(0.02, 0.2, count),
        "background": rng.integers(0, 256, (count, 3)).astype(np.float64),
        "gradient_angle": rng.uniform(0, 2 * np.pi, count),
        "gradient_amplitude": rng.uniform(0, 60, count),
        "blur": rng.uniform(0, 1.0, count),
        "noise": rng.uniform(0, 6, count),
        "noise_seed": rng.integers(0, 2**63 - 1, count),
    }
    text = rng.integers(0, 256, (count, 3)).astype(np.float64)
    for _ in range(100):  # redraw low-contrast text colours; each round keeps ~70 % of the rest
        low = np.abs((text - p["background"]) @ LUMA) < MIN_CONTRAST
        if not low.any():
            break
        text[low] = rng.integers(0, 256, (int(low.sum()), 3))
    p["text"] = text
    return p


def text_mask(fonts: dict, p: dict[str, np.ndarray], i: int):
    """The rendered digits of image ``i`` as an ``L`` image of the output size (255 = ink)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(canvas)
    font = fonts[int(p["font"][i]), int(p["size"][i])]
    label = str(int(p["label"][i]))
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    cx, cy = CANVAS / 2 + p["dx"][i], CANVAS / 2 + p["dy"][i]
    x = round(cx - (left + right) / 2)
    y = round(cy - (top + bottom) / 2)
    draw.text((x, y), label, font=font, fill=255)
    gap = p["gap"][i] * p["size"][i]
    if p["left"][i] >= 0:
        other = str(int(p["left"][i]))
        other_right = draw.textbbox((0, 0), other, font=font)[2]
        draw.text((round(x + left - gap - other_right), y), other, font=font, fill=255)
    if p["right"][i] >= 0:
        other = str(int(p["right"][i]))
        other_left = draw.textbbox((0, 0), other, font=font)[0]
        draw.text((round(x + right + gap - other_left), y), other, font=font, fill=255)
    canvas = canvas.rotate(float(p["angle"][i]), resample=Image.BILINEAR, center=(cx, cy))
    return canvas.resize((OUT, OUT), Image.BOX)


def background(p: dict[str, np.ndarray], i: int) -> np.ndarray:
    """Float ``[32, 32, 3]``: the background colour plus a linear gradient."""
    coords = (np.arange(OUT) - (OUT - 1) / 2) / OUT
    theta = p["gradient_angle"][i]
    ramp = np.cos(theta) * coords[None, :] + np.sin(theta) * coords[:, None]
    return p["background"][i] + p["gradient_amplitude"][i] * ramp[..., None]


def render(p: dict[str, np.ndarray], fonts: dict, i: int) -> np.ndarray:
    from PIL import Image, ImageFilter

    ink = np.asarray(text_mask(fonts, p, i), dtype=np.float64)[..., None] / 255.0
    image = background(p, i) * (1 - ink) + p["text"][i] * ink
    pil = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    image = np.asarray(pil.filter(ImageFilter.GaussianBlur(float(p["blur"][i]))), dtype=np.float64)
    image += p["noise"][i] * np.random.default_rng(int(p["noise_seed"][i])).standard_normal(image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8).transpose(2, 0, 1)


class FontCache(dict):
    """``(font index, size) -> ImageFont``, loaded on first use."""

    def __init__(self, files: list[Path]) -> None:
        super().__init__()
        self.files = files

    def __missing__(self, key: tuple[int, int]):
        from PIL import ImageFont

        font = ImageFont.truetype(str(self.files[key[0]]), key[1])
        self[key] = font
        return font


def read(found: Found, split: str, seed: int, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    files = digit_fonts(list(found.payload))
    if not files:
        raise ValueError(f"none of the {len(found.payload)} fonts found draws the digits 0-9 legibly")
    count = SPLIT_SIZES[split]
    p = draw_parameters(count, len(files), np.random.default_rng([seed, SPLIT_STREAM[split], 0x5359]))
    n = count if limit is None else min(limit, count)
    fonts = FontCache(files)
    images = np.empty((n, 3, OUT, OUT), dtype=np.uint8)
    for i in range(n):
        images[i] = render(p, fonts, i)
    return images, p["label"][:n].astype(np.int64)
