"""Image-, pixel-, sample-, saliency- and anomaly-level metrics in plain numpy (no torch, no Ray, no scikit-learn).

Workers call :func:`image_stats` per image; the driver calls :func:`summarize` on the collected dicts.
"""

from components.metrics.aggregate import image_stats, summarize
from components.metrics.anomaly import aupro, choose_threshold, pixel_entry, pro_curve
from components.metrics.image import auc_from_histograms, average_precision, f1_max_threshold, pixel_roc_auc, roc_auc
from components.metrics.saliency import (
    as_prob_map,
    e_measure,
    e_measure_curve,
    e_measure_from_counts,
    f_max,
    iou,
    mae,
    mean_pr_curve,
    pr_curve_counts,
    s_measure,
    weighted_fmeasure,
)
from components.metrics.sample import (
    confusion,
    iou_from_counts,
    pooled_iou,
    sample_miou,
    seg_accuracy,
    seg_recall,
)

__all__ = [
    "as_prob_map",
    "auc_from_histograms",
    "aupro",
    "average_precision",
    "choose_threshold",
    "confusion",
    "e_measure",
    "e_measure_curve",
    "e_measure_from_counts",
    "f1_max_threshold",
    "f_max",
    "image_stats",
    "iou",
    "iou_from_counts",
    "mae",
    "mean_pr_curve",
    "pixel_entry",
    "pixel_roc_auc",
    "pooled_iou",
    "pr_curve_counts",
    "pro_curve",
    "roc_auc",
    "s_measure",
    "sample_miou",
    "seg_accuracy",
    "seg_recall",
    "summarize",
    "weighted_fmeasure",
]
