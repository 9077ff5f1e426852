"""``load_image_domain``: one domain of an image benchmark from a local data root, as a Dataset.

The benchmark folder is looked for under the data root by each of its accepted names (e.g.
``<data_root>/office31``; ``data_root`` may also be the benchmark folder itself), then the domain in
its folder layouts, then in its image-list layouts (see :mod:`gradharmony.uda.data.benchmarks` for
the layouts of each benchmark; ``ImageBenchmark.layouts()`` prints them).  Nothing is downloaded.

Labels follow the benchmark's class order in every layout.  Image lists are renumbered through the
class folder of each path (``.../<class>/<image>``) after checking that the list numbers each
folder with one label, so a list that orders the classes differently (TLlib's Office-Home lists)
gives the same labels as the folders; a list whose paths do not end in known class folders keeps
its own numbers.

Example::

    source = load_image_domain("office31", "amazon", data_root="data")              # train transform
    target_eval = load_image_domain("office31", "webcam", data_root="data", train=False)
    real = load_image_domain("visda2017", "real", train=False)   # metric: mean_class_accuracy
    test = load_image_domain("domainnet", "sketch", "test", train=False)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gradharmony.uda.data.benchmarks import ImageBenchmark, ListFile, get_benchmark
from gradharmony.uda.data.domain import DatasetFormatError, DatasetNotFoundError
from gradharmony.uda.data.image_transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform
from gradharmony.uda.data.images import FolderDataset, ImageListDataset, read_image_list, resolve_image_paths
from gradharmony.uda.data.load import default_data_root

LAYOUTS = ("auto", "folder", "list")


def _benchmark_roots(bench: ImageBenchmark, data_root: Path) -> list[Path]:
    """Existing candidate benchmark folders, in order; ``data_root`` itself comes last."""
    roots = [data_root / name for name in bench.folders]
    roots.append(data_root)
    seen, out = set(), []
    for root in roots:
        key = root.resolve() if root.exists() else root
        if root.is_dir() and key not in seen:
            seen.add(key)
            out.append(root)
    return out


def _check_classes(bench: ImageBenchmark, classes: Sequence[str] | None) -> tuple[str, ...]:
    if classes is None:
        return bench.classes
    names = tuple(classes)
    unknown = [c for c in names if c not in bench.classes]
    if unknown or len(set(names)) != len(names) or not names:
        raise ValueError(f"classes must be distinct {bench.title} class names; unknown: {unknown[:10]}")
    return names


def _relabel(
    entries: list[tuple[Path, int]], bench: ImageBenchmark, names: tuple[str, ...], lists: Sequence[Path]
) -> list[tuple[Path, int]]:
    """Renumber list entries by their class folder in the order ``names`` (see the module doc)."""
    folders = [path.parent.name for path, _ in entries]
    if not all(f in bench.classes for f in folders):
        if names != bench.classes:
            raise ValueError(
                f"classes=... selects classes by folder name, but the paths of "
                f"{', '.join(map(str, lists))} do not end in <class>/<image>"
            )
        return entries
    used: dict[int, str] = {}
    for (_, label), folder in zip(entries, folders):
        if used.setdefault(label, folder) != folder:
            raise DatasetFormatError(
                lists[0], f"one label per class folder; label {label} is given to both {used[label]!r} and {folder!r}"
            )
    index = {name: i for i, name in enumerate(names)}
    return [(path, index[f]) for (path, _), f in zip(entries, folders) if f in index]


def _from_lists(
    bench: ImageBenchmark, lists: Sequence[Path], bases: Sequence[Path], names: tuple[str, ...], **dataset_kw: Any
) -> ImageListDataset:
    entries: list[tuple[Path, int]] = []
    for list_file in lists:
        raw = read_image_list(list_file)
        paths = resolve_image_paths([p for p, _ in raw], bases)
        entries += [(path, label) for path, (_, label) in zip(paths, raw)]
    entries = _relabel(entries, bench, names, lists)
    present = {label for _, label in entries}
    absent = [name for i, name in enumerate(names) if i not in present]
    if absent:
        shown = ", ".join(absent[:10]) + (f" ... and {len(absent) - 10} more" if len(absent) > 10 else "")
        raise DatasetNotFoundError(
            f"{len(absent)} of {len(names)} classes have no image in {', '.join(map(str, lists))}: {shown}"
        )
    dataset = ImageListDataset(bases[0], entries=entries, classes=names, **dataset_kw)
    dataset.source = f"image list {', '.join(map(str, lists))}"
    return dataset


def _find_lists(bench: ImageBenchmark, domain: str, split: str, root: Path) -> tuple[list[Path], Path] | None:
    """The list file(s) of the domain and split under one benchmark folder, and their base."""
    splits = ("train", "test") if bench.split_lists and split == "all" else (split,)
    per_pattern = zip(*(bench.lists(domain, s) for s in splits))
    for group in per_pattern:
        files = [root / lf.path for lf in group]
        if all(f.is_file() for f in files):
            return files, root / group[0].base
    return None


def _looked_at(
    bench: ImageBenchmark, domain: str, split: str, roots: list[Path], data_root: Path, layout: str
) -> list[Path]:
    # Benchmark folders that are absent, then every domain path under those present (data_root
    # itself is tried last, as the benchmark folder).
    paths = [data_root / name for name in bench.folders if not (data_root / name).is_dir()]
    for root in roots:
        if layout != "list":
            paths += [root / folder for folder in bench.domain_folders[domain]]
        if layout != "folder":
            lists: list[ListFile] = []
            for s in ("train", "test") if bench.split_lists and split == "all" else (split,):
                lists += bench.lists(domain, s)
            paths += [root / lf.path for lf in lists]
    return paths


def _context(bench: ImageBenchmark, domain: str, split: str) -> str:
    return (
        f"Accepted layouts for {bench.title} domain {domain!r}:\n{bench.layouts(domain, split)}\n"
        f"Where to get it: {bench.where}\n"
        "Pass data_root=... to load_image_domain or set $GRADHARMONY_DATA_ROOT."
    )


def _not_found(
    bench: ImageBenchmark, domain: str, split: str, roots: list[Path], data_root: Path, layout: str
) -> DatasetNotFoundError:
    tried = "\n".join(
        f"  {p}  ({'present' if p.exists() else 'missing'})"
        for p in _looked_at(bench, domain, split, roots, data_root, layout)
    )
    note = ""
    if (
        bench.split_lists
        and split != "all"
        and any((r / f).is_dir() for r in roots for f in bench.domain_folders[domain])
    ):
        note = (
            f"The {bench.title} {split} split is defined by its list files; the images are there "
            f"but the lists are not (split='all' reads the whole folder).\n"
        )
    what = f"{bench.title} domain {domain!r}" + (f" ({split} split)" if bench.split_lists else "")
    return DatasetNotFoundError(
        f"{what} not found under {data_root}. Looked at:\n{tried}\n{note}{_context(bench, domain, split)}"
    )


def load_image_domain(
    benchmark: str,
    domain: str,
    split: str = "train",
    data_root: str | Path | None = None,
    *,
    train: bool = True,
    transform: Callable | None = None,
    resize: int = 256,
    crop: int = 224,
    crop_mode: str = "random_resized",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    classes: Sequence[str] | None = None,
    layout: str = "auto",
    list_file: str | Path | None = None,
    on_corrupt: str = "raise",
    verify: bool = False,
) -> ImageListDataset:
    """One domain (and split) of an image benchmark as a Dataset of ``(image tensor, label)``.

    Args:
        benchmark: ``office31``, ``officehome``, ``visda2017`` or ``domainnet`` (case, ``-`` and
            ``_`` ignored: ``Office-31`` works).
        domain: a domain name or alias (``amazon`` or ``A``; ``Real_World`` or ``Rw``; VisDA
            ``synthetic``/``train`` or ``real``/``validation``; DomainNet ``clipart`` or ``c``).
        split: ``train``, ``test`` or ``all``.  Only DomainNet has splits (its official lists;
            ``all`` is both); elsewhere every split is the whole domain, as in the literature.
        data_root: folder holding the benchmark folders (default: ``$GRADHARMONY_DATA_ROOT`` or
            ``./data``), or the benchmark folder itself.
        train: pick the train transform (random crop and flip) or the evaluation one.
        transform: a transform of the PIL image that replaces the standard ones.
        resize, crop, crop_mode, mean, std: the standard transforms' settings
            (:mod:`gradharmony.uda.data.image_transforms`).
        classes: read only these classes (a subset of the benchmark's, renumbered in this order).
        layout: ``"auto"`` (folders first, then lists), ``"folder"`` or ``"list"``.
        list_file: read this image list instead (absolute, or relative to the benchmark folder);
            its paths start at the benchmark folder or, failing that, at the list's folder.
        on_corrupt: ``"raise"`` or ``"skip"`` unreadable images (:mod:`gradharmony.uda.data.images`).
        verify: decode every image now (:meth:`ImageListDataset.verify`).

    Returns:
        an :class:`ImageListDataset` (a :class:`FolderDataset` for folder layouts) with
        ``num_classes``, ``classes``, ``source`` and the catalogue facts ``benchmark``, ``domain``,
        ``split`` and ``metric`` (what the literature reports on this benchmark's targets).

    Raises:
        ValueError: unknown benchmark, domain, split, layout or class names.
        DatasetNotFoundError: the domain is missing (the message lists the paths tried, the
            accepted layouts and where the data is published) or incomplete (missing or empty
            class folders, list entries whose files are missing: the message lists them).
        DatasetFormatError: a malformed list, or a list whose labels contradict its folders.
        CorruptImageError: with ``verify=True`` and ``on_corrupt="raise"``, an unreadable image.
    """
    bench = get_benchmark(benchmark)
    domain = bench.domain(domain)
    split = bench.split(split)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    names = _check_classes(bench, classes)
    data_root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    if transform is None:
        transform = (
            train_transform(resize, crop, crop_mode=crop_mode, mean=mean, std=std)
            if train
            else eval_transform(resize, crop, mean=mean, std=std)
        )
    dataset_kw = {"transform": transform, "on_corrupt": on_corrupt}
    roots = _benchmark_roots(bench, data_root)
    read = _locate(bench, domain, split, data_root, roots, layout, list_file)
    try:
        dataset = read(names, dataset_kw)
    except DatasetNotFoundError as exc:
        raise DatasetNotFoundError(f"{bench.title} domain {domain!r}: {exc}\n{_context(bench, domain, split)}") from exc
    dataset.benchmark, dataset.domain, dataset.split, dataset.metric = bench.name, domain, split, bench.metric
    dataset.source = f"{bench.title} {domain} ({split}) from {dataset.source}"
    if verify:
        dataset.verify()
    return dataset


def _locate(
    bench: ImageBenchmark,
    domain: str,
    split: str,
    data_root: Path,
    roots: list[Path],
    layout: str,
    list_file: str | Path | None,
) -> Callable[[tuple[str, ...], dict], ImageListDataset]:
    """Find the domain's folder or list(s); return the function that reads them."""
    if list_file is not None:
        path = Path(list_file).expanduser()
        candidates = [path] if path.is_absolute() else [r / path for r in roots] or [data_root / path]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise DatasetNotFoundError(
                f"image list {list_file} not found under {data_root}; looked at " + ", ".join(map(str, candidates))
            )
        bases = [r for r in roots if found.is_relative_to(r)] + [found.parent]
        return lambda names, kw: _from_lists(bench, [found], bases, names, **kw)
    folders_allowed = layout != "list" and not (bench.split_lists and split != "all")
    for root in roots:
        if folders_allowed:
            for folder in bench.domain_folders[domain]:
                if (root / folder).is_dir():
                    return lambda names, kw, folder=root / folder: FolderDataset(folder, names, **kw)
        if layout != "folder" and (found_lists := _find_lists(bench, domain, split, root)) is not None:
            files, base = found_lists
            return lambda names, kw: _from_lists(bench, files, [base], names, **kw)
    raise _not_found(bench, domain, split, roots, data_root, layout)
