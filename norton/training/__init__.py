"""Stage ③: datasets in their on-disk formats, the one training engine, the
classification loop, and ``compress`` (decompose → prune → fine-tune)."""
from norton.training.classification import (
    FitResult,
    TrainConfig,
    classification_loss,
    evaluate,
    fit,
    load_best,
    lr_factor,
    recalibrate_bn,
)
from norton.training.data import (
    DATASETS,
    ArrayDataset,
    dataset_shape,
    epoch_batches,
    held_out,
    input_size_of,
    joined,
    limit,
    load_dataset,
    num_batches,
    split_validation,
)
from norton.training.distributed import Distributed, init_distributed, resolve_device
from norton.training.folders import BAD_IMAGE_CHOICES, folder_splits
from norton.training.engine import TrainingRun
from norton.training.pipeline import CompressConfig, calibration_batches, compress
from norton.training.candidates import apply_plan, select_plan

__all__ = [
    "BAD_IMAGE_CHOICES",
    "DATASETS",
    "ArrayDataset",
    "CompressConfig",
    "Distributed",
    "FitResult",
    "TrainConfig",
    "TrainingRun",
    "apply_plan",
    "calibration_batches",
    "classification_loss",
    "compress",
    "dataset_shape",
    "epoch_batches",
    "evaluate",
    "fit",
    "folder_splits",
    "held_out",
    "init_distributed",
    "input_size_of",
    "joined",
    "limit",
    "load_best",
    "load_dataset",
    "lr_factor",
    "num_batches",
    "recalibrate_bn",
    "resolve_device",
    "select_plan",
    "split_validation",
]
