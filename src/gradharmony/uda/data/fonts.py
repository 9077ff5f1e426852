"""Fonts installed here that draw the digits 0-9 legibly, for the SynDigits-like domain.

Candidates: matplotlib's bundled TrueType fonts (``<matplotlib data path>/fonts/ttf``: DejaVu,
STIX, Computer Modern) and every ``.ttf`` / ``.otf`` under ``/usr/share/fonts``.  Many installed
fonts are symbol, math-extension or fallback fonts whose code points 0x30-0x39 are not digits
(e.g. ``cmex10``, ``cmsy10``, ``STIXSize*``, ``LastResort``), so each candidate is rendered and
kept only if its ten digits are non-empty, pairwise different, and at least
``MIN_RECOGNISED`` of them are closest (normalised correlation of the cropped glyph) to the same
digit of DejaVu Sans.  Fonts with the same (family, style) are kept once.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

SYSTEM_FONT_DIRS = (Path("/usr/share/fonts"),)
MIN_RECOGNISED = 6  # of 10 digits; italic Computer Modern scores 6, symbol fonts 1-2
_GLYPH_PX = 48


def matplotlib_font_dir() -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return folder if folder.is_dir() else None


def candidate_font_files() -> list[Path]:
    """Font files to try, matplotlib's first, in a fixed order."""
    files: list[Path] = []
    bundled = matplotlib_font_dir()
    if bundled is not None:
        files += sorted(bundled.glob("*.ttf"))
    for folder in SYSTEM_FONT_DIRS:
        if folder.is_dir():
            files += sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".ttf", ".otf"))
    return files


def glyph_signature(font, char: str) -> np.ndarray:
    """The glyph cropped to its ink, resized to 16x16, zero-mean unit-norm; zeros if no ink."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (2 * _GLYPH_PX, 2 * _GLYPH_PX), 0)
    ImageDraw.Draw(canvas).text((_GLYPH_PX // 2, _GLYPH_PX // 4), char, font=font, fill=255)
    box = canvas.getbbox()
    if box is None:
        return np.zeros(256)
    glyph = np.asarray(canvas.crop(box).resize((16, 16), Image.BILINEAR), dtype=np.float64).ravel()
    glyph -= glyph.mean()
    norm = np.linalg.norm(glyph)
    return glyph / norm if norm > 0 else glyph


def digit_signatures(font) -> np.ndarray:
    return np.stack([glyph_signature(font, str(d)) for d in range(10)])


def draws_digits(font, reference: np.ndarray | None) -> bool:
    glyphs = digit_signatures(font)
    if not np.all(np.abs(glyphs).sum(1) > 0):
        return False
    if len({g.tobytes() for g in glyphs}) < 10:
        return False
    if reference is None:
        return True
    recognised = int(((glyphs @ reference.T).argmax(1) == np.arange(10)).sum())
    return recognised >= MIN_RECOGNISED


@lru_cache(maxsize=4)
def _digit_fonts(files: tuple[Path, ...]) -> tuple[Path, ...]:
    from PIL import ImageFont

    reference = None
    bundled = matplotlib_font_dir()
    if bundled is not None and (bundled / "DejaVuSans.ttf").is_file():
        reference = digit_signatures(ImageFont.truetype(str(bundled / "DejaVuSans.ttf"), _GLYPH_PX))
    kept, seen = [], set()
    for path in files:
        try:
            font = ImageFont.truetype(str(path), _GLYPH_PX)
        except OSError:
            continue
        name = font.getname()
        if name in seen or not draws_digits(font, reference):
            continue
        seen.add(name)
        kept.append(path)
    return tuple(kept)


def digit_fonts(files: list[Path] | None = None) -> list[Path]:
    """The font files (of ``files``, default :func:`candidate_font_files`) that draw digits."""
    return list(_digit_fonts(tuple(candidate_font_files() if files is None else files)))
