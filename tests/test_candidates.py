"""Choosing among the planner's candidate plans by validation accuracy after a brief fine-tuning."""
import copy
import json

import pytest
import torch

from norton import NortonError, Plan, count_macs, create_model, plan, select_plan
from norton.training import FitResult, TrainConfig, calibration_batches, load_dataset, split_validation
from norton.training import candidates as selection_module


@pytest.fixture(scope="module")
def setup():
    train, val = split_validation(load_dataset("digits", None, "train"), 200)
    model = create_model("resnet_20", in_channels=1, num_classes=10).eval()
    x = calibration_batches(train, 32)[0]
    planned = plan(model, x, target_macs=0.6, ranks=(2,), keep_steps=2, forms=("cp",), recover=True)
    return model, train, val, x, planned


def test_every_distinct_candidate_is_a_plan_of_its_own(setup):
    model, _, _, x, planned = setup
    assert len(planned.alternatives) >= 2
    configs = {json.dumps([a["ranks"], a["keep"], a["tucker"]], sort_keys=True) for a in planned.alternatives.values()}
    assert len(configs) == len(planned.alternatives)  # distinct configurations
    own = planned.allocation.split(" (")[0]
    assert planned.alternative(own).keep == planned.keep and planned.alternative(own).ranks == planned.ranks
    for name in planned.alternatives:  # each meets the target as the chosen one does
        other = planned.alternative(name)
        assert other.macs_reduction >= 0.6 - 1e-9 and other.recover
    assert Plan.from_dict(json.loads(json.dumps(planned.to_dict()))) == planned
    with pytest.raises(NortonError, match="no candidate plan 'nope'; this plan has: "):
        planned.alternative("nope")


def test_select_plan_keeps_the_best_validation_candidate_and_resumes(setup, tmp_path, monkeypatch):
    model, train, val, x, planned = setup
    names = list(planned.alternatives)
    scripted = {n: 50.0 + i for i, n in enumerate(names)}  # the last candidate is best
    seen = []

    def fake_fit(trial, train_data, val_data, config, run_dir, **kwargs):
        name = kwargs["extra"]["stage"].removeprefix("plan selection: ")
        seen.append((name, config.epochs))
        assert count_macs(trial, x[:1]) == planned.alternative(name).macs_after  # that candidate, applied
        return FitResult(best_epoch=1, best_val={"top1": scripted[name]})

    monkeypatch.setattr(selection_module, "fit", fake_fit)
    before = copy.deepcopy(model.state_dict())
    chosen = select_plan(model, planned, train, val, epochs=2, finetune=TrainConfig(epochs=9, batch_size=64),
                         run_dir=str(tmp_path), calibration=[x], example=x[:1], device=torch.device("cpu"),
                         recalibration_images=64)
    assert seen == [(n, 2) for n in names]
    assert chosen.selection == scripted
    assert chosen.keep == planned.alternative(names[-1]).keep and chosen.ranks == planned.alternative(names[-1]).ranks
    assert chosen.allocation.startswith(f"{names[-1]} (best validation top-1 of {len(names)}")
    assert "validation top-1 after a brief fine-tuning" in chosen.table()
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))
    seen.clear()  # a second call reads every candidate's score back instead of training again
    again = select_plan(model, planned, train, val, epochs=2, finetune=TrainConfig(epochs=9, batch_size=64),
                        run_dir=str(tmp_path), calibration=[x], example=x[:1], device=torch.device("cpu"))
    assert not seen and again.selection == scripted


def test_select_plan_refuses_bad_input(setup, tmp_path):
    model, train, val, x, planned = setup
    with pytest.raises(NortonError, match="selection epochs must be a positive integer, got 0"):
        select_plan(model, planned, train, val, epochs=0, finetune=TrainConfig(), run_dir=str(tmp_path),
                    calibration=[x], example=x[:1], device=torch.device("cpu"))
    empty = copy.deepcopy(planned)
    empty.alternatives = {}
    with pytest.raises(NortonError, match="no candidate plans to select from"):
        select_plan(model, empty, train, val, epochs=1, finetune=TrainConfig(), run_dir=str(tmp_path),
                    calibration=[x], example=x[:1], device=torch.device("cpu"))
