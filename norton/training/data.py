"""Datasets in their standard on-disk formats, and fast in-memory batches.

Small datasets (CIFAR-10, Fashion-MNIST, digits) are decoded once into uint8
tensors and batched in memory: shuffling, padded random crops and flips are done
on whole batches with a ``torch.Generator`` seeded from (seed, epoch), so an
epoch's order and augmentation are reproducible — which makes resumed runs
bit-identical — and cheap on a 2-core CPU.  ImageNet goes through torchvision's
``ImageFolder`` with its standard presets and DataLoader workers.

Grayscale data (Fashion-MNIST, digits) has one channel; build the model with
``in_channels=1`` (the CLI does this from the dataset).
"""
from __future__ import annotations

import copy
import gzip
import os
import pickle
import struct
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Subset

from norton.errors import NortonError
from norton.training.arrays import ArrayDataset, normalize
from norton.training.folders import BAD_IMAGE_CHOICES, folder_splits

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
DIGITS_MEAN, DIGITS_STD = (0.3051,), (0.3834,)


# -- readers -------------------------------------------------------------------------------
class _SafeUnpickler(pickle.Unpickler):
    """Admits plain containers and numpy arrays — nothing that can run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dataset file")
        if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            from numpy._core import multiarray

            return getattr(multiarray, name)
        if module == "_codecs":
            import _codecs

            return _codecs.encode
        return getattr(np, name)


def _load_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _SafeUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise NortonError(f"CIFAR-10 batch {path!r} is corrupt, truncated or not a CIFAR pickle: {err}") from None
    if not isinstance(batch, dict):
        raise NortonError(f"CIFAR-10 batch {path!r} does not hold a dict")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise NortonError(f"CIFAR-10 batch {path!r} lacks 'data' (array) or 'labels'")
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise NortonError(
            f"CIFAR-10 batch {path!r}: expected uint8 data of shape (n, 3072) and n labels, "
            f"got {data.dtype} {data.shape} and {labels.shape[0]} labels"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise NortonError(f"CIFAR-10 batch {path!r}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_dir(root: str) -> str:
    for candidate in (root, os.path.join(root, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(candidate, "data_batch_1")):
            return candidate
    raise NortonError(
        f"no CIFAR-10 data in {root!r}: expected cifar-10-batches-py/ with data_batch_1..5 and "
        "test_batch (the python version of CIFAR-10)"
    )


def load_cifar10(root: str, split: str) -> ArrayDataset:
    folder = _cifar_dir(root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = []
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise NortonError(f"CIFAR-10 file {path!r} is missing (expected data_batch_1..5 and test_batch)")
        parts.append(_load_cifar_batch(path))
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    train = split == "train"
    return ArrayDataset(images, labels, CIFAR10_MEAN, CIFAR10_STD, crop_padding=4 if train else 0, flip=train)


def _read_idx(path: str, expected_magic: int) -> np.ndarray:
    if not os.path.isfile(path):
        raise NortonError(f"missing file {path!r}")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise NortonError(f"{path!r} is not a readable gzip IDX file: {err}") from None
    if len(raw) < 8:
        raise NortonError(f"{path!r} is empty or truncated (no IDX header)")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != expected_magic:
        raise NortonError(f"{path!r}: IDX magic number {magic}, expected {expected_magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise NortonError(f"{path!r} is truncated inside its IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims))
    if len(raw) - header != count:
        raise NortonError(f"{path!r} is truncated or has trailing bytes: header says {dims}, {count} bytes; found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_fashion_mnist(root: str | None, split: str) -> ArrayDataset:
    root = root or FASHION_MNIST_DIR
    if not os.path.isdir(root):
        raise NortonError(
            f"Fashion-MNIST directory {root!r} does not exist: expected train-images-idx3-ubyte.gz, "
            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz "
            "(Debian: apt install dataset-fashion-mnist)"
        )
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), 2051)
    labels = _read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), 2049)
    if images.ndim != 3 or labels.shape[0] != images.shape[0]:
        raise NortonError(f"Fashion-MNIST in {root!r}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise NortonError(f"Fashion-MNIST in {root!r}: labels outside 0..9")
    train = split == "train"
    return ArrayDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                        FASHION_MEAN, FASHION_STD, crop_padding=2 if train else 0, flip=train)


def load_digits(split: str, seed: int = 0) -> ArrayDataset:
    """scikit-learn's 8×8 digits, scaled to 0..255 and upsampled to 16×16;
    a fixed 80/20 train/test split."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = torch.from_numpy((bunch.images * (255.0 / 16.0)).astype(np.float32)).unsqueeze(1)
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False).round().clamp(0, 255).to(torch.uint8)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    cut = int(0.8 * len(labels))
    index = order[:cut] if split == "train" else order[cut:]
    train = split == "train"
    return ArrayDataset(images[index], labels[index], DIGITS_MEAN, DIGITS_STD, crop_padding=1 if train else 0, flip=False)


DATASETS = ("cifar10", "fashion-mnist", "digits", "imagenet", "folder")


def load_dataset(name: str, root: str | None, split: str, **folder_options):
    """``split``: "train" or "test".  ImageNet returns an ImageFolder dataset;
    ``folder`` (a user's class folders, ``norton.training.folders``) takes
    ``folder_options``: input_size, on_bad_image, augment."""
    if split not in ("train", "test"):
        raise NortonError(f"split must be 'train' or 'test', got {split!r}")
    if name == "folder":
        train, _, test = folder_splits(root, **folder_options)
        return train if split == "train" else test
    if name == "cifar10":
        if not root:
            raise NortonError("cifar10 needs --data-dir (the folder holding cifar-10-batches-py)")
        return load_cifar10(root, split)
    if name == "fashion-mnist":
        return load_fashion_mnist(root, split)
    if name == "digits":
        return load_digits(split)
    if name == "imagenet":
        return load_imagenet(root, split)
    raise NortonError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")


def load_imagenet(root: str | None, split: str):
    import torchvision
    from torchvision.transforms import v2

    if not root:
        raise NortonError("imagenet needs --data-dir (the folder holding train/ and val/)")
    folder = os.path.join(root, "train" if split == "train" else "val")
    if not os.path.isdir(folder):
        raise NortonError(f"ImageNet folder {folder!r} does not exist: expected {root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG")
    if split == "train":
        transform = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(),
                                v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    else:
        transform = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224), v2.PILToTensor(),
                                v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    try:
        dataset = torchvision.datasets.ImageFolder(folder, transform=transform)
    except (FileNotFoundError, RuntimeError) as err:
        raise NortonError(f"ImageNet folder {folder!r}: {err}") from None
    dataset.eval_transform = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224), v2.PILToTensor(),
                                         v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return dataset


# -- batches ---------------------------------------------------------------------------------
def split_validation(train, size: int, seed: int = 0):
    """A held-out validation set taken from the training data (fixed by ``seed``),
    without augmentation."""
    if not 0 < size < len(train):
        raise NortonError(f"validation size {size} must be between 1 and {len(train) - 1}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 7919))
    if isinstance(train, ArrayDataset):
        return train.subset(order[size:]), train.subset(order[:size]).without_augmentation()
    return Subset(train, order[size:].tolist()), Subset(_for_evaluation(train), order[:size].tolist())


def _for_evaluation(train):
    """An ImageFolder's same files with its evaluation transform."""
    evaluation = copy.copy(train)
    evaluation.transform = getattr(train, "eval_transform", train.transform)
    return evaluation


def _limit_order(count: int, seed: int) -> Tensor:
    """The fixed shuffle ``limit`` takes its first images from."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed + 104729))


def limit(train, count: int | None, seed: int = 0):
    """The first ``count`` images of a fixed shuffle (all when ``count`` is None)."""
    if count is None or count >= len(train):
        return train
    if count < 1:
        raise NortonError(f"--subset must be >= 1, got {count}")
    order = _limit_order(len(train), seed)[:count]
    if isinstance(train, ArrayDataset):
        return train.subset(order)
    return Subset(train, order.tolist())


def held_out(train, count: int, extra: int, seed: int = 0):
    """``extra`` images that ``limit(train, count, seed)`` leaves out (the next ones of the
    same fixed shuffle), without augmentation: more validation data with the same
    training images."""
    if extra < 1 or count + extra > len(train):
        raise NortonError(f"{extra} held-out images beyond the first {count} need a dataset of at least "
                          f"{count + extra} images; this one has {len(train)}")
    order = _limit_order(len(train), seed)[count:count + extra]
    if isinstance(train, ArrayDataset):
        return train.subset(order).without_augmentation()
    return Subset(_for_evaluation(train), order.tolist())


def joined(first, second):
    """Two datasets of the same kind as one (validation splits: no augmentation)."""
    if isinstance(first, ArrayDataset) and isinstance(second, ArrayDataset):
        return first.joined(second)
    return ConcatDataset([first, second])


def dataset_shape(train) -> tuple[int, int]:
    """(classes, input channels) of a dataset."""
    if isinstance(train, ArrayDataset):
        return train.num_classes, train.input_size[0]
    base = getattr(train, "dataset", train)
    return len(base.classes), 3


def input_size_of(data) -> tuple[int, int, int]:
    return data.input_size if isinstance(data, ArrayDataset) else (3, 224, 224)


def augment(images: Tensor, padding: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Per-image random crop (after zero padding) and horizontal flip of a uint8 batch."""
    n, _, h, w = images.shape
    if padding:
        padded = F.pad(images, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None, :])  # (n, h)
        cols = (dx[:, None] + torch.arange(w)[None, :])  # (n, w)
        batch = torch.arange(n)[:, None, None]
        images = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        images = torch.where(mask[:, None, None, None], images.flip(3), images)
    return images.contiguous()


def first_images(data, num_images: int, batch_size: int, *, seed: int, epoch: int, smallest_last: int = 1):
    """Yield the first ``num_images`` images of a shuffled epoch (normalised, in
    batches); a last batch smaller than ``smallest_last`` is left out."""
    used = 0
    for images, _ in epoch_batches(data, batch_size, seed=seed, epoch=epoch, shuffle=True):
        images = images[: num_images - used]
        if images.shape[0] == 0 or (images.shape[0] < smallest_last and used):
            return
        used += images.shape[0]
        yield images
        if used >= num_images:
            return


def epoch_batches(data, batch_size: int, *, seed: int, epoch: int, shuffle: bool,
                  rank: int = 0, world_size: int = 1, drop_last: bool = False, workers: int = 2):
    """Yield normalised ``(images, labels)`` float batches for one epoch.

    Order and augmentation depend only on (seed, epoch): a resumed epoch repeats
    exactly.  With ``world_size`` > 1 each rank takes its share of every global
    batch of ``batch_size`` (rank r gets items r, r + world_size, ...).
    """
    n = len(data)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    if not isinstance(data, ArrayDataset):  # files on disk: torchvision transforms in loader workers
        yield from _loader_batches(data, order, stop, batch_size, generator, rank, world_size, workers)
        return
    for start in range(0, stop, batch_size):
        index = order[start:start + batch_size]
        images = data.take(index)
        if data.crop_padding or data.flip:
            images = augment(images, data.crop_padding, data.flip, generator)
        labels = data.labels[index]
        if world_size > 1:
            images, labels = images[rank::world_size], labels[rank::world_size]
        yield normalize(images, data.mean, data.std), labels


def _loader_batches(data, order, stop, batch_size, generator, rank, world_size, workers):
    batches = [order[start:min(start + batch_size, stop)][rank::world_size].tolist() for start in range(0, stop, batch_size)]
    loader = DataLoader(data, batch_sampler=[b for b in batches if b], num_workers=workers,
                        generator=torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator))))
    for images, labels in loader:
        yield images, labels


def num_batches(data, batch_size: int, drop_last: bool = False) -> int:
    n = len(data)
    return n // batch_size if drop_last else -(-n // batch_size)
