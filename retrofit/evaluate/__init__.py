"""Downstream evaluation of dense features: LOST object discovery (CorLoc) and linear-probe segmentation (mIoU)."""

from .datasets import EvalDataset, box_dataset, mask_dataset
from .lost import best_iou, corloc, evaluate_lost, lost_box
from .probe import evaluate_probe

__all__ = [
    "EvalDataset",
    "best_iou",
    "box_dataset",
    "corloc",
    "evaluate_lost",
    "evaluate_probe",
    "lost_box",
    "mask_dataset",
]
