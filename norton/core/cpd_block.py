"""CPDBlock: a k×k convolution whose every filter is a rank-R CP tensor.

For input x with C channels, N filters and rank R::

    y = pointwise(x)     1×1 conv, C -> R·N channels
    y = vertical(y)      depthwise kh×1 conv, stride (sh, 1), padding (ph, 0)
    y = horizontal(y)    depthwise 1×kw conv, stride (1, sw), padding (0, pw)
    out[:, n] = Σ_r y[:, r·N + n]  (+ bias[n])

Internal channels are rank-major (channel r·N + n is rank term r of filter n),
the layout of the published checkpoints.  All parameters live on the block
itself, so a dependency-graph pruner sees one module with N output channels.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from norton.core.cp import Factors, cp_decompose
from norton.errors import NortonError

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# how forward may compute the block: "auto" and each ``forward_<plan>`` method below (a new execution plan is a
# method and its name here; norton.tune_plans and norton.deploy time every one but auto)
PLANS = ("auto", "separable", "depthwise", "dense")
# Cost of the depthwise plan relative to the dense conv, fitted to per-layer
# timings of training (forward + backward) on CPU (ranks 1–8, 3–512 channels,
# 2–32 px): ≈ MACS_WEIGHT × (its MACs / dense MACs) + TRAFFIC_WEIGHT × (its
# R·N·H·W intermediate values / dense MACs).  The factored plan runs only when
# that is below FACTORED_BELOW; otherwise the recomposed dense kernel runs at the
# dense model's speed.  Inference follows the same rule: timed without gradients
# (benchmarks/auto_plan.py), it chose within a few percent of the fastest plan,
# where charging the separable plan its MACs alone chose one several times slower.
MACS_WEIGHT = 1.3
TRAFFIC_WEIGHT = 200.0
FACTORED_BELOW = 0.6


def _positive_pair(name: str, value: object) -> tuple[int, int]:
    pair = _pair(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise NortonError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair


class CPDBlock(nn.Module):
    """Drop-in replacement for ``nn.Conv2d(groups=1)`` with CP-factored filters.

    Parameters (shapes as ``F.conv2d`` expects them):
        pointwise  (R·N, C, 1, 1)   channel factors  a_{n,r}
        vertical   (R·N, 1, kh, 1)  vertical factors b_{n,r}
        horizontal (R·N, 1, 1, kw)  horizontal factors c_{n,r}
        bias       (N,) or None
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise NortonError(f"{name} must be an integer >= 1, got {value!r}")
        if padding_mode not in PADDING_MODES:
            raise NortonError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.rank = rank
        self.kernel_size = _positive_pair("kernel_size", kernel_size)
        self.stride = _positive_pair("stride", stride)
        self.dilation = _positive_pair("dilation", dilation)
        self.padding = self._resolve_padding(padding)
        self.padding_mode = padding_mode
        kh, kw = self.kernel_size
        factory = {"device": device, "dtype": dtype}
        channels = rank * out_channels
        self.pointwise = nn.Parameter(torch.empty(channels, in_channels, 1, 1, **factory))
        self.vertical = nn.Parameter(torch.empty(channels, 1, kh, 1, **factory))
        self.horizontal = nn.Parameter(torch.empty(channels, 1, 1, kw, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.plan = "auto"
        self.reset_parameters()

    def _resolve_padding(self, padding: object) -> tuple[int, int]:
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            if any(s != 1 for s in self.stride):
                raise NortonError("padding='same' needs stride 1, as in nn.Conv2d")
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            if any(t % 2 for t in total):
                raise NortonError(
                    f"padding='same' with kernel {self.kernel_size} and dilation {self.dilation} "
                    "needs asymmetric padding, which CPDBlock does not support"
                )
            return (total[0] // 2, total[1] // 2)
        pair = _pair(padding)
        if len(pair) != 2 or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in pair):
            raise NortonError(f"padding must be 'same', 'valid', an int >= 0 or a pair of them, got {padding!r}")
        return pair

    def reset_parameters(self) -> None:
        """Random factors whose recomposed kernel has variance 1/fan_in."""
        kh, kw = self.kernel_size
        with torch.no_grad():
            nn.init.normal_(self.pointwise, std=1.0 / math.sqrt(self.rank * self.in_channels))
            nn.init.normal_(self.vertical, std=1.0 / math.sqrt(kh))
            nn.init.normal_(self.horizontal, std=1.0 / math.sqrt(kw))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_channels * kh * kw)
                nn.init.uniform_(self.bias, -bound, bound)

    # -- the function ---------------------------------------------------------
    def set_plan(self, plan: str) -> "CPDBlock":
        """How forward computes the block — always the same function:
        ``separable``: the three convs (the published structure);
        ``depthwise``: the 1×1 conv, then one depthwise kh×kw conv whose kernels
        are the outer products b ⊗ c (built on the fly), then the rank sum;
        ``dense``: recompose W = Σ a⊗b⊗c on the fly and run one conv;
        ``auto``: the cheaper by a cost model (``norton.tune_plans`` times
        them instead).  Gradients reach the factors in every plan."""
        if plan not in PLANS:
            raise NortonError(f"plan must be one of {PLANS}, got {plan!r}")
        self.plan = plan
        return self

    def resolved_plan(self) -> str:
        """The plan forward runs: the set one, or for ``auto`` the depthwise plan
        where the cost model above (measured timings, not MACs alone) predicts
        it clearly faster than the dense conv, else the recomposed dense kernel —
        so a fresh block trains and evaluates at least about as fast as the dense
        conv with no plan tuning by the caller (``norton.deploy`` times every
        plan for serving)."""
        if self.plan != "auto":
            return self.plan
        kh, kw = self.kernel_size
        dense = self.in_channels * kh * kw
        predicted = MACS_WEIGHT * self.rank * (self.in_channels + kh * kw) / dense + TRAFFIC_WEIGHT * self.rank / dense
        return "depthwise" if predicted < FACTORED_BELOW else "dense"

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self, f"forward_{self.resolved_plan()}")(x)

    def _rank_sum(self, y: Tensor) -> Tensor:
        if self.rank > 1:
            batch, _, height, width = y.shape
            y = y.reshape(batch, self.rank, self.out_channels, height, width).sum(1)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    def forward_depthwise(self, x: Tensor) -> Tensor:
        ph, pw = self.padding
        y = F.conv2d(x, self.pointwise)
        if self.padding_mode != "zeros":
            y = F.pad(y, (pw, pw, ph, ph), mode=self.padding_mode)
            ph = pw = 0
        kernel = self.vertical * self.horizontal  # (R·N, 1, kh, kw): b ⊗ c per channel
        y = F.conv2d(y, kernel, stride=self.stride, padding=(ph, pw), dilation=self.dilation, groups=kernel.shape[0])
        return self._rank_sum(y)

    def forward_dense(self, x: Tensor) -> Tensor:
        # a channels-last input (the user's choice of layout) gets the kernel in that layout too: the
        # recomposition's product already is, and the convolution would convert a contiguous one back
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        weight = self.dense_weight(torch.channels_last if channels_last else torch.contiguous_format)
        if self.padding_mode != "zeros":
            ph, pw = self.padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            return F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation)

    def forward_separable(self, x: Tensor) -> Tensor:
        ph, pw = self.padding
        sh, sw = self.stride
        dh, dw = self.dilation
        channels = self.pointwise.shape[0]
        y = F.conv2d(x, self.pointwise)
        if self.padding_mode != "zeros":  # these paddings commute with the 1×1 conv and are separable
            y = F.pad(y, (pw, pw, ph, ph), mode=self.padding_mode)
            ph = pw = 0
        y = F.conv2d(y, self.vertical, stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), groups=channels)
        y = F.conv2d(y, self.horizontal, stride=(1, sw), padding=(0, pw), dilation=(1, dw), groups=channels)
        return self._rank_sum(y)

    # -- factors <-> dense ----------------------------------------------------
    def factors(self) -> Factors:
        """Per-filter factors ``A (N, C, R)``, ``B (N, kh, R)``, ``C (N, kw, R)``."""
        n, r = self.out_channels, self.rank
        a = self.pointwise.reshape(r, n, self.in_channels).permute(1, 2, 0)
        b = self.vertical.reshape(r, n, self.kernel_size[0]).permute(1, 2, 0)
        c = self.horizontal.reshape(r, n, self.kernel_size[1]).permute(1, 2, 0)
        return a, b, c

    @torch.no_grad()
    def set_factors(self, factors: Factors) -> None:
        """Load per-filter factors ``(A, B, C)`` laid out as ``factors()`` returns them."""
        a, b, c = factors
        n, r = self.out_channels, self.rank
        expected = ((n, self.in_channels, r), (n, self.kernel_size[0], r), (n, self.kernel_size[1], r))
        got = tuple(tuple(f.shape) for f in factors)
        if got != expected:
            raise NortonError(f"factors must have shapes {expected}, got {got}")
        self.pointwise.copy_(a.permute(2, 0, 1).reshape_as(self.pointwise))
        self.vertical.copy_(b.permute(2, 0, 1).reshape_as(self.vertical))
        self.horizontal.copy_(c.permute(2, 0, 1).reshape_as(self.horizontal))

    def dense_weight(self, memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
        """The equivalent conv kernel ``W_n = Σ_r a ⊗ b ⊗ c``, shape (N, C, kh, kw),
        in ``memory_format`` (``torch.contiguous_format`` or ``torch.channels_last``;
        the latter costs no layout copy).

        Differentiable: gradients reach the factors.
        """
        if memory_format not in (torch.contiguous_format, torch.channels_last):
            raise NortonError(f"memory_format must be torch.contiguous_format or torch.channels_last, got {memory_format!r}")
        n, kh, kw = self.out_channels, *self.kernel_size
        # (R, N, K) spatial kernels b ⊗ c and the (R, N, C) 1×1 weight, both read by the batched matmul
        # as strided views without a copy; the product comes out (N, K, C) and is laid out as
        # (N, C, kh, kw) once.  Fewer autograd nodes than going through factors(), and faster forward and
        # backward than the (N, C, R) @ (N, R, K) orientation (benchmarks/train_overhead.py).
        spatial = (self.vertical * self.horizontal).reshape(self.rank, n, kh * kw).permute(1, 2, 0)
        pointwise = self.pointwise.reshape(self.rank, n, self.in_channels).transpose(0, 1)
        weight = torch.bmm(spatial, pointwise).view(n, kh, kw, self.in_channels).permute(0, 3, 1, 2)
        if memory_format == torch.channels_last:
            return weight
        # the standard strides, also where contiguous() keeps these (one input channel: (C·K, 1, kw, 1) passes as
        # contiguous, yet a convolution reads it as channels-last and puts the whole network in that layout)
        return weight.contiguous().view(-1).view(weight.shape)

    @classmethod
    def like_conv(cls, conv: nn.Conv2d, rank: int) -> "CPDBlock":
        """A randomly initialised block with ``conv``'s geometry, device and dtype."""
        if not isinstance(conv, nn.Conv2d) or isinstance(conv, nn.modules.conv._ConvTransposeNd):
            raise NortonError(f"expected an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise NortonError(f"a CPDBlock replaces convs with groups=1, got groups={conv.groups}")
        block = cls(
            conv.in_channels,
            conv.out_channels,
            rank,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        block.train(conv.training)
        return block

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, **cp_options) -> "CPDBlock":
        """Decompose ``conv`` (groups=1) filter by filter; keeps stride, padding,
        dilation, bias, device and dtype.  ``cp_options`` go to ``cp_decompose``."""
        block = cls.like_conv(conv, rank)
        block.set_factors(cp_decompose(conv.weight.detach(), rank, **cp_options))
        block.copy_bias_from(conv)
        return block

    @torch.no_grad()
    def copy_bias_from(self, conv: nn.Conv2d) -> None:
        if conv.bias is not None:
            self.bias.copy_(conv.bias)

    @torch.no_grad()
    def to_conv(self) -> nn.Conv2d:
        """The dense ``nn.Conv2d`` computing exactly the same function."""
        weight = self.pointwise
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=weight.device,
            dtype=weight.dtype,
        )
        conv.weight.copy_(self.dense_weight())
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        conv.train(self.training)
        return conv

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, rank={self.rank}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}"
        )
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self.plan != "auto":
            s += f", plan={self.plan!r}"
        if self.bias is None:
            s += ", bias=False"
        return s


@contextlib.contextmanager
def plan_override(model: nn.Module, plan: str):
    """Run every CPDBlock of ``model`` with ``plan`` inside the block (restored after)."""
    blocks = [m for m in model.modules() if isinstance(m, CPDBlock)]
    saved = [b.plan for b in blocks]
    try:
        for b in blocks:
            b.set_plan(plan)
        yield model
    finally:
        for b, plan_ in zip(blocks, saved):
            b.plan = plan_
