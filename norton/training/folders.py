"""A user's own images: a folder of class folders, decoded once into memory (or a cache file).

Layouts (torchvision's ``ImageFolder`` convention, classes = sorted folder names):

- ``DIR/train/<class>/*``, ``DIR/test/<class>/*`` and optionally ``DIR/val/<class>/*``;
- ``DIR/<class>/*``: split per class with a fixed seed (stratified) into
  ``TEST_FRACTION`` test and ``VAL_FRACTION`` validation images, the rest train.

Every image is decoded once per process (PIL), made grayscale when every image of
the folder is, resized so its shorter side is the input size and centre-cropped
to a square, and kept as uint8 — an epoch then costs no decoding.  A folder
whose decoded images would not fit in memory (half of it, or
``NORTON_FOLDER_MEMORY_GB``) is decoded once into a cache file instead
(``FolderCache``, under ``NORTON_CACHE_DIR``), memory-mapped, and reused by later
runs on the same folder; one that would not fit on that disk either is refused
before any decoding, naming the sizes.  The input size
defaults to the median shorter side of the images, capped at ``MAX_SIZE``.  The
normalisation is the per-channel mean and std of the training split; training
augmentation is a padded random crop (an eighth of the side) and, for colour
images, a horizontal flip.  An unreadable image stops with its path named, or is
skipped with a warning (``on_bad_image="skip"``).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import statistics
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from norton.checkpoints.atomic import atomic_write_text
from norton.errors import NortonError
from norton.training.arrays import ArrayDataset, normalize

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MAX_SIZE = 224
TEST_FRACTION, VAL_FRACTION = 0.2, 0.1
BAD_IMAGE_CHOICES = ("error", "skip")


def _class_folders(folder: str) -> list[str]:
    return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))


def _files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))


def _listing(root: str) -> dict[str, list[tuple[str, int]]]:
    """{split: [(path, class index)]} and the classes, from either layout."""
    if not os.path.isdir(root):
        raise NortonError(f"image folder {root!r} does not exist")
    top = _class_folders(root)
    split_layout = "train" in top and "test" in top
    if split_layout:
        classes = _class_folders(os.path.join(root, "train"))
        splits = [s for s in ("train", "val", "test") if s in top]
    else:
        classes, splits = top, [None]
    if len(classes) < 2:
        where = os.path.join(root, "train") if split_layout else root
        raise NortonError(f"image folder {where!r} has {len(classes)} class folder(s); a classifier needs at least 2 "
                          "(one folder of images per class)")
    listing = {}
    for split in splits:
        base = os.path.join(root, split) if split else root
        if split and _class_folders(base) != classes:
            raise NortonError(f"{base!r} has the classes {_class_folders(base)}, not those of train/: {classes}")
        items = []
        for index, name in enumerate(classes):
            files = _files(os.path.join(base, name))
            if not files:
                raise NortonError(f"class folder {os.path.join(base, name)!r} holds no images "
                                  f"({', '.join(IMAGE_EXTENSIONS)})")
            items += [(path, index) for path in files]
        listing[split or "all"] = items
    return {"classes": classes, **listing}


def _bad(path: str, err: Exception, on_bad_image: str) -> None:
    """An unreadable image: stop naming it, or warn and go on (``on_bad_image`` skip)."""
    message = f"cannot read image {path!r}: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    if on_bad_image == "error":
        raise NortonError(message + " (pass --on-bad-image skip to leave such files out)") from None
    warnings.warn(message + "; skipped", stacklevel=4)


_UNREADABLE = (OSError, ValueError, SyntaxError)  # PIL's UnidentifiedImageError is an OSError


def _header(path: str, on_bad_image: str) -> tuple[tuple[int, int], bool] | None:
    """The image's size and whether it is grayscale, from its header (no pixels decoded), or None (skipped)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size, _is_gray(image)
    except _UNREADABLE as err:
        _bad(path, err, on_bad_image)
        return None


def _decode(path: str, on_bad_image: str):
    """The image as a PIL image in L or RGB mode, or None (skipped)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("L" if _is_gray(image) else "RGB")
    except _UNREADABLE as err:
        _bad(path, err, on_bad_image)
        return None


def _is_gray(image) -> bool:
    """Whether a PIL image (its header is enough) holds gray values only."""
    return image.mode in ("1", "L", "I", "I;16", "F", "LA") or (
        image.mode == "P" and all(r == g == b for r, g, b in _palette(image)))


def _palette(image):
    values = image.getpalette() or []
    return zip(values[0::3], values[1::3], values[2::3])


def _square(image, size: int) -> np.ndarray:
    """Shorter side to ``size``, centre crop: (size, size) or (size, size, 3) uint8."""
    from PIL import Image

    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BILINEAR)
    left, top = (resized.size[0] - size) // 2, (resized.size[1] - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)


@functools.lru_cache(maxsize=4)
def _decoded(root: str, input_size: int | None, on_bad_image: str, stamp: float):
    """Every image of the folder decoded, resized and split: the classes, {split: (images, labels)} and the
    input size.  The headers are read first (size, grayscale: no pixels) and the split is drawn on the
    readable ones; then each image is decoded and shrunk to the input size on its own, straight into its
    split's rows — of an array in memory, or of the folder's cache file when the decoded images would not fit
    (``memory_budget``), so memory holds at most one full-size image besides."""
    listing = _listing(root)
    classes = listing.pop("classes")
    headers = {split: [(path, label, _header(path, on_bad_image)) for path, label in items]
               for split, items in listing.items()}
    everything = [header for items in headers.values() for _, _, header in items if header is not None]
    if not everything:
        raise NortonError(f"image folder {root!r}: no readable image")
    gray = all(is_gray for _, is_gray in everything)
    size = input_size or min(MAX_SIZE, int(statistics.median(min(shape) for shape, _ in everything)))
    if size < 1:
        raise NortonError(f"input size must be at least 1 pixel, got {size}")
    splits = {split: [(path, label) for path, label, header in items if header is not None]
              for split, items in headers.items()}
    if "all" in splits:
        splits = _stratified(splits.pop("all"), seed=0)
    shape = (len(everything), 1 if gray else 3, size, size)
    cache = None
    if math.prod(shape) > memory_budget():
        cache = FolderCache(root, splits, shape, on_bad_image)
        if cache.complete():
            return classes, cache.arrays(), size
        store = cache.create()
    else:
        store = np.empty(shape, dtype=np.uint8)
    counts, labels, row = {}, {}, 0
    for split, items in splits.items():
        begin, kept = row, []
        for path, label in tqdm(items, desc=f"decode {split} images", unit="image", leave=False,
                                disable=cache is None):
            image = _decode(path, on_bad_image)  # a header can read while its pixels do not
            if image is not None:
                pixels = _square(image.convert("L" if gray else "RGB"), size)
                store[row] = pixels[None] if gray else pixels.transpose(2, 0, 1)
                kept.append(label)
                row += 1
        counts[split], labels[split] = row - begin, kept
        row = begin + len(items)  # a split's rows: as many as it has readable headers; the decoded ones first
    if cache is not None:
        return classes, cache.finish(store, counts, labels), size
    return classes, _split_arrays(torch.from_numpy(store), splits, counts, labels), size


def _split_arrays(images: torch.Tensor, splits: dict, counts: dict, labels: dict, mapped: bool = False) -> dict:
    """{split: (images, rows, labels)}: each split's decoded rows of ``images`` — in memory a view of them
    (rows None); from a cache file the whole file with the split's row numbers, so that splits of one
    folder can be pooled without reading them into memory."""
    arrays, row = {}, 0
    for split, items in splits.items():
        span = slice(row, row + counts[split])
        arrays[split] = ((images, torch.arange(span.start, span.stop)) if mapped else (images[span], None)) + (
            torch.tensor(labels[split], dtype=torch.int64),)
        row += len(items)
    return arrays


class FolderCache:
    """A folder's decoded images in one uint8 ``.npy`` file under ``cache_dir()``, for
    folders too big for memory: named by a digest of what they were decoded
    from (every file's path, size and modification time, the input size,
    channels and bad-image policy), written under a temporary name and renamed
    when whole, with its labels and split sizes beside it in a JSON file, and
    read back memory-mapped — the operating system pages the images in as
    batches use them.  A later run on the same folder and settings reuses it."""

    def __init__(self, root: str, splits: dict, shape: tuple[int, ...], on_bad_image: str):
        self.shape, self.splits = shape, splits
        digest = hashlib.sha256(json.dumps([root, list(shape[1:]), on_bad_image]).encode())
        for split, items in splits.items():
            for path, label in items:
                info = os.stat(path)
                digest.update(f"{split}\0{path}\0{label}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
        folder = cache_dir()
        self.data = os.path.join(folder, f"folder-{digest.hexdigest()[:24]}.npy")
        self.meta = self.data[:-4] + ".json"

    def complete(self) -> bool:
        try:
            with open(self.meta) as f:
                meta = json.load(f)
            return meta["shape"] == list(self.shape) and np.load(self.data, mmap_mode="r").shape == self.shape
        except (OSError, ValueError, KeyError):
            return False

    def create(self) -> np.memmap:
        folder = os.path.dirname(self.data)
        try:
            os.makedirs(folder, exist_ok=True)
            free = shutil.disk_usage(folder).free
        except OSError as err:
            raise NortonError(f"cannot write the image cache in {folder!r} ({err.strerror}); set NORTON_CACHE_DIR "
                              "to a writable folder") from None
        needed = math.prod(self.shape)
        if needed > free:
            raise NortonError(f"{self.shape[0]:,} images of {self.shape[2]}×{self.shape[3]} take {needed / 2**30:.1f} "
                              f"GiB decoded: more than memory allows (NORTON_FOLDER_MEMORY_GB) and more than the "
                              f"{free / 2**30:.1f} GiB free in {folder!r} (NORTON_CACHE_DIR); pass a smaller "
                              "--image-size")
        return np.lib.format.open_memmap(self.data + ".partial", mode="w+", dtype=np.uint8, shape=self.shape)

    def finish(self, store: np.memmap, counts: dict, labels: dict) -> dict:
        store.flush()
        del store
        os.replace(self.data + ".partial", self.data)
        atomic_write_text(self.meta, json.dumps({"shape": list(self.shape), "counts": counts, "labels": labels}))
        return self.arrays()

    def arrays(self) -> dict:
        with open(self.meta) as f:
            meta = json.load(f)
        images = np.lib.format.open_memmap(self.data, mode="c")  # copy-on-write: never changes the file
        return _split_arrays(torch.from_numpy(images), self.splits, meta["counts"], meta["labels"], mapped=True)


def cache_dir() -> str:
    """Where folders too big for memory keep their decoded images: ``NORTON_CACHE_DIR``, else
    ``~/.cache/norton`` (``XDG_CACHE_HOME`` when set)."""
    given = os.environ.get("NORTON_CACHE_DIR")
    if given:
        return os.path.abspath(os.path.expanduser(given))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "norton")


def memory_budget() -> int:
    """Bytes of decoded images a folder may take in memory: ``NORTON_FOLDER_MEMORY_GB``, else half of the
    machine's physical memory."""
    given = os.environ.get("NORTON_FOLDER_MEMORY_GB")
    if given:
        try:
            value = float(given)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise NortonError(f"NORTON_FOLDER_MEMORY_GB must be a positive number of GiB, got {given!r}")
        return int(value * 2**30)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def _stratified(items: list[tuple[str, int]], seed: int) -> dict[str, list[tuple[str, int]]]:
    """Per class, a fixed shuffle: the first ``TEST_FRACTION`` to test, the next ``VAL_FRACTION`` to val, the
    rest to train; each split in the listing's order."""
    generator = torch.Generator().manual_seed(seed + 31337)
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    parts = {"train": [], "val": [], "test": []}
    for label in labels.unique().tolist():
        index = (labels == label).nonzero().flatten()
        index = index[torch.randperm(len(index), generator=generator)]
        n_test, n_val = round(TEST_FRACTION * len(index)), round(VAL_FRACTION * len(index))
        parts["test"].append(index[:n_test])
        parts["val"].append(index[n_test:n_test + n_val])
        parts["train"].append(index[n_test + n_val:])
    return {split: [items[i] for i in torch.cat(ix).sort().values.tolist()] for split, ix in parts.items()}


def _channel_stats(images: torch.Tensor, chunk: int = 1024) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (sample) std of uint8 images in [0, 1], summed in float64 a chunk at a time
    (a float copy of a large split would take four times its memory)."""
    channels = images.shape[1]
    total, squares, n = torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64), 0
    for begin in range(0, images.shape[0], chunk):
        x = images[begin:begin + chunk].to(torch.float64).div_(255).transpose(0, 1).flatten(1)
        total += x.sum(1)
        squares += (x * x).sum(1)
        n += x.shape[1]
    mean = total / n
    var = (squares - n * mean * mean) / max(n - 1, 1)
    return tuple(mean.tolist()), tuple(var.clamp_min(0).sqrt().clamp_min(1e-3).tolist())


def folder_splits(root: str | None, *, input_size: int | None = None, on_bad_image: str = "error", augment: bool = True):
    """(train, validation or None, test) ``ArrayDataset``s of an image folder (see the module text)."""
    if not root:
        raise NortonError("folder needs --data-dir (a folder of class folders, or of train/ and test/ holding them)")
    if on_bad_image not in BAD_IMAGE_CHOICES:
        raise NortonError(f"on_bad_image must be {' or '.join(BAD_IMAGE_CHOICES)}, got {on_bad_image!r}")
    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1):
        raise NortonError(f"input size must be a positive number of pixels, got {input_size!r}")
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise NortonError(f"image folder {root!r} does not exist")
    classes, arrays, size = _decoded(root, input_size, on_bad_image, os.stat(root).st_mtime)
    train_store, train_rows, _ = arrays["train"]
    for split in ("train", "val", "test"):
        if split in arrays:
            missing = sorted(set(range(len(classes))) - set(arrays[split][2].tolist()))
            if missing:
                raise NortonError(f"image folder {root!r}: the {split} split has no image of class "
                                  f"{classes[missing[0]]!r} (too few images in that class for a "
                                  f"{TEST_FRACTION:.0%} test / {VAL_FRACTION:.0%} validation split?)")
    mean, std = _channel_stats(train_store if train_rows is None else train_store[train_rows[0]:train_rows[-1] + 1])
    padding = max(1, size // 8) if augment else 0
    source = {"kind": "folder", "root": root, "image_size": size, "on_bad_image": on_bad_image, "augment": augment,
              "classes": list(classes), "mean": list(mean), "std": list(std)}

    def dataset(split: str, train: bool):
        store, rows, labels = arrays[split]
        return ArrayDataset(store, labels, mean, std, crop_padding=padding if train else 0,
                            flip=augment and train and store.shape[1] == 3, classes=tuple(classes), source=source,
                            mapped=rows is not None, rows=rows)

    return dataset("train", True), (dataset("val", False) if "val" in arrays else None), dataset("test", False)


def read_images(paths: list[str], source: dict) -> torch.Tensor:
    """New images as a model trained on a folder saw its test images: decoded,
    in its number of channels, resized and centre-cropped to its size and
    normalised with its training split's mean and std — all from ``source``
    (the ``data_source`` a checkpoint records).  An unreadable file or a
    missing one is a clear error naming it."""
    if not paths:
        raise NortonError("give at least one image file")
    if source.get("kind") != "folder":
        raise NortonError("this checkpoint was not trained on an image folder (--data folder): it records no image "
                          "size, normalisation or class names to read a new image with")
    gray = len(source["mean"]) == 1
    pixels = []
    for path in paths:
        if not os.path.isfile(path):
            raise NortonError(f"image {path!r} does not exist or is not a file")
        image = _decode(path, "error")
        pixels.append(_square(image.convert("L" if gray else "RGB"), source["image_size"]))
    images = torch.from_numpy(np.stack(pixels))
    images = images.unsqueeze(1) if gray else images.permute(0, 3, 1, 2)
    return normalize(images, source["mean"], source["std"])

