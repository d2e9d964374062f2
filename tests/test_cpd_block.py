import pytest
import torch
import torch.nn.functional as F
from conftest import low_rank_filters
from torch import nn

from norton import CPDBlock, NortonError, nmse


def conv_with_low_rank_filters(c_in, c_out, rank, kernel, **conv_kwargs):
    conv = nn.Conv2d(c_in, c_out, kernel, **conv_kwargs)
    weight, _ = low_rank_filters(c_out, c_in, *conv.kernel_size, rank, dtype=torch.float32)
    with torch.no_grad():
        conv.weight.copy_(weight)
    return conv


@pytest.mark.parametrize("conv_kwargs", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1, bias=False),
    dict(kernel_size=(3, 5), stride=(1, 2), padding=(1, 2)),
    dict(kernel_size=3, dilation=2, padding=2),
    dict(kernel_size=(5, 3), stride=(2, 1), padding=(0, 1), dilation=(1, 2)),
    dict(kernel_size=3, padding="same"),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=3, padding=1, padding_mode="circular"),
    dict(kernel_size=3, padding=2, padding_mode="replicate"),
])
def test_exactly_low_rank_conv_equals_its_block(conv_kwargs):
    kernel = conv_kwargs.pop("kernel_size")
    conv = conv_with_low_rank_filters(6, 10, 2, kernel, **conv_kwargs)
    block = CPDBlock.from_conv(conv, 2, n_iter_max=500, tol=1e-12)
    x = torch.randn(2, 6, 13, 11)
    torch.testing.assert_close(block(x), conv(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_to_conv_matches_block(rank):
    block = CPDBlock(5, 7, rank, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=True)
    conv = block.to_conv()
    x = torch.randn(3, 5, 16, 17)
    torch.testing.assert_close(conv(x), block(x), atol=1e-5, rtol=1e-4)
    assert conv.stride == (2, 1) and conv.padding == (1, 2) and conv.dilation == (1, 2)


def test_rank_major_channel_layout():
    """Channel r·N + n of each stage holds rank term r of filter n (published layout)."""
    n, c, r = 4, 3, 2
    block = CPDBlock(c, n, r, 3, padding=1)
    a, b, cc = block.factors()
    for rr in range(r):
        for nn_ in range(n):
            ch = rr * n + nn_
            torch.testing.assert_close(block.pointwise[ch, :, 0, 0], a[nn_, :, rr])
            torch.testing.assert_close(block.vertical[ch, 0, :, 0], b[nn_, :, rr])
            torch.testing.assert_close(block.horizontal[ch, 0, 0, :], cc[nn_, :, rr])
    # and the block's function is Σ_r of the separable stages in that layout
    x = torch.randn(1, c, 8, 8)
    y = F.conv2d(x, block.pointwise)
    y = F.conv2d(y, block.vertical, padding=(1, 0), groups=n * r)
    y = F.conv2d(y, block.horizontal, padding=(0, 1), groups=n * r)
    expected = y[:, :n] + y[:, n:]
    torch.testing.assert_close(block(x), expected)


def test_parameters_live_on_the_block():
    block = CPDBlock(3, 4, 2, 3, bias=True)
    assert list(dict(block.named_children())) == []
    assert {name for name, _ in block.named_parameters()} == {"pointwise", "vertical", "horizontal", "bias"}


def test_from_conv_keeps_bias_device_dtype_and_mode():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True).double().eval()
    block = CPDBlock.from_conv(conv, 3)
    assert block.pointwise.dtype == torch.float64 and not block.training
    torch.testing.assert_close(block.bias, conv.bias)
    assert block.pointwise.device == conv.weight.device


def test_factor_roundtrip_and_nmse():
    conv = nn.Conv2d(8, 5, 3)
    block = CPDBlock.from_conv(conv, 4)
    a, b, c = block.factors()
    assert a.shape == (5, 8, 4) and b.shape == (5, 3, 4) and c.shape == (5, 3, 4)
    err = nmse(conv.weight, block.factors())
    dense_err = ((conv.weight - block.dense_weight()) ** 2).sum((1, 2, 3)) / (conv.weight**2).sum((1, 2, 3))
    torch.testing.assert_close(err, dense_err, atol=1e-6, rtol=1e-5)


def test_gradients_reach_factors():
    block = CPDBlock(3, 4, 2, 3, padding=1, bias=True)
    block(torch.randn(2, 3, 6, 6)).square().sum().backward()
    for p in block.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    weight = block.dense_weight()
    assert weight.requires_grad


def test_macs_are_those_of_the_factored_form():
    from norton import complexity

    c, n, r, h = 16, 32, 3, 10
    block = CPDBlock(c, n, r, 3, padding=1)
    macs = complexity(block, (c, h, h)).macs
    assert macs == c * r * n * h * h + 3 * r * n * h * h + 3 * r * n * h * h


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(padding=-1), "padding"),
    (dict(padding_mode="mirror"), "padding_mode"),
    (dict(padding="same", stride=2), "stride 1"),
])
def test_bad_construction(kwargs, match):
    args = dict(in_channels=3, out_channels=4, rank=2, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(NortonError, match=match):
        CPDBlock(**args)


def test_from_conv_rejects_grouped():
    with pytest.raises(NortonError, match="groups=1"):
        CPDBlock.from_conv(nn.Conv2d(4, 4, 3, groups=2), 2)


@pytest.mark.parametrize("conv_kwargs", [
    dict(kernel_size=3, padding=1, bias=True),
    dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
])
def test_plans_agree_in_value_and_gradient(conv_kwargs):
    block = CPDBlock(5, 6, 3, **conv_kwargs)
    x = torch.randn(2, 5, 12, 13, requires_grad=True)
    results = {}
    for plan in ("separable", "depthwise", "dense"):
        block.set_plan(plan)
        block.zero_grad()
        x.grad = None
        out = block(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results[plan] = (out.detach(), x.grad.clone(), [p.grad.clone() for p in block.parameters()])
    o1, gx1, gp1 = results["separable"]
    for plan in ("depthwise", "dense"):
        o2, gx2, gp2 = results[plan]
        torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(gx1, gx2, atol=1e-5, rtol=1e-4)
        for a, b in zip(gp1, gp2):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_dense_weight_is_the_same_when_the_block_is_channels_last():
    block = CPDBlock(5, 6, 3, kernel_size=(3, 5))
    expected = block.dense_weight().detach()
    a, b, c = block.factors()
    torch.testing.assert_close(expected, torch.einsum("ncr,nhr,nwr->nchw", a, b, c), atol=1e-6, rtol=1e-5)
    block.to(memory_format=torch.channels_last)
    assert block.pointwise.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(block.dense_weight().detach(), expected)
    assert block.dense_weight().is_contiguous()
    channels_last = block.dense_weight(torch.channels_last)
    assert channels_last.is_contiguous(memory_format=torch.channels_last) and not channels_last.is_contiguous()
    torch.testing.assert_close(channels_last.detach(), expected)
    with pytest.raises(NortonError, match="memory_format must be torch.contiguous_format or torch.channels_last"):
        block.dense_weight(torch.preserve_format)


def test_a_one_channel_block_keeps_a_standard_input_in_the_standard_layout():
    """A grayscale first layer: its kernel (N, 1, kh, kw) passes as contiguous with channels-last strides too;
    in those, a convolution reads it as channels-last and returns every later layer's activations in that
    layout (batch norm of 12 channels at 64×64 ran 3–4× slower so on 2 cores)."""
    block = CPDBlock(1, 12, 2, kernel_size=3, padding=1).set_plan("dense")
    weight = block.dense_weight()
    assert weight.stride() == (9, 9, 3, 1)
    x = torch.randn(2, 1, 8, 8)
    for training in (True, False):
        block.train(training)
        y = block(x)
        assert y.is_contiguous() and not y.is_contiguous(memory_format=torch.channels_last)
    assert block.to_conv()(x).is_contiguous()


def test_a_channels_last_input_trains_the_dense_plan_to_the_same_values_and_gradients(monkeypatch):
    block = CPDBlock(6, 5, 3, kernel_size=3, padding=1, bias=True).set_plan("dense")
    x = torch.randn(2, 6, 9, 11)
    asked = []
    recompose = CPDBlock.dense_weight
    monkeypatch.setattr(CPDBlock, "dense_weight", lambda self, *fmt: asked.append(fmt) or recompose(self, *fmt))
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        block.zero_grad()
        inp = x.contiguous(memory_format=layout).detach().requires_grad_(True)
        out = block(inp)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), inp.grad.clone(), [p.grad.clone() for p in block.parameters()]))
    (o1, gx1, gp1), (o2, gx2, gp2) = results
    assert asked == [(torch.contiguous_format,), (torch.channels_last,)]  # the kernel comes in the input's layout
    assert o2.is_contiguous(memory_format=torch.channels_last)  # the user's layout is kept
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gx1, gx2, atol=1e-5, rtol=1e-4)
    for a, b in zip(gp1, gp2):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_auto_plan_and_bad_plan():
    # the factored plan only where it runs clearly faster than a dense conv: training and inference alike (the
    # separable plan, chosen for inference by its MACs, evaluated a rank-2 ResNet-20 at 64×64 6× slower than dense)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            assert CPDBlock(256, 256, 1, 3).resolved_plan() == "depthwise"
            assert CPDBlock(256, 256, 1, 3).eval().resolved_plan() == "depthwise"
            assert CPDBlock(512, 512, 8, 3).resolved_plan() == "dense"  # VGG-16's rank-8 layers
            assert CPDBlock(16, 16, 4, 3).resolved_plan() == "dense"  # ResNet-56's rank-4 layers
            assert CPDBlock(16, 16, 2, 3).eval().resolved_plan() == "dense"  # ResNet-20's rank-2 layers
            assert CPDBlock(3, 64, 1, 3).resolved_plan() == "dense"  # a 3-channel stem
    with pytest.raises(NortonError, match="plan must be one of"):
        CPDBlock(3, 3, 1, 3).set_plan("fast")
