"""The standard train / test transforms of the UDA image benchmarks (PIL image -> float tensor).

Train (TLlib's default, also the CDAN / GH authors' ``image_train``): resize to a square
``resize x resize`` (the aspect ratio is *not* kept, as TLlib's ``ResizeImage`` and the authors'
``ResizeImage`` do), a random crop of side ``crop``, a random horizontal flip, scaling to [0, 1]
and normalisation.  The crop is ``RandomResizedCrop(crop)`` by default (scale 0.08-1, as in TLlib);
``crop_mode="random"`` takes a plain ``RandomCrop(crop)`` (SSRT's ``random_resized_crop`` option)
and ``"center"`` a centre crop.

Evaluation (:func:`eval_transform`): square resize, centre crop, normalisation.

Normalisation defaults to ImageNet's mean and std (what torchvision's ResNets expect); a backbone's
own ``input_mean`` / ``input_std`` attributes (e.g. 0.5 / 0.5 for timm's ViT) can be passed in.
The defaults 256 / 224 are the literature's; smaller sizes (e.g. 72 / 64) make CPU runs cheap.

Example:
    >>> from PIL import Image
    >>> image = Image.new("RGB", (40, 30))
    >>> tuple(train_transform(resize=36, crop=32)(image).shape), tuple(eval_transform(36, 32)(image).shape)
    ((3, 32, 32), (3, 32, 32))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_MODES = ("random_resized", "random", "center")


def _check_sizes(resize: int, crop: int) -> None:
    if not (isinstance(resize, int) and isinstance(crop, int) and 0 < crop <= resize):
        raise ValueError(f"need integers 0 < crop <= resize, got resize={resize!r}, crop={crop!r}")


def _to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    return [T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std)), T.ToPureTensor()]


def train_transform(
    resize: int = 256,
    crop: int = 224,
    *,
    crop_mode: str = "random_resized",
    flip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """Square resize, random (resized) crop, horizontal flip, normalise: ``[3, crop, crop]`` float."""
    _check_sizes(resize, crop)
    if crop_mode not in CROP_MODES:
        raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {crop_mode!r}")
    cropper = {
        "random_resized": lambda: T.RandomResizedCrop(crop, antialias=True),
        "random": lambda: T.RandomCrop(crop),
        "center": lambda: T.CenterCrop(crop),
    }[crop_mode]()
    steps = [T.ToImage(), T.Resize((resize, resize), antialias=True), cropper]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + _to_normalized_tensor(mean, std))


def eval_transform(
    resize: int = 256, crop: int = 224, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> T.Compose:
    """Square resize, centre crop, normalise: ``[3, crop, crop]`` float, deterministic."""
    _check_sizes(resize, crop)
    return T.Compose(
        [T.ToImage(), T.Resize((resize, resize), antialias=True), T.CenterCrop(crop), *_to_normalized_tensor(mean, std)]
    )
