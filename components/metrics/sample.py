"""Sample-centric segmentation metrics (after Dong et al., "Sample-centric multi-task learning", arXiv 2510.13226).

Industrial test sets are mostly defect-free. Pixel-pooled IoU lets a few large, easy defects dominate ("pixel
dilution"), and per-image mean IoU with the empty/empty = 1 convention is inflated by every clean image predicted
clean. The paper proposes sample-level metrics (Seg_mIoU / Sample_mIoU, Seg_Recall, Seg_Accuracy) but their exact
rules are not published. The definitions below are our documented *assumption* (see the methods notes, section 2);
every choice the paper might have made differently is a parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "confusion",
    "iou_from_counts",
    "pooled_iou",
    "sample_miou",
    "seg_accuracy",
    "seg_recall",
]

# The largest IoU that (I + 1e-7) / (U + 1e-7) gives without any overlap (U >= 1). "Any overlap" is tested against
# it so that smoothed IoUs, which are never exactly 0, still count a miss as a miss; a real overlap is at least 1/U,
# above this floor for any union under 10^7 pixels.
_NO_OVERLAP_FLOOR = 1e-7 / (1.0 + 1e-7)


def confusion(pred_bin: np.ndarray, gt: np.ndarray) -> tuple[int, int, int, int]:
    """Pixel confusion counts ``(tp, fp, fn, tn)`` of a binary prediction against a mask.

    Counts, unlike ratios, can be summed across images and workers, which is what pooled metrics need. Non-bool
    inputs are binarised at 0.5.
    """
    p = np.asarray(pred_bin)
    g = np.asarray(gt)
    p = p if p.dtype == bool else p >= 0.5
    g = g if g.dtype == bool else g >= 0.5
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} does not match mask shape {g.shape}")
    tp = int(np.count_nonzero(p & g))
    fp = int(np.count_nonzero(p & ~g))
    fn = int(np.count_nonzero(~p & g))
    tn = int(p.size - tp - fp - fn)
    return tp, fp, fn, tn


def iou_from_counts(tp: int, fp: int, fn: int, empty: float = 1.0) -> float:
    """Exact IoU ``tp / (tp + fp + fn)``; ``empty`` when both masks are empty (0/0).

    Unlike the smoothed per-image IoU it is exactly 0 on a miss, which "any overlap" tests rely on.
    """
    union = tp + fp + fn
    return float(empty) if union == 0 else tp / union


def pooled_iou(counts: Iterable[Sequence[int]]) -> float:
    """Dataset IoU with pixels pooled over all samples: ΣTP / Σ(TP + FP + FN).

    This is the classic "mIoU" the sample-centric paper criticises; it is kept as the baseline to compare with.
    ``counts`` holds per-image ``(tp, fp, fn[, tn])`` tuples. Returns 1.0 when no image has a defect or a predicted
    pixel (nothing to get wrong), matching the per-image empty/empty convention.
    """
    tp = union = 0
    for c in counts:
        tp += int(c[0])
        union += int(c[0]) + int(c[1]) + int(c[2])
    return 1.0 if union == 0 else tp / union


def _bool_vector(values: Sequence | np.ndarray, n: int, name: str) -> np.ndarray:
    v = np.asarray(values).ravel()
    if v.size != n:
        raise ValueError(f"{name} has {v.size} entries, expected {n}")
    return v.astype(bool)


def sample_miou(
    ious: Sequence[float] | np.ndarray,
    gt_nonempty: Sequence[bool] | np.ndarray,
    pred_nonempty: Sequence[bool] | np.ndarray | None = None,
    include_pred_only: bool = False,
) -> float | None:
    """Sample_mIoU (*assumption*): mean per-image IoU over the samples that carry a defect.

    Excluding true-negative images removes the bias they add to per-image mean IoU (each scores 1). With
    ``include_pred_only=True`` images with an empty mask but a non-empty prediction are averaged in too (IoU 0),
    so false alarms on good images are penalised; that needs ``pred_nonempty``. Returns None when no sample
    qualifies (the metric is undefined on a defect-free set).
    """
    iou = np.asarray(ious, dtype=np.float64).ravel()
    keep = _bool_vector(gt_nonempty, iou.size, "gt_nonempty")
    if include_pred_only:
        if pred_nonempty is None:
            raise ValueError("include_pred_only=True needs pred_nonempty")
        keep = keep | _bool_vector(pred_nonempty, iou.size, "pred_nonempty")
    if not keep.any():
        return None
    return float(np.mean(iou[keep]))


def seg_recall(
    ious: Sequence[float] | np.ndarray, gt_nonempty: Sequence[bool] | np.ndarray, tau: float = 0.5
) -> float | None:
    """Seg_Recall (*assumption*): share of defective samples whose predicted mask reaches IoU >= ``tau``.

    A sample, not a pixel, is what an inspector accepts or rejects, so recall is counted per defective sample.
    ``tau=0`` means "any overlap" (IoU > 0); it also works with IoUs smoothed by ``(I + 1e-7) / (U + 1e-7)``, whose
    misses are tiny but non-zero. Returns None when no sample is defective.
    """
    if tau < 0 or tau > 1:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    iou = np.asarray(ious, dtype=np.float64).ravel()
    keep = _bool_vector(gt_nonempty, iou.size, "gt_nonempty")
    if not keep.any():
        return None
    hits = iou[keep] > _NO_OVERLAP_FLOOR if tau == 0 else iou[keep] >= tau
    return float(np.mean(hits))


def seg_accuracy(
    gt_nonempty: Sequence[bool] | np.ndarray,
    pred_nonempty: Sequence[bool] | Sequence[int] | np.ndarray,
    min_pixels: int = 1,
) -> float | None:
    """Seg_Accuracy (*assumption*): sample-level accuracy of "predicted mask is non-empty" as a defect decision.

    It judges the segmentation head as a classifier, the way a line would use it when no separate image score is
    trusted. ``pred_nonempty`` holds either booleans or predicted-pixel counts; with counts, a prediction counts as
    defective when it has at least ``min_pixels`` pixels, which discounts isolated speckle. Returns None on an
    empty set.
    """
    if min_pixels < 1:
        raise ValueError(f"min_pixels must be >= 1, got {min_pixels}")
    g = np.asarray(gt_nonempty).ravel().astype(bool)
    p = np.asarray(pred_nonempty).ravel()
    if p.size != g.size:
        raise ValueError(f"pred_nonempty has {p.size} entries, expected {g.size}")
    if p.dtype == bool:
        if min_pixels > 1:
            raise ValueError("min_pixels > 1 needs predicted-pixel counts, not booleans, in pred_nonempty")
        decided = p
    else:
        decided = p >= min_pixels
    if g.size == 0:
        return None
    return float(np.mean(decided == g))
