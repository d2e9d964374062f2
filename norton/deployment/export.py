"""ONNX export of a deployed model, checked and run with ONNX Runtime."""
from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from norton.errors import NortonError


@dataclass
class ExportResult:
    path: str
    max_abs_diff: float  # ONNX Runtime vs PyTorch on the example input


def export_onnx(model: nn.Module, example: torch.Tensor, path: str, *, opset: int = 17, tolerance: float = 1e-3) -> ExportResult:
    """Export ``model`` (batch dimension dynamic), run onnx's checker, and compare
    ONNX Runtime's output with PyTorch's on ``example``."""
    import onnx
    import onnxruntime as ort

    model = model.eval()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # norton chooses the TorchScript exporter on purpose (CPDBlock's grouped convs export exactly with it)
            warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export",
                                    category=DeprecationWarning)
            fastpath = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)  # MultiheadAttention's fused kernel has no ONNX form
            try:
                torch.onnx.export(model, (example,), tmp, dynamo=False, opset_version=opset, input_names=["input"],
                                  output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
            except torch.onnx.errors.OnnxExporterError as err:
                first = str(err).strip().splitlines()[0][:300]
                raise NortonError(f"torch's ONNX exporter (opset {opset}) cannot export this model for an example of "
                                  f"shape {tuple(example.shape)}: {first}") from None
            finally:
                torch.backends.mha.set_fastpath_enabled(fastpath)
        onnx.checker.check_model(onnx.load(tmp))
        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        got = session.run(None, {"input": example.cpu().numpy()})[0]
        with torch.no_grad():
            expected = model(example).cpu().numpy()
        diff = float(np.abs(got - expected).max())
        scale = float(np.abs(expected).max()) or 1.0
        if diff > tolerance * scale:
            raise NortonError(f"ONNX Runtime's output differs from PyTorch's by {diff:.3g} (scale {scale:.3g})")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ExportResult(path=path, max_abs_diff=diff)


def onnx_latency_ms(path: str, example: torch.Tensor, *, repeats: int = 15, threads: int | None = None) -> list[float]:
    """Wall-clock milliseconds of ``repeats`` ONNX Runtime runs (after one warm-up)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {"input": example.cpu().numpy()}
    session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(1000 * (time.perf_counter() - start))
    return times
