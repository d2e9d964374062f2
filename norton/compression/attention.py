"""The inner width of window attention (torchvision's Swin and Swin-V2), pruned.

torchvision's ``ShiftedWindowAttention`` takes its head size from the width of
its input (``C // num_heads``), so the q, k, v of its heads and the inputs of
its projection cannot narrow while the residual stream keeps its C channels —
the reason the dependency graph leaves them whole.  Here each attention keeps
its head size as an attribute: pruning removes the same positions from every
head's q, k and v and from the matching inputs of the projection, and the
module's class becomes a subclass of its own whose forward reads that head size
(and the scale of the unpruned heads, so the pruned model computes what the
original computes with those positions zeroed).  Positions are ranked by the
L2 norm of their q, k, v rows and projection columns, summed over the heads.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

from norton.compression.graph import GroupPruning
from norton.errors import NortonError


class _InnerWidth:
    """The forward of a window attention whose heads are ``head_dim`` wide."""

    head_dim: int
    norton_scale: float

    def forward(self, x: Tensor) -> Tensor:
        return window_attention(self, x)


class PrunedWindowAttention(_InnerWidth, ShiftedWindowAttention):
    """torchvision's ShiftedWindowAttention with narrower heads."""


class PrunedWindowAttentionV2(_InnerWidth, ShiftedWindowAttentionV2):
    """torchvision's ShiftedWindowAttentionV2 (cosine attention) with narrower heads."""


_PRUNED = {ShiftedWindowAttention: PrunedWindowAttention, ShiftedWindowAttentionV2: PrunedWindowAttentionV2}


def window_attention(m: ShiftedWindowAttention, x: Tensor) -> Tensor:
    """Shifted-window multi-head attention of ``x`` (B, H, W, C) with the
    module's weights and its ``head_dim`` (the computation of torchvision's
    ``shifted_window_attention``, whose head size is C // num_heads)."""
    b, h, w, c = x.shape
    wh, ww = m.window_size
    heads, d = m.num_heads, m.head_dim
    x = F.pad(x, (0, 0, 0, (-w) % ww, 0, (-h) % wh))
    ph, pw = x.shape[1], x.shape[2]
    shift = [0 if wh >= ph else m.shift_size[0], 0 if ww >= pw else m.shift_size[1]]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nh, nw = ph // wh, pw // ww
    tokens = x.view(b, nh, wh, nw, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, wh * ww, c)
    n, t = tokens.shape[:2]
    bias, logit_scale = m.qkv.bias, getattr(m, "logit_scale", None)
    if logit_scale is not None and bias is not None:  # Swin-V2 has no key bias
        bias = torch.cat([bias[:heads * d], torch.zeros_like(bias[heads * d:2 * heads * d]), bias[2 * heads * d:]])
    qkv = F.linear(tokens, m.qkv.weight, bias).reshape(n, t, 3, heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:  # cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * m.norton_scale) @ k.transpose(-2, -1)
    attn = attn + m.get_relative_position_bias()
    if sum(shift) > 0:
        mask = _shift_mask(ph, pw, (wh, ww), shift, x)
        attn = (attn.view(b, nh * nw, heads, t, t) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, t, t)
    attn = F.dropout(F.softmax(attn, dim=-1), p=m.attention_dropout, training=m.training)
    out = (attn @ v).transpose(1, 2).reshape(n, t, heads * d)
    out = F.dropout(F.linear(out, m.proj.weight, m.proj.bias), p=m.dropout, training=m.training)
    out = out.view(b, nh, nw, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    if sum(shift) > 0:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    return out[:, :h, :w, :].contiguous()


def _shift_mask(ph: int, pw: int, window: tuple[int, int], shift: list[int], like: Tensor) -> Tensor:
    """-100 between tokens of a window that come from different regions of the
    shifted map (they were not neighbours before the roll), 0 elsewhere."""
    regions = like.new_zeros((ph, pw))
    label = 0
    for rows in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for cols in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            regions[rows[0]:rows[1], cols[0]:cols[1]] = label
            label += 1
    regions = regions.view(ph // window[0], window[0], pw // window[1], window[1]).permute(0, 2, 1, 3)
    regions = regions.reshape(-1, window[0] * window[1])
    differ = regions.unsqueeze(1) - regions.unsqueeze(2)
    return differ.masked_fill(differ != 0, -100.0).masked_fill(differ == 0, 0.0)


# -- which attentions, and how wide ----------------------------------------------------------
def window_attentions(model: nn.Module) -> dict[str, ShiftedWindowAttention]:
    """Every torchvision window attention of ``model``, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ShiftedWindowAttention)}


def head_width(m: ShiftedWindowAttention) -> int:
    """The width of each head's q, k and v (C // num_heads until pruned)."""
    return getattr(m, "head_dim", m.qkv.out_features // (3 * m.num_heads))


def attention_targets(model: nn.Module, *, compress_rate=None, keep: Mapping[str, int] | None = None,
                      amount: float | None = None, ignored_layers=()):
    """Split what ``prune`` was given between the dependency groups and the
    window attentions: (compress_rate, keep, positions to keep per head by
    attention name).  A ``keep`` or rate dict hands the attention names it holds
    to the attentions (``keep`` counts the inner width q, k, v keep — a multiple
    of the head count); an ``amount`` removes that share of every attention's
    head width.  Ignored attentions stay whole."""
    ignored = set(ignored_layers)
    attentions = {n: m for n, m in window_attentions(model).items() if m not in ignored}
    counts = keep is not None
    named = keep if counts else compress_rate if isinstance(compress_rate, Mapping) else None
    if named is None:
        per_layer = {n: float(amount) for n in attentions} if amount is not None else {}
        return compress_rate, keep, _positions(attentions, per_layer, counts=False)
    per_layer = {n: v for n, v in named.items() if n in attentions}
    rest = {n: v for n, v in named.items() if n not in attentions}
    return (None, rest, _positions(attentions, per_layer, counts=True)) if counts else \
        (rest, None, _positions(attentions, per_layer, counts=False))


def _positions(attentions: Mapping[str, ShiftedWindowAttention], per_layer: Mapping, counts: bool) -> dict[str, int]:
    """Positions to keep per head: from a rate, or from an inner-width count."""
    targets = {}
    for name, value in per_layer.items():
        m = attentions[name]
        width = head_width(m)
        if counts:
            if isinstance(value, bool) or not isinstance(value, int) or value % m.num_heads or not (
                    m.num_heads <= value <= width * m.num_heads):
                raise NortonError(f"keep[{name!r}] must be a multiple of its {m.num_heads} heads from {m.num_heads} "
                                  f"to {width * m.num_heads}, got {value!r}")
            targets[name] = value // m.num_heads
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise NortonError(f"rate {value!r} for attention {name!r} is outside [0, 1)")
            targets[name] = max(1, int(width * (1.0 - value)))
    return targets


def prune_attentions(model: nn.Module, targets: Mapping[str, int], criterion: str = "l2",
                     seed: int = 0) -> list[GroupPruning]:
    """Narrow every named attention's heads to ``targets[name]`` positions (the
    same in every head and in q, k and v), in place; one report entry per
    attention, its channels the inner width (heads × head size)."""
    modules = window_attentions(model)
    report = []
    for name, keep in targets.items():
        m = modules[name]
        width = head_width(m)
        if keep >= width:
            continue
        scores = _position_scores(m, width, criterion, seed)
        positions = sorted(torch.topk(scores, keep).indices.tolist())
        narrow(m, positions)
        label = "random" if criterion == "random" else "l2"
        report.append(GroupPruning(root=name, layers=[f"{name}.qkv", f"{name}.proj"], total=m.num_heads * width,
                                   kept=[h * width + p for h in range(m.num_heads) for p in positions],
                                   criterion=f"{label} (attention: same positions of q, k, v in each of "
                                             f"{m.num_heads} heads)"))
    return report


def _position_scores(m: ShiftedWindowAttention, width: int, criterion: str, seed: int) -> Tensor:
    if criterion == "random":
        return torch.rand(width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        rows = m.qkv.weight.detach().double().reshape(3, m.num_heads, width, -1)
        cols = m.proj.weight.detach().double().reshape(-1, m.num_heads, width)
        return rows.pow(2).sum(dim=(0, 1, 3)) + cols.pow(2).sum(dim=(0, 1))


def narrow(m: ShiftedWindowAttention, positions: list[int]) -> None:
    """Keep ``positions`` of every head's q, k, v (and the projection's matching
    inputs) of one attention."""
    width, heads = head_width(m), m.num_heads
    cols = torch.tensor([h * width + p for h in range(heads) for p in positions])
    rows = torch.tensor(_qkv_rows(m, cols.tolist()))
    with torch.no_grad():
        qkv, proj = m.qkv, m.proj
        qkv.weight = nn.Parameter(qkv.weight.detach()[rows.to(qkv.weight.device)].clone(),
                                  requires_grad=qkv.weight.requires_grad)
        if qkv.bias is not None:
            qkv.bias = nn.Parameter(qkv.bias.detach()[rows.to(qkv.bias.device)].clone(),
                                    requires_grad=qkv.bias.requires_grad)
        proj.weight = nn.Parameter(proj.weight.detach()[:, cols.to(proj.weight.device)].clone(),
                                   requires_grad=proj.weight.requires_grad)
    qkv.out_features, proj.in_features = len(rows), len(cols)
    if not hasattr(m, "norton_scale"):
        m.norton_scale = width ** -0.5  # the unpruned heads' scale: pruning zeroes positions, it does not rescale
    m.head_dim = len(positions)
    m.__class__ = _PRUNED.get(type(m), type(m))


def zero_positions(m: ShiftedWindowAttention, removed: set[int]) -> None:
    """Zero the q, k, v rows of the inner channels ``removed`` (head × head size
    + position): the attention then computes what it computes with those
    positions pruned."""
    rows = _qkv_rows(m, sorted(removed))
    with torch.no_grad():
        m.qkv.weight[rows] = 0.0
        if m.qkv.bias is not None:
            m.qkv.bias[rows] = 0.0


def _qkv_rows(m: ShiftedWindowAttention, channels: list[int]) -> list[int]:
    """The rows of q, then k, then v of the inner ``channels`` (head × head size + position) in qkv's weight."""
    inner = m.num_heads * head_width(m)
    return [s * inner + c for s in range(3) for c in channels]


def restructure_attentions(model: nn.Module, widths: Mapping[str, int]) -> None:
    """Narrow each attention whose q, k, v width ``widths`` records (as
    ``<name>.qkv``) below its own: the first positions of every head (weights
    are loaded afterwards)."""
    for name, m in window_attentions(model).items():
        recorded = widths.get(f"{name}.qkv")
        if recorded is None or recorded == m.qkv.out_features:
            continue
        keep, extra = divmod(recorded, 3 * m.num_heads)
        if extra or not 1 <= keep <= head_width(m):
            raise NortonError(f"recorded width {recorded} of {name}.qkv is not 3 × {m.num_heads} heads × a head size "
                              f"from 1 to {head_width(m)}")
        narrow(m, list(range(keep)))
