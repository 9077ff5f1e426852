"""Image benchmarks on generated JPEG trees in every accepted layout: loading, labels, transforms,
missing / incomplete data messages, corrupt images."""

from __future__ import annotations

import random
import shutil
import warnings

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fakes.images import write_benchmark_tree, write_class_tree, write_image_list, write_jpeg
from gradharmony.uda.data import DatasetFormatError, DatasetNotFoundError
from gradharmony.uda.data.benchmarks import (
    BENCHMARKS,
    DOMAINNET_CLASSES,
    OFFICE31_CLASSES,
    OFFICE_HOME_CLASSES,
    VISDA2017_CLASSES,
    get_benchmark,
)
from gradharmony.uda.data.image_domains import load_image_domain
from gradharmony.uda.data.image_transforms import IMAGENET_MEAN, eval_transform, train_transform
from gradharmony.uda.data.images import (
    CorruptImageError,
    CorruptImageWarning,
    FolderDataset,
    ImageListDataset,
    read_image_list,
)

SMALL = {"resize": 36, "crop": 32}
THREE = {
    "office31": OFFICE31_CLASSES[:3],
    "officehome": OFFICE_HOME_CLASSES[:3],
    "visda2017": VISDA2017_CLASSES[:3],
    "domainnet": DOMAINNET_CLASSES[:3],
}


def load(benchmark, domain, root, split="train", **kwargs):
    kwargs.setdefault("classes", THREE[benchmark])
    return load_image_domain(benchmark, domain, split, root, **SMALL, **kwargs)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Every benchmark, every domain, 3 classes x 3 images, folders and the first list layout."""
    root = tmp_path_factory.mktemp("images")
    for name in BENCHMARKS:
        write_benchmark_tree(root, name, classes=THREE[name], per_class=3, lists=True)
    return root


# ---------------------------------------------------------------- catalogue
@pytest.mark.parametrize(
    "name, count, metric",
    [
        ("office31", 31, "accuracy"),
        ("officehome", 65, "accuracy"),
        ("visda2017", 12, "mean_class_accuracy"),
        ("domainnet", 345, "accuracy"),
    ],
)
def test_catalogue_classes_and_metric(name, count, metric):
    bench = BENCHMARKS[name]
    assert bench.num_classes == count == len(set(bench.classes))
    assert bench.metric == metric
    if name != "domainnet":  # DomainNet keeps the official list order
        assert list(bench.classes) == sorted(bench.classes)
    else:
        assert bench.classes.index("cello") < bench.classes.index("cell_phone")
        assert bench.classes[0] == "aircraft_carrier" and bench.classes[-1] == "zigzag"


def test_catalogue_names_and_aliases():
    assert get_benchmark("Office-31") is get_benchmark("office_31") is BENCHMARKS["office31"]
    assert get_benchmark("VisDA").name == "visda2017" and get_benchmark("Office-Home").name == "officehome"
    assert BENCHMARKS["office31"].domain("A") == "amazon"
    assert BENCHMARKS["officehome"].domain("rw") == "Real_World"
    assert BENCHMARKS["officehome"].domain("real world") == "Real_World"
    assert BENCHMARKS["visda2017"].domain("validation") == "real"
    assert BENCHMARKS["domainnet"].domain("s") == "sketch"
    with pytest.raises(ValueError, match="valid benchmarks"):
        get_benchmark("imagenet")
    with pytest.raises(ValueError, match="amazon, dslr, webcam"):
        BENCHMARKS["office31"].domain("caltech")
    with pytest.raises(ValueError, match="valid splits"):
        BENCHMARKS["domainnet"].split("validation")


def test_splits_mean_the_whole_domain_except_domainnet():
    assert {BENCHMARKS["office31"].split(s) for s in ("train", "test", "all")} == {"all"}
    assert BENCHMARKS["domainnet"].split("test") == "test"


def test_unknown_classes_rejected(tree):
    with pytest.raises(ValueError, match="unknown"):
        load("office31", "amazon", tree, classes=["back_pack", "teapot"])


# ---------------------------------------------------------------- folder layouts
@pytest.mark.parametrize(
    "benchmark, domain, folder",
    [
        ("office31", "amazon", "office31/amazon/images"),
        ("officehome", "Clipart", "office-home/Clipart"),
        ("visda2017", "synthetic", "visda-2017/train"),
        ("visda2017", "real", "visda-2017/validation"),
    ],
)
def test_folder_layout(tree, benchmark, domain, folder):
    ds = load(benchmark, domain, tree, layout="folder")
    assert isinstance(ds, FolderDataset) and str(tree / folder) in ds.source
    assert len(ds) == 9 and ds.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert ds.num_classes == 3 and ds.classes == list(THREE[benchmark])
    assert [p.parent.name for p, _ in ds.samples][::3] == list(THREE[benchmark])
    x, y = ds[4]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    assert ds.metric == BENCHMARKS[benchmark].metric and ds.domain == BENCHMARKS[benchmark].domain(domain)


def test_office31_plain_layout_and_other_folder_names(tmp_path):
    classes = OFFICE31_CLASSES[:2]
    write_class_tree(tmp_path / "Office-31" / "webcam", classes, per_class=2)
    ds = load("office31", "W", tmp_path, classes=classes)
    assert len(ds) == 4 and ds.targets == [0, 0, 1, 1] and "Office-31/webcam" in ds.source


def test_data_root_may_be_the_benchmark_folder(tree):
    assert len(load("office31", "dslr", tree / "office31")) == 9


def test_office_home_real_world_with_a_space(tmp_path):
    write_class_tree(tmp_path / "OfficeHomeDataset_10072016" / "Real World", OFFICE_HOME_CLASSES[:3], per_class=1)
    assert len(load("officehome", "Real_World", tmp_path)) == 3


def test_default_data_root_from_environment(tree, monkeypatch):
    monkeypatch.setenv("GRADHARMONY_DATA_ROOT", str(tree))
    ds = load_image_domain("visda2017", "real", classes=VISDA2017_CLASSES[:3], **SMALL)
    assert len(ds) == 9


def test_folder_dataset_default_order_and_filtering(tmp_path):
    write_class_tree(tmp_path, ["zebra", "Apple", "mango"], per_class=2)
    write_jpeg(tmp_path / "mango" / "nested" / "deep.jpg", 2)
    (tmp_path / "mango" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    ds = FolderDataset(tmp_path)
    assert ds.classes == ["Apple", "mango", "zebra"]  # sorted like ImageFolder
    assert ds.targets == [0, 0, 1, 1, 1, 2, 2]
    ordered = FolderDataset(tmp_path, classes=["zebra", "mango"])  # subset, fixed order
    assert ordered.targets == [0, 0, 1, 1, 1] and ordered.num_classes == 2
    image, label = ds[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 0


# ---------------------------------------------------------------- list layouts
@pytest.mark.parametrize(
    "benchmark, domain, list_name",
    [
        ("office31", "webcam", "office31/image_list/webcam.txt"),
        ("officehome", "Art", "office-home/image_list/Art.txt"),
        ("visda2017", "real", "visda-2017/validation/image_list.txt"),
    ],
)
def test_list_layout(tree, benchmark, domain, list_name):
    ds = load(benchmark, domain, tree, layout="list")
    assert str(tree / list_name) in ds.source
    assert ds.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    folder = load(benchmark, domain, tree, layout="folder")
    assert [(p.resolve(), y) for p, y in ds.samples] == [(p.resolve(), y) for p, y in folder.samples]


def test_domainnet_official_split_lists(tree):
    train, test = load("domainnet", "sketch", tree, "train"), load("domainnet", "sketch", tree, "test", train=False)
    assert (len(train), len(test)) == (6, 3)
    assert train.targets == [0, 0, 1, 1, 2, 2] and test.targets == [0, 1, 2]
    assert not {p for p, _ in train.samples} & {p for p, _ in test.samples}
    everything = load("domainnet", "sketch", tree, "all", layout="list")
    assert len(everything) == 9
    assert len(load("domainnet", "sketch", tree, "all")) == 9  # the folder
    assert train.split == "train" and train.metric == "accuracy"


def test_visda_tllib_list_layout(tmp_path):
    classes = VISDA2017_CLASSES[:2]
    entries = write_class_tree(tmp_path / "visda2017" / "train", classes, per_class=2)
    write_image_list(tmp_path / "visda2017" / "image_list" / "train.txt", entries, tmp_path / "visda2017")
    ds = load("visda2017", "synthetic", tmp_path, classes=classes, layout="list")
    assert ds.targets == [0, 0, 1, 1] and "image_list/train.txt" in ds.source


def test_list_with_other_class_order_is_renumbered_by_folder(tmp_path):
    classes = OFFICE_HOME_CLASSES[:3]
    entries = write_class_tree(tmp_path / "office-home" / "Product", classes, per_class=2)
    tllib_order = {0: 2, 1: 0, 2: 1}  # the list numbers the classes differently
    write_image_list(
        tmp_path / "office-home" / "image_list" / "Product.txt",
        [(p, tllib_order[y]) for p, y in entries],
        tmp_path / "office-home",
    )
    ds = load("officehome", "Product", tmp_path, layout="list")
    assert ds.targets == [0, 0, 1, 1, 2, 2]
    subset = load("officehome", "Product", tmp_path, layout="list", classes=[classes[2], classes[0]])
    assert subset.targets == [1, 1, 0, 0] and subset.num_classes == 2


def test_list_contradicting_its_folders(tmp_path):
    entries = write_class_tree(tmp_path / "office31" / "dslr" / "images", OFFICE31_CLASSES[:2], per_class=2)
    write_image_list(
        tmp_path / "office31" / "image_list" / "dslr.txt", [(p, 0) for p, _ in entries], tmp_path / "office31"
    )
    with pytest.raises(DatasetFormatError, match="label 0 is given to both"):
        load("office31", "dslr", tmp_path, layout="list", classes=OFFICE31_CLASSES[:2])


def test_foreign_list_paths_are_rerooted(tmp_path):
    """The CDAN / GH authors' lists carry their machine's folders in front of the usual paths."""
    entries = write_class_tree(tmp_path / "office31" / "amazon" / "images", OFFICE31_CLASSES[:2], per_class=2)
    write_image_list(
        tmp_path / "office31" / "amazon_list.txt",
        entries,
        tmp_path / "office31",
        prefix="/data/office/domain_adaptation_images/",
    )
    ds = load("office31", "amazon", tmp_path, layout="list", classes=OFFICE31_CLASSES[:2])
    assert [p for p, _ in ds.samples] == [p for p, _ in entries]
    explicit = load("office31", "amazon", tmp_path, list_file="amazon_list.txt", classes=OFFICE31_CLASSES[:2])
    assert explicit.targets == [0, 0, 1, 1]


def test_image_list_dataset_from_file_and_entries(tmp_path):
    a = write_jpeg(tmp_path / "im gs" / "a.jpg", 0)
    b = write_jpeg(tmp_path / "im gs" / "b.jpg", 1)
    list_file = tmp_path / "list.txt"
    list_file.write_text("# comment\n\nim gs/a.jpg 1\nim gs/b.jpg   0\n")
    assert read_image_list(list_file) == [("im gs/a.jpg", 1), ("im gs/b.jpg", 0)]
    ds = ImageListDataset(list_file=list_file, transform=eval_transform(**SMALL))
    assert ds.samples == [(a, 1), (b, 0)] and ds.num_classes == 2 and ds[0][0].shape == (3, 32, 32)
    named = ImageListDataset(tmp_path, entries=[("im gs/b.jpg", 2)], classes=["x", "y", "z"])
    assert named.samples == [(b, 2)] and named.classes == ["x", "y", "z"]
    with pytest.raises(DatasetFormatError, match=r"labels in 0\.\.1"):
        ImageListDataset(tmp_path, entries=[("im gs/b.jpg", 2)], classes=["x", "y"])
    with pytest.raises(ValueError, match="exactly one"):
        ImageListDataset(tmp_path)


def test_malformed_list_names_the_line(tmp_path):
    list_file = tmp_path / "bad.txt"
    list_file.write_text("a.jpg 0\nb.jpg dog\n")
    with pytest.raises(DatasetFormatError, match="line 2"):
        read_image_list(list_file)


def test_dataloader_batches(tree):
    ds = load("office31", "amazon", tree)
    x, y = next(iter(DataLoader(ds, batch_size=4, shuffle=False)))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64 and type(x) is torch.Tensor
    assert y.tolist() == ds.targets[:4] == [0, 0, 0, 1]


# ---------------------------------------------------------------- transforms
def test_transforms_shapes_and_normalisation():
    image = Image.new("RGB", (50, 30), color=(255, 255, 255))
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor((0.229, 0.224, 0.225))
    for mode in ("random_resized", "random", "center"):
        out = train_transform(36, 32, crop_mode=mode)(image)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        # Any crop or flip of a white image is white: ImageNet-normalised white in every pixel.
        assert torch.allclose(out, expected.view(3, 1, 1).expand(3, 32, 32), atol=1e-4), mode
    test = eval_transform(36, 32)
    out = test(image)
    assert out.shape == (3, 32, 32) and torch.equal(out, test(image))
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-4)
    half = eval_transform(36, 32, mean=(0.5,) * 3, std=(0.5,) * 3)(image)
    assert torch.allclose(half, torch.ones_like(half), atol=1e-4)
    assert train_transform().transforms[1].size == [256, 256]  # the literature's defaults
    with pytest.raises(ValueError):
        train_transform(32, 36)
    with pytest.raises(ValueError, match="crop_mode"):
        train_transform(crop_mode="five")


def test_train_transform_is_random_and_flips():
    torch.manual_seed(0)
    image = Image.fromarray(torch.randint(0, 255, (40, 40, 3), dtype=torch.uint8).numpy())
    outs = [train_transform(36, 32)(image) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    # With a crop that takes the whole image, the only randomness left is the horizontal flip:
    # every output is the evaluation view or its mirror image, and both occur.
    square = Image.fromarray(torch.randint(0, 255, (32, 32, 3), dtype=torch.uint8).numpy())
    view = eval_transform(32, 32)(square)
    flips = [train_transform(32, 32, crop_mode="center")(square) for _ in range(20)]
    plain = sum(torch.equal(o, view) for o in flips)
    mirrored = sum(torch.equal(o, view.flip(-1)) for o in flips)
    assert plain + mirrored == 20 and plain > 0 and mirrored > 0
    assert all(
        torch.equal(o, view)
        for o in (train_transform(32, 32, crop_mode="center", flip=False)(square) for _ in range(5))
    )


def test_custom_transform_and_eval_flag(tree):
    ds = load("visda2017", "real", tree, train=False)
    # train=False: the deterministic evaluation transform (square resize, centre crop, normalise).
    path, label = ds.samples[0]
    with Image.open(path) as im:
        assert torch.equal(ds[0][0], eval_transform(**SMALL)(im.convert("RGB")))
    assert ds[0][1] == label == 0
    raw = load("visda2017", "real", tree, transform=lambda im: im.size)
    assert raw[0][0] == (40, 40)


# ---------------------------------------------------------------- missing and incomplete data
def test_missing_benchmark_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_image_domain("office31", "amazon", data_root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "office31") in message and "missing" in message
    assert "office31/amazon/images/<class>/<image>.jpg" in message
    assert "image_list/amazon.txt" in message and "Where to get it" in message and "data_root" in message


def test_missing_domain_lists_the_paths_tried(tree, tmp_path):
    shutil.copytree(tree / "office-home" / "Art", tmp_path / "office-home" / "Art")
    root = tmp_path
    with pytest.raises(DatasetNotFoundError) as info:
        load("officehome", "Product", root)
    message = str(info.value)
    assert str(root / "office-home" / "Product") in message and "image_list/Product.txt" in message
    assert "hemanthdv" in message


def test_domainnet_split_needs_the_lists(tmp_path):
    write_class_tree(tmp_path / "domainnet" / "quickdraw", DOMAINNET_CLASSES[:3], per_class=1)
    assert len(load("domainnet", "quickdraw", tmp_path, "all")) == 3
    with pytest.raises(DatasetNotFoundError, match="defined by its list files") as info:
        load("domainnet", "quickdraw", tmp_path, "test")
    assert "quickdraw_test.txt" in str(info.value)


def test_incomplete_folder_names_missing_and_empty_classes(tmp_path):
    classes = OFFICE31_CLASSES[:4]
    write_class_tree(tmp_path / "office31" / "amazon" / "images", classes[:2], per_class=1)
    (tmp_path / "office31" / "amazon" / "images" / classes[3]).mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        load("office31", "amazon", tmp_path, classes=classes)
    message = str(info.value)
    assert "1 of 4 class folders are missing" in message and classes[2] in message
    assert "1 class folders hold no image" in message and classes[3] in message
    assert "Office-31 domain 'amazon'" in message and "Where to get it" in message


def test_full_class_list_is_checked_by_default(tree):
    with pytest.raises(DatasetNotFoundError, match="28 of 31 class folders are missing"):
        load_image_domain("office31", "amazon", data_root=tree)


def test_list_with_missing_files_and_classes(tmp_path):
    entries = write_class_tree(tmp_path / "office31" / "dslr" / "images", OFFICE31_CLASSES[:3], per_class=2)
    write_image_list(tmp_path / "office31" / "image_list" / "dslr.txt", entries, tmp_path / "office31")
    entries[1][0].unlink()
    entries[3][0].unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load("office31", "dslr", tmp_path, layout="list")
    message = str(info.value)
    assert "2 of 6 images referenced" in message and str(entries[1][0]) in message and str(entries[3][0]) in message
    write_image_list(tmp_path / "office31" / "image_list" / "dslr.txt", entries[4:], tmp_path / "office31")
    with pytest.raises(DatasetNotFoundError, match="2 of 3 classes have no image"):
        load("office31", "dslr", tmp_path, layout="list")


# ---------------------------------------------------------------- corrupt images
@pytest.fixture
def with_corrupt(tmp_path):
    entries = write_class_tree(tmp_path / "visda-2017" / "validation", VISDA2017_CLASSES[:3], per_class=2)
    bad = entries[2][0]
    bad.write_bytes(bad.read_bytes()[:60])  # truncated JPEG
    garbage = tmp_path / "visda-2017" / "validation" / VISDA2017_CLASSES[2] / "zz.jpg"
    garbage.write_bytes(b"not an image at all")
    return tmp_path, [bad, garbage]


def test_corrupt_image_raises_with_its_path(with_corrupt):
    root, bad = with_corrupt
    ds = load("visda2017", "real", root)
    ds[0]
    with pytest.raises(CorruptImageError, match=str(bad[0])) as info:
        ds[2]
    assert "on_corrupt='skip'" in str(info.value)
    with pytest.raises(CorruptImageError, match=str(bad[0])):
        load("visda2017", "real", root, verify=True)


def test_corrupt_image_skipped_when_asked(with_corrupt):
    root, bad = with_corrupt
    ds = load("visda2017", "real", root, on_corrupt="skip")
    with pytest.warns(CorruptImageWarning, match=str(bad[0])):
        x, y = ds[2]  # replaced by the next readable image
    assert x.shape == (3, 32, 32) and y == 1 and ds.skipped == [bad[0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[2]  # known bad: skipped again without a new warning
    verified = load("visda2017", "real", root, on_corrupt="skip")
    with pytest.warns(CorruptImageWarning, match="skipped 2 unreadable") as record:
        skipped = verified.verify()
    assert sorted(skipped) == sorted(bad) and len(verified) == 5
    assert all(str(p) in str(record[-1].message) for p in bad)
    assert verified.targets == [0, 0, 1, 2, 2]


def test_every_image_corrupt(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(b"junk")
    ds = ImageListDataset(tmp_path, entries=[(path, 0)], on_corrupt="skip")
    with pytest.warns(CorruptImageWarning), pytest.raises(DatasetFormatError, match="every image"):
        ds[0]
    with pytest.raises(ValueError, match="on_corrupt"):
        ImageListDataset(tmp_path, entries=[(path, 0)], on_corrupt="ignore")


def test_shuffled_list_order_is_kept(tmp_path):
    entries = write_class_tree(tmp_path / "domainnet" / "real", DOMAINNET_CLASSES[:2], per_class=2)
    random.Random(0).shuffle(entries)
    write_image_list(tmp_path / "domainnet" / "real_train.txt", entries, tmp_path / "domainnet")
    ds = load("domainnet", "real", tmp_path, classes=DOMAINNET_CLASSES[:2])
    assert ds.samples == entries
