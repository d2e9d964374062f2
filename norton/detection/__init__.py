"""Faster / Mask / Keypoint R-CNN on a NORTON ResNet-50: builders (registered in
the model registry), COCO-format data and evaluation, training, drawing."""
from norton.detection.builders import (
           DETECTORS,
           Detector,
           detector_complexity,
           freeze_batchnorm,
           is_detector,
)
from norton.detection.coco import CocoData, coco_stats, stats_table
from norton.detection.serving import backbone_batch, deploy_detector, load_deployed, save_deployed
from norton.detection.drawing import draw_detections
from norton.detection.engine import DetectTrainConfig, evaluate_detector, train_detector

__all__ = ["DETECTORS", "CocoData", "DetectTrainConfig", "Detector", "backbone_batch", "coco_stats", "deploy_detector",
           "detector_complexity", "draw_detections", "evaluate_detector", "freeze_batchnorm", "is_detector", "load_deployed",
           "save_deployed", "stats_table", "train_detector"]
