"""The bottom layer: CP decomposition, the CPDBlock and its execution plans, the
Tucker-2 block,
layers shared by models and pruning, MAC/param counting, module surgery and
the compress-rate grammar, and the allocator set up for training.  Imports nothing else of norton but its errors."""
from norton.core.allocator import tune_allocator
from norton.core.batchnorm import (
    ChannelsLastBatchNorm2d,
    batch_statistics,
    batchnorms,
    fast_channels_last_batchnorm,
    reestimate_bn,
)
from norton.core.compress_rate import (
    fit_compress_rate,
    format_compress_rate,
    parse_compress_rate,
)
from norton.core.counting import (
    Complexity,
    complexity,
    conv_output_size,
    count_macs,
    count_params,
)
from norton.core.cp import CPResult, Factors, cp_als, cp_decompose, nmse, reconstruct
from norton.core.cpd_block import PLANS, CPDBlock, plan_override
from norton.core.devices import (
    DTYPE_NAMES,
    DTYPES,
    deterministic_numerics,
    device_name,
    machine_record,
    provenance,
    provenance_text,
    resolve_device,
    resolve_dtype,
)
from norton.core.layers import ChannelPadShortcut
from norton.core.plans import time_plans, tune_plans
from norton.core.surgery import as_args, is_decomposable, replace_module
from norton.core.tucker import TuckerBlock, tucker2

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "PLANS",
    "CPDBlock",
    "CPResult",
    "ChannelPadShortcut",
    "Complexity",
    "Factors",
    "TuckerBlock",
    "as_args",
    "batch_statistics",
    "batchnorms",
    "ChannelsLastBatchNorm2d",
    "fast_channels_last_batchnorm",
    "complexity",
    "conv_output_size",
    "count_macs",
    "count_params",
    "cp_als",
    "cp_decompose",
    "deterministic_numerics",
    "device_name",
    "machine_record",
    "provenance",
    "provenance_text",
    "fit_compress_rate",
    "format_compress_rate",
    "is_decomposable",
    "nmse",
    "parse_compress_rate",
    "plan_override",
    "reconstruct",
    "reestimate_bn",
    "replace_module",
    "resolve_device",
    "resolve_dtype",
    "time_plans",
    "tucker2",
    "tune_allocator",
    "tune_plans",
]
