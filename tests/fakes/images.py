"""Small generated image trees in the benchmarks' layouts, for tests and CI-sized runs.

Each class gets its own base colour plus noise, so a tiny network can tell the classes apart.
Nothing here is real data: it exercises the loaders and the image training path offline.

Example::

    root = write_benchmark_tree(tmp_path, "office31", classes=OFFICE31_CLASSES[:3], per_class=3)
    dataset = load_image_domain("office31", "amazon", data_root=tmp_path,
                                classes=OFFICE31_CLASSES[:3], resize=36, crop=32)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from gradharmony.uda.data.benchmarks import get_benchmark


def write_jpeg(path: str | Path, label: int, size: int = 40, seed: int = 0) -> Path:
    """A ``size x size`` RGB JPEG whose colour depends on ``label`` (noise depends on ``seed``)."""
    rng = np.random.default_rng(seed)
    hue = np.array([(label * 97) % 256, (label * 57 + 80) % 256, (label * 29 + 160) % 256], dtype=np.float64)
    pixels = np.clip(hue + rng.normal(0.0, 25.0, size=(size, size, 3)), 0, 255).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return path


def write_class_tree(
    folder: str | Path, classes: Sequence[str], per_class: int = 3, size: int = 40, seed: int = 0
) -> list[tuple[Path, int]]:
    """``<folder>/<class>/<i>.jpg`` for every class; returns ``(path, label)`` in label order."""
    entries = []
    for label, name in enumerate(classes):
        for i in range(per_class):
            path = write_jpeg(Path(folder) / name / f"{i:04d}.jpg", label, size, seed * 100_003 + label * 1009 + i)
            entries.append((path, label))
    return entries


def write_image_list(
    list_file: str | Path, entries: Iterable[tuple[Path, int]], relative_to: str | Path, prefix: str = ""
) -> Path:
    """Write ``<prefix><path relative to relative_to> <label>`` lines (``prefix`` mimics foreign lists)."""
    list_file = Path(list_file)
    list_file.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{prefix}{Path(p).relative_to(relative_to).as_posix()} {label}\n" for p, label in entries]
    list_file.write_text("".join(lines), encoding="utf-8")
    return list_file


def write_benchmark_tree(
    data_root: str | Path,
    benchmark: str,
    *,
    domains: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    per_class: int = 3,
    size: int = 40,
    lists: bool = False,
    seed: int = 0,
) -> Path:
    """Generated images for ``benchmark`` under ``<data_root>/<its canonical folder>``; returns that folder.

    Images go in each domain's first accepted folder (e.g. ``office31/amazon/images/<class>/``).
    With ``lists=True`` the benchmark's first list layout is written too (TLlib's
    ``image_list/<domain>.txt``, VisDA's ``<folder>/image_list.txt``, DomainNet's
    ``<domain>_{train,test}.txt`` with the first ``ceil(per_class / 2)`` images of a class in train),
    numbering the classes as ``classes`` orders them.
    """
    bench = get_benchmark(benchmark)
    classes = tuple(classes) if classes is not None else bench.classes
    root = Path(data_root) / bench.folders[0]
    for d, domain in enumerate(bench.domain(x) for x in (domains or bench.domains)):
        folder = root / bench.domain_folders[domain][0]
        entries = write_class_tree(folder, classes, per_class, size, seed=seed * 31 + d)
        if not lists:
            continue
        if bench.split_lists:
            cut = (per_class + 1) // 2
            parts = {
                "train": [e for i, e in enumerate(entries) if i % per_class < cut],
                "test": [e for i, e in enumerate(entries) if i % per_class >= cut],
            }
        else:
            parts = {"all": entries}
        for split, chosen in parts.items():
            lf = bench.lists(domain, split)[0]
            write_image_list(root / lf.path, chosen, root / lf.base)
    return root
