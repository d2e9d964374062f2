"""Stage ③: datasets in their on-disk formats, the one training engine, the
classification loop, and ``compress`` (decompose → prune → fine-tune)."""
from norton.training.classification import (
    CONVERGED_SPREAD,
    CONVERGED_WINDOW,
    FitResult,
    TrainConfig,
    classification_loss,
    converged,
    evaluate,
    fit,
    load_best,
    lr_factor,
    recalibrate_bn,
    stops_early,
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
from norton.training.folders import BAD_IMAGE_CHOICES, folder_splits, read_images
from norton.training.engine import TrainingRun
from norton.training.pipeline import CompressConfig, calibration_batches, compress
from norton.training.candidates import apply_plan, select_plan

__all__ = [
    "BAD_IMAGE_CHOICES",
    "CONVERGED_SPREAD",
    "CONVERGED_WINDOW",
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
    "converged",
    "dataset_shape",
    "epoch_batches",
    "evaluate",
    "fit",
    "folder_splits",
    "read_images",
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
    "stops_early",
]
