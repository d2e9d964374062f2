import gzip
import os
import pickle
import struct

import numpy as np

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_DIR = os.path.join(ROOT, "tests", "reference")  # copies of shared/reference


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def low_rank_filters(n, c, kh, kw, rank, *, dtype=torch.float64, seed=0):
    """Filters that are exactly rank-``rank`` CP tensors, and their factors."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, c, rank, generator=g, dtype=dtype)
    b = torch.randn(n, kh, rank, generator=g, dtype=dtype)
    cc = torch.randn(n, kw, rank, generator=g, dtype=dtype)
    return torch.einsum("ncr,nhr,nwr->nchw", a, b, cc), (a, b, cc)


def trained_like_filters(n, c, k=3, seed=0):
    """Filters with the structure of trained ones: a few smooth spatial patterns
    (edges, blobs) mixed across channels with a decaying spectrum, plus noise."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.linspace(-1, 1, k, dtype=torch.float64)
    patterns = torch.stack([
        torch.ones(k, k, dtype=torch.float64),
        lin[:, None].expand(k, k),
        lin[None, :].expand(k, k),
        torch.exp(-(lin[:, None] ** 2 + lin[None, :] ** 2)),
        lin[:, None] * lin[None, :],
    ])
    weights = torch.randn(n, c, len(patterns), generator=g, dtype=torch.float64)
    weights *= torch.tensor([1.0, 0.7, 0.7, 0.5, 0.3], dtype=torch.float64)
    w = torch.einsum("ncp,pij->ncij", weights, patterns)
    return (w + 0.1 * torch.randn(n, c, k, k, generator=g, dtype=torch.float64)).float()


# -- tiny datasets in the exact on-disk formats users have ---------------------------------


def write_cifar10(root, per_batch=20, seed=0):
    """cifar-10-batches-py/ with data_batch_1..5 and test_batch: protocol-2 pickles of
    dicts with bytes keys, uint8 data (n, 3072) and a list of int labels."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


def write_idx(path, array, magic):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_fashion_mnist(root, n_train=64, n_test=32, seed=0):
    """The four gzip IDX files; class k images are brighter in a band at row 2k+4,
    so that a small net can learn them."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 * k + 4: 2 * k + 7, :] = 230
        write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), images, 2051)
        write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), labels, 2049)
    return root


def write_image_folder(root, classes=("cat", "dog"), per_class=3, size=(40, 30)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            folder = os.path.join(root, split, c)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i}.JPEG"), format="JPEG")
    return root
