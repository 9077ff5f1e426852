"""Image datasets read from files: image lists and class folders, with corrupt-image handling.

Two layouts, both returning ``(transform(image), label)`` with the image decoded by Pillow as RGB:

* **Image list** (:class:`ImageListDataset`): a text file with one ``<path> <label>`` per line, the
  format of TLlib's ``image_list/*.txt``, of the official VisDA-2017 ``image_list.txt`` and
  DomainNet ``<domain>_{train,test}.txt``, and of the CDAN / GH authors' lists.  Relative paths
  start at ``root``.  Paths may contain spaces (the label is the last field); blank lines and
  lines starting with ``#`` are ignored.  Lists written on another machine, whose paths begin with
  that machine's folders (``/data/office/domain_adaptation_images/amazon/images/...``), are
  re-rooted: the fewest leading folders are dropped that make the paths exist under ``root``.
* **Class folders** (:class:`FolderDataset`): ``<root>/<class>/**/<image>`` as
  ``torchvision.datasets.ImageFolder`` reads it, with the class order given by the benchmark (so
  every domain of a benchmark numbers its classes alike) or, by default, sorted.

A file Pillow cannot decode raises :class:`CorruptImageError` naming it; with
``on_corrupt="skip"`` it is skipped instead (the next readable image is returned), listed in
:attr:`ImageListDataset.skipped` and reported by a :class:`CorruptImageWarning`.
:meth:`ImageListDataset.verify` decodes every image up front for an exact count (skips found while
training with DataLoader workers are counted per worker process).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from gradharmony.uda.data.domain import DatasetFormatError, DatasetNotFoundError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
ON_CORRUPT = ("raise", "skip")
_SHOWN = 10  # how many paths an error message lists before "... and N more"

Entry = tuple[Path, int]


class CorruptImageError(DatasetFormatError):
    """An image file exists but Pillow cannot decode it."""

    def __init__(self, path: str | Path, cause: BaseException | None = None) -> None:
        super().__init__(path, "an image file Pillow can decode", cause)
        self.args = (
            f"{self.args[0]} Pass on_corrupt='skip' to skip unreadable images "
            "(they are counted and listed in a warning).",
        )


class CorruptImageWarning(UserWarning):
    """Unreadable images were skipped (``on_corrupt="skip"``)."""


def _listing(paths: Sequence[Any]) -> str:
    shown = "\n".join(f"  {p}" for p in paths[:_SHOWN])
    more = f"\n  ... and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else ""
    return shown + more


def read_image_list(list_file: str | Path) -> list[tuple[str, int]]:
    """Parse an image list: ``(path as written, label)`` for each ``<path> <label>`` line.

    Raises:
        DatasetNotFoundError: the file does not exist.
        DatasetFormatError: a line has no integer label as its last field, or a label is negative.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DatasetNotFoundError(f"image list {list_file} not found")
    entries = []
    with open(list_file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            try:
                label = int(parts[1]) if len(parts) == 2 else -1
            except ValueError:
                label = -1
            if label < 0:
                raise DatasetFormatError(
                    list_file, f"'<path> <label>' lines with a label >= 0; line {number} is {line!r}"
                )
            entries.append((parts[0], label))
    return entries


def _rebase_depth(paths: Sequence[str], root: Path, tries: int = 20) -> int | None:
    """How many leading components to drop from the paths so that they exist under ``root``.

    Looks at the first ``tries`` paths (some may be genuinely missing) and returns the smallest
    depth that makes one of them exist, or ``None`` if none can be found.
    """
    for raw in paths[:tries]:
        path = Path(raw)
        if path.is_absolute() and path.is_file():
            return 0
        parts = path.parts[1:] if path.is_absolute() else path.parts
        for depth in range(len(parts)):
            if (root / Path(*parts[depth:])).is_file():
                return depth + (1 if path.is_absolute() else 0)
    return None


def resolve_image_paths(paths: Sequence[str], root: str | Path | Sequence[str | Path]) -> list[Path]:
    """Turn the paths of a list into file paths under ``root`` (see the module doc on re-rooting).

    ``root`` may be several candidate folders: the first under which the paths can be found is
    used.  Absolute paths that exist are kept.  The number of leading folders to drop is found
    once, from the first paths, and applied to every path; nothing else is checked here.
    """
    roots = [Path(root)] if isinstance(root, (str, Path)) else [Path(r) for r in root]
    depth, base = 0, roots[0]
    for candidate in roots:
        if (found := _rebase_depth(paths, candidate)) is not None:
            depth, base = found, candidate
            break
    out = []
    for raw in paths:
        path = Path(raw)
        if path.is_absolute() and depth == 0:
            out.append(path)
            continue
        parts = path.parts[depth:]
        out.append(base / Path(*parts) if parts else base)
    return out


def _check_on_corrupt(on_corrupt: str) -> str:
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
    return on_corrupt


class ImageListDataset(Dataset):
    """Images and labels from an image-list file or from ``(path, label)`` entries.

    Args:
        root: folder the relative paths start from (default: the list file's folder).
        list_file: a ``<path> <label>`` text file (see the module doc).  Give this or ``entries``.
        entries: ``(path, label)`` pairs instead of a file; relative paths start at ``root``.
        transform: applied to the RGB ``PIL.Image`` (e.g.
            :func:`gradharmony.uda.data.image_transforms.train_transform`); ``None`` returns the image.
        on_corrupt: ``"raise"`` (default) or ``"skip"`` for images Pillow cannot decode.
        classes: class names in label order; sets :attr:`num_classes` and bounds the labels.
        check_files: check that every file exists (one ``stat`` per image).

    Attributes:
        samples: ``(path, label)`` for every image.
        targets: the labels, in order.
        classes: class names (``"0"``, ``"1"``... when not given).
        num_classes: ``len(classes)``.
        source: one line saying where the images came from.

    Raises:
        DatasetNotFoundError: the list file or some images are missing (the message lists them).
        DatasetFormatError: a malformed line, or a label outside ``0 .. len(classes) - 1``.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        list_file: str | Path | None = None,
        *,
        entries: Iterable[tuple[str | Path, int]] | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        on_corrupt: str = "raise",
        classes: Sequence[str] | None = None,
        check_files: bool = True,
    ) -> None:
        if (list_file is None) == (entries is None):
            raise ValueError("give exactly one of list_file and entries")
        self.on_corrupt = _check_on_corrupt(on_corrupt)
        self.transform = transform
        if list_file is not None:
            list_file = Path(list_file).expanduser()
            raw = read_image_list(list_file)
            base = Path(root).expanduser() if root is not None else list_file.parent
            paths = resolve_image_paths([p for p, _ in raw], base)
            pairs = [(p, label) for p, (_, label) in zip(paths, raw)]
            self.source = f"image list {list_file} (paths under {base})"
        else:
            base = Path(root).expanduser() if root is not None else Path.cwd()
            pairs = [(Path(p) if Path(p).is_absolute() else base / p, int(label)) for p, label in entries]
            self.source = f"{len(pairs)} images under {base}"
        self.samples: list[Entry] = pairs
        self.targets = [label for _, label in pairs]
        highest = max(self.targets, default=-1)
        if classes is None:
            classes = [str(i) for i in range(highest + 1)]
        self.classes = list(classes)
        bad = sorted({t for t in self.targets if not 0 <= t < len(self.classes)})
        if bad:
            raise DatasetFormatError(
                list_file or base,
                f"labels in 0..{len(self.classes) - 1} ({len(self.classes)} classes); found {bad[:_SHOWN]}",
            )
        if check_files:
            missing = [p for p, _ in pairs if not p.is_file()]
            if missing:
                where = f"image list {list_file}" if list_file is not None else f"root {base}"
                raise DatasetNotFoundError(
                    f"{len(missing)} of {len(pairs)} images referenced by {where} are missing:\n"
                    f"{_listing(missing)}\n"
                    "Check that the images were extracted under the folder the paths start from."
                )
        self._skipped: dict[Path, str] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def skipped(self) -> list[Path]:
        """Unreadable images skipped so far (in this process), sorted."""
        return sorted(self._skipped)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={len(self)}, num_classes={self.num_classes}, "
            f"on_corrupt={self.on_corrupt!r}, source={self.source!r})"
        )

    def _open(self, path: Path) -> Image.Image | None:
        """The RGB image, or ``None`` if it is unreadable and skipping was asked for."""
        if path in self._skipped:
            return None
        try:
            with Image.open(path) as image:
                return image.convert("RGB")  # decodes the whole file: truncation shows up here
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            if self.on_corrupt == "raise":
                raise CorruptImageError(path, exc) from exc
            self._skipped[path] = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"skipped unreadable image {path} ({type(exc).__name__}: {exc}); "
                f"{len(self._skipped)} skipped so far in this process (see .skipped)",
                CorruptImageWarning,
                stacklevel=3,
            )
            return None

    def __getitem__(self, index: int) -> tuple[Any, int]:
        # With on_corrupt="skip" an unreadable image is replaced by the next readable one, so a
        # DataLoader keeps its batch size.
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            image = self._open(path)
            if image is not None:
                return (self.transform(image) if self.transform is not None else image), label
        raise DatasetFormatError(self.source, "at least one readable image; every image is unreadable")

    def verify(self) -> list[Path]:
        """Decode every image once; drop the unreadable ones (``skip``) or raise on the first.

        Returns the skipped paths; one :class:`CorruptImageWarning` lists them all.  Costs one
        full decode per image.
        """
        bad = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CorruptImageWarning)
            for path, _ in self.samples:
                if self._open(path) is None:
                    bad.append(path)
        if bad:
            dropped = set(bad)
            self.samples = [s for s in self.samples if s[0] not in dropped]
            self.targets = [label for _, label in self.samples]
            warnings.warn(
                f"skipped {len(bad)} unreadable images of {self.source}:\n{_listing(bad)}",
                CorruptImageWarning,
                stacklevel=2,
            )
            if not self.samples:
                raise DatasetFormatError(self.source, "at least one readable image; every image is unreadable")
        return bad


def scan_class_folders(
    root: str | Path, classes: Sequence[str] | None = None, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> tuple[list[str], list[Entry]]:
    """The class names and ``(path, label)`` entries of a ``<root>/<class>/**/<image>`` tree.

    ``classes`` fixes the label order and which folders are read (others are ignored); by default
    every sub-folder is a class, in sorted order.  Files are sorted within a class; sub-folders of
    a class folder are searched too.  Only files with one of ``extensions`` (any case) count.

    Raises:
        DatasetNotFoundError: ``root`` is not a folder, has no class folders, or (the tree is
            incomplete) some classes have no folder or no image; the message lists them.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} not found")
    if classes is None:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise DatasetNotFoundError(f"image folder {root} has no class folders (expected <root>/<class>/<image>)")
    suffixes = tuple(s.lower() for s in extensions)
    entries: list[Entry] = []
    missing, empty = [], []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            missing.append(name)
            continue
        files = sorted(
            Path(dirpath) / f
            for dirpath, _, names in os.walk(folder, followlinks=True)
            for f in names
            if f.lower().endswith(suffixes)
        )
        if not files:
            empty.append(name)
        entries.extend((path, label) for path in files)
    if missing or empty:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {len(classes)} class folders are missing:\n{_listing(missing)}")
        if empty:
            parts.append(f"{len(empty)} class folders hold no image ({', '.join(suffixes)}):\n{_listing(empty)}")
        raise DatasetNotFoundError(f"image folder {root} is incomplete: " + "\n".join(parts))
    return list(classes), entries


class FolderDataset(ImageListDataset):
    """Images in class folders, ``<root>/<class>/**/<image>`` (see :func:`scan_class_folders`).

    Args:
        root: the folder holding one folder per class (e.g. ``office31/amazon/images``).
        classes: class names in label order (a benchmark's classes, shared by its domains);
            default: the sorted sub-folder names.
        transform, on_corrupt: as for :class:`ImageListDataset`.
        extensions: file name endings that count as images.
    """

    def __init__(
        self,
        root: str | Path,
        classes: Sequence[str] | None = None,
        *,
        transform: Callable[[Image.Image], Any] | None = None,
        on_corrupt: str = "raise",
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        _check_on_corrupt(on_corrupt)
        names, entries = scan_class_folders(root, classes, extensions)
        super().__init__(
            root, entries=entries, transform=transform, on_corrupt=on_corrupt, classes=names, check_files=False
        )
        self.source = f"class folders under {Path(root).expanduser()}"
