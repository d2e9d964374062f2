"""The tutorial's commands, run as written on a generated folder of class folders (the comparison, minutes of
CPU, by `make docs-check`)."""
import os
import re
import shlex
from pathlib import Path

import pytest
import torch
from test_folders import make_folder

from norton.checkpoints import load_checkpoint
from norton.cli import main

TUTORIAL = Path(__file__).resolve().parent.parent / "docs" / "guides" / "tutorial.md"


def commands() -> list[str]:
    blocks = re.findall(r"```shell\n(.*?)```", TUTORIAL.read_text(), re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def run_tutorial(root: Path, monkeypatch, capsys, *, compare: bool) -> dict[str, str]:
    lines = commands()
    assert [line.split()[1] for line in lines] == ["train", "evaluate", "plan", "compress", "deploy", "benchmark",
                                                   "export", "predict", "compare"]
    make_folder(root / "images", rgb=True, split_layout=False, counts={"cat": 70, "dog": 50, "bird": 40})
    monkeypatch.chdir(root)
    printed = {}
    for line in lines if compare else lines[:-1]:
        argv = shlex.split(line)
        assert argv[0] == "norton"
        assert main(argv[1:]) == 0, line
        printed[argv[1]] = capsys.readouterr().out
    return printed


def test_the_tutorial_commands_run_as_written(tmp_path, monkeypatch, capsys):
    printed = run_tutorial(tmp_path, monkeypatch, capsys, compare=False)
    source = load_checkpoint("runs/base/model.pt")["extra"]["data_source"]
    assert source["classes"] == ["bird", "cat", "dog"] and source["image_size"] == 32
    assert "MACs" in printed["compress"] and "1.00×" in printed["benchmark"]
    assert [line.split(":")[0] for line in printed["predict"].splitlines()] == ["images/cat/1.png", "images/dog/2.jpg"]
    assert os.path.getsize("runs/small/model.onnx") > 0 and os.path.exists("runs/small/deployed.pt")
    assert torch.load("runs/small/final.pt", weights_only=True)["format"]  # a norton checkpoint, loaded safely


@pytest.mark.benchmark
def test_the_tutorial_comparison_runs_as_written(tmp_path, monkeypatch, capsys):
    run_tutorial(tmp_path, monkeypatch, capsys, compare=True)
    table = Path("runs/compare/results.md").read_text()
    assert "image folder" in table and "baseline given (runs/base/model.pt)" in table
    assert re.search(r"NORTON \(pabs\) \*\*(wins|loses|ties)\*\*", table)
