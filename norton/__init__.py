"""norton: compress CNNs with NORTON — filter-wise CP decomposition, then pruning.

The package is layered; each layer imports only those below it:

    core < models | deployment < compression < checkpoints < training < detection < evidence < cli

Everything a user calls is re-exported here.
"""
from norton.checkpoints import load_checkpoint, load_model, save_checkpoint
from norton.compression import (
    DecompositionReport,
    Plan,
    PruneReport,
    decompose,
    list_criteria,
    measure_round_to,
    plan,
    prune,
    recover,
)
from norton.core import (
    Complexity,
    CPDBlock,
    complexity,
    count_macs,
    cp_als,
    cp_decompose,
    nmse,
    parse_compress_rate,
    tune_allocator,
    tune_plans,
)
from norton.deployment import DeployReport, compare_latency, deploy, export_onnx
from norton.detection import (  # also registers the detectors in the model registry
    deploy_detector,
    detector_complexity,
    load_deployed,
)
from norton.errors import NortonError
from norton.models import create_model, list_models, register_model
from norton.training import (
    CompressConfig,
    TrainConfig,
    compress,
    evaluate,
    fit,
    load_dataset,
    recalibrate_bn,
    select_plan,
)
from norton.version import __version__

__all__ = [
    "CPDBlock",
    "Complexity",
    "CompressConfig",
    "DecompositionReport",
    "DeployReport",
    "NortonError",
    "Plan",
    "PruneReport",
    "TrainConfig",
    "__version__",
    "compare_latency",
    "complexity",
    "compress",
    "count_macs",
    "cp_als",
    "cp_decompose",
    "create_model",
    "decompose",
    "deploy",
    "deploy_detector",
    "detector_complexity",
    "evaluate",
    "export_onnx",
    "fit",
    "list_criteria",
    "list_models",
    "load_checkpoint",
    "load_dataset",
    "load_deployed",
    "load_model",
    "measure_round_to",
    "nmse",
    "parse_compress_rate",
    "plan",
    "prune",
    "recalibrate_bn",
    "recover",
    "register_model",
    "save_checkpoint",
    "select_plan",
    "tune_allocator",
    "tune_plans",
]
