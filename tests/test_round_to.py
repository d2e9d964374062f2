"""Widths the hardware likes: round_to in pruning and the planner, and the multiple measured per device."""
import json

import pytest
import torch

from norton import NortonError, create_model
from norton.cli import main
from norton.compression import measure_round_to, plan, prune
from norton.compression.selection import nearest_multiple
from norton.core import CPDBlock


@pytest.mark.parametrize("count,multiple,total,expected", [
    (37, 8, 64, 40), (35, 8, 64, 32), (36, 8, 64, 40),  # nearest; a tie goes to the larger
    (3, 8, 64, 8),  # below the first multiple: the multiple
    (5, 8, 6, 6),  # a group smaller than the multiple stays whole
    (63, 8, 100, 64), (99, 8, 100, 96),  # never past the group
    (64, 8, 64, 64), (70, 8, 64, 70),  # a group kept whole is left alone
    (37, 1, 64, 37),
])
def test_nearest_multiple(count, multiple, total, expected):
    assert nearest_multiple(count, multiple, total) == expected


@pytest.mark.parametrize("arch,target", [("vgg_16_bn", 0.6), ("vgg_16_bn", 0.85), ("resnet_56", 0.6)])
def test_round_to_keeps_multiples_at_the_macs_target_within_a_point(arch, target):
    model = create_model(arch)
    x = torch.randn(1, 3, 32, 32)
    report = prune(model, target_macs=target, example_inputs=x, criterion="l2", round_to=8)
    pruned = [g for g in report.groups if g.width < g.total]
    assert pruned and all(g.width % 8 == 0 for g in pruned)
    assert abs((1 - report.macs_after / report.macs_before) - target) <= 0.01
    for m in model.modules():  # the layers really have those widths
        if isinstance(m, torch.nn.Conv2d) and m.out_channels < 64 and m.out_channels not in (3, 10, 16):
            assert m.out_channels % 8 == 0


def test_round_to_with_a_rate_and_with_factors():
    model = create_model("resnet_20", rank=2)
    report = prune(model, amount=0.3, example_inputs=torch.randn(1, 3, 32, 32), round_to=8)  # pabs on CP factors
    assert {g.width for g in report.groups if g.width < g.total} <= {8, 16, 24, 32, 40, 48, 56}
    assert all(m.out_channels % 8 == 0 for m in model.modules() if isinstance(m, CPDBlock))


@pytest.mark.parametrize("bad", [0, -8, 2.5, True, "8"])
def test_round_to_must_be_a_positive_integer(bad):
    with pytest.raises(NortonError, match="round_to must be a positive integer"):
        prune(create_model("resnet_20"), amount=0.3, example_inputs=torch.randn(1, 3, 32, 32), round_to=bad)


def test_planner_keeps_multiples_of_round_to():
    model = create_model("resnet_20").eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    p = plan(model, x, target_macs=0.6, ranks=(1, 2), keep_steps=4, forms=("cp",), round_to=8, allocation="greedy")
    assert p.round_to == 8
    assert all(k % 8 == 0 or k == p.totals[root] for root, k in p.keep.items())
    assert any(k < p.totals[root] for root, k in p.keep.items())


def _fake_timer(cost):
    def timer(fn, x, repeats):
        seconds = {}

        def capture(module, args, out):
            seconds["s"] = cost(out.shape[1])

        from torch.nn.modules.module import register_module_forward_hook

        handle = register_module_forward_hook(capture)
        try:
            fn()
        finally:
            handle.remove()
        return seconds["s"]

    return timer


def test_the_multiple_is_chosen_from_measurement():
    # tensor-core-like: a width off the multiple falls back to a kernel half as fast
    assert measure_round_to("cpu", timer=_fake_timer(lambda w: w if w % 8 == 0 else 2.0 * w)) == 8
    assert measure_round_to("cpu", timer=_fake_timer(lambda w: w if w % 32 == 0 else 2.0 * w)) == 32
    # padded to the next multiple of 8: about 3 % lost on average, below the 5 % gain asked for
    assert measure_round_to("cpu", timer=_fake_timer(lambda w: float(-(-w // 8) * 8))) == 1
    assert measure_round_to("cpu", timer=_fake_timer(lambda w: float(w))) == 1  # any width as good as another


def test_cli_round_to(tmp_path, capsys):
    out = tmp_path / "pruned.pt"
    assert main(["prune", "--arch", "vgg_16_bn", "--target-macs", "0.6", "--criterion", "l2", "--round-to", "8",
                 "--out", str(out), "--device", "cpu"]) == 0
    from norton.checkpoints import load_checkpoint

    kept = load_checkpoint(out)["extra"]["kept"]
    assert all(len(k) % 8 == 0 for k in kept.values())
    with pytest.raises(SystemExit) as stop:
        main(["prune", "--arch", "vgg_16_bn", "--amount", "0.5", "--round-to", "0", "--out", str(tmp_path / "x.pt")])
    assert stop.value.code == 2 and "round-to must be a positive integer" in capsys.readouterr().err
