"""NORTON's stages ① and ②: decomposition into CPDBlocks, redundancy criteria,
pruning of any model through its dependency graph, least-squares recovery of
the layers pruning cut, and the architecture of a
compressed model as data."""
from norton.compression.architecture import build_base, describe, rebuild
from norton.compression.criteria import (
    Criterion,
    get_criterion,
    list_criteria,
    register_criterion,
)
from norton.compression.decomposition import (
    DecompositionReport,
    LayerDecomposition,
    decompose,
)
from norton.compression.costs import measure_round_to
from norton.compression.planning import PLANNER_CRITERION, Plan, calibration_batch_size, plan
from norton.compression.pruning import GroupPruning, PruneReport, check_round_to, prune
from norton.compression.recovery import RecoveryReport, recover

__all__ = [
    "PLANNER_CRITERION", "Criterion", "DecompositionReport", "GroupPruning", "LayerDecomposition", "Plan", "PruneReport", "RecoveryReport", "build_base", "calibration_batch_size",
    "check_round_to", "decompose", "describe", "get_criterion", "list_criteria", "measure_round_to", "plan", "prune", "rebuild", "recover", "register_criterion",
]
