import gzip
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import write_cifar10, write_fashion_mnist, write_idx, write_image_folder
from hypothesis import given, settings
from hypothesis import strategies as st

from norton import NortonError
from norton.training.data import (
    FASHION_MNIST_DIR,
    augment,
    epoch_batches,
    held_out,
    joined,
    limit,
    load_dataset,
    split_validation,
)


def test_cifar10_reads_the_standard_batches(tmp_path):
    folder = write_cifar10(tmp_path)
    train = load_dataset("cifar10", str(tmp_path), "train")
    test = load_dataset("cifar10", str(folder), "test")  # the batches folder itself works too
    assert train.images.shape == (100, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (20, 3, 32, 32)
    with open(os.path.join(folder, "test_batch"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert torch.equal(test.images[3], torch.from_numpy(raw[b"data"][3].reshape(3, 32, 32)))
    assert test.labels.tolist() == raw[b"labels"]
    assert train.crop_padding == 4 and train.flip and not test.flip
    x, _ = next(epoch_batches(test, 8, seed=0, epoch=0, shuffle=False))
    expected = (test.images[:8].float() / 255 - torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)) / torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected)


def test_cifar10_refuses_pickled_code(tmp_path):
    folder = write_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(os.path.join(folder, "data_batch_3"), "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(NortonError, match="posix.system is not allowed|os.system is not allowed|is not allowed"):
        load_dataset("cifar10", str(tmp_path), "train")


@pytest.mark.parametrize("damage,match", [
    (lambda p: open(p, "wb").write(open(p, "rb").read()[:100]) if False else p.write_bytes(p.read_bytes()[:100]), "corrupt, truncated"),
    (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, protocol=2)), "shape \\(n, 3072\\)"),
    (lambda p: p.unlink(), "data_batch_2' is missing"),
])
def test_cifar10_damaged(tmp_path, damage, match):
    folder = write_cifar10(tmp_path)
    damage(tmp_path / "cifar-10-batches-py" / "data_batch_2")
    with pytest.raises(NortonError, match=match):
        load_dataset("cifar10", str(folder), "train")


def test_cifar10_missing_directory(tmp_path):
    with pytest.raises(NortonError, match="no CIFAR-10 data in .*expected cifar-10-batches-py/"):
        load_dataset("cifar10", str(tmp_path), "train")


def test_fashion_mnist_idx(tmp_path):
    write_fashion_mnist(tmp_path, n_train=50, n_test=20)
    train = load_dataset("fashion-mnist", str(tmp_path), "train")
    test = load_dataset("fashion-mnist", str(tmp_path), "test")
    assert train.images.shape == (50, 1, 28, 28) and test.images.shape == (20, 1, 28, 28)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read()[16:], dtype=np.uint8).reshape(20, 28, 28)
    assert torch.equal(test.images[:, 0], torch.from_numpy(raw.copy()))


@pytest.mark.parametrize("damage,match", [
    (lambda p: write_idx(p, np.zeros((3, 28, 28)), 2049), "magic number 2049, expected 2051"),
    (lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-10])), "truncated"),
    (lambda p: p.write_bytes(b""), "empty or truncated|not a readable gzip"),
    (lambda p: p.write_bytes(b"plain bytes, not gzip"), "not a readable gzip IDX file"),
    (lambda p: p.unlink(), "missing file"),
])
def test_fashion_mnist_damaged(tmp_path, damage, match):
    write_fashion_mnist(tmp_path)
    damage(tmp_path / "train-images-idx3-ubyte.gz")
    with pytest.raises(NortonError, match=match):
        load_dataset("fashion-mnist", str(tmp_path), "train")


def test_fashion_mnist_missing_directory(tmp_path):
    with pytest.raises(NortonError, match="does not exist: expected train-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist", str(tmp_path / "nope"), "train")


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    train = load_dataset("fashion-mnist", None, "train")
    test = load_dataset("fashion-mnist", None, "test")
    assert len(train) == 60000 and len(test) == 10000
    assert torch.bincount(test.labels).tolist() == [1000] * 10


def test_digits():
    train, test = load_dataset("digits", None, "train"), load_dataset("digits", None, "test")
    assert len(train) + len(test) == 1797 and train.images.shape[1:] == (1, 16, 16)
    assert set(train.labels.tolist()) == set(range(10))


def test_a_grayscale_batch_comes_in_the_standard_layout_and_a_convolution_keeps_it():
    """A gathered or cropped one-channel batch could carry channels-last strides (a size-1 dimension's stride
    is free); convolution then ran the whole network channels-last, where batch norm is slow on a CPU."""
    train = load_dataset("digits", None, "train")
    assert train.crop_padding  # the cropped path as well as the gathered one
    for data in (train, train.without_augmentation()):
        images, _ = next(iter(epoch_batches(data, 64, seed=0, epoch=0, shuffle=True)))
        assert images.stride() == (256, 256, 16, 1)
        features = torch.nn.Conv2d(1, 4, 3, padding=1)(images)
        assert features.stride() == (4 * 256, 256, 16, 1)


def test_image_folder(tmp_path):
    write_image_folder(tmp_path)
    train = load_dataset("imagenet", str(tmp_path), "train")
    val = load_dataset("imagenet", str(tmp_path), "test")
    assert train.classes == ["cat", "dog"] and len(val) == 6
    image, label = val[0]
    assert image.shape == (3, 224, 224) and label == 0
    batches = list(epoch_batches(train, 4, seed=0, epoch=0, shuffle=True, workers=0))
    assert [b[0].shape[0] for b in batches] == [4, 2]


def test_image_folder_missing(tmp_path):
    with pytest.raises(NortonError, match="expected .*train/<class>"):
        load_dataset("imagenet", str(tmp_path), "train")


def test_unknown_dataset():
    with pytest.raises(NortonError, match="unknown dataset 'mnist'; available: cifar10, fashion-mnist, digits, imagenet"):
        load_dataset("mnist", None, "train")


def test_epochs_are_reproducible_and_distinct():
    data = load_dataset("digits", None, "train")
    first = [y for _, y in epoch_batches(data, 64, seed=1, epoch=3, shuffle=True)]
    again = [y for _, y in epoch_batches(data, 64, seed=1, epoch=3, shuffle=True)]
    other = [y for _, y in epoch_batches(data, 64, seed=1, epoch=4, shuffle=True)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_ranks_split_every_global_batch():
    data = load_dataset("digits", None, "train")
    whole = list(epoch_batches(data, 32, seed=0, epoch=0, shuffle=True))
    parts = [list(epoch_batches(data, 32, seed=0, epoch=0, shuffle=True, rank=r, world_size=2)) for r in (0, 1)]
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts):
        assert torch.equal(torch.sort(torch.cat([y0, y1])).values, torch.sort(y).values)
        assert x0.shape[0] + x1.shape[0] == x.shape[0]


def test_validation_split_is_held_out():
    data = load_dataset("digits", None, "train")
    train, val = split_validation(data, 100)
    assert len(train) == len(data) - 100 and len(val) == 100 and not val.flip and val.crop_padding == 0
    seen = {tuple(img.flatten().tolist()) for img in train.images}
    assert sum(tuple(img.flatten().tolist()) in seen for img in val.images) < 5  # digits has a few duplicates
    assert len(limit(data, 10)) == 10


def test_held_out_images_are_the_ones_limit_leaves_out():
    """More validation data with the same training split (the comparison's
    ``extra_val_images``): the next images of limit's shuffle, disjoint from the
    limited set, without augmentation; too many is a clear error."""
    data = load_dataset("digits", None, "train")
    data.crop_padding, data.flip = 2, True
    first = limit(data, 300)
    extra = held_out(data, 300, 200)
    assert len(extra) == 200 and not extra.flip and extra.crop_padding == 0
    both = limit(data, 500)  # the same shuffle, longer: the limited set, then the held-out images
    assert torch.equal(torch.cat([first.images, extra.images]), both.images)
    assert torch.equal(torch.cat([first.labels, extra.labels]), both.labels)
    train, val = split_validation(first, 100)
    bigger = joined(val, extra)
    assert len(bigger) == 300 and torch.equal(bigger.images[100:], extra.images) and not bigger.flip
    with pytest.raises(NortonError, match=f"at least {len(data) + 1} images"):
        held_out(data, len(data) - 5, 6)


@settings(max_examples=20, derandomize=True, deadline=None)
@given(padding=st.integers(0, 4), flip=st.booleans(), n=st.integers(1, 6), size=st.integers(4, 12))
def test_augment_keeps_shape_and_pixels(padding, flip, n, size):
    images = torch.randint(1, 256, (n, 2, size, size), dtype=torch.uint8)
    out = augment(images, padding, flip, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    if padding == 0 and not flip:
        assert torch.equal(out, images)
    # every output pixel is either padding (0) or some pixel of the same image
    for i in range(n):
        assert set(out[i].unique().tolist()) <= set(images[i].unique().tolist()) | {0}
