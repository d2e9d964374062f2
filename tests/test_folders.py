"""A user's own images: class folders (PNG and JPEG, grayscale and RGB, uneven classes, a corrupt file)
through the commands, with splits, sizes and normalisation that follow the data."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from norton import NortonError
from norton.cli import main
from norton.training import folder_splits, load_dataset

COUNTS = {"cat": 40, "dog": 25, "bird": 15}  # uneven classes


def make_folder(root, *, rgb: bool, split_layout: bool, corrupt: bool = True, counts=COUNTS):
    rng = np.random.default_rng(0)
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            split = ("test" if i % 5 == 0 else "train") if split_layout else None
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            width, height = 20 + i % 7, 18 + i % 5
            pixels = np.clip(c * 80 + rng.integers(0, 60, (height, width, 3 if rgb else 1)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels if rgb else pixels[..., 0], "RGB" if rgb else "L")
            image.save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    if corrupt:
        bad = (root / "train" / "cat") if split_layout else (root / "cat")
        (bad / "broken.png").write_bytes(b"\x89PNG but not an image")
    return root


def test_a_flat_folder_is_split_per_class_reproducibly(tmp_path):
    root = make_folder(tmp_path / "photos", rgb=True, split_layout=False)
    train, val, test = folder_splits(str(root), on_bad_image="skip")
    again = folder_splits(str(root), on_bad_image="skip")
    for a, b in zip((train, val, test), again):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert train.classes == ("bird", "cat", "dog") and train.num_classes == 3
    sizes = {split: torch.bincount(d.labels, minlength=3).tolist() for split, d in
             (("train", train), ("val", val), ("test", test))}
    # per class: 20 % test, 10 % validation, the rest train (cat lost its corrupt file: 40 readable)
    assert sizes["test"] == [3, 8, 5] and sizes["val"] == [2, 4, 2] and sizes["train"] == [10, 28, 18]
    assert train.images.shape[1:] == (3, 20, 20)  # RGB; the median shorter side of the images
    assert train.flip and train.crop_padding == 2 and not test.flip and test.crop_padding == 0
    expected = train.images.float().div(255).transpose(0, 1).flatten(1)
    assert train.mean == pytest.approx(expected.mean(1).tolist()) and train.std == pytest.approx(expected.std(1).tolist())
    assert test.mean == train.mean and val.std == train.std  # every split normalised as the training split


def test_a_split_folder_keeps_its_splits_and_grayscale_stays_one_channel(tmp_path):
    root = make_folder(tmp_path / "scans", rgb=False, split_layout=True)
    train, val, test = folder_splits(str(root), input_size=12, on_bad_image="skip", augment=False)
    assert val is None and len(test) == 16 and len(train) == 64
    assert train.images.shape[1:] == (1, 12, 12) and not train.flip and train.crop_padding == 0
    assert torch.equal(load_dataset("folder", str(root), "test", input_size=12, on_bad_image="skip").labels, test.labels)


@pytest.mark.parametrize("build, message", [
    (lambda root: root.mkdir(), r"has 0 class folder\(s\)"),
    (lambda root: make_folder(root, rgb=True, split_layout=False, corrupt=False, counts={"only": 5}), r"has 1 class folder\(s\)"),
    (lambda root: (make_folder(root, rgb=True, split_layout=False, corrupt=False), (root / "empty").mkdir()),
     "class folder '.*empty' holds no images"),
    (lambda root: make_folder(root, rgb=True, split_layout=False, corrupt=False, counts={"a": 9, "b": 2}),
     "the val split has no image of class 'b'"),
    (lambda root: None, "does not exist"),
])
def test_bad_folders_are_one_clear_line_and_nothing_is_written(tmp_path, capsys, build, message):
    import re

    root = tmp_path / "data"
    build(root)
    with pytest.raises(NortonError, match=message):
        folder_splits(str(root))
    run_dir = tmp_path / "run"
    assert main(["train", "--arch", "resnet_20", "--data", "folder", "--data-dir", str(root), "--epochs", "1",
                 "--run-dir", str(run_dir), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]) and not run_dir.exists()


def test_a_corrupt_image_is_named_or_skipped(tmp_path, capsys):
    root = make_folder(tmp_path / "photos", rgb=True, split_layout=False)
    run_dir = tmp_path / "run"
    args = ["train", "--arch", "resnet_20", "--data", "folder", "--data-dir", str(root), "--epochs", "1",
            "--batch-size", "32", "--run-dir", str(run_dir), "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "--on-bad-image skip" in err and not run_dir.exists()
    assert main(args + ["--on-bad-image", "skip"]) == 0
    assert "broken.png" in capsys.readouterr().err  # said, and left out


@pytest.mark.slow
def test_a_folder_through_train_evaluate_plan_and_compress(tmp_path, capsys):
    """train reads the folder with its flags; every later command given the checkpoint reads it the same way
    without them (the checkpoint records how the folder was read)."""
    from norton.checkpoints import load_checkpoint

    root = make_folder(tmp_path / "scans", rgb=False, split_layout=True)
    data = ["--data", "folder", "--data-dir", str(root)]
    assert main(["train", "--arch", "resnet_20", *data, "--on-bad-image", "skip", "--image-size", "16", "--epochs", "1",
                 "--batch-size", "32", "--run-dir", str(tmp_path / "base"), "--device", "cpu"]) == 0
    ckpt = str(tmp_path / "base" / "model.pt")
    source = load_checkpoint(ckpt)["extra"]["data_source"]
    assert source["image_size"] == 16 and source["on_bad_image"] == "skip" and source["classes"] == ["bird", "cat", "dog"]
    capsys.readouterr()
    assert main(["evaluate", "--ckpt", ckpt, *data, "--json"]) == 0  # no flags: the corrupt file is skipped again
    assert json.loads(capsys.readouterr().out)["images"] == 16
    assert main(["plan", "--ckpt", ckpt, *data, "--target-macs", "0.5", "--calibration-images", "16",
                 "--ranks", "1,2", "--keep-steps", "2", "--out", str(tmp_path / "plan.json")]) == 0
    assert main(["compress", "--ckpt", ckpt, *data, "--plan", str(tmp_path / "plan.json"), "--epochs", "1",
                 "--batch-size", "32", "--run-dir", str(tmp_path / "c"), "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    # MACs counted at the data's size: 16×16 grayscale, not the zoo's 32×32
    assert summary["baseline"]["macs"] == pytest.approx(10_064_064, rel=0.01)
    assert load_checkpoint(tmp_path / "c" / "final.pt")["extra"]["data_source"] == source
    capsys.readouterr()
    assert main(["evaluate", "--ckpt", ckpt, *data, "--on-bad-image", "error"]) == 2  # a flag given wins
    assert "broken.png" in capsys.readouterr().err


def test_every_command_counts_macs_at_the_size_of_the_data(tmp_path, capsys):
    """A ResNet-20 trained on digits (16×16): its checkpoint records that size, and prune counts MACs there
    (as compress does), not at the zoo's 32×32."""
    from norton.checkpoints import load_model

    assert main(["train", "--arch", "resnet_20", "--data", "digits", "--subset", "300", "--epochs", "1",
                 "--run-dir", str(tmp_path / "base"), "--device", "cpu"]) == 0
    model, _ = load_model(tmp_path / "base" / "model.pt")
    assert tuple(model.default_input_size) == (1, 16, 16)
    capsys.readouterr()
    assert main(["prune", "--ckpt", str(tmp_path / "base" / "model.pt"), "--target-macs", "0.6", "--criterion", "l2",
                 "--out", str(tmp_path / "pruned.pt"), "--device", "cpu"]) == 0
    assert "MACs 10,064,512 ->" in capsys.readouterr().out


def test_compare_runs_on_an_image_folder_and_resumes_only_as_it_was_read(tmp_path, capsys):
    from norton.evidence.compare import CompareBudget, run_compare
    from norton.training import TrainConfig

    root = make_folder(tmp_path / "photos", rgb=True, split_layout=False)
    budget = CompareBudget(train_images=None, val_images=12, test_images=None,
                           baseline=TrainConfig(epochs=1, batch_size=32, lr=0.05, warmup_epochs=0),
                           finetune=TrainConfig(epochs=1, batch_size=32, lr=0.01, warmup_epochs=0),
                           seeds=(0,), targets=(0.6,), recalibration_images=16, calibration_images=16,
                           latency_batch=8, latency_repeats=2)
    read = {"input_size": 16, "on_bad_image": "skip", "augment": True}
    out = str(tmp_path / "c")
    summary = run_compare(out, budget=budget, methods=["l1"], data="folder", data_dir=str(root), folder_options=read,
                          progress=False)
    train, val, test = folder_splits(str(root), **read)
    assert summary["setup"].startswith(f"image folder {root}: {len(train) + len(val) - 12} training + 12 validation")
    assert f"{len(test)} test images" in summary["setup"] and "(3×16×16)" in summary["setup"]
    assert summary["budget_settings"]["val_images"] == 12
    with pytest.raises(NortonError, match="holds a comparison run with folder="):
        run_compare(out, budget=budget, methods=["l1"], data="folder", data_dir=str(root), resume=True,
                    folder_options={**read, "input_size": 20}, progress=False)
    # the report takes the comparison's folder, read as the comparison read it, and the same splits
    from norton.evidence import ReportPlan, run_report

    plan = ReportPlan(ranks=(1, 2), grid=(2, 3), gradcam_images=2, gradcam_ranks=(1,))
    report = run_report(str(tmp_path / "r"), compare_dir=out, budget=budget, plan=plan, progress=False)
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.startswith(f"# NORTON analyses on the image folder {root} (ResNet-20)")
    assert report["budget"]["train_images"] == len(train) + len(val) - 12 and report["budget"]["val_images"] == 12
    assert report["baseline"]["top1"] == summary["baseline"]["top1"]  # the same test images, the same model
    assert report["baseline"]["macs"] == summary["baseline"]["macs"]  # counted at the folder's 3×16×16
    with Image.open(tmp_path / "r" / "gradcam.png") as image:
        assert image.size[0] > 400
    (tmp_path / "empty").mkdir()
    assert main(["compare", "--data", "folder", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "empty" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "e").exists()


def test_predict_reads_new_images_as_the_checkpoint_saw_its_folder(tmp_path, capsys):
    root = make_folder(tmp_path / "scans", rgb=False, split_layout=True, corrupt=False)
    assert main(["train", "--arch", "resnet_20", "--data", "folder", "--data-dir", str(root), "--image-size", "16",
                 "--epochs", "1", "--batch-size", "32", "--run-dir", str(tmp_path / "base"), "--device", "cpu"]) == 0
    ckpt = str(tmp_path / "base" / "model.pt")
    # a new image of another size and in colour: read in the checkpoint's size, channels and normalisation
    new = tmp_path / "new.jpg"
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8), "RGB").save(new)
    files = [str(root / "test" / "dog" / "0.jpg"), str(new)]
    capsys.readouterr()
    assert main(["predict", "--ckpt", ckpt, *files, "--top", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in rows] == files
    for r in rows:
        assert len(r["predictions"]) == 2 and {p["class"] for p in r["predictions"]} <= {"bird", "cat", "dog"}
        assert r["predictions"][0]["probability"] >= r["predictions"][1]["probability"]
    # the same as the model's output on the test split's tensor of that image
    from norton.checkpoints import load_checkpoint, model_from_checkpoint
    from norton.training import read_images
    from norton.training.data import normalize

    checkpoint = load_checkpoint(ckpt)
    model = model_from_checkpoint(checkpoint, ckpt).eval()
    _, _, test = folder_splits(str(root), input_size=16)
    dog = test.classes.index("dog")
    first_dog = test.images[test.labels == dog][0:1]  # the test split keeps the listing's order: 0.jpg first
    x = read_images(files[:1], checkpoint["extra"]["data_source"])
    torch.testing.assert_close(x, normalize(first_dog, test.mean, test.std))
    with torch.no_grad():
        best = model(x).softmax(1)[0].max().item()
    assert rows[0]["predictions"][0]["probability"] == pytest.approx(best, abs=1e-6)
    assert main(["predict", "--ckpt", ckpt, str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert main(["predict", "--ckpt", ckpt, str(broken)]) == 2
    assert "broken.png" in capsys.readouterr().err
    torch.manual_seed(0)
    from norton import create_model
    from norton.checkpoints import save_checkpoint
    save_checkpoint(str(tmp_path / "zoo.pt"), create_model("resnet_20", num_classes=10))
    assert main(["predict", "--ckpt", str(tmp_path / "zoo.pt"), str(new)]) == 2
    assert "not trained on an image folder" in capsys.readouterr().err


def test_a_truncated_image_whose_header_reads_is_named_or_skipped(tmp_path):
    root = make_folder(tmp_path / "photos", rgb=True, split_layout=False, corrupt=False)
    whole = (root / "dog" / "2.jpg").read_bytes()
    (root / "dog" / "truncated.jpg").write_bytes(whole[: len(whole) // 3])  # the header is whole, the pixels not
    with pytest.raises(NortonError, match=r"cannot read image .*truncated\.jpg.*--on-bad-image skip"):
        folder_splits(str(root))
    with pytest.warns(UserWarning, match="truncated.jpg"):
        train, val, test = folder_splits(str(root), on_bad_image="skip")
    assert len(train) + len(val) + len(test) == sum(COUNTS.values())


def test_a_folder_too_big_for_memory_is_decoded_once_into_a_cache_file(tmp_path, monkeypatch, capsys):
    from norton.training import folders

    root = make_folder(tmp_path / "photos", rgb=True, split_layout=False, corrupt=False)
    in_memory = folder_splits(str(root), input_size=32)
    monkeypatch.setenv("NORTON_FOLDER_MEMORY_GB", str(50_000 / 2**30))  # 80 images × 3×32×32 = 245,760 bytes
    monkeypatch.setenv("NORTON_CACHE_DIR", str(tmp_path / "cache"))
    folders._decoded.cache_clear()
    cached = folder_splits(str(root), input_size=32)
    for a, b in zip(in_memory, cached):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert a.mean == pytest.approx(b.mean) and a.std == pytest.approx(b.std)
    # splits of the file pooled and split again (as compare does) stay rows of it, never copied
    from norton.training import epoch_batches, joined, split_validation
    from norton.training.arrays import normalize

    pooled = joined(cached[0], cached[1])
    assert pooled.mapped and pooled.store is cached[0].store is cached[2].store and not in_memory[0].mapped
    assert torch.equal(pooled.images, torch.cat([in_memory[0].images, in_memory[1].images]))
    kept, held = split_validation(pooled, 7)
    assert kept.store is held.store is pooled.store and len(kept) + len(held) == len(pooled)
    images, labels = next(epoch_batches(held, 7, seed=0, epoch=0, shuffle=False))
    assert torch.equal(images, normalize(held.images, held.mean, held.std)) and torch.equal(labels, held.labels)
    written = sorted(os.listdir(tmp_path / "cache"))
    assert len(written) == 2 and written[0].endswith(".json") and written[1].endswith(".npy")  # no .partial left
    assert isinstance(np.load(tmp_path / "cache" / written[1], mmap_mode="r"), np.memmap)

    # a later process reuses the file: nothing is decoded again, the images are the same
    folders._decoded.cache_clear()
    decode = folders._decode
    monkeypatch.setattr(folders, "_decode", lambda *args: pytest.fail("decoded again"))
    again = folder_splits(str(root), input_size=32)
    assert all(torch.equal(a.images, b.images) for a, b in zip(cached, again))
    assert main(["train", "--arch", "resnet_20", "--data", "folder", "--data-dir", str(root), "--image-size", "32",
                 "--epochs", "1", "--batch-size", "32", "--run-dir", str(tmp_path / "run"), "--device", "cpu"]) == 0
    assert len(os.listdir(tmp_path / "cache")) == 2
    os.utime(root / "dog" / "3.png", ns=(1, 1))  # a file changed: decoded anew, into a file of its own
    folders._decoded.cache_clear()
    monkeypatch.setattr(folders, "_decode", decode)
    assert all(torch.equal(a.images, b.images) for a, b in zip(cached, folder_splits(str(root), input_size=32)))
    assert len(os.listdir(tmp_path / "cache")) == 4

    # another input size is another file; no room on the disk is one line naming the sizes, nothing decoded
    import shutil
    from collections import namedtuple

    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("usage", "total used free")(10**9, 10**9, 1000))
    folders._decoded.cache_clear()
    with pytest.raises(NortonError, match=r"80 images of 24×24 take 0\.0 GiB decoded.*free in .*NORTON_CACHE_DIR"):
        folder_splits(str(root), input_size=24)
    assert len(os.listdir(tmp_path / "cache")) == 4
    monkeypatch.setenv("NORTON_FOLDER_MEMORY_GB", "lots")
    with pytest.raises(NortonError, match="NORTON_FOLDER_MEMORY_GB must be a positive number of GiB, got 'lots'"):
        folders.memory_budget()
