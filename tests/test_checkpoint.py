import hashlib
import os

import pytest
import torch
import torchvision

from norton import NortonError, create_model, decompose
from norton.checkpoints import atomic_save, load_checkpoint, load_model, save_checkpoint
from norton.compression import prune

X = torch.randn(2, 3, 32, 32)


def same_function(a, b, x):
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


def test_roundtrip_of_a_pruned_decomposed_zoo_model(tmp_path):
    model = create_model("resnet_20", rank=2)
    prune(model, amount=0.4, example_inputs=X)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, metrics={"top1": 91.5}, train_state={"epoch": 3})
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    rebuilt, ckpt = load_model(path)
    same_function(model, rebuilt, X)
    assert ckpt["metrics"] == {"top1": 91.5} and ckpt["train_state"] == {"epoch": 3}
    assert ckpt["architecture"]["base"]["arch"] == "resnet_20"


def test_roundtrip_of_a_torchvision_model(tmp_path):
    model = create_model("torchvision/resnet18", num_classes=5)
    decompose(model, 2, n_iter_max=3, progress=False)
    x = torch.randn(1, 3, 64, 64)
    prune(model, amount=0.5, example_inputs=x)
    save_checkpoint(tmp_path / "tv.pt", model)
    rebuilt, _ = load_model(tmp_path / "tv.pt")
    same_function(model, rebuilt, x)


def test_model_outside_the_zoo_needs_its_base(tmp_path):
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    x = torch.randn(1, 3, 64, 64)
    prune(model, amount=0.5, example_inputs=x, criterion="l2")
    save_checkpoint(tmp_path / "plain.pt", model, input_size=[3, 64, 64])
    with pytest.raises(NortonError, match="not from the norton zoo; pass the original"):
        load_model(tmp_path / "plain.pt")
    rebuilt, _ = load_model(tmp_path / "plain.pt", base_model=torchvision.models.resnet18(weights=None, num_classes=3))
    same_function(model, rebuilt, x)


def test_a_flipped_byte_is_detected(tmp_path):
    model = create_model("resnet_20")
    path = tmp_path / "m.pt"
    save_checkpoint(path, model)
    data = bytearray(path.read_bytes())
    # flip a byte inside the largest tensor's data (the file's middle is tensor data)
    middle = len(data) // 2
    data[middle] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(NortonError, match="corrupt"):
        load_checkpoint(path)


def test_truncated_file(tmp_path):
    model = create_model("resnet_20")
    path = tmp_path / "m.pt"
    save_checkpoint(path, model)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(NortonError, match="cannot be read safely"):
        load_checkpoint(path)


def test_not_a_norton_checkpoint(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"state_dict": create_model("resnet_20").state_dict()}, path)
    with pytest.raises(NortonError, match="is not a norton checkpoint"):
        load_checkpoint(path)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)  # a pickled module, not weights
    with pytest.raises(NortonError, match="cannot be read safely"):
        load_checkpoint(path)


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "m.pt"
    atomic_save({"a": torch.ones(2)}, path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(Exception):
        atomic_save({"bad": lambda: None}, path)  # cannot be pickled
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")] == []
