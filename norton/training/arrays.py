"""Images held in memory as uint8 tensors, with their normalisation and augmentation."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass
class ArrayDataset:
    """Images ``(n, C, H, W)`` uint8 and labels ``(n,)`` int64, with the
    normalisation and augmentation that go with them.  Where the images are
    a memory-mapped file (``mapped``: an image folder's cache file) a subset
    keeps row numbers (``rows``) into it rather than a copy, so that splitting
    a folder too big for memory does not read it into memory; ``take`` gives
    the images at some positions either way."""

    store: Tensor  # the images; with ``rows``, the array this dataset's images are rows of
    labels: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 0  # random crop of the original size after zero-padding by this much
    flip: bool = False
    classes: tuple[str, ...] | None = None  # class names, where the data has them (image folders)
    source: dict | None = None  # how an image folder was read (norton.training.folders): kept in checkpoints
    mapped: bool = False  # ``store`` is a memory-mapped file: subsets keep row numbers
    rows: Tensor | None = None  # this dataset's images are ``store[rows]`` (None: all of ``store``, in order)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def images(self) -> Tensor:
        """Every image of the dataset, (n, C, H, W) uint8 (gathered, where ``rows`` are kept)."""
        return self.store if self.rows is None else self.store[self.rows]

    def take(self, index: Tensor) -> Tensor:
        """The images at positions ``index`` of the dataset."""
        return self.store[index if self.rows is None else self.rows[index]]

    @property
    def num_classes(self) -> int:
        if self.classes is not None:
            return len(self.classes)
        return int(self.labels.max()) + 1 if len(self) else 0

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.store.shape[1:])

    def subset(self, index: Tensor) -> "ArrayDataset":
        if self.mapped:
            return replace(self, labels=self.labels[index], rows=index if self.rows is None else self.rows[index])
        return replace(self, store=self.take(index), labels=self.labels[index], rows=None)

    def without_augmentation(self) -> "ArrayDataset":
        return replace(self, crop_padding=0, flip=False)

    def joined(self, other: "ArrayDataset") -> "ArrayDataset":
        """This dataset's images followed by ``other``'s (rows of the same mapped file stay rows)."""
        labels = torch.cat([self.labels, other.labels])
        if self.mapped and other.store is self.store:
            every = [d.rows if d.rows is not None else torch.arange(len(d.store)) for d in (self, other)]
            return replace(self, labels=labels, rows=torch.cat(every))
        return replace(self, store=torch.cat([self.images, other.images]), labels=labels, mapped=False, rows=None)


def normalize(images: Tensor, mean, std) -> Tensor:
    """uint8 images (N, C, H, W) as float, scaled to [0, 1] and normalised per channel, in the standard
    (N, C, H, W) memory layout whatever the strides of ``images``.

    The layout matters for one channel: a gathered or cropped grayscale batch can have the strides of a
    channels-last tensor (a size-1 dimension's stride is free, so ``.contiguous()`` leaves it), and convolution
    then propagates channels-last through the whole network — where batch norm on a CPU is several times
    slower (a ResNet-20 training step at 64×64 took twice as long)."""
    x = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    x.copy_(images).div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)
