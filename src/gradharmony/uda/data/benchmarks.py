"""The catalogue of image benchmarks: domains, classes, splits, folder layouts, reported metric.

Every benchmark lives in one folder under the data root (several spellings are accepted, e.g.
``office31`` or ``office-31``) and each domain is either a folder of class folders or an image-list
text file (one ``relative/path/to/image.jpg label`` per line).  Labels always follow
:attr:`ImageBenchmark.classes`: the sorted class names for Office-31, Office-Home and VisDA-2017
(what ``torchvision.datasets.ImageFolder`` gives and what the official VisDA lists use), the
official label order of the DomainNet lists for DomainNet.  List files that number the classes
in another order (TLlib's Office-Home lists do) are renumbered through the class folder in each
path; see :func:`gradharmony.uda.data.image_domains.load_image_domain`.

=============  ================================  =======  ====================  ======================
benchmark      domains                           classes  splits                metric
=============  ================================  =======  ====================  ======================
office31       amazon, dslr, webcam                   31  whole domain          accuracy
officehome     Art, Clipart, Product, Real_World      65  whole domain          accuracy
visda2017      synthetic (train), real (valid.)       12  whole domain          mean_class_accuracy
domainnet      clipart, infograph, painting,         345  train, test (lists)   accuracy
               quickdraw, real, sketch
=============  ================================  =======  ====================  ======================

For Office-31 and Office-Home the literature trains on the whole source domain (labelled) and the
whole target domain (unlabelled) and reports accuracy on the whole target domain, so every split
name (``train``, ``test``, ``all``) means the whole domain.  VisDA-2017's split *is* its domain:
``synthetic`` is the ``train`` folder, ``real`` the ``validation`` folder (the target on which
results are reported, as mean per-class accuracy).  DomainNet defines train and test lists per
domain; ``all`` is their union.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ACCURACY = "accuracy"
MEAN_CLASS_ACCURACY = "mean_class_accuracy"
WHOLE_DOMAIN_SPLITS = ("train", "test", "all")

OFFICE31_CLASSES: tuple[str, ...] = tuple(
    sorted(
        (
            "back_pack",
            "bike",
            "bike_helmet",
            "bookcase",
            "bottle",
            "calculator",
            "desk_chair",
            "desk_lamp",
            "desktop_computer",
            "file_cabinet",
            "headphones",
            "keyboard",
            "laptop_computer",
            "letter_tray",
            "mobile_phone",
            "monitor",
            "mouse",
            "mug",
            "paper_notebook",
            "pen",
            "phone",
            "printer",
            "projector",
            "punchers",
            "ring_binder",
            "ruler",
            "scissors",
            "speaker",
            "stapler",
            "tape_dispenser",
            "trash_can",
        )
    )
)

OFFICE_HOME_CLASSES: tuple[str, ...] = tuple(
    sorted(
        (
            "Alarm_Clock",
            "Backpack",
            "Batteries",
            "Bed",
            "Bike",
            "Bottle",
            "Bucket",
            "Calculator",
            "Calendar",
            "Candles",
            "Chair",
            "Clipboards",
            "Computer",
            "Couch",
            "Curtains",
            "Desk_Lamp",
            "Drill",
            "Eraser",
            "Exit_Sign",
            "Fan",
            "File_Cabinet",
            "Flipflops",
            "Flowers",
            "Folder",
            "Fork",
            "Glasses",
            "Hammer",
            "Helmet",
            "Kettle",
            "Keyboard",
            "Knives",
            "Lamp_Shade",
            "Laptop",
            "Marker",
            "Monitor",
            "Mop",
            "Mouse",
            "Mug",
            "Notebook",
            "Oven",
            "Pan",
            "Paper_Clip",
            "Pen",
            "Pencil",
            "Postit_Notes",
            "Printer",
            "Push_Pin",
            "Radio",
            "Refrigerator",
            "Ruler",
            "Scissors",
            "Screwdriver",
            "Shelf",
            "Sink",
            "Sneakers",
            "Soda",
            "Speaker",
            "Spoon",
            "TV",
            "Table",
            "Telephone",
            "ToothBrush",
            "Toys",
            "Trash_Can",
            "Webcam",
        )
    )
)

VISDA2017_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bus",
    "car",
    "horse",
    "knife",
    "motorcycle",
    "person",
    "plant",
    "skateboard",
    "train",
    "truck",
)

# The label order of the official DomainNet lists (alphabetical ignoring case and punctuation, as
# the folders were listed by their authors): label i of `<domain>_train.txt` is DOMAINNET_CLASSES[i].
DOMAINNET_CLASSES: tuple[str, ...] = (
    "aircraft_carrier",
    "airplane",
    "alarm_clock",
    "ambulance",
    "angel",
    "animal_migration",
    "ant",
    "anvil",
    "apple",
    "arm",
    "asparagus",
    "axe",
    "backpack",
    "banana",
    "bandage",
    "barn",
    "baseball",
    "baseball_bat",
    "basket",
    "basketball",
    "bat",
    "bathtub",
    "beach",
    "bear",
    "beard",
    "bed",
    "bee",
    "belt",
    "bench",
    "bicycle",
    "binoculars",
    "bird",
    "birthday_cake",
    "blackberry",
    "blueberry",
    "book",
    "boomerang",
    "bottlecap",
    "bowtie",
    "bracelet",
    "brain",
    "bread",
    "bridge",
    "broccoli",
    "broom",
    "bucket",
    "bulldozer",
    "bus",
    "bush",
    "butterfly",
    "cactus",
    "cake",
    "calculator",
    "calendar",
    "camel",
    "camera",
    "camouflage",
    "campfire",
    "candle",
    "cannon",
    "canoe",
    "car",
    "carrot",
    "castle",
    "cat",
    "ceiling_fan",
    "cello",
    "cell_phone",
    "chair",
    "chandelier",
    "church",
    "circle",
    "clarinet",
    "clock",
    "cloud",
    "coffee_cup",
    "compass",
    "computer",
    "cookie",
    "cooler",
    "couch",
    "cow",
    "crab",
    "crayon",
    "crocodile",
    "crown",
    "cruise_ship",
    "cup",
    "diamond",
    "dishwasher",
    "diving_board",
    "dog",
    "dolphin",
    "donut",
    "door",
    "dragon",
    "dresser",
    "drill",
    "drums",
    "duck",
    "dumbbell",
    "ear",
    "elbow",
    "elephant",
    "envelope",
    "eraser",
    "eye",
    "eyeglasses",
    "face",
    "fan",
    "feather",
    "fence",
    "finger",
    "fire_hydrant",
    "fireplace",
    "firetruck",
    "fish",
    "flamingo",
    "flashlight",
    "flip_flops",
    "floor_lamp",
    "flower",
    "flying_saucer",
    "foot",
    "fork",
    "frog",
    "frying_pan",
    "garden",
    "garden_hose",
    "giraffe",
    "goatee",
    "golf_club",
    "grapes",
    "grass",
    "guitar",
    "hamburger",
    "hammer",
    "hand",
    "harp",
    "hat",
    "headphones",
    "hedgehog",
    "helicopter",
    "helmet",
    "hexagon",
    "hockey_puck",
    "hockey_stick",
    "horse",
    "hospital",
    "hot_air_balloon",
    "hot_dog",
    "hot_tub",
    "hourglass",
    "house",
    "house_plant",
    "hurricane",
    "ice_cream",
    "jacket",
    "jail",
    "kangaroo",
    "key",
    "keyboard",
    "knee",
    "knife",
    "ladder",
    "lantern",
    "laptop",
    "leaf",
    "leg",
    "light_bulb",
    "lighter",
    "lighthouse",
    "lightning",
    "line",
    "lion",
    "lipstick",
    "lobster",
    "lollipop",
    "mailbox",
    "map",
    "marker",
    "matches",
    "megaphone",
    "mermaid",
    "microphone",
    "microwave",
    "monkey",
    "moon",
    "mosquito",
    "motorbike",
    "mountain",
    "mouse",
    "moustache",
    "mouth",
    "mug",
    "mushroom",
    "nail",
    "necklace",
    "nose",
    "ocean",
    "octagon",
    "octopus",
    "onion",
    "oven",
    "owl",
    "paintbrush",
    "paint_can",
    "palm_tree",
    "panda",
    "pants",
    "paper_clip",
    "parachute",
    "parrot",
    "passport",
    "peanut",
    "pear",
    "peas",
    "pencil",
    "penguin",
    "piano",
    "pickup_truck",
    "picture_frame",
    "pig",
    "pillow",
    "pineapple",
    "pizza",
    "pliers",
    "police_car",
    "pond",
    "pool",
    "popsicle",
    "postcard",
    "potato",
    "power_outlet",
    "purse",
    "rabbit",
    "raccoon",
    "radio",
    "rain",
    "rainbow",
    "rake",
    "remote_control",
    "rhinoceros",
    "rifle",
    "river",
    "roller_coaster",
    "rollerskates",
    "sailboat",
    "sandwich",
    "saw",
    "saxophone",
    "school_bus",
    "scissors",
    "scorpion",
    "screwdriver",
    "sea_turtle",
    "see_saw",
    "shark",
    "sheep",
    "shoe",
    "shorts",
    "shovel",
    "sink",
    "skateboard",
    "skull",
    "skyscraper",
    "sleeping_bag",
    "smiley_face",
    "snail",
    "snake",
    "snorkel",
    "snowflake",
    "snowman",
    "soccer_ball",
    "sock",
    "speedboat",
    "spider",
    "spoon",
    "spreadsheet",
    "square",
    "squiggle",
    "squirrel",
    "stairs",
    "star",
    "steak",
    "stereo",
    "stethoscope",
    "stitches",
    "stop_sign",
    "stove",
    "strawberry",
    "streetlight",
    "string_bean",
    "submarine",
    "suitcase",
    "sun",
    "swan",
    "sweater",
    "swing_set",
    "sword",
    "syringe",
    "table",
    "teapot",
    "teddy-bear",
    "telephone",
    "television",
    "tennis_racquet",
    "tent",
    "The_Eiffel_Tower",
    "The_Great_Wall_of_China",
    "The_Mona_Lisa",
    "tiger",
    "toaster",
    "toe",
    "toilet",
    "tooth",
    "toothbrush",
    "toothpaste",
    "tornado",
    "tractor",
    "traffic_light",
    "train",
    "tree",
    "triangle",
    "trombone",
    "truck",
    "trumpet",
    "t-shirt",
    "umbrella",
    "underwear",
    "van",
    "vase",
    "violin",
    "washing_machine",
    "watermelon",
    "waterslide",
    "whale",
    "wheel",
    "windmill",
    "wine_bottle",
    "wine_glass",
    "wristwatch",
    "yoga",
    "zebra",
    "zigzag",
)


@dataclass(frozen=True)
class ListFile:
    """An image-list file of a domain, and the folder its relative paths start from.

    Both are relative to the benchmark folder; ``{domain}`` and ``{split}`` are filled in.
    """

    path: str
    base: str = "."
    origin: str = ""


@dataclass(frozen=True)
class ImageBenchmark:
    """One benchmark of the catalogue.

    Attributes:
        name: the catalogue key (``office31``, ``officehome``, ``visda2017``, ``domainnet``).
        title: the usual spelling (``Office-31``).
        domains: canonical domain names.
        classes: class names in label order.
        metric: what the literature reports on the target: ``"accuracy"`` or
            ``"mean_class_accuracy"`` (VisDA-2017).
        splits: accepted split names.  Where the benchmark defines none, every name means the
            whole domain (:attr:`split_lists` is False).
        folders: accepted names of the benchmark folder under the data root, canonical first.
        domain_folders: per domain, the accepted folders (relative to the benchmark folder) holding
            its ``<class>/<image>`` tree, tried in order.
        list_files: accepted image-list files per domain, tried in order.
        split_lists: True if the split (train/test) is only defined by list files (DomainNet).
        aliases: other names of the domains (TLlib's task letters, VisDA's folder names...).
        where: where the data is published.
    """

    name: str
    title: str
    domains: tuple[str, ...]
    classes: tuple[str, ...]
    metric: str
    splits: tuple[str, ...]
    folders: tuple[str, ...]
    domain_folders: dict[str, tuple[str, ...]]
    list_files: tuple[ListFile, ...]
    where: str
    split_lists: bool = False
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def domain(self, name: str) -> str:
        """The canonical name of a domain, given its name or an alias (case-insensitive)."""
        lookup = {d.lower(): d for d in self.domains}
        lookup.update({a.lower(): d for a, d in self.aliases.items()})
        key = name.lower().replace(" ", "_")
        if key not in lookup:
            names = ", ".join(self.domains)
            raise ValueError(
                f"unknown {self.title} domain {name!r}; valid domains: {names} "
                f"(aliases: {', '.join(sorted(self.aliases))})"
            )
        return lookup[key]

    def split(self, name: str) -> str:
        """The split to read: ``all`` for benchmarks without splits, else ``train``/``test``/``all``."""
        if name not in self.splits:
            raise ValueError(f"unknown {self.title} split {name!r}; valid splits: {', '.join(self.splits)}")
        return name if self.split_lists else "all"

    def lists(self, domain: str, split: str = "all") -> list[ListFile]:
        """The accepted list files of a domain (canonical name) and split, placeholders filled in."""
        folder = self.domain_folders[domain][0] if domain in self.domain_folders else domain
        fill = {"domain": domain, "split": split, "folder": folder}
        return [ListFile(lf.path.format(**fill), lf.base.format(**fill), lf.origin) for lf in self.list_files]

    def layouts(self, domain: str = "<domain>", split: str = "<split>") -> str:
        """The accepted layouts of a domain, one per line, for error messages and docs."""
        root = f"<data_root>/{self.folders[0]}"
        note = "   (split 'all' only; train/test need the lists)" if self.split_lists else ""
        lines = [
            f"  - {root}/{folder}/<class>/<image>.jpg{note}" for folder in self.domain_folders.get(domain, (domain,))
        ]
        for lf in self.lists(domain, split):
            base = "" if lf.base == "." else f", paths relative to {root}/{lf.base}"
            origin = f", {lf.origin}" if lf.origin else ""
            lines.append(f"  - {root}/{lf.path}   (image list: '<path> <label>' per line{base}{origin})")
        return "\n".join(lines)


OFFICE31 = ImageBenchmark(
    name="office31",
    title="Office-31",
    domains=("amazon", "dslr", "webcam"),
    classes=OFFICE31_CLASSES,
    metric=ACCURACY,
    splits=WHOLE_DOMAIN_SPLITS,
    folders=("office31", "office-31", "Office31", "Office-31", "office_31", "domain_adaptation_images"),
    domain_folders={d: (f"{d}/images", d) for d in ("amazon", "dslr", "webcam")},
    list_files=(
        ListFile("image_list/{domain}.txt", origin="TLlib"),
        ListFile("{domain}_list.txt", origin="CDAN / GH authors"),
        ListFile("{domain}.txt", origin="SSRT / GH authors"),
    ),
    aliases={"a": "amazon", "d": "dslr", "w": "webcam"},
    where=(
        "Saenko et al. 2010, 'domain_adaptation_images.tar.gz' (https://faculty.cc.gatech.edu/~judy/"
        "domainadapt/), or TLlib: tllib.vision.datasets.Office31(root, task, download=True)"
    ),
)

OFFICE_HOME = ImageBenchmark(
    name="officehome",
    title="Office-Home",
    domains=("Art", "Clipart", "Product", "Real_World"),
    classes=OFFICE_HOME_CLASSES,
    metric=ACCURACY,
    splits=WHOLE_DOMAIN_SPLITS,
    folders=("office-home", "officehome", "OfficeHome", "Office-Home", "office_home", "OfficeHomeDataset_10072016"),
    domain_folders={
        "Art": ("Art",),
        "Clipart": ("Clipart",),
        "Product": ("Product",),
        "Real_World": ("Real_World", "Real World", "RealWorld"),
    },
    list_files=(
        ListFile("image_list/{domain}.txt", origin="TLlib"),
        ListFile("{domain}.txt", origin="CDAN / GH authors"),
        ListFile("{domain}_list.txt"),
    ),
    aliases={"ar": "Art", "cl": "Clipart", "pr": "Product", "rw": "Real_World", "realworld": "Real_World"},
    where=(
        "Venkateswara et al. 2017, https://www.hemanthdv.org/officeHomeDataset.html "
        "(OfficeHomeDataset_10072016.zip), or TLlib: tllib.vision.datasets.OfficeHome(root, task, download=True)"
    ),
)

VISDA2017 = ImageBenchmark(
    name="visda2017",
    title="VisDA-2017",
    domains=("synthetic", "real"),
    classes=VISDA2017_CLASSES,
    metric=MEAN_CLASS_ACCURACY,
    splits=WHOLE_DOMAIN_SPLITS,
    folders=("visda-2017", "visda2017", "VisDA-2017", "VisDA2017", "visda", "VisDA"),
    domain_folders={"synthetic": ("train",), "real": ("validation",)},
    list_files=(
        ListFile("{folder}/image_list.txt", base="{folder}", origin="official release"),
        ListFile("image_list/{folder}.txt", origin="TLlib"),
        ListFile("{folder}_list.txt", origin="CDAN / GH authors"),
    ),
    aliases={
        "train": "synthetic",
        "t": "synthetic",
        "s": "synthetic",
        "syn": "synthetic",
        "validation": "real",
        "val": "real",
        "v": "real",
        "r": "real",
    },
    where=(
        "the VisDA-2017 classification track, http://ai.bu.edu/visda-2017/ (train.tar and "
        "validation.tar), or TLlib: tllib.vision.datasets.VisDA2017(root, task, download=True)"
    ),
)

DOMAINNET = ImageBenchmark(
    name="domainnet",
    title="DomainNet",
    domains=("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
    classes=DOMAINNET_CLASSES,
    metric=ACCURACY,
    splits=("train", "test", "all"),
    split_lists=True,
    folders=("domainnet", "DomainNet", "domain_net", "DomainNet345"),
    domain_folders={d: (d,) for d in ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")},
    list_files=(
        ListFile("{domain}_{split}.txt", origin="official release"),
        ListFile("image_list/{domain}_{split}.txt", origin="TLlib"),
    ),
    aliases={"c": "clipart", "i": "infograph", "p": "painting", "q": "quickdraw", "r": "real", "s": "sketch"},
    where=(
        "Peng et al. 2019, http://ai.bu.edu/M3SDA/ (the six domain zips, cleaned versions of clipart "
        "and painting, and the <domain>_train.txt / <domain>_test.txt lists), or TLlib: "
        "tllib.vision.datasets.DomainNet(root, task, split, download=True)"
    ),
)

BENCHMARKS: dict[str, ImageBenchmark] = {b.name: b for b in (OFFICE31, OFFICE_HOME, VISDA2017, DOMAINNET)}
BENCHMARK_NAMES: tuple[str, ...] = tuple(BENCHMARKS)


def get_benchmark(name: str) -> ImageBenchmark:
    """A benchmark by name, ignoring case, ``-`` and ``_`` (``Office-31``, ``office_home``, ``VisDA``...)."""
    key = name.lower().replace("-", "").replace("_", "").replace(" ", "")
    key = {"visda": "visda2017", "office": "office31"}.get(key, key)
    if key not in BENCHMARKS:
        raise ValueError(f"unknown image benchmark {name!r}; valid benchmarks: {', '.join(BENCHMARK_NAMES)}")
    return BENCHMARKS[key]
