"""The channels-last BatchNorm norton trains with on the CPU computes what nn.BatchNorm2d does."""
import pytest
import torch
from torch import nn

from norton.core import ChannelsLastBatchNorm2d, batch_statistics, fast_channels_last_batchnorm
from norton.training import TrainConfig, fit
from norton.training.data import ArrayDataset

CPU = torch.device("cpu")


def _pair(channels: int, affine: bool, momentum: float | None):
    torch.manual_seed(0)
    native = nn.BatchNorm2d(channels, affine=affine, momentum=momentum).double()
    if affine:
        with torch.no_grad():
            native.weight.uniform_(0.5, 1.5)
            native.bias.uniform_(-1.0, 1.0)
    fast = nn.BatchNorm2d(channels, affine=affine, momentum=momentum).double()
    fast.load_state_dict(native.state_dict())
    fast.__class__ = ChannelsLastBatchNorm2d
    return native, fast


@pytest.mark.parametrize("channels,size,affine,momentum", [
    (10, 12, True, 0.1), (20, 7, True, None), (41, 5, False, 0.3), (3, 9, True, 0.1)])
def test_channels_last_batchnorm_gives_pytorchs_output_gradients_and_running_statistics(channels, size, affine,
                                                                                          momentum):
    native, fast = _pair(channels, affine, momentum)
    for step in range(3):  # the running averages over several batches (momentum None: the cumulative average)
        x = (torch.randn(6, channels, size, size, dtype=torch.float64) * 3 + 2).to(memory_format=torch.channels_last)
        grad = torch.randn(6, channels, size, size, dtype=torch.float64)
        if step == 1:  # the gradient arriving channels-last, as a channels-last network hands it back
            grad = grad.to(memory_format=torch.channels_last)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = native(a), fast(b)
        assert type(yb.grad_fn).__name__ == "_ChannelsLastNormBackward"  # the fast path ran, not PyTorch's kernel
        assert yb.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-10)
        ya.backward(grad)
        yb.backward(grad)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-10)
        assert b.grad.is_contiguous(memory_format=torch.channels_last)
        if affine:
            torch.testing.assert_close(fast.weight.grad, native.weight.grad, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(fast.bias.grad, native.bias.grad, rtol=1e-9, atol=1e-10)
        for name, buffer in native.named_buffers():
            torch.testing.assert_close(dict(fast.named_buffers())[name], buffer, rtol=1e-10, atol=1e-12)


def test_channels_last_batchnorm_leaves_every_other_case_to_pytorch():
    native, fast = _pair(10, True, 0.1)
    x = torch.randn(4, 10, 6, 6, dtype=torch.float64, requires_grad=True)
    assert type(fast(x).grad_fn).__name__ == "NativeBatchNormBackward0"  # contiguous input
    cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    fast.eval()
    assert type(fast(cl).grad_fn).__name__ == "NativeBatchNormBackward0"  # running statistics
    _, aligned = _pair(16, True, 0.1)
    assert type(aligned(torch.randn(4, 16, 6, 6, dtype=torch.float64, requires_grad=True)
                        .to(memory_format=torch.channels_last)).grad_fn).__name__ == "NativeBatchNormBackward0"
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # PyTorch's own check still applies
        _pair(10, True, 0.1)[1](torch.randn(1, 10, 1, 1, dtype=torch.float64))


def test_batch_statistics_without_running_statistics_normalise_alike_and_update_nothing():
    model = nn.Sequential(nn.Conv2d(3, 10, 3), nn.BatchNorm2d(10), nn.ReLU()).double()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64).to(memory_format=torch.channels_last)
    model.to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), batch_statistics(model):
        expected = model(x)
        with fast_channels_last_batchnorm(model):
            got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_the_context_swaps_only_plain_batchnorms_and_restores_them_even_after_an_error():
    class Custom(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.BatchNorm2d(10), Custom(10), nn.BatchNorm1d(10))
    keys = list(model.state_dict())
    with pytest.raises(RuntimeError, match="stop"):
        with fast_channels_last_batchnorm(model):
            assert [type(m) for m in model] == [ChannelsLastBatchNorm2d, Custom, nn.BatchNorm1d]
            assert list(model.state_dict()) == keys
            raise RuntimeError("stop")
    assert [type(m) for m in model] == [nn.BatchNorm2d, Custom, nn.BatchNorm1d]


def test_a_network_of_pruned_widths_trains_channels_last_to_the_numbers_of_contiguous_training(tmp_path):
    torch.manual_seed(0)
    data = ArrayDataset(torch.randint(0, 256, (96, 1, 16, 16), dtype=torch.uint8), torch.randint(0, 4, (96,)),
                        (0.5,), (0.25,))

    def net():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(1, 10, 3, padding=1), nn.BatchNorm2d(10), nn.ReLU(),
                             nn.Conv2d(10, 20, 3, padding=1, stride=2), nn.BatchNorm2d(20), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(20, 4))

    runs, kernels = {}, []
    for layout in (False, True):
        model = net()
        if layout:
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.register_forward_hook(lambda m, i, out: kernels.append(type(out.grad_fn).__name__)
                                            if torch.is_grad_enabled() else None)
        runs[layout] = model, fit(model, data, data, TrainConfig(epochs=2, batch_size=96, lr=0.05, warmup_epochs=0,
                                                                 channels_last=layout),
                                  str(tmp_path / str(layout)), device=CPU, progress=False)
    (plain, a), (fast, b) = runs[False], runs[True]
    for x, y in zip(a.history, b.history):  # one step an epoch: the same steps up to float rounding
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-5)
    for (key, x), y in zip(plain.state_dict().items(), fast.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=key)
    assert set(kernels) == {"_ChannelsLastNormBackward"}  # every training step's BatchNorms took the fast path
    assert all(type(m) is nn.BatchNorm2d for m in fast.modules() if isinstance(m, nn.BatchNorm2d))
