import copy
import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from norton import NortonError, create_model
from norton.checkpoints import load_checkpoint, load_model
from norton.training import (
    TrainConfig,
    classification_loss,
    evaluate,
    fit,
    limit,
    load_dataset,
    lr_factor,
    recalibrate_bn,
    resolve_device,
    split_validation,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    train = load_dataset("digits", None, "train")
    train, val = split_validation(train, 200)
    return train, val, load_dataset("digits", None, "test")


def test_schedule_warmup_then_cosine():
    total, warm = 100, 10
    assert lr_factor(0, total, warm, 0.01) == pytest.approx(0.01)
    assert lr_factor(5, total, warm, 0.01) == pytest.approx(0.505)
    assert lr_factor(10, total, warm, 0.01) == pytest.approx(1.0)
    assert lr_factor(55, total, warm, 0.01) == pytest.approx(0.5)
    assert lr_factor(100, total, warm, 0.01) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0, total, 0, 0.01) == pytest.approx(1.0)


def test_training_learns_and_writes_its_run(digits, tmp_path):
    train, val, test = digits
    model = create_model("resnet_20", in_channels=1)
    result = fit(model, train, val, TrainConfig(epochs=3, batch_size=64, lr=0.1, warmup_epochs=1), str(tmp_path),
                 device=CPU, progress=False)
    assert result.best_val["top1"] > 80 and len(result.history) == 3
    assert evaluate(model, test, device=CPU)["top1"] > 70
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and '"val_top1"' in lines[0]
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["train_state"]["finished"] and ckpt["train_state"]["epoch"] == 2
    best, _ = load_model(tmp_path / "best.pt")
    assert evaluate(best, val, device=CPU)["top1"] == pytest.approx(result.best_val["top1"])


def test_run_directory_is_protected(digits, tmp_path):
    train, val, _ = digits
    config = TrainConfig(epochs=1, batch_size=128, lr=0.05, warmup_epochs=0)
    fit(create_model("resnet_20", in_channels=1), train, val, config, str(tmp_path), device=CPU, progress=False)
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(NortonError, match="already holds a finished run; pass --resume .* or --overwrite"):
        fit(create_model("resnet_20", in_channels=1), train, val, config, str(tmp_path), device=CPU, progress=False)
    assert (tmp_path / "last.pt").read_bytes() == before
    with pytest.raises(NortonError, match="different settings"):
        fit(create_model("resnet_20", in_channels=1), train, val, TrainConfig(epochs=2, batch_size=64), str(tmp_path),
            device=CPU, resume=True, progress=False)


class NaNAfter(nn.Module):
    """Wraps a model; its output turns NaN after ``calls`` forward passes in training."""

    def __init__(self, model, calls):
        super().__init__()
        self.model, self.calls = model, calls
        self.default_input_size = model.default_input_size
        self.norton_spec = model.norton_spec

    def forward(self, x):
        out = self.model(x)
        if self.training:
            self.calls -= 1
            if self.calls < 0:
                return out * float("nan")
        return out


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(digits, tmp_path):
    train, val, _ = digits
    steps = -(-len(train) // 128)
    model = NaNAfter(create_model("resnet_20", in_channels=1), calls=steps + 3)  # NaN in epoch 2
    with pytest.raises(NortonError, match="the loss became nan at epoch 2, step 4; .* last good checkpoint"):
        fit(model, train, val, TrainConfig(epochs=3, batch_size=128, lr=0.05, warmup_epochs=0), str(tmp_path),
            device=CPU, progress=False)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["train_state"]["epoch"] == 0 and not ckpt["train_state"]["finished"]
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def _train_cmd(run_dir, *extra):
    return [sys.executable, "-m", "norton.cli", "train", "--arch", "resnet_20", "--data", "digits",
            "--epochs", "3", "--batch-size", "32", "--lr", "0.05", "--warmup-epochs", "1", "--device", "cpu",
            "--run-dir", str(run_dir), *extra]


def _digest(path):
    ckpt = load_checkpoint(path)
    h = hashlib.sha256()
    for key in sorted(ckpt["state_dict"]):
        h.update(ckpt["state_dict"][key].numpy().tobytes())
    return h.hexdigest()


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"  # runs alongside the killed run (one thread each)
    errors = tmp_path / "straight.err"
    with open(errors, "w") as err:
        uninterrupted = subprocess.Popen(_train_cmd(straight), env=env, stdout=subprocess.DEVNULL, stderr=err)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for the first epoch's checkpoint, then kill mid-epoch 2
        if (killed / "last.pt").exists():
            time.sleep(0.7)
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(killed / "last.pt")["train_state"]["epoch"] < 2  # it really was interrupted
    assert uninterrupted.wait(timeout=300) == 0, errors.read_text()[-3000:]
    resumed = subprocess.run(_train_cmd(killed, "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _digest(killed / "last.pt") == _digest(straight / "last.pt")
    assert _digest(killed / "model.pt") == _digest(straight / "model.pt")
    assert (killed / "metrics.jsonl").read_text().count("\n") == 3


def test_recalibration_restores_mode_and_momentum(digits):
    train, _, _ = digits
    model = create_model("resnet_20", in_channels=1).eval()
    bn = model.bn1
    bn.running_mean.fill_(5.0)
    used = recalibrate_bn(model, train, device=CPU, num_images=200, batch_size=64)
    assert used == 200 and not model.training and bn.momentum == 0.1
    assert bn.running_mean.abs().max() < 5.0 and bn.num_batches_tracked == 4


def test_devices():
    assert resolve_device("cpu") == CPU
    with pytest.raises(NortonError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(NortonError, match="CUDA is not available"):
            resolve_device("cuda")


def test_distillation_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 1, 2])
    config = TrainConfig(distill=0.3, temperature=2.0)
    s, t = student.numpy(), teacher.numpy()

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    ce = -np.mean(np.log(softmax(s)[np.arange(5), labels.numpy()]))
    p_t, p_s = softmax(t / 2.0), softmax(s / 2.0)
    kl = np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1))
    expected = 0.7 * ce + 0.3 * 4.0 * kl
    assert float(classification_loss(student, labels, config, teacher)) == pytest.approx(expected, rel=1e-12)
    assert float(classification_loss(student, labels, TrainConfig(), teacher)) == pytest.approx(ce, rel=1e-12)


def test_distillation_needs_a_teacher_and_trains_with_one(tmp_path):
    train, val = split_validation(load_dataset("digits", None, "train"), 200)
    model = create_model("resnet_20", in_channels=1)
    config = TrainConfig(epochs=1, batch_size=128, warmup_epochs=0, distill=0.5)
    with pytest.raises(NortonError, match="needs a teacher"):
        fit(model, train, val, config, str(tmp_path / "a"), device=torch.device("cpu"), progress=False)
    teacher = create_model("resnet_20", in_channels=1)
    result = fit(model, train, val, config, str(tmp_path / "b"), device=torch.device("cpu"), progress=False,
                 teacher=teacher)
    assert result.history[0]["train_loss"] > 0 and all(not p.requires_grad for p in teacher.parameters())
    with pytest.raises(NortonError, match="distillation weight must be in"):
        TrainConfig(distill=1.5).validate()


def test_a_run_started_before_a_setting_existed_resumes_when_the_setting_has_its_default(digits, tmp_path):
    """Runs of norton 0.1.0 have no distill/temperature in their saved settings."""
    from norton.checkpoints import atomic_save
    from norton.checkpoints.files import content_hash

    train, val, _ = digits
    config = TrainConfig(epochs=1, batch_size=128, lr=0.05, warmup_epochs=0)
    fit(create_model("resnet_20", in_channels=1), train, val, config, str(tmp_path), device=CPU, progress=False)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    for key in ("distill", "temperature"):
        del ckpt["train_state"]["config"][key]
    ckpt["sha256"] = content_hash(ckpt)
    atomic_save(ckpt, tmp_path / "last.pt")
    fit(create_model("resnet_20", in_channels=1), train, val, config, str(tmp_path), device=CPU, progress=False,
        resume=True)
    with pytest.raises(NortonError, match="different settings"):
        fit(create_model("resnet_20", in_channels=1), train, val, TrainConfig(epochs=1, batch_size=128, lr=0.05,
            warmup_epochs=0, distill=0.5), str(tmp_path), device=CPU, progress=False, resume=True,
            teacher=create_model("resnet_20", in_channels=1))


def test_channels_last_training_gives_the_same_numbers_and_resumes_exactly(digits, tmp_path, monkeypatch):
    from norton.training import classification

    train, val, _ = digits
    config = TrainConfig(epochs=2, batch_size=128, lr=0.05, warmup_epochs=0)
    start = create_model("resnet_20", in_channels=1)
    runs = {}
    for name, channels_last in (("contiguous", False), ("channels_last", True)):
        for images in (128, None):  # one step an epoch (the same step up to float rounding), and every image
            model = create_model("resnet_20", in_channels=1)
            model.load_state_dict(start.state_dict())
            runs[name, images] = (model, fit(model, limit(train, images), val, replace(config, channels_last=channels_last),
                                             str(tmp_path / f"{name}{images}"), device=CPU, progress=False))
    (_, a), (_, b) = runs["contiguous", 128], runs["channels_last", 128]
    assert b.history[0]["train_loss"] == pytest.approx(a.history[0]["train_loss"], rel=1e-6)
    assert b.history[1]["train_loss"] == pytest.approx(a.history[1]["train_loss"], rel=1e-4)
    assert a.history[0]["train_loss"] != a.history[1]["train_loss"]
    # ten steps an epoch: rounding differences grow with SGD's steps from a random start, so only roughly equal
    (_, a), (fast, b) = runs["contiguous", None], runs["channels_last", None]
    for x, y in zip(a.history, b.history):
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=0.1)
    assert all(p.is_contiguous() for p in fast.parameters())  # handed back contiguous
    assert load_checkpoint(tmp_path / "channels_lastNone" / "last.pt")["train_state"]["config"]["channels_last"] is True

    # stopped after the first epoch's checkpoint, then resumed: bit-identical to the straight run
    layouts, real_evaluate = [], classification.evaluate

    def evaluate_then_stop(model, *args, **kwargs):
        layouts.append(model.conv1.weight.is_contiguous(memory_format=torch.channels_last))
        if len(layouts) == 2:
            raise KeyboardInterrupt
        return real_evaluate(model, *args, **kwargs)

    interrupted = create_model("resnet_20", in_channels=1)
    interrupted.load_state_dict(start.state_dict())
    cl_config = replace(config, channels_last=True)
    monkeypatch.setattr(classification, "evaluate", evaluate_then_stop)
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, train, val, cl_config, str(tmp_path / "stopped"), device=CPU, progress=False)
    monkeypatch.setattr(classification, "evaluate", real_evaluate)
    assert layouts == [True, True]  # it trained channels-last
    with pytest.raises(NortonError, match="different settings"):  # a run resumes only in the layout it started in
        fit(create_model("resnet_20", in_channels=1), train, val, config, str(tmp_path / "stopped"), device=CPU,
            progress=False, resume=True)
    resumed = create_model("resnet_20", in_channels=1)
    fit(resumed, train, val, cl_config, str(tmp_path / "stopped"), device=CPU, progress=False, resume=True)
    for (key, x), y in zip(fast.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(x, y), key


def test_channels_last_training_names_a_view_that_needs_contiguous_activations(digits, tmp_path):
    class Flatten(nn.Module):
        def forward(self, x):
            return x.view(x.shape[0], -1)

    train, val, _ = digits
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), Flatten(), nn.Linear(4 * 8 * 8, 10))
    with pytest.raises(NortonError, match=r"reshapes a channels-last activation with \.view.*channels_last=False"):
        fit(model, train, val, TrainConfig(epochs=1, batch_size=64, warmup_epochs=0, channels_last=True),
            str(tmp_path), device=CPU, progress=False)
    with pytest.raises(NortonError, match="channels_last must be True, False or \"auto\""):
        TrainConfig(channels_last="yes").validate()


@pytest.mark.parametrize("slow", ["contiguous", "channels_last"])
def test_auto_layout_trains_in_the_layout_its_first_steps_timed_faster_and_resumes_in_it(digits, tmp_path,
                                                                                        monkeypatch, slow):
    from norton.training import classification

    slow_format = torch.contiguous_format if slow == "contiguous" else torch.channels_last
    real_synchronize = classification.LayoutTrial._synchronize

    def synchronize(self):  # the slow layout's steps take 0.2 s longer
        real_synchronize(self)
        if self.phase == slow_format and self.chosen is None:
            time.sleep(0.2)

    monkeypatch.setattr(classification.LayoutTrial, "_synchronize", synchronize)
    layouts, real_evaluate = [], classification.evaluate

    def evaluate_then_stop(model, *args, **kwargs):
        weight = model.layer1[0].conv1.weight
        layouts.append(weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous())
        if len(layouts) == 2:
            raise KeyboardInterrupt
        return real_evaluate(model, *args, **kwargs)

    train, val, _ = digits  # 1,237 training images: 10 steps of 128, the trial takes 6
    config = TrainConfig(epochs=3, batch_size=128, lr=0.05, warmup_epochs=0, channels_last="auto")
    model = create_model("resnet_20", in_channels=1)
    monkeypatch.setattr(classification, "evaluate", evaluate_then_stop)
    with pytest.raises(KeyboardInterrupt):
        fit(model, train, val, config, str(tmp_path), device=CPU, progress=False)
    faster = slow == "contiguous"  # channels-last is the faster one
    assert layouts == [faster, faster]
    assert load_checkpoint(tmp_path / "last.pt")["train_state"]["channels_last"] is faster

    def no_trial(*args, **kwargs):
        raise AssertionError("a resumed run timed the layouts again")

    layouts.clear()
    monkeypatch.setattr(classification, "evaluate", lambda model, *a, **k: (evaluate_then_stop(model, *a, **k)
                                                                            if len(layouts) < 1 else
                                                                            real_evaluate(model, *a, **k)))
    monkeypatch.setattr(classification, "LayoutTrial", no_trial)
    resumed = create_model("resnet_20", in_channels=1)
    fit(resumed, train, val, config, str(tmp_path), device=CPU, progress=False, resume=True)
    assert layouts == [faster]  # epoch 3 trained in the layout chosen in epoch 1
    assert all(p.is_contiguous() for p in resumed.parameters())  # handed back in the standard layout


def test_auto_layout_trains_a_model_that_cannot_run_channels_last_and_a_short_epoch_decides_on_what_it_timed(
        digits, tmp_path):
    class Flatten(nn.Module):
        def forward(self, x):
            return x.view(x.shape[0], -1)

    train, val, _ = digits
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), Flatten(), nn.Linear(4 * 16 * 16, 10))
    result = fit(model, train, val, TrainConfig(epochs=2, batch_size=128, warmup_epochs=0, channels_last="auto"),
                 str(tmp_path / "view"), device=CPU, progress=False)
    assert len(result.history) == 2
    assert load_checkpoint(tmp_path / "view" / "last.pt")["train_state"]["channels_last"] is False
    # two steps an epoch, both in the standard layout's part of the trial: the standard layout, decided at its end
    short = create_model("resnet_20", in_channels=1)
    fit(short, limit(train, 256), val, TrainConfig(epochs=1, batch_size=128, warmup_epochs=0, channels_last="auto"),
        str(tmp_path / "short"), device=CPU, progress=False)
    assert load_checkpoint(tmp_path / "short" / "last.pt")["train_state"]["channels_last"] is False


def test_the_cli_trains_channels_last_on_request(tmp_path):
    from norton.cli import main

    run = str(tmp_path / "run")
    assert main(["train", "--arch", "resnet_20", "--data", "digits", "--subset", "256", "--epochs", "1",
                 "--batch-size", "128", "--warmup-epochs", "0", "--channels-last", "--run-dir", run, "--device", "cpu"]) == 0
    assert load_checkpoint(os.path.join(run, "last.pt"))["train_state"]["config"]["channels_last"] is True
    auto = str(tmp_path / "auto")
    assert main(["train", "--arch", "resnet_20", "--data", "digits", "--subset", "256", "--epochs", "1",
                 "--batch-size", "128", "--warmup-epochs", "0", "--channels-last", "auto", "--run-dir", auto,
                 "--device", "cpu"]) == 0
    state = load_checkpoint(os.path.join(auto, "last.pt"))["train_state"]
    assert state["config"]["channels_last"] == "auto" and state["channels_last"] in (True, False)


def test_evaluation_is_one_function_whatever_plan_the_blocks_were_set_to(digits):
    """A run's recorded accuracy is what `norton evaluate` of the checkpoint gives:
    the blocks' training or timed plans do not enter evaluation, which runs the
    plan a freshly loaded block runs."""
    from norton.core import CPDBlock

    _, _, test = digits
    torch.manual_seed(0)
    model = create_model("resnet_20", rank=2, num_classes=10, in_channels=1)
    blocks = [m for m in model.modules() if isinstance(m, CPDBlock)]
    seen = []
    for b in blocks:
        b.register_forward_pre_hook(lambda module, args: seen.append(module.plan))
    fresh = evaluate(model, test, device=CPU)
    for plan in ("separable", "depthwise", "dense"):
        for b in blocks:
            b.set_plan(plan)
        seen.clear()
        assert evaluate(model, test, device=CPU) == fresh
        assert seen and set(seen) == {"auto"}  # evaluated in the loaded checkpoint's plan
        assert all(b.plan == plan for b in blocks)  # and the plans set stay set


def test_resolve_device_names_a_gpu_that_is_not_there():
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        with pytest.raises(NortonError, match=f"this machine has {count} GPU"):
            resolve_device(f"cuda:{count}")
    else:
        with pytest.raises(NortonError, match="CUDA is not available"):
            resolve_device("cuda:7")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on a GPU machine)")
def test_cuda_evaluation_is_reproducible_and_training_plans_are_tuned_on_the_device(digits, tmp_path):
    from norton.core import CPDBlock

    train, val, test = digits
    torch.manual_seed(0)
    model = create_model("resnet_20", rank=2, num_classes=10, in_channels=1)
    cuda = torch.device("cuda")
    fit(model, train, val, TrainConfig(epochs=1, batch_size=64), str(tmp_path / "run"), device=cuda, progress=False)
    assert all(m.plan != "auto" for m in model.modules() if isinstance(m, CPDBlock))  # timed on the GPU
    torch.backends.cudnn.benchmark = True  # whatever a user left switched on
    try:
        first = evaluate(model, test, device=cuda)
        loaded, _ = load_model(tmp_path / "run" / "last.pt")
        assert evaluate(loaded.to(cuda), test, device=cuda) == first
    finally:
        torch.backends.cudnn.benchmark = False


@pytest.mark.parametrize("curve,patience,stops", [
    ([50, 60, 70, 69, 68], 2, True),  # two epochs without a new best
    ([50, 60, 70, 69, 71], 2, False),  # the last one improved
    ([50, 60, 70, 70, 70], 2, True),  # equal is not better
    ([50, 60, 70, 69], 3, False),  # not enough epochs since the best yet
    ([50, 40, 30], 0, False),  # patience 0: never
])
def test_the_early_stopping_rule(curve, patience, stops):
    from norton.training import stops_early

    assert stops_early(curve, patience) is stops


@pytest.mark.parametrize("curve,settled", [
    ([80.0, 84.9, 85.0, 85.1], True), ([84.9, 85.0, 85.2], False), ([85.0, 85.1], False), ([85.0] * 3, True)])
def test_convergence_is_the_last_three_within_two_tenths(curve, settled):
    from norton.training import converged

    assert converged(curve) is settled


def test_fit_stops_early_and_a_resume_keeps_it_stopped(digits, tmp_path, monkeypatch):
    import norton.training.classification as classification

    train, val, _ = digits
    scripted = iter([60.0, 70.0, 65.0, 66.0, 90.0, 91.0])  # a validation curve that stalls after epoch 2
    real = classification.evaluate

    def fake_evaluate(model, data, **kwargs):
        result = real(model, data, **kwargs)
        return {**result, "top1": next(scripted)}

    monkeypatch.setattr(classification, "evaluate", fake_evaluate)
    torch.manual_seed(0)
    model = create_model("resnet_20", num_classes=10, in_channels=1)
    config = TrainConfig(epochs=6, batch_size=128, patience=2)
    result = fit(model, train, val, config, str(tmp_path / "run"), device=CPU, progress=False)
    assert result.epochs == 4 and result.stopped_early and result.best_epoch == 2 and not result.converged
    again = fit(model, train, val, config, str(tmp_path / "run"), device=CPU, progress=False, resume=True)
    assert again.epochs == 4 and again.stopped_early  # a stopped run stays stopped
    with pytest.raises(NortonError, match="patience must be an integer >= 0"):
        TrainConfig(patience=-1).validate()


def test_precise_bn_validates_with_statistics_of_the_epochs_final_weights(digits, tmp_path):
    from norton.training import recalibrate_bn

    train, val, _ = digits
    torch.manual_seed(0)
    model = create_model("resnet_20", num_classes=10, in_channels=1)
    config = TrainConfig(epochs=1, batch_size=128, lr=0.1, warmup_epochs=0, precise_bn=256)
    result = fit(model, train, val, config, str(tmp_path / "run"), device=CPU, progress=False)
    again = copy.deepcopy(model)
    for m in again.modules():  # forget the statistics, then re-estimate them from the same images
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
    recalibrate_bn(again, train.without_augmentation(), device=CPU, num_images=256, seed=0)
    bns = [(a, b) for a, b in zip(model.modules(), again.modules()) if isinstance(a, torch.nn.BatchNorm2d)]
    assert bns and all(torch.allclose(a.running_var, b.running_var) and torch.allclose(a.running_mean, b.running_mean)
                       for a, b in bns)
    # the recorded validation top-1 is the model's with those statistics
    assert result.history[-1]["val_top1"] == pytest.approx(evaluate(model, val, device=CPU)["top1"])
    torch.manual_seed(0)
    plain = create_model("resnet_20", num_classes=10, in_channels=1)
    fit(plain, train, val, replace(config, precise_bn=0), str(tmp_path / "plain"), device=CPU, progress=False)
    assert not torch.allclose(next(m for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_var,
                              bns[0][0].running_var)  # without it: the running averages of training
    for bad in (-1, True, 2.5):
        with pytest.raises(NortonError, match="precise_bn must be an integer >= 0"):
            TrainConfig(precise_bn=bad).validate()
