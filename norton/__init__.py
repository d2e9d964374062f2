"""norton: compress CNNs with NORTON — filter-wise CP decomposition, then pruning."""
from norton.complexity import Complexity, complexity
from norton.compress_rate import parse_compress_rate
from norton.cp import cp_als, cp_decompose, nmse
from norton.cpd_block import CPDBlock
from norton.decompose import DecompositionReport, decompose
from norton.errors import NortonError
from norton.models import create_model, list_models, register_model

__version__ = "0.1.0"

__all__ = [
    "CPDBlock",
    "Complexity",
    "DecompositionReport",
    "NortonError",
    "complexity",
    "cp_als",
    "cp_decompose",
    "create_model",
    "decompose",
    "list_models",
    "nmse",
    "parse_compress_rate",
    "register_model",
]
