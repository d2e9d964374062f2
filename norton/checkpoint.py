"""Loading weights safely: ``torch.load(weights_only=True)`` only, clear errors."""
from __future__ import annotations

import os
import pickle
import zipfile

import torch
from torch import nn

from norton.errors import NortonError


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: a bare state dict, or one under ``"state_dict"``
    or ``"model"``.  Never unpickles code."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise NortonError(f"checkpoint {path!r} does not exist or is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NortonError(f"checkpoint {path!r} cannot be read safely (corrupt, truncated, or not a weights file): {first}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise NortonError(
            f"checkpoint {path!r} holds no state dict (expected a dict of tensors, "
            "possibly under 'state_dict' or 'model')"
        )
    return obj


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error naming the first mismatch."""
    own = model.state_dict()
    for key in own:
        if key not in state_dict:
            raise NortonError(f"{source}: missing key {key!r} (model expects shape {tuple(own[key].shape)})")
        if tuple(state_dict[key].shape) != tuple(own[key].shape):
            raise NortonError(
                f"{source}: key {key!r} has shape {tuple(state_dict[key].shape)}, "
                f"the model expects {tuple(own[key].shape)}"
            )
    for key in state_dict:
        if key not in own:
            raise NortonError(f"{source}: unexpected key {key!r} not in the model")
    model.load_state_dict(state_dict, strict=True)
