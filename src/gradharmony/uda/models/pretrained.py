"""Reading pretrained weights from local files and download caches, with errors that say what to do.

Nothing here downloads: the builders decide whether to (``download=True``) and call these helpers
for everything local.  Accepted files: a PyTorch checkpoint holding a state dict, either bare or
under a ``state_dict`` / ``model`` key (a ``module.`` prefix left by DataParallel/DDP is removed),
or a ``.safetensors`` file.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn


class PretrainedWeightsNotFoundError(FileNotFoundError):
    """Pretrained weights were asked for but are neither on disk nor downloadable.

    The message says where the weights were looked for and how to provide them.
    """


def hub_checkpoint_path(url: str) -> Path:
    """Where ``torch.hub`` (and so torchvision) caches the file at ``url``:
    ``$TORCH_HOME/hub/checkpoints/<file name>`` (``TORCH_HOME`` defaults to ``~/.cache/torch``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict stored in ``path`` (see the module doc for the accepted forms)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PretrainedWeightsNotFoundError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # optional: only for .safetensors files

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError as exc:
        raise ImportError(f"reading {path} needs the safetensors package (pip install safetensors)") from exc
    except Exception as exc:  # torch.load raises many types on a bad file (pickle, zip, EOF...)
        raise ValueError(f"cannot read weights from {path}: {type(exc).__name__}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (name -> tensor)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_weights(
    module: nn.Module, state: dict[str, torch.Tensor], source: str | Path, ignore_prefixes: tuple[str, ...] = ()
) -> None:
    """Load ``state`` into ``module`` strictly, after dropping keys under ``ignore_prefixes``
    (e.g. the ImageNet classifier ``fc.``).

    Raises:
        ValueError: keys are missing or unexpected, or shapes differ; the message names
            ``source`` and lists the first offending keys.
    """
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"weights from {source} do not fit {type(module).__name__}: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"weights from {source} do not fit {type(module).__name__}: "
            f"missing keys {result.missing_keys[:8]}, unexpected keys {result.unexpected_keys[:8]}"
        )


def no_weights_message(what: str, looked_at: list[str], ways: list[str], cause: BaseException | None = None) -> str:
    """A uniform 'weights not found' message: what, where it looked, why, and how to provide them."""
    where = "\n".join(f"  {p}" for p in looked_at)
    why = f"\nDownload failed: {type(cause).__name__}: {cause}" if cause is not None else ""
    how = "\n".join(
        f"  {i}. {w}"
        for i, w in enumerate([*ways, "pass pretrained=False to start from random weights (works offline)"], 1)
    )
    return f"ImageNet weights for {what} not found. Looked at:\n{where}{why}\nProvide them in one of these ways:\n{how}"
