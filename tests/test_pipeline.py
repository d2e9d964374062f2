import json

import pytest
from conftest import write_fashion_mnist

from norton.checkpoints import load_checkpoint, load_model
from norton import complexity, create_model
from norton.cli import main
from norton.evidence import DemoBudget, run_demo
from norton.training import TrainConfig


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    run = tmp_path_factory.mktemp("base")
    assert main(["train", "--arch", "resnet_20", "--data", "digits", "--epochs", "3", "--batch-size", "64",
                 "--lr", "0.1", "--warmup-epochs", "1", "--run-dir", str(run), "--device", "cpu"]) == 0
    return run / "model.pt"


def test_train_writes_a_self_describing_model(baseline):
    ckpt = load_checkpoint(baseline)
    assert ckpt["architecture"]["base"]["arch"] == "resnet_20" and ckpt["architecture"]["base"]["in_channels"] == 1
    assert ckpt["metrics"]["test"]["top1"] > 70
    from norton import complexity, create_model
    expected = complexity(create_model("resnet_20", in_channels=1), [1, 16, 16])
    assert (ckpt["metrics"]["macs"], ckpt["metrics"]["params"]) == (expected.macs, expected.params)


def test_compress_end_to_end(baseline, tmp_path, capsys):
    run = tmp_path / "c"
    args = ["compress", "--ckpt", str(baseline), "-r", "3", "--amount", "0.5", "--criterion", "pabs", "--data", "digits",
            "--epochs", "2", "--batch-size", "64", "--lr", "0.02", "--warmup-epochs", "0", "--run-dir", str(run), "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| decomposed |" in out and "| final |" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["macs"] < 0.5 * summary["baseline"]["macs"]
    assert summary["final"]["top1"] > 60
    # BN recalibration is reported next to the raw accuracy after each stage
    assert summary["decomposed"]["recalibrated"]["top1"] >= 0 and summary["pruned"]["recalibrated"] is not None
    for stage in ("decomposed", "pruned", "final"):
        model, _ = load_model(run / f"{stage}.pt")
    # a finished run is refused; --resume loads every stage instead of redoing it
    assert main(args) == 2
    assert "already holds a compress run" in capsys.readouterr().err
    before = (run / "final.pt").read_bytes()
    assert main(args + ["--resume"]) == 0
    assert (run / "final.pt").read_bytes() == before

    assert main(["evaluate", "--ckpt", str(run / "final.pt"), "--data", "digits", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["top1"] == pytest.approx(summary["final"]["top1"])


def test_compress_distils_from_the_uncompressed_model(baseline, tmp_path):
    run = tmp_path / "kd"
    assert main(["compress", "--ckpt", str(baseline), "-r", "3", "--amount", "0.5", "--criterion", "l2", "--data", "digits",
                 "--epochs", "1", "--batch-size", "64", "--lr", "0.02", "--warmup-epochs", "0", "--distill", "0.5",
                 "--temperature", "3", "--run-dir", str(run), "--device", "cpu"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["finetune"]["distill"] == 0.5 and summary["config"]["finetune"]["temperature"] == 3.0
    assert summary["final"]["top1"] > 50
    # finetune takes the teacher from a checkpoint; without one --distill is refused
    ft = ["finetune", "--ckpt", str(run / "pruned.pt"), "--data", "digits", "--epochs", "1", "--batch-size", "64",
          "--warmup-epochs", "0", "--distill", "0.5", "--device", "cpu"]
    assert main(ft + ["--run-dir", str(tmp_path / "ft0")]) == 2
    assert main(ft + ["--teacher", str(baseline), "--run-dir", str(tmp_path / "ft1")]) == 0


@pytest.mark.parametrize("args,match", [
    (["evaluate", "--ckpt", "x.pt", "--data", "mnist"], "does not exist"),
    (["train", "--arch", "resnet_20", "--data", "mnist", "--run-dir", "r"], "unknown dataset 'mnist'"),
    (["train", "--arch", "resnet_20", "--data", "cifar10", "--data-dir", "/nonexistent", "--run-dir", "r"], "no CIFAR-10 data in '/nonexistent'"),
])
def test_bad_input(args, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


def test_demo_runs_through_the_same_code_on_tiny_data(tmp_path):
    data = write_fashion_mnist(tmp_path / "fm", n_train=120, n_test=40)
    tiny = DemoBudget(train_images=None, val_images=20,
                      baseline=TrainConfig(epochs=2, batch_size=32, lr=0.05, warmup_epochs=0),
                      finetune=TrainConfig(epochs=1, batch_size=32, lr=0.01, warmup_epochs=0),
                      levels=(("NORTON rank 2, prune 50%", 2, 0.5),))
    table = run_demo(str(tmp_path / "demo"), data_dir=str(data), budget=tiny)
    assert "| baseline ResNet-20 |" in table and "NORTON rank 2, prune 50%" in table
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    level = results["levels"]["NORTON rank 2, prune 50%"]
    assert level["final"]["macs"] < level["baseline"]["macs"]
    assert f"{level['final']['top1']:.2f} %" in table  # the table holds the measured numbers
    assert (tmp_path / "demo" / "accuracy_vs_macs.png").stat().st_size > 10_000
    # results.md is rendered from results.json alone (the docs render their copy the same way), latency deployed
    from norton.evidence.demo import demo_markdown

    assert (tmp_path / "demo" / "results.md").read_text() == demo_markdown(results)
    assert results["latency"] == "deployed" and set(results["latency_ms"]) == {"baseline", "NORTON rank 2, prune 50%"}
    assert f"{results['latency_ms']['baseline']:.1f} ms" in table


def test_demo_runs_on_an_image_folder_with_its_classes_and_channels(tmp_path, capsys):
    from test_folders import make_folder

    root = make_folder(tmp_path / "photos", rgb=True, split_layout=False, corrupt=False,
                       counts={"cat": 50, "dog": 40, "bird": 40})
    tiny = DemoBudget(train_images=None, val_images=12,
                      baseline=TrainConfig(epochs=1, batch_size=32, lr=0.05, warmup_epochs=0),
                      finetune=TrainConfig(epochs=1, batch_size=32, lr=0.01, warmup_epochs=0),
                      levels=(("NORTON rank 2, prune 50%", 2, 0.5),))
    table = run_demo(str(tmp_path / "demo"), budget=tiny, data="folder", data_dir=str(root),
                     folder_options={"input_size": 16, "on_bad_image": "error", "augment": True})
    assert f"image folder {root}: " in capsys.readouterr().out
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["data"] == f"image folder {root}" and "| baseline ResNet-20 |" in table
    level = results["levels"]["NORTON rank 2, prune 50%"]
    assert level["baseline"]["macs"] == complexity(create_model("resnet_20", num_classes=3), [3, 16, 16]).macs
    assert main(["demo", "--data", "folder", "--data-dir", str(tmp_path / "missing"),
                 "--out-dir", str(tmp_path / "d2")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "d2").exists()


def test_prune_prints_accuracy_when_given_data(baseline, tmp_path, capsys):
    decomposed = tmp_path / "d.pt"
    assert main(["decompose", "--ckpt", str(baseline), "-r", "2", "--n-iter-max", "30", "--out", str(decomposed)]) == 0
    assert main(["prune", "--ckpt", str(decomposed), "--amount", "0.3", "--data", "digits", "--out", str(tmp_path / "p.pt")]) == 0
    out = capsys.readouterr().out
    assert "test top-1 before pruning" in out and "right after pruning (no fine-tuning)" in out


def test_compress_recovers_the_pruned_layers_from_calibration_images(baseline, tmp_path):
    common = ["compress", "--ckpt", str(baseline), "-r", "3", "--amount", "0.6", "--criterion", "l2", "--data", "digits",
              "--epochs", "1", "--batch-size", "64", "--lr", "0.02", "--warmup-epochs", "0", "--device", "cpu",
              "--calibration-images", "256"]
    summaries = {}
    for flag in ("--recover", "--no-recover"):
        run = tmp_path / flag
        assert main(common + [flag, "--run-dir", str(run)]) == 0
        summaries[flag] = json.loads((run / "summary.json").read_text())
    recovery = summaries["--recover"]["pruned"]["recovery"]
    assert recovery["layers"] == 19 and "recovery" not in summaries["--no-recover"]["pruned"]
    assert all(recovery["error_after"][k] < before for k, before in recovery["error_before"].items())
    top1 = {flag: s["pruned"]["recalibrated"]["top1"] for flag, s in summaries.items()}
    assert top1["--recover"] > top1["--no-recover"] + 5, top1


def test_compress_prunes_in_steps_toward_the_one_shot_widths(baseline, tmp_path, capsys):
    run = tmp_path / "iter"
    args = ["compress", "--ckpt", str(baseline), "-r", "3", "--amount", "0.6", "--criterion", "l2", "--data", "digits",
            "--epochs", "3", "--batch-size", "64", "--lr", "0.02", "--warmup-epochs", "0", "--device", "cpu",
            "--iterative-steps", "2", "--run-dir", str(run)]
    assert main(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    plan, step = summary["steps"]
    final, totals = plan["final_keep"], plan["totals"]
    assert any(final[r] < totals[r] for r in final)
    for root in final:  # halfway, then exactly the widths one-shot pruning gives
        assert step["keep"][root] == totals[root] - round((totals[root] - final[root]) / 2)
        assert summary["pruned"]["kept"][root] == [final[root], step["keep"][root]]
    assert step["epochs"] == 1 and step["top1"] > 30 and summary["final"]["top1"] > 60
    assert len(json.loads((run / "finetune" / "metrics.jsonl").read_text().splitlines()[-1])) and \
        len((run / "finetune" / "metrics.jsonl").read_text().splitlines()) == 2  # the last step's 2 epochs
    # interrupted after step 1: a resumed run starts from step1.pt, not from scratch
    for name in ("pruned.pt", "final.pt"):
        (run / name).unlink()
    step_ckpt = (run / "finetune_step1" / "last.pt").stat().st_mtime_ns
    assert main(args + ["--resume"]) == 0
    assert (run / "finetune_step1" / "last.pt").stat().st_mtime_ns == step_ckpt
    assert json.loads((run / "summary.json").read_text())["pruned"]["kept"] == summary["pruned"]["kept"]
    capsys.readouterr()
    assert main(args[:-4] + ["--iterative-steps", "4", "--run-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "iterative_steps 4 needs at least 4 fine-tuning epochs" in err and len(err.strip().splitlines()) == 1
