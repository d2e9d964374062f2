import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_DIR = os.path.join(ROOT, "tests", "reference")  # copies of shared/reference

if os.environ.get("PYTEST_XDIST_WORKER"):  # one core per worker, and for the processes it starts
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


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


KEYPOINT_NAMES = ["nose", "left_eye", "right_eye", "left_hand", "right_hand"]


def write_coco(root, task="bbox", n_images=4, size=(96, 128), seed=0):
    """A tiny COCO-format dataset: PNG images with a drawn square and disk, their
    boxes, polygon masks and (task "keypoints") 5 keypoints of a 'person' figure.
    Category ids are not contiguous (1 and 3), as in COCO.  Returns (images dir, json)."""
    import json
    import math

    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    if task == "keypoints":
        categories = [{"id": 1, "name": "person", "supercategory": "person", "keypoints": KEYPOINT_NAMES,
                       "skeleton": [[1, 2], [1, 3], [2, 4], [3, 5]]}]
    else:
        categories = [{"id": 1, "name": "square", "supercategory": "shape"},
                      {"id": 3, "name": "disk", "supercategory": "shape"}]
    images, annotations = [], []
    h, w = size
    for i in range(n_images):
        picture = Image.fromarray(rng.integers(0, 60, (h, w, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(picture)
        x0, y0 = int(rng.integers(4, w // 2 - 30)), int(rng.integers(4, h - 40))
        s = int(rng.integers(24, 34))
        draw.rectangle([x0, y0, x0 + s, y0 + s], fill=(230, 40, 40))
        square = {"bbox": [x0, y0, s + 1, s + 1], "category_id": 1,
                  "segmentation": [[x0, y0, x0 + s + 1, y0, x0 + s + 1, y0 + s + 1, x0, y0 + s + 1]]}
        cx, cy, r = int(rng.integers(w // 2 + 16, w - 18)), int(rng.integers(18, h - 18)), int(rng.integers(10, 16))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(40, 200, 240))
        polygon = [v for k in range(16) for v in (cx + r * math.cos(2 * math.pi * k / 16), cy + r * math.sin(2 * math.pi * k / 16))]
        disk = {"bbox": [cx - r, cy - r, 2 * r + 1, 2 * r + 1], "category_id": 3, "segmentation": [polygon]}
        objects = [square, disk]
        if task == "keypoints":  # the square is a "person": nose on top, eyes, hands at the bottom corners
            x1, y1 = x0 + s, y0 + s
            square["keypoints"] = [x0 + s / 2, y0 + 2, 2, x0 + s / 3, y0 + s / 3, 2, x0 + 2 * s / 3, y0 + s / 3, 2,
                                   x0 + 1, y1 - 1, 2, x1 - 1, y1 - 1, 1]
            square["num_keypoints"] = 5
            objects = [square]
        name = f"{i:06d}.png"
        picture.save(os.path.join(image_dir, name))
        images.append({"id": 100 + i, "file_name": name, "height": h, "width": w})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + i, "iscrowd": 0,
                                "area": float(obj["bbox"][2] * obj["bbox"][3]), **obj})
    ann_file = os.path.join(root, f"{task}.json")
    with open(ann_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return image_dir, ann_file
