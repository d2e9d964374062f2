"""Every command block of the README and the guides, executed as written.

A block is ```python (run in a fresh interpreter by tests/test_readme.py), ```shell (every line run: ``norton ...`` in this
process, ``make TARGET`` checked with ``make -n``, a ``.venv/bin/python``
script or ``torchrun`` as a subprocess) or ```text (output, layouts and
diagrams: never a command).  The blocks of a page run in order in one sandbox —
a temporary directory that is both the working directory and ``$HOME``, holding
small generated datasets in their standard formats: ``images/`` and
``~/images`` (class folders, RGB), ``~/scans`` (grayscale, one corrupt file),
``~/data/cifar-10-batches-py``, ``~/coco`` (COCO json and images),
``checkpoints/`` (a stand-in for a published research checkpoint).  A block
after ``<!-- long -->`` runs only with ``-m benchmark`` (``make docs-check``);
a line that needs CUDA is skipped with that reason where none is present.
The tutorial has its own test (tests/test_tutorial.py) and is left out here."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_cifar10, write_coco
from test_folders import make_folder
from test_research import research_state_dict

from norton.cli import main

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", "docs/index.md", "docs/design.md",
         *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "guides").glob("*.md") if p.name != "tutorial.md")]
FENCE = re.compile(r"(<!-- long -->\n)?```(\w*)\n(.*?)```", re.S)
COMMAND = re.compile(r"^\s*(\$ |norton |make |torchrun |python|\.venv/)", re.M)
LANGUAGES = ("python", "shell", "text")


def blocks(page: str) -> list[tuple[str, str, bool]]:
    """(language, code, long) of every fenced block of ``page``."""
    return [(lang, code, bool(long)) for long, lang, code in FENCE.findall((ROOT / page).read_text())]


@pytest.mark.parametrize("page", PAGES)
def test_every_block_is_python_shell_or_text_and_text_holds_no_command(page):
    for lang, code, _ in blocks(page):
        assert lang in LANGUAGES, f"{page}: a code block tagged {lang!r}, not one of {LANGUAGES}:\n{code[:200]}"
        if lang == "text":
            assert not COMMAND.search(code), f"{page}: a command in a text block (make it a shell block):\n{code[:300]}"


def shell_lines(code: str) -> list[str]:
    joined = code.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def needs_cuda(argv: list[str]) -> bool:
    return any(a.startswith("cuda") for a in argv) or "--cuda-graph" in argv


def run_shell(line: str, skipped: list[str]) -> None:
    argv = [os.path.expanduser(a) for a in shlex.split(line, comments=True)]
    if needs_cuda(argv) and not torch.cuda.is_available():
        skipped.append(line)
        return
    if argv[0] == "norton":
        assert main(argv[1:]) == 0, line
    elif argv[0] == "make":
        done = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, f"{line}: {done.stderr}"
    elif argv[0] in (".venv/bin/python", "torchrun"):
        program = [sys.executable] if argv[0] == ".venv/bin/python" else [sys.executable, "-m", "torch.distributed.run"]
        done = subprocess.run([*program, *argv[1:]], cwd=ROOT if argv[0] == ".venv/bin/python" else None,
                              capture_output=True, text=True, timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, f"{line}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    else:
        pytest.fail(f"a shell line this test cannot run: {line}")


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    counts = {"cat": 30, "dog": 24, "bird": 20}
    make_folder(tmp_path / "images", rgb=True, split_layout=False, corrupt=False, counts=counts)
    # the own-data guide compares methods on it: a comparison needs at least 100 training images after the split
    make_folder(tmp_path / "scans", rgb=False, split_layout=False, corrupt=True,
                counts={name: 2 * n for name, n in counts.items()})
    (tmp_path / "data").mkdir()
    write_cifar10(tmp_path / "data", per_batch=40)
    (tmp_path / "checkpoints").mkdir()  # a stand-in for a published checkpoint: its keys and shapes
    torch.save({"state_dict": research_state_dict("resnet_56", 1, "[0.]+[0.18]*29"), "rank": 1},
               tmp_path / "checkpoints" / "resnet_56_[0.]+[0.18]*29_1_93.1.pt")
    coco = tmp_path / "coco"  # the COCO-2017 layout
    (coco / "annotations").mkdir(parents=True)
    for split, seed in (("train2017", 0), ("val2017", 1)):
        images, ann = write_coco(tmp_path / f"coco_{split}", "segm", n_images=4, seed=seed)
        os.rename(images, coco / split)
        os.rename(ann, coco / "annotations" / f"instances_{split}.json")
    return tmp_path


def run_page(page: str, *, long: bool) -> list[str]:
    skipped: list[str] = []
    for lang, code, is_long in blocks(page):
        if is_long and not long:
            break  # later blocks may need what the long one makes
        if lang == "shell":
            for line in shell_lines(code):
                run_shell(line, skipped)
    return skipped


@pytest.mark.parametrize("page", PAGES)
def test_the_blocks_run_as_written(page, sandbox):
    skipped = run_page(page, long=False)
    if skipped:
        pytest.skip(f"every other block ran; these lines need CUDA: {skipped}")


@pytest.mark.benchmark
@pytest.mark.parametrize("page", [p for p in PAGES if any(long for *_, long in blocks(p))])
def test_the_long_blocks_run_as_written(page, sandbox):
    skipped = run_page(page, long=True)
    if skipped:
        pytest.skip(f"every other block ran; these lines need CUDA: {skipped}")
