"""Images held in memory as uint8 tensors, with their normalisation and augmentation."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ArrayDataset:
    """Images ``(n, C, H, W)`` uint8 and labels ``(n,)`` int64, with the
    normalisation and augmentation that go with them."""

    images: Tensor
    labels: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 0  # random crop of the original size after zero-padding by this much
    flip: bool = False
    classes: tuple[str, ...] | None = None  # class names, where the data has them (image folders)
    source: dict | None = None  # how an image folder was read (norton.training.folders): kept in checkpoints

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        if self.classes is not None:
            return len(self.classes)
        return int(self.labels.max()) + 1 if len(self) else 0

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, index: Tensor) -> "ArrayDataset":
        return ArrayDataset(self.images[index], self.labels[index], self.mean, self.std, self.crop_padding, self.flip,
                            self.classes, self.source)

    def without_augmentation(self) -> "ArrayDataset":
        return ArrayDataset(self.images, self.labels, self.mean, self.std, 0, False, self.classes, self.source)


def normalize(images: Tensor, mean, std) -> Tensor:
    """uint8 images (N, C, H, W) as float, scaled to [0, 1] and normalised per channel."""
    x = images.float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
