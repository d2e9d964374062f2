"""Import of checkpoints written by the NORTON research code.

Those files hold ``{"state_dict": ...}`` (sometimes ``"rank"``) with CPDBlock
weights under ``<layer>.feature.{pointwise,vertical,horizontal}.weight`` in the
same rank-major layout as ours; the architecture lives only in the file name,
e.g. ``vgg_16_bn_[0.6]*6+[0.8]*7_1_90.32.pt`` = arch, compress rate, rank, top-1.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from norton.checkpoints.files import load_state_dict_strict, read_checkpoint
from norton.errors import NortonError
from norton.models import create_model

_NAME = re.compile(r"^(?P<arch>[a-z][a-z0-9_]*?)_(?P<rate>\[.*\][^_]*)_(?P<rank>\d+)_(?P<top1>\d+(?:\.\d+)?)\.pth?$")


@dataclass
class ResearchName:
    arch: str
    compress_rate: str
    rank: int
    top1: float


def parse_research_name(path: str) -> ResearchName | None:
    """Arch, compress rate, rank and top-1 from a published file name, if it has that form."""
    match = _NAME.match(os.path.basename(path))
    if not match:
        return None
    return ResearchName(match["arch"], match["rate"], int(match["rank"]), float(match["top1"]))


def convert_research_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``X.feature.pointwise.weight`` -> ``X.pointwise`` (same for vertical, horizontal)."""
    out = {}
    for key, value in state_dict.items():
        for stage in ("pointwise", "vertical", "horizontal"):
            suffix = f".feature.{stage}.weight"
            if key.endswith(suffix):
                key = key[: -len(suffix)] + f".{stage}"
                break
        out[key] = value
    return out


def _infer_rank(state_dict: dict[str, torch.Tensor]) -> int | None:
    """R = (R·N pointwise rows) / (N channels of the conv's bias or BatchNorm)."""
    suffix = ".feature.pointwise.weight"
    for key, weight in state_dict.items():
        if not key.endswith(suffix):
            continue
        prefix = key[: -len(suffix)]
        parent, _, leaf = prefix.rpartition(".")
        number = leaf[len("conv"):] if leaf.startswith("conv") else leaf
        for candidate in (f"{prefix}.bias", f"{parent}.bn{number}.weight", f"{parent}.norm{number}.weight"):
            channels = state_dict.get(candidate.lstrip("."))
            if channels is not None and channels.numel() and weight.shape[0] % channels.numel() == 0:
                return weight.shape[0] // channels.numel()
    return None


def load_research_checkpoint(path: str, *, arch: str | None = None, rank: int | None = None,
                             compress_rate: str | None = None, num_classes: int | None = None) -> tuple[nn.Module, ResearchName | None]:
    """Build the zoo model the file was written for and load its weights strictly.

    ``arch``/``rank``/``compress_rate`` default to what the file name says.
    """
    named = parse_research_name(path)
    arch = arch or (named.arch if named else None)
    rank = rank if rank is not None else (named.rank if named else None)
    compress_rate = compress_rate if compress_rate is not None else (named.compress_rate if named else None)
    _, obj = read_checkpoint(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        if rank is None and isinstance(obj.get("rank"), int):
            rank = obj["rank"]
        state_dict = obj["state_dict"]
    elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state_dict = obj
    else:
        raise NortonError(f"{path!r} holds no research-code state dict (expected {{'state_dict': ...}})")
    if arch is None or rank is None:
        raise NortonError(f"cannot tell the architecture of {path!r} from its name; give --arch, -r and -cpr")
    model = create_model(arch, rank=rank, compress_rate=compress_rate, num_classes=num_classes)
    converted = convert_research_state_dict(state_dict)
    try:
        load_state_dict_strict(model, converted, f"research checkpoint {path!r} as {arch} rank {rank} rate {compress_rate}")
    except NortonError as err:
        hint = _infer_rank(state_dict)
        extra = f"; its CPDBlocks look like rank {hint}" if hint and hint != rank else ""
        raise NortonError(f"{err}{extra}") from None
    return model, named
