"""tune_allocator: glibc keeps freed training buffers for reuse instead of fresh pages every step."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import norton.cli
import norton.core.allocator as allocator
import norton.training.engine
from norton import NortonError, tune_allocator
from norton.cli import main
from norton.training import TrainingRun

GLIBC = allocator.glibc() is not None
needs_glibc = pytest.mark.skipif(not GLIBC, reason="the allocator settings are glibc's")

# In a fresh process, after tune_allocator: allocates and frees a 48 MiB buffer (above glibc's
# largest dynamic mmap threshold, 32 MiB) six times, as a training step does its activations, and
# reports what malloc did with the first and how many fresh pages the last three touched.
PROBE = r"""
import ctypes, json, resource, torch
from norton import tune_allocator
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
applied = tune_allocator()
size = 48 << 20
before = libc.mallinfo2()
buffer = torch.ones(size, dtype=torch.uint8)
during = libc.mallinfo2()
del buffer
after = libc.mallinfo2()
faults = []
for _ in range(5):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = torch.ones(size, dtype=torch.uint8)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
    del buffer
print(json.dumps({"applied": applied, "pages": size // 4096,
                  "mmapped": during.hblkhd - before.hblkhd, "kept_free": after.fordblks - before.fordblks,
                  "late_faults": sum(faults[-3:])}))
"""


def probe(choice: str) -> dict:
    env = {**os.environ, allocator.ENV: choice}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_glibc
def test_tuned_allocator_serves_and_keeps_large_buffers_from_the_heap():
    tuned, default = probe("tuned"), probe("default")
    size = 48 << 20
    assert default["applied"] is False and tuned["applied"] is True
    # glibc's defaults: the buffer is its own mapping, handed back when freed
    assert default["mmapped"] >= size
    # tuned: it comes from the heap and stays there when freed; after a round or two (small
    # allocations take a corner of a freed block) every buffer reuses pages already there
    assert tuned["mmapped"] < size
    assert tuned["kept_free"] >= size
    assert tuned["late_faults"] < tuned["pages"] // 4


def test_bad_setting_is_refused_with_the_accepted_values(monkeypatch):
    monkeypatch.setenv(allocator.ENV, "jemalloc")
    with pytest.raises(NortonError, match=r"NORTON_ALLOCATOR must be one of \('tuned', 'default'\), got 'jemalloc'"):
        tune_allocator()


def test_bad_setting_is_one_line_from_the_cli(monkeypatch, capsys):
    monkeypatch.setenv(allocator.ENV, "off")
    assert main(["models"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NORTON_ALLOCATOR must be one of" in err[0] and "'off'" in err[0]


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.delenv(allocator.ENV, raising=False)
    monkeypatch.setattr(allocator, "glibc", lambda: None)
    assert tune_allocator() is False


class FakeLibc:
    def __init__(self, refuse: set[int]):
        self.refuse, self.calls = refuse, []

    def mallopt(self, param, value):
        self.calls.append((param.value, value.value))
        return 0 if param.value in self.refuse else 1


def test_settings_passed_to_mallopt_and_a_refusal_warned(monkeypatch):
    monkeypatch.delenv(allocator.ENV, raising=False)
    libc = FakeLibc(refuse={allocator.M_TOP_PAD})
    monkeypatch.setattr(allocator, "glibc", lambda: libc)
    with pytest.warns(RuntimeWarning, match=r"refused the allocator settings \['M_TOP_PAD'\]"):
        assert tune_allocator() is True
    assert libc.calls == [(allocator.M_MMAP_THRESHOLD, 256 << 20), (allocator.M_TRIM_THRESHOLD, 2**31 - 1),
                          (allocator.M_TOP_PAD, 256 << 20)]
    everything = FakeLibc(refuse={param for _, param, _ in allocator.SETTINGS})
    monkeypatch.setattr(allocator, "glibc", lambda: everything)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert tune_allocator() is False


def test_training_runs_and_the_cli_set_it_up(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(norton.training.engine, "tune_allocator", lambda: calls.append("run"))
    monkeypatch.setattr(norton.cli, "tune_allocator", lambda: calls.append("cli"))
    model = torch.nn.Linear(2, 2)
    TrainingRun(str(tmp_path / "run"), model, torch.optim.SGD(model.parameters(), lr=0.1), lambda step, epoch: 1.0,
                settings={})
    assert main(["models"]) == 0
    assert calls == ["run", "cli"]
