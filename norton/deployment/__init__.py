"""Stage ④: inference copies that run fast (BatchNorm folded, fastest plan or
dense conv per layer, memory format), ONNX export, side-by-side latency."""
from norton.deployment.export import ExportResult, export_onnx, onnx_latency_ms
from norton.deployment.latency import Latency, compare_latency
from norton.deployment.optimize import DeployReport, deploy, fold_batchnorm, time_tucker

__all__ = ["DeployReport", "ExportResult", "Latency", "compare_latency", "deploy", "export_onnx", "fold_batchnorm",
           "onnx_latency_ms", "time_tucker"]
