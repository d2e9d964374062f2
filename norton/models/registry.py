"""Model registry: ``register_model``, ``create_model``, ``list_models``."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from norton.core import CPDBlock, is_decomposable, replace_module
from norton.errors import NortonError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name; a duplicate name is an error."""
    name = fn.__name__
    if name in _MODELS:
        raise RuntimeError(f"a model named {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def _external_model_builder(name: str) -> Callable[..., nn.Module]:
    """``torchvision/<name>`` or ``timm/<name>``: a classifier of that library, randomly initialised."""
    library, model_name = name.split("/", 1)

    def build(rank: int = 0, compress_rate=None, **kwargs) -> nn.Module:
        if compress_rate is not None:
            raise NortonError(f"{name}: compress-rate lists are for zoo models; prune with norton.prune instead")
        make = _torchvision_model if library == "torchvision" else _timm_model
        return make(model_name, rank=rank, **kwargs)

    return build


def list_models() -> list[str]:
    return sorted(_MODELS)


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    if name not in _MODELS:
        raise NortonError(f"unknown architecture {name!r}; available: {', '.join(list_models())}")
    return _MODELS[name]


def _torchvision_model(name: str, rank: int = 0, num_classes: int | None = None, in_channels: int | None = None,
                       **kwargs) -> nn.Module:
    """A torchvision classifier by name (no weights), with CPDBlocks at rank > 0."""
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None, **({"num_classes": num_classes} if num_classes else {}), **kwargs)
    except (ValueError, TypeError) as err:
        raise NortonError(f"torchvision model {name!r} cannot be built: {err}") from None
    if in_channels not in (None, 3):  # grayscale data: the stem takes that many channels
        stem_name, stem = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
        replace_module(model, stem_name, nn.Conv2d(in_channels, stem.out_channels, stem.kernel_size, stem.stride,
                                                   stem.padding, stem.dilation, stem.groups, stem.bias is not None,
                                                   stem.padding_mode))
    model.default_input_size = (in_channels or 3, 224, 224)
    return _decomposed(model, rank)


def _timm_model(name: str, rank: int = 0, num_classes: int | None = None, in_channels: int | None = None,
                **kwargs) -> nn.Module:
    """A timm classifier by name (no weights), with CPDBlocks at rank > 0; needs timm installed."""
    try:
        import timm
    except ImportError:
        raise NortonError(f"timm/{name} needs timm (pip install timm); zoo and torchvision/<name> models do not") from None
    options = {**({"num_classes": num_classes} if num_classes else {}), **({"in_chans": in_channels} if in_channels else {})}
    try:
        model = timm.create_model(name, pretrained=False, **options, **kwargs)
    except (RuntimeError, ValueError, TypeError) as err:
        raise NortonError(f"timm model {name!r} cannot be built: {str(err).splitlines()[0][:200]}") from None
    size = model.default_cfg.get("input_size", (3, 224, 224)) if hasattr(model, "default_cfg") else (3, 224, 224)
    model.default_input_size = (in_channels or size[0], *size[1:])
    return _decomposed(model, rank)


def _decomposed(model: nn.Module, rank: int) -> nn.Module:
    if rank:
        for conv_name, conv in [(n, m) for n, m in model.named_modules() if is_decomposable(m)]:
            replace_module(model, conv_name, CPDBlock.like_conv(conv, rank))
    return model


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model.  ``None`` keyword values are dropped, so a CLI
    default of ``None`` never overrides the builder's own default.

    Common keywords: ``rank`` (0 = plain convs), ``compress_rate`` (list or the
    published string form), ``num_classes``, ``in_channels``.
    ``"torchvision/<name>"`` and ``"timm/<name>"`` build that library's
    classifier (random weights; ``in_channels`` replaces a torchvision stem).
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    builder = (_external_model_builder(name) if name.startswith(("torchvision/", "timm/"))
               else get_model_builder(name))
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
