import json
import subprocess
import sys

import pytest
import torch

from norton import CPDBlock, create_model, load_model
from norton.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "norton.cli", *args], capture_output=True, text=True)


def test_complexity_human(capsys):
    assert main(["complexity", "--arch", "vgg_16_bn", "-r", "1", "-cpr", "[0.6]*6+[0.8]*7"]) == 0
    out = capsys.readouterr().out
    assert "MACs:   4.24M (98.65% ↓)" in out
    assert "Params: 150.67K" in out and "baseline 313.46M" in out


def test_complexity_json(capsys):
    assert main(["complexity", "--arch", "resnet_50", "-r", "1", "-cpr", "[0.]+[0.1]*2+[0.4]*5+[0.75]*12", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["macs"] == 899619808 and record["params"] == 5885736
    assert record["baseline_macs"] == 4089184256 and record["baseline_params"] == 25557032


def test_complexity_input_size(capsys):
    assert main(["complexity", "--arch", "resnet_56", "--input-size", "64", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["macs"] == 4 * 125485696 - 3 * 640  # convs scale with pixels, the fc does not
    assert record["input_size"] == [64]


def test_short_rate_list_warns_in_one_line(capsys):
    assert main(["complexity", "--arch", "vgg_16_bn", "-r", "8", "-cpr", "[0.21]*7+[0.75]*5"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["norton: warning: compress rate for vgg_16_bn has 12 of 13 entries; the last 1 are taken as 0 (unpruned)"]


@pytest.mark.parametrize("args,match", [
    (["complexity", "--arch", "vgg_17"], "unknown architecture 'vgg_17'; available:"),
    (["complexity", "--arch", "vgg_16_bn", "-r", "-1"], "rank must be an integer >= 0, got '-1'"),
    (["complexity", "--arch", "vgg_16_bn", "-r", "1.5"], "rank must be an integer >= 0, got '1.5'"),
    (["complexity", "--arch", "vgg_16_bn", "-cpr", "[0.1]*2.5"], "repeat count '2.5' is not a whole number"),
    (["complexity", "--arch", "vgg_16_bn", "-cpr", "[0.1]*14"], "has 14 entries but vgg_16_bn takes 13"),
    (["complexity", "--arch", "vgg_16_bn", "-cpr", "[1.5]"], "every rate must be in [0, 1)"),
    (["complexity", "--arch", "vgg_16_bn", "--input-size", "0"], "input size must be"),
    (["decompose-report", "--arch", "resnet_20"], "the following arguments are required: -r/--rank"),
    (["decompose-report", "--arch", "resnet_20", "-r", "0"], "rank must be >= 1 to decompose"),
    (["decompose-report", "--arch", "resnet_20", "-r", "2", "--ckpt", "/nonexistent.pt"], "does not exist"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_input_exits_2_with_one_line(args, match, capsys):
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert match in lines[0]


def test_bad_input_through_the_real_entry_point():
    result = run("complexity", "--arch", "vgg_16_bn", "-cpr", "[0.1]*999999999")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "norton complexity: error: compress rate '[0.1]*999999999': it has 999999999 entries, more than the "
        "limit of 10000; expected a form like \"[0.]+[0.1]*2+[0.4]*5\" or \"0.1,0.2\""
    ]


def test_decompose_report_from_checkpoint(tmp_path, capsys):
    model = create_model("resnet_20")
    path = tmp_path / "baseline.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    assert main(["decompose-report", "--arch", "resnet_20", "-r", "3", "--ckpt", str(path), "--n-iter-max", "20", "--device", "cpu", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["layers"]) == 19
    assert all(layer["rank"] == 3 and 0 < layer["nmse"] < 1 for layer in record["layers"])


def test_decompose_report_rejects_other_architecture(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(create_model("resnet_20").state_dict(), path)
    result = run("decompose-report", "--arch", "resnet_56", "-r", "2", "--ckpt", str(path))
    assert result.returncode == 2
    assert "missing key 'layer1.3.conv1.weight'" in result.stderr


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint at all")
    result = run("decompose-report", "--arch", "resnet_20", "-r", "2", "--ckpt", str(path))
    assert result.returncode == 2 and "cannot be read safely" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_models_lists_the_zoo(capsys):
    assert main(["models"]) == 0
    assert capsys.readouterr().out.split() == ["densenet_40", "fasterrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "resnet_110", "resnet_20", "resnet_50", "resnet_56", "vgg_16_bn", "vgg_19_bn"]


@pytest.mark.parametrize("command", ["models", "complexity", "decompose-report", "decompose", "prune", "train", "finetune",
                                     "evaluate", "compress", "benchmark", "export", "demo"])
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "examples:" in capsys.readouterr().out


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "norton.cli", "complexity", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "examples:" in result.stdout


def test_decompose_then_prune_files(tmp_path, capsys):
    dense = tmp_path / "dense.pt"
    torch.save(create_model("resnet_20").state_dict(), dense)
    dense_bytes = dense.read_bytes()
    decomposed, pruned = tmp_path / "dec.pt", tmp_path / "pruned.pt"
    assert main(["decompose", "--arch", "resnet_20", "--ckpt", str(dense), "-r", "2", "--n-iter-max", "20",
                 "--device", "cpu", "--out", str(decomposed)]) == 0
    assert main(["prune", "--ckpt", str(decomposed), "-cpr", "[0.]+[0.25]*11", "--criterion", "pabs", "--device", "cpu",
                 "--out", str(pruned)]) == 0
    out = capsys.readouterr().out
    assert "12/16" in out and "MACs" in out
    assert dense.read_bytes() == dense_bytes  # the input is never modified
    from norton import complexity
    from norton.checkpoints import load_model

    model, ckpt = load_model(pruned)
    assert complexity(model) == complexity(create_model("resnet_20", rank=2, compress_rate="[0.]+[0.25]*11"))
    assert ckpt["extra"]["criterion"] == "pabs"


DEVICE_ERRORS = [("tpu", "unknown device 'tpu'"), ("meta", "device 'meta' is not supported")]
if not torch.cuda.is_available():
    DEVICE_ERRORS.append(("cuda", "CUDA is not available here"))


@pytest.mark.parametrize("command", [["decompose", "-r", "2"], ["prune", "-r", "1", "--amount", "0.5"],
                                     ["decompose-report", "-r", "2"]])
@pytest.mark.parametrize("device,match", DEVICE_ERRORS)
def test_decompose_and_prune_refuse_a_device_they_cannot_use(tmp_path, capsys, command, device, match):
    out = tmp_path / "o.pt"
    outputs = [] if command[0] == "decompose-report" else ["--out", str(out)]
    assert main([command[0], "--arch", "resnet_20", *command[1:], "--device", device, *outputs]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and not out.exists()


@pytest.mark.parametrize("extra,match", [
    (["--criterion", "hrank", "--amount", "0.5"], "unknown criterion 'hrank'"),
    (["--layer-rate", "nope"], "--layer-rate takes NAME=VALUE"),
    (["--amount", "1.2"], "must be a number in [0, 1)"),
    (["-cpr", "[0.1]*3+[0.2]"], "has 4 of 12 entries"),
    (["--amount", "0.5", "--global"], "a global ranking needs one score per filter, but criterion 'pabs'"),
    (["-cpr", "[0.]+[0.2]*11", "--global", "--criterion", "l2"], "global_ranking decides the widths itself"),
])
def test_prune_bad_input(tmp_path, extra, match, capsys):
    try:
        code = main(["prune", "--arch", "resnet_20", "-r", "1", "--out", str(tmp_path / "o.pt"), *extra])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    if match.startswith("has 4 of"):  # a short list is padded with a warning, then pruning succeeds
        assert code == 0 and match in err
    else:
        assert code == 2 and match in err


def test_prune_with_one_ranking_across_layers(tmp_path, capsys):
    out = tmp_path / "g.pt"
    assert main(["prune", "--arch", "resnet_20", "-r", "1", "--amount", "0.4", "--criterion", "l2", "--global",
                 "--out", str(out)]) == 0
    widths = {m.out_channels for m in load_model(str(out))[0].modules() if isinstance(m, CPDBlock)}
    assert len(widths) > 3  # not one rate for every layer (that gives one width per stage: 9, 19, 38)


def test_prune_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "o.pt"
    out.write_bytes(b"precious")
    assert main(["prune", "--arch", "resnet_20", "-r", "1", "--amount", "0.5", "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"


def test_prune_rejects_checkpoint_of_another_architecture(tmp_path, capsys):
    from norton.checkpoints import save_checkpoint

    path = tmp_path / "r20.pt"
    save_checkpoint(path, create_model("resnet_20", rank=1))
    assert main(["prune", "--arch", "vgg_16_bn", "--ckpt", str(path), "--amount", "0.5", "--out", str(tmp_path / "o.pt")]) == 2
    assert "holds a resnet_20, not a vgg_16_bn" in capsys.readouterr().err


def test_the_command_line_is_kept_for_the_records(monkeypatch):
    from norton import cli

    seen = {}
    monkeypatch.setattr(cli.evidence, "run_compare", lambda *a, **kw: seen.update(kw))
    assert cli.main(["compare", "--budget", "small", "--out", "runs/x y"]) == 0
    assert seen["command"] == "norton compare --budget small --out 'runs/x y'"
