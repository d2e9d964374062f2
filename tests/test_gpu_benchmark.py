"""benchmarks/gpu.py runs as prepared (here on the CPU, small) and its page is rendered from its JSON."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu.py")


def run(out, sections, *extra):
    result = subprocess.run([sys.executable, SCRIPT, "--quick", "--device", "cpu", "--repeats", "2", "--out-dir",
                             str(out), "--sections", sections, *extra], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text()


def render(data):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import gpu
    finally:
        sys.path.pop(0)
    return gpu.render(data)


@pytest.mark.slow
def test_gpu_benchmark_runs_and_resumes(tmp_path):
    data, page = run(tmp_path, "detector,training,criteria")
    rows = data["rows"]
    assert data["setting"]["device"] == "cpu" and data["setting"]["dtypes"]
    detector = rows["detector batch 1 float32"]["models"]
    assert detector["dense"]["speedup"] == 1.0 and detector["dense"]["backbone_speedup"] == 1.0  # deployed vs deployed
    assert "paper backbone r1" in detector and detector["paper backbone r1"]["fps"] > 0
    assert "detector batch 1 bf16 channels-last, CUDA graph" not in rows  # CUDA graphs only on a GPU
    assert rows["training step resnet_20 r2"]["as built (auto) / dense"] > 0
    assert rows["pabs"]["median_s"] > 0
    assert page == render(data)  # the page is what the JSON renders to
    # a second call with --resume keeps what is there and measures nothing again
    before = (tmp_path / "gpu.json").read_text()
    again, _ = run(tmp_path, "detector,training,criteria", "--resume")
    assert again["rows"] == json.loads(before)["rows"]


@pytest.mark.benchmark
def test_gpu_benchmark_inference_rows(tmp_path):
    data, page = run(tmp_path, "inference")
    row = data["rows"]["resnet_20 batch 8 float32"]
    assert row["models"]["dense"]["speedup"] == 1.0
    assert "planner 60% fewer MACs" in row["models"]
    assert any(name.startswith("Torch-Pruning L1") for name in row["models"])
    assert page == render(data)
