import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    errors = tmp_path / "one.err"
    with open(errors, "w") as err:  # the one-process run goes alongside the two-process one
        one = subprocess.Popen([sys.executable, os.path.join(HERE, "ddp_worker.py"), str(tmp_path / "run1"),
                                str(tmp_path / "one")], env=env, stdout=subprocess.DEVNULL, stderr=err)
    # the two processes train channels-last: DDP's gradient buckets then meet channels-last gradients
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", os.path.join(HERE, "ddp_worker.py"),
                          str(tmp_path / "run2"), str(tmp_path / "two"), "channels_last"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert one.wait(timeout=300) == 0, errors.read_text()[-3000:]
    rank0 = torch.load(tmp_path / "two.rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "two.rank1.pt", weights_only=True)
    single = torch.load(tmp_path / "one.rank0.pt", weights_only=True)
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), key  # DDP keeps the ranks identical
        torch.testing.assert_close(rank0[key], single[key], atol=1e-4, rtol=1e-3)  # = one contiguous process, same global batch
    # only rank 0 wrote the run directory, once
    assert sorted(os.listdir(tmp_path / "run2")) == ["best.pt", "last.pt", "metrics.jsonl"]
