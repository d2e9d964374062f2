"""Detection on COCO-format data through the CLI: training, COCOeval, drawing."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import KEYPOINT_NAMES, write_coco

from norton.cli import main
from norton.detection import CocoData, DetectTrainConfig, coco_stats, train_detector
from norton.detection.coco import aspect_ratio_groups, grouped_batches, hflip, to_coco
from norton.errors import NortonError

ARCHS = {"bbox": "fasterrcnn_resnet50_fpn", "segm": "maskrcnn_resnet50_fpn", "keypoints": "keypointrcnn_resnet50_fpn"}
# small and fast: a heavily compressed body, small images, few proposals
FAST = ["-r", "1", "-cpr", "[0.]+[0.1]*2+[0.4]*5+[0.75]*12", "--min-size", "96", "--max-size", "128",
        "--warmup-iters", "2", "--device", "cpu",
        "--detector-option", "rpn_pre_nms_top_n_train=200", "--detector-option", "rpn_post_nms_top_n_train=100",
        "--detector-option", "rpn_pre_nms_top_n_test=200", "--detector-option", "rpn_post_nms_top_n_test=50",
        "--detector-option", "box_batch_size_per_image=64", "--detector-option", "box_detections_per_img=10"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short detect-train run per task (cached for the module)."""
    runs = {}

    def get(task):
        if task not in runs:
            root = tmp_path_factory.mktemp(f"coco_{task}")
            images, ann = write_coco(root, task, n_images=3)
            run_dir = str(root / "run")
            rc = main(["detect-train", "--arch", ARCHS[task], *FAST, "--train-images", images, "--train-ann", ann,
                       "--val-images", images, "--val-ann", ann, "--epochs", "1", "--batch-size", "2",
                       "--run-dir", run_dir])
            assert rc == 0
            runs[task] = (images, ann, run_dir)
        return runs[task]

    return get


@pytest.mark.parametrize("task", ["bbox", "segm", "keypoints"])
def test_detect_train_then_eval_through_the_cli(trained, task, capsys):
    images, ann, run_dir = trained(task)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["iteration"] for r in rows] == [1, 2]  # 3 images, batch 2: two aspect-ratio-grouped batches
    head = {"bbox": "loss_box_reg", "segm": "loss_mask", "keypoints": "loss_keypoint"}[task]
    assert all(np.isfinite(r[head]) for r in rows)
    with open(os.path.join(run_dir, "eval.json")) as f:
        stats = json.load(f)
    assert set(stats) == ({"bbox"} | {task})
    for values in stats.values():
        assert all(0.0 <= v <= 1.0 for k, v in values.items() if k != "detections")
    capsys.readouterr()
    assert main(["detect-eval", "--ckpt", os.path.join(run_dir, "final.pt"), "--val-images", images,
                 "--val-ann", ann, "--device", "cpu", "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again == stats  # the saved checkpoint evaluates exactly as the model did in training
    assert main(["detect-eval", "--ckpt", os.path.join(run_dir, "final.pt"), "--val-images", images,
                 "--val-ann", ann, "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "| box |" in table and "AP50" in table and "AR100" in table
    if task == "segm":
        assert "| mask |" in table
    if task == "keypoints":
        assert "| keypoints" in table


@pytest.mark.parametrize("task", ["bbox", "segm", "keypoints"])
def test_ground_truth_as_predictions_scores_ap_1(tmp_path, task):
    """The conversion to COCO results (labels back to category ids, xywh boxes,
    RLE masks, keypoints) is checked end to end against COCOeval."""
    images, ann = write_coco(tmp_path, task, n_images=3)
    data = CocoData(images, ann, task, train=False)
    results = []
    for i in range(len(data)):
        _, target = data[i]
        n = target["boxes"].shape[0]
        output = {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(n)}
        if task == "segm":
            output["masks"] = target["masks"][:, None].float()
        if task == "keypoints":
            output["keypoints"] = target["keypoints"]
        results += to_coco(output, data.ids[i], data)
    assert {r["category_id"] for r in results} == ({1} if task == "keypoints" else {1, 3})
    stats = coco_stats(data, results, "bbox")
    assert stats["AP"] == pytest.approx(1.0) and stats["AR100"] == pytest.approx(1.0)
    if task != "bbox":
        assert coco_stats(data, results, task)["AP"] == pytest.approx(1.0, abs=0.02)
    shifted = [dict(r, bbox=[r["bbox"][0] + 0.6 * r["bbox"][2], *r["bbox"][1:]]) for r in results]
    assert coco_stats(data, shifted, "bbox")["AP"] < 0.2  # and wrong boxes do not


def test_no_detection_scores_zero(tmp_path):
    images, ann = write_coco(tmp_path, "bbox", n_images=2)
    assert coco_stats(CocoData(images, ann, "bbox", train=False), [], "bbox")["AP"] == 0.0


def _corrupt(tmp_path, change):
    images, ann = write_coco(tmp_path, "segm", n_images=2)
    with open(ann) as f:
        data = json.load(f)
    change(data)
    with open(ann, "w") as f:
        json.dump(data, f)
    return images, ann


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("annotations"), "missing list 'annotations'"),
    (lambda d: d["annotations"][1].pop("bbox"), "annotations[1] (id 2) has no 'bbox'"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4]), "has bbox [1, 2, -3, 4]"),
    (lambda d: d["annotations"][0].update(image_id=999), "refers to image_id 999"),
    (lambda d: d["annotations"][2].update(category_id=7), "has category_id 7; categories are [1, 3]"),
    (lambda d: d["annotations"][0].pop("segmentation"), "no 'segmentation'"),
    (lambda d: d["images"][0].pop("file_name"), "images[0] needs 'id' and 'file_name'"),
])
def test_malformed_annotations_are_named(tmp_path, change, message):
    images, ann = _corrupt(tmp_path, change)
    with pytest.raises(NortonError, match="annotation file") as err:
        CocoData(images, ann, "segm", train=True)
    assert message in str(err.value) and ann in str(err.value)


def test_bad_keypoint_count_missing_image_and_bad_json(tmp_path, capsys):
    images, ann = write_coco(tmp_path / "k", "keypoints", n_images=2)
    with open(ann) as f:
        data = json.load(f)
    data["annotations"][0]["keypoints"] = data["annotations"][0]["keypoints"][:-3]
    with open(ann, "w") as f:
        json.dump(data, f)
    with pytest.raises(NortonError, match=r"12 keypoint values; expected 3 × 5"):
        CocoData(images, ann, "keypoints", train=True)

    images, ann = write_coco(tmp_path / "m", "bbox", n_images=2)
    os.remove(os.path.join(images, "000001.png"))
    rc = main(["detect-train", "--arch", "fasterrcnn_resnet50_fpn", "--train-images", images, "--train-ann", ann,
               "--no-eval", "--run-dir", str(tmp_path / "run"), "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "1 image(s)" in err and "'000001.png'" in err and images in err

    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(NortonError, match="not valid JSON"):
        CocoData(images, str(tmp_path / "broken.json"), "bbox", train=False)

    write_coco(tmp_path / "m", "bbox", n_images=2)
    rc = main(["detect-train", "--arch", "fasterrcnn_resnet50_fpn", "--train-images", images, "--train-ann", ann,
               "--no-eval", "--run-dir", str(tmp_path / "r2"), "--detector-option", "box_detection=3"])
    assert rc == 2
    assert "'box_detection' is not a keyword of torchvision's FasterRCNN" in capsys.readouterr().err


def test_hflip_swaps_left_and_right_keypoints(tmp_path):
    images, ann = write_coco(tmp_path, "keypoints", n_images=1)
    data = CocoData(images, ann, "keypoints", train=True)
    assert [KEYPOINT_NAMES[i] for i in data.flip_index] == ["nose", "right_eye", "left_eye", "right_hand", "left_hand"]
    image, target = data[0]
    width = image.shape[-1]
    flipped_image, flipped = hflip(image, target, data.flip_index)
    assert torch.equal(flipped_image, image.flip(-1))
    assert torch.allclose(flipped["boxes"][:, 0], width - target["boxes"][:, 2])
    # the flipped left eye is the mirrored right eye
    assert torch.allclose(flipped["keypoints"][0, 1, 0], width - target["keypoints"][0, 2, 0])
    back_image, back = hflip(flipped_image, flipped, data.flip_index)
    assert torch.equal(back_image, image)
    for key in ("boxes", "keypoints"):
        assert torch.allclose(back[key], target[key])


def test_grouped_batches_are_a_seeded_partition_by_aspect_ratio():
    groups = [0, 1, 1, 0, 2, 1, 0, 0, 1, 2, 2]
    batches = grouped_batches(groups, 2, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(len(groups)))
    assert all(len({groups[i] for i in b}) == 1 for b in batches)
    assert batches == grouped_batches(groups, 2, seed=3, epoch=0)
    assert batches != grouped_batches(groups, 2, seed=3, epoch=1)


def test_aspect_ratio_groups_follow_torchvision_bins(tmp_path):
    images, ann = write_coco(tmp_path, "bbox", n_images=2, size=(96, 128))
    data = CocoData(images, ann, "bbox", train=True)
    # 128/96 = 1.33 lies in the bin (2^(1/3), 2^(2/3)] of torchvision's quantisation
    assert aspect_ratio_groups(data) == [5, 5]


def test_lr_schedule_scales_the_26_epoch_steps():
    assert DetectTrainConfig().milestones() == [16, 22]
    assert DetectTrainConfig(epochs=13).milestones() == [8, 11]
    with pytest.raises(NortonError, match="checkpoint_every"):
        DetectTrainConfig(checkpoint_every=0).validate()


def test_interrupted_detection_training_resumes_exactly(tmp_path, monkeypatch):
    import norton.detection.engine as detect
    from norton.models import create_model

    images, ann = write_coco(tmp_path, "bbox", n_images=4)
    data = CocoData(images, ann, "bbox", train=True)
    options = dict(rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, box_batch_size_per_image=32,
                   min_size=64, max_size=96)

    def model():
        torch.manual_seed(0)
        return create_model("fasterrcnn_resnet50_fpn", rank=1, compress_rate="[0.]+[0.1]*2+[0.4]*5+[0.75]*12",
                            num_classes=3, **options)

    config = DetectTrainConfig(epochs=2, batch_size=2, warmup_iters=2, checkpoint_every=1)
    reference = model()
    torch.manual_seed(123)
    train_detector(reference, data, config, str(tmp_path / "a"), device=torch.device("cpu"), progress=False)

    calls = {"n": 0}
    real_batch = detect._batch

    def dying_batch(*args):
        calls["n"] += 1
        if calls["n"] == 3:  # killed during the first iteration of the second epoch
            raise KeyboardInterrupt
        return real_batch(*args)

    monkeypatch.setattr(detect, "_batch", dying_batch)
    interrupted = model()
    torch.manual_seed(123)
    with pytest.raises(KeyboardInterrupt):
        train_detector(interrupted, data, config, str(tmp_path / "b"), device=torch.device("cpu"), progress=False)
    monkeypatch.setattr(detect, "_batch", real_batch)
    resumed = model()
    torch.manual_seed(999)  # the RNG state comes from the checkpoint
    train_detector(resumed, data, config, str(tmp_path / "b"), device=torch.device("cpu"), resume=True, progress=False)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    with pytest.raises(NortonError, match="already holds a finished detection run; pass --resume"):
        train_detector(model(), data, config, str(tmp_path / "b"), device=torch.device("cpu"), progress=False)


@pytest.mark.parametrize("task", ["segm", "keypoints"])
def test_detect_draws_on_a_real_photograph(trained, task, tmp_path, capsys):
    from skimage import data as samples
    from torchvision.io import decode_image

    _, _, run_dir = trained(task)
    photo = samples.astronaut()  # a real photograph shipped with scikit-image
    from PIL import Image

    Image.fromarray(photo).save(tmp_path / "astronaut.png")
    out = tmp_path / "out" / "detections.png"
    capsys.readouterr()
    assert main(["detect", "--ckpt", os.path.join(run_dir, "final.pt"), str(tmp_path / "astronaut.png"), "-o", str(out),
                 "--score-threshold", "0", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    count = int(printed.split()[0])
    assert count > 0 and any(name in printed for name in ("square", "disk", "person"))
    drawn = decode_image(str(out)).permute(1, 2, 0).numpy()
    assert drawn.shape == photo.shape
    first = [float(v) for v in printed.splitlines()[1].split("box [")[1].rstrip("]").split(",")]
    x0, y0, x1 = int(first[0]), int(first[1]), int(first[2])
    edge = slice(x0, max(x1, x0 + 2))
    assert (drawn[min(y0, 510), edge] != photo[min(y0, 510), edge]).any()  # the box outline is drawn there
    assert main(["detect", "--ckpt", os.path.join(run_dir, "final.pt"), str(tmp_path / "missing.jpg"), "-o", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_detect_train_under_torchrun(tmp_path):
    """Two processes share every batch; evaluation gathers both halves of the
    val set, so it matches a one-process evaluation of the saved model."""
    import subprocess
    import sys

    images, ann = write_coco(tmp_path, "bbox", n_images=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    run_dir = tmp_path / "run"
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "norton", "detect-train",
                          "--arch", "fasterrcnn_resnet50_fpn", *FAST, "--train-images", images, "--train-ann", ann,
                          "--val-images", images, "--val-ann", ann, "--epochs", "1", "--batch-size", "1",
                          "--run-dir", str(run_dir)], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "global batch 2" in two.stdout
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [1, 2]  # 4 images, 2 per step across the two processes: written once
    one = subprocess.run([sys.executable, "-m", "norton", "detect-eval", "--ckpt", str(run_dir / "final.pt"),
                          "--val-images", images, "--val-ann", ann, "--device", "cpu", "--json"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert json.loads(one.stdout.strip().splitlines()[-1]) == json.load(open(run_dir / "eval.json"))
