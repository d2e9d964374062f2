"""Self-describing checkpoints: safe to load, verified, written atomically.

A checkpoint is one ``torch.save`` file holding only tensors and plain data
(``torch.serialization.get_unsafe_globals_in_checkpoint`` finds nothing), so
it loads with ``torch.load(weights_only=True)``:

    format, norton_version, torch_version,
    architecture   (see norton.architecture.describe) — the model is rebuilt from it,
    state_dict, metrics, train_state, extra,
    sha256         a hash of all the above, checked on load.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from typing import Any

import torch
from torch import nn

from norton.checkpoints.atomic import atomic_save
from norton.compression import describe, rebuild
from norton.errors import NortonError
from norton.version import __version__

FORMAT = "norton.checkpoint/1"


# -- hashing ------------------------------------------------------------------------------
def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for key in sorted(obj, key=str):
            h.update(json.dumps(str(key)).encode())
            _feed(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for item in obj:
            _feed(h, item)
        h.update(b"]")
    else:
        h.update(json.dumps(obj).encode())


def content_hash(payload: dict[str, Any]) -> str:
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "sha256"})
    return h.hexdigest()


# -- writing ------------------------------------------------------------------------------
def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_cpu(v) for v in obj]
    return obj


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    metrics: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    input_size: list[int] | None = None,
) -> None:
    """Write ``model`` with its architecture, metrics and training state."""
    payload = {
        "format": FORMAT,
        "norton_version": __version__,
        "torch_version": str(torch.__version__),
        "architecture": describe(model, input_size),
        "state_dict": _cpu(model.state_dict()),
        "metrics": _cpu(metrics or {}),
        "train_state": _cpu(train_state or {}),
        "extra": _cpu(extra or {}),
    }
    payload["sha256"] = content_hash(payload)
    atomic_save(payload, path)


# -- reading ------------------------------------------------------------------------------
def _safe_load(path: str) -> Any:
    if not os.path.isfile(path):
        raise NortonError(f"checkpoint {path!r} does not exist or is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NortonError(
            f"checkpoint {path!r} cannot be read safely (corrupt, truncated, or not a weights file): {first[:200]}"
        ) from None


def read_checkpoint(path: str | os.PathLike) -> tuple[str, Any]:
    """What a weights file holds, loaded safely (never unpickles code):
    ``("norton", checkpoint)`` with its content hash verified, or ``("other", obj)``
    for anything else (a bare state dict, a research-code file, ...)."""
    path = os.fspath(path)
    obj = _safe_load(path)
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT):
        return "other", obj
    if obj.get("sha256") != content_hash(obj):
        raise NortonError(f"checkpoint {path!r} is corrupt: its content does not match its sha256")
    return "norton", obj


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A norton checkpoint, its content hash verified."""
    kind, obj = read_checkpoint(path)
    if kind != "norton":
        raise NortonError(f"{os.fspath(path)!r} is not a norton checkpoint (no format {FORMAT!r}); "
                          "research-code files are imported with --arch/-r/-cpr")
    return obj


def model_from_checkpoint(ckpt: dict[str, Any], source: str, *, base_model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model a loaded checkpoint describes and load its weights (strictly)."""
    model = rebuild(ckpt["architecture"], base_model)
    load_state_dict_strict(model, ckpt["state_dict"], source)
    return model


def load_model(path: str | os.PathLike, *, base_model: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint file describes and load its weights (strictly)."""
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt, f"checkpoint {os.fspath(path)!r}", base_model=base_model), ckpt


def state_dict_of(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The state dict in a loaded file: a norton checkpoint's, a bare one, or one
    under ``"state_dict"`` or ``"model"``."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return obj["state_dict"]
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise NortonError(
            f"{source} holds no state dict (expected a dict of tensors, "
            "possibly under 'state_dict' or 'model')"
        )
    return obj


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: a norton checkpoint, a bare state dict, or one
    under ``"state_dict"`` or ``"model"``.  Never unpickles code."""
    return state_dict_of(read_checkpoint(path)[1], f"checkpoint {os.fspath(path)!r}")


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
