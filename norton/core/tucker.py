"""Tucker-2: a k×k convolution as 1×1 (C -> R_in), k×k core (R_in -> R_out), 1×1 (R_out -> N).

``W[n, c] ≈ Σ_{o,i} U_out[n, o] · G[o, i] · U_in[c, i]`` — the two channel modes
of the kernel are factored, the spatial ones stay in the core.  Not part of the
published method: the budget planner offers it per layer next to CP ranks,
dense and pruning, because at high compression it keeps more of a layer than a
per-filter CP of the same cost (see the comparison guide).

``TuckerBlock`` is an ``nn.Sequential`` of three plain ``nn.Conv2d``, so the
dependency graph, BatchNorm folding, MACs counting and ONNX export treat it as
the three convolutions it is.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from norton.errors import NortonError

HOOI_ITERATIONS = 10


def _leading(matrix: Tensor, rank: int) -> Tensor:
    """The ``rank`` leading left singular vectors of ``matrix`` (d, m), as columns,
    from the eigenvectors of its (d, d) Gram matrix; the sign of each is fixed
    (largest entry positive) so the result is deterministic."""
    _, vectors = torch.linalg.eigh(matrix @ matrix.T)
    top = vectors[:, -rank:].flip(1)
    signs = torch.sign(top.gather(0, top.abs().argmax(0, keepdim=True)))
    return top * torch.where(signs == 0, torch.ones_like(signs), signs)


def tucker2(weight: Tensor, ranks: tuple[int, int], n_iter: int = HOOI_ITERATIONS) -> tuple[Tensor, Tensor, Tensor]:
    """Tucker-2 of a conv kernel ``weight`` (N, C, kh, kw) by higher-order
    orthogonal iteration: returns ``(u_out (N, R_out), core (R_out, R_in, kh, kw),
    u_in (C, R_in))``, ``u_in`` with orthonormal columns and the core's (R_out,
    R_in·kh·kw) unfolding with orthonormal rows, so that the norm of row n of
    ``u_out`` is the norm of filter n of the approximation (and distances
    between rows are distances between filters): norm-based filter criteria
    score the last 1×1 conv as they would the dense kernel.  In ``weight``'s dtype."""
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise NortonError(f"tucker2 needs a conv kernel (N, C, kh, kw), got {getattr(weight, 'shape', type(weight).__name__)}")
    n, c = weight.shape[:2]
    r_out, r_in = _check_ranks(ranks)
    if r_out > n or r_in > c:
        raise NortonError(f"Tucker-2 ranks {tuple(ranks)} exceed the kernel's (output, input) channels ({n}, {c})")
    w = weight.detach().to(torch.float64)
    u_in = _leading(w.transpose(0, 1).reshape(c, -1), r_in)
    u_out = _leading(w.reshape(n, -1), r_out)
    for _ in range(n_iter):
        u_out = _leading(torch.einsum("ncij,cr->nrij", w, u_in).reshape(n, -1), r_out)
        u_in = _leading(torch.einsum("ncij,no->coij", w, u_out).reshape(c, -1), r_in)
    core = torch.einsum("ncij,no,cr->orij", w, u_out, u_in)
    unfolded = core.reshape(r_out, -1)
    if r_out <= unfolded.shape[1]:  # core rows orthonormal, their scale in u_out: ‖u_out[n]‖ = ‖W_n‖ (approximated)
        q, r = torch.linalg.qr(unfolded.T)
        core, u_out = q.T.reshape(core.shape), u_out @ r.T
    return u_out.to(weight.dtype), core.to(weight.dtype), u_in.to(weight.dtype)


def _check_ranks(ranks: object) -> tuple[int, int]:
    if (not isinstance(ranks, (tuple, list)) or len(ranks) != 2
            or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks)):
        raise NortonError(f"Tucker-2 ranks must be a pair (output rank, input rank) of positive ints, got {ranks!r}")
    return int(ranks[0]), int(ranks[1])


class TuckerBlock(nn.Sequential):
    """Drop-in replacement for ``nn.Conv2d(groups=1)``: 1×1 conv (C -> R_in, no
    bias), the core conv (R_in -> R_out, the original kernel size, stride,
    padding, dilation and padding mode), 1×1 conv (R_out -> N, the original bias)."""

    def __init__(self, in_channels: int, out_channels: int, ranks: tuple[int, int], kernel_size, stride=1,
                 padding=0, dilation=1, bias: bool = False, padding_mode: str = "zeros",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        r_out, r_in = _check_ranks(ranks)
        factory = {"device": device, "dtype": dtype}
        super().__init__(
            nn.Conv2d(in_channels, r_in, 1, bias=False, **factory),
            nn.Conv2d(r_in, r_out, kernel_size, stride, padding, dilation, bias=False, padding_mode=padding_mode,
                      **factory),
            nn.Conv2d(r_out, out_channels, 1, bias=bias, **factory),
        )

    @property
    def in_channels(self) -> int:
        return self[0].in_channels

    @property
    def out_channels(self) -> int:
        return self[2].out_channels

    @property
    def ranks(self) -> tuple[int, int]:
        """(R_out, R_in): the core's output and input channels."""
        return self[1].out_channels, self[1].in_channels

    @classmethod
    def like_conv(cls, conv: nn.Conv2d, ranks: tuple[int, int]) -> TuckerBlock:
        """A randomly initialised block with ``conv``'s geometry, device and dtype."""
        if type(conv) is not nn.Conv2d or conv.groups != 1:
            raise NortonError(f"a TuckerBlock replaces an nn.Conv2d with groups=1, got {conv!r}")
        block = cls(conv.in_channels, conv.out_channels, ranks, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)
        block.train(conv.training)
        return block

    @classmethod
    @torch.no_grad()
    def from_conv(cls, conv: nn.Conv2d, ranks: tuple[int, int], n_iter: int = HOOI_ITERATIONS) -> TuckerBlock:
        """Decompose ``conv``; ranks larger than its channels are clamped to them."""
        r_out, r_in = _check_ranks(ranks)
        ranks = (min(r_out, conv.out_channels), min(r_in, conv.in_channels))
        block = cls.like_conv(conv, ranks)
        u_out, core, u_in = tucker2(conv.weight, ranks, n_iter)
        block[0].weight.copy_(u_in.T[:, :, None, None])
        block[1].weight.copy_(core)
        block[2].weight.copy_(u_out[:, :, None, None])
        if conv.bias is not None:
            block[2].bias.copy_(conv.bias)
        for p in block.parameters():
            p.requires_grad_(conv.weight.requires_grad)
        return block

    def dense_weight(self) -> Tensor:
        """The equivalent conv kernel (N, C, kh, kw)."""
        return torch.einsum("no,orij,rc->ncij", self[2].weight[:, :, 0, 0], self[1].weight, self[0].weight[:, :, 0, 0])

    @torch.no_grad()
    def to_conv(self) -> nn.Conv2d:
        """The dense ``nn.Conv2d`` computing the same function."""
        core = self[1]
        conv = nn.Conv2d(self.in_channels, self.out_channels, core.kernel_size, core.stride, core.padding,
                         core.dilation, bias=self[2].bias is not None, padding_mode=core.padding_mode,
                         device=core.weight.device, dtype=core.weight.dtype)
        conv.weight.copy_(self.dense_weight())
        if self[2].bias is not None:
            conv.bias.copy_(self[2].bias)
        conv.train(self.training)
        return conv
