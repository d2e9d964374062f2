"""Model registry: ``register_model``, ``create_model``, ``list_models``."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from norton.errors import NortonError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name; a duplicate name is an error."""
    name = fn.__name__
    if name in _MODELS:
        raise RuntimeError(f"a model named {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    if name not in _MODELS:
        raise NortonError(f"unknown architecture {name!r}; available: {', '.join(list_models())}")
    return _MODELS[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model.  ``None`` keyword values are dropped, so a CLI
    default of ``None`` never overrides the builder's own default.

    Common keywords: ``rank`` (0 = plain convs), ``compress_rate`` (list or the
    published string form), ``num_classes``, ``in_channels``.
    """
    builder = get_model_builder(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    rank = kwargs.get("rank", 0)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise NortonError(f"rank must be an integer >= 0 (0 = plain convolutions), got {rank!r}")
    for key in ("num_classes", "in_channels"):
        value = kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise NortonError(f"{key} must be an integer >= 1, got {value!r}")
    model = builder(**kwargs)
    # The architecture as data: enough to rebuild the model (checkpoints, pruning).
    model.norton_spec = {"arch": name, **{k: v for k, v in kwargs.items() if k != "compress_rate"},
                         "rank": rank, "compress_rate": kwargs.get("compress_rate")}
    return model
