"""The on-disk cache: hits, keys, atomic writes, corrupt entries rebuilt, never in the data root."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fakes.digits import fake_images, listing, write_fake_data_root, write_usps_libsvm
from gradharmony.uda.data import load_domain, registry
from gradharmony.uda.data.cache import cache_key, default_cache_dir, load_cached, save_cached


@pytest.fixture
def usps_root(tmp_path):
    write_usps_libsvm(tmp_path / "root", "train", *fake_images(6, 16))
    return tmp_path / "root"


@pytest.fixture
def read_calls(monkeypatch):
    """Counts calls of the USPS reader."""
    calls = []
    spec = registry.DOMAINS["usps"]

    def counting_read(*args):
        calls.append(args)
        return spec.read(*args)

    monkeypatch.setitem(
        registry.DOMAINS,
        "usps",
        registry.DomainSpec(spec.locate, counting_read, spec.size, spec.channels, spec.seeded, spec.version),
    )
    return calls


def cache_files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_second_load_hits_the_cache(usps_root, tmp_path, read_calls):
    cache = tmp_path / "cache"
    first = load_domain("usps", data_root=usps_root, image_size=16, cache_dir=cache)
    second = load_domain("usps", data_root=usps_root, image_size=16, cache_dir=cache)
    assert len(read_calls) == 1
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.source == first.source
    assert len(cache_files(cache)) == 1 and not any(n.endswith(".tmp") for n in cache_files(cache))


def test_other_size_reuses_the_native_entry(usps_root, tmp_path, read_calls):
    cache = tmp_path / "cache"
    load_domain("usps", data_root=usps_root, image_size=16, cache_dir=cache)
    resized = load_domain("usps", data_root=usps_root, image_size=28, channels=3, cache_dir=cache)
    assert len(read_calls) == 1 and resized.images.shape == (6, 3, 28, 28)
    assert len(cache_files(cache)) == 2
    load_domain("usps", data_root=usps_root, image_size=28, channels=3, cache_dir=cache)
    assert len(read_calls) == 1


def test_changed_source_file_invalidates_the_cache(usps_root, tmp_path, read_calls):
    cache = tmp_path / "cache"
    load_domain("usps", data_root=usps_root, image_size=16, cache_dir=cache)
    write_usps_libsvm(usps_root, "train", *fake_images(4, 16, seed=9))
    stat = (usps_root / "usps.bz2").stat()
    os.utime(usps_root / "usps.bz2", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert len(load_domain("usps", data_root=usps_root, image_size=16, cache_dir=cache)) == 4
    assert len(read_calls) == 2


def test_corrupt_cache_entry_is_rebuilt_with_a_warning(usps_root, tmp_path, read_calls):
    cache = tmp_path / "cache"
    first = load_domain("usps", data_root=usps_root, image_size=16, cache_dir=cache)
    (entry,) = cache.iterdir()
    entry.write_bytes(entry.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match="unreadable"):
        rebuilt = load_domain("usps", data_root=usps_root, image_size=16, cache_dir=cache)
    assert torch.equal(rebuilt.images, first.images) and len(read_calls) == 2
    images, labels, source = load_cached(entry)  # rewritten whole: the entry holds the domain again
    assert torch.equal(images, first.images) and torch.equal(labels, first.labels) and source == first.source


def test_use_cache_false_writes_nothing(usps_root, tmp_path, read_calls):
    cache = tmp_path / "cache"
    load_domain("usps", data_root=usps_root, image_size=28, cache_dir=cache, use_cache=False)
    load_domain("usps", data_root=usps_root, image_size=28, cache_dir=cache, use_cache=False)
    assert len(read_calls) == 2 and cache_files(cache) == []


def test_default_cache_dir_is_the_users_never_the_data_root(tmp_path, monkeypatch):
    monkeypatch.delenv("GRADHARMONY_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "gradharmony"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "gradharmony"
    monkeypatch.setenv("GRADHARMONY_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_load_without_cache_dir_writes_to_the_default_cache_only(usps_root, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADHARMONY_CACHE_DIR", str(tmp_path / "default"))
    before = listing(usps_root)
    load_domain("usps", data_root=usps_root, image_size=28)
    assert len(cache_files(tmp_path / "default")) == 2  # native and resized
    assert listing(usps_root) == before and not (usps_root / ".cache").exists()


def test_an_old_cache_in_the_data_root_is_read_never_written(usps_root, tmp_path, read_calls):
    """Entries an earlier version wrote into <data_root>/.cache are still hits; new ones go elsewhere."""
    legacy = usps_root / ".cache"
    first = load_domain("usps", data_root=usps_root, image_size=16, cache_dir=legacy)  # as it used to
    assert len(read_calls) == 1
    before = listing(usps_root)
    again = load_domain("usps", data_root=usps_root, image_size=16, cache_dir=tmp_path / "cache")
    assert len(read_calls) == 1 and torch.equal(again.images, first.images)  # a hit in the old cache
    assert cache_files(tmp_path / "cache") == []
    resized = load_domain("usps", data_root=usps_root, image_size=28, cache_dir=tmp_path / "cache")
    assert len(read_calls) == 1 and resized.images.shape == (6, 1, 28, 28)  # from the old native entry
    assert len(cache_files(tmp_path / "cache")) == 1  # the new entry goes to the cache folder
    (entry,) = legacy.iterdir()
    entry.write_bytes(b"garbage")
    before = listing(usps_root)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        rebuilt = load_domain("usps", data_root=usps_root, image_size=16, cache_dir=tmp_path / "cache")
    assert torch.equal(rebuilt.images, first.images) and len(read_calls) == 2
    assert listing(usps_root) == before  # the corrupt old entry is ignored, not rewritten
    assert len(cache_files(tmp_path / "cache")) == 2


class _Planted:
    """Unpickling it would create a file: a cache entry carrying code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_cache_entries_are_read_as_weights_only(usps_root, tmp_path, read_calls):
    cache = tmp_path / "cache"
    first = load_domain("usps", data_root=usps_root, image_size=16, cache_dir=cache)
    (entry,) = cache.iterdir()
    marker = tmp_path / "code-ran"
    torch.save({"images": first.images, "labels": first.labels, "source": _Planted(str(marker))}, entry)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        rebuilt = load_domain("usps", data_root=usps_root, image_size=16, cache_dir=cache)
    assert not marker.exists()  # refused, not run
    assert torch.equal(rebuilt.images, first.images) and len(read_calls) == 2


def test_a_read_only_data_root_loads_and_trains(tmp_path, monkeypatch):
    """chmod stops no write of root's, so the data root is also compared file by file."""
    from gradharmony.uda.config import TrainConfig
    from gradharmony.uda.engine import train

    monkeypatch.setenv("GRADHARMONY_CACHE_DIR", str(tmp_path / "default-cache"))
    root = write_fake_data_root(tmp_path / "data", count=16)
    before = listing(root)
    folders = [root, *(p for p in root.rglob("*") if p.is_dir())]
    for folder in folders:
        folder.chmod(0o555)
    try:
        cfg = TrainConfig.from_dict(
            {
                "source": "usps",
                "target": "mnistm",
                "method": "dann",
                "steps": 2,
                "eval_every": 2,
                "batch_size": 8,
                "image_size": 16,
                "channels": 1,
                "bottleneck_dim": 8,
                "source_eval_size": 8,
                "data_root": str(root),
                "cache_dir": str(tmp_path / "cache"),
                "out": str(tmp_path / "run"),
                "progress": False,
            }
        )
        result = train(cfg)
    finally:
        for folder in folders:
            folder.chmod(0o755)
    assert result["steps"] == 2
    assert listing(root) == before  # nothing created, changed or removed in the data root
    assert {name.split("-")[0] for name in cache_files(tmp_path / "cache")} == {"usps", "mnistm"}
    assert cache_files(tmp_path / "default-cache") == []


def test_unwritable_cache_dir_warns_and_still_loads(usps_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.warns(RuntimeWarning, match="could not write cache"):
        domain = load_domain("usps", data_root=usps_root, image_size=16, cache_dir=blocker / "cache")
    assert len(domain) == 6


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "entry.pt"
    images, labels = torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)
    assert save_cached(path, images, labels, "old")

    def failing_save(obj, fh):
        fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        save_cached(path, images + 1, labels, "new")
    assert load_cached(path)[2] == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["entry.pt"]


def test_cache_key_depends_on_every_part():
    base = {"name": "usps", "split": "train", "image_size": 28, "channels": 1, "seed": None}
    keys = {cache_key(base)} | {
        cache_key({**base, k: v}) for k, v in [("split", "test"), ("image_size", 32), ("channels", 3), ("seed", 1)]
    }
    assert len(keys) == 5
    assert cache_key(dict(reversed(list(base.items())))) == cache_key(base)


def test_cached_load_of_60k_images_is_fast(tmp_path):
    import time

    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (60_000, 1, 28, 28), dtype=np.uint8))
    labels = torch.zeros(60_000, dtype=torch.int64)
    save_cached(tmp_path / "big.pt", images, labels, "x")
    start = time.perf_counter()
    loaded = load_cached(tmp_path / "big.pt")
    assert time.perf_counter() - start < 1.0
    assert torch.equal(loaded[0], images)
