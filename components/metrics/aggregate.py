"""The evaluation contract between Ray workers and the driver.

Workflows compute :func:`image_stats` next to the model (one small, JSON-able dict per image: a few floats, four
pixel counts, two 256-bin histograms and the sparse fine-grid histograms of :mod:`components.metrics.anomaly`) and
ship those to the driver, which calls :func:`summarize`. Everything a summary needs is therefore either averaged per
image or additive across images; no pixel map ever travels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from components.metrics import anomaly, saliency
from components.metrics import image as image_metrics
from components.metrics import sample as sample_metrics

__all__ = ["image_stats", "summarize", "threshold_warnings"]

logger = logging.getLogger(__name__)

_IOU_SMOOTH = 1e-7


def _squeeze_map(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    while a.ndim > 2 and a.shape[0] == 1:  # tolerate (1, H, W) / (1, 1, H, W) straight from a detector
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) map, got shape {a.shape}")
    return a


def image_stats(
    prob: np.ndarray,
    mask: np.ndarray | None,
    threshold: float = 0.5,
    n_bins: int = 256,
    min_pixels: int = 1,
) -> dict[str, Any]:
    """Per-image statistics, small enough to return from a Ray task and to store as JSON.

    ``prob`` is the defect probability map in [0, 1]; ``mask`` the {0, 1} ground truth, or None when the image has
    no pixel annotation (then only prediction-side fields are returned, with ``has_mask: False``, so that weakly
    labelled images still flow through the same code). ``threshold`` binarises the map for IoU and the confusion
    counts; ``min_pixels`` is how many predicted pixels make the image "predicted defective" (``pred_nonempty``).
    ``wfm`` is None on an empty mask, where the weighted F-measure carries no information; ``e_measure_adaptive``
    is E_ξ at the adaptive threshold (the E-measure curve is rebuilt on the driver from the histograms).
    ``map_max`` (always present) is the image score of the segmentation head, for the seg-image AUROC; ``pixel``
    (with a mask) is the :func:`components.metrics.anomaly.pixel_entry` behind pixel AUROC / AP and AUPRO (a few
    kB for a clean image, ~20 kB for a 256×256 image with 10 defect regions).
    """
    p = _squeeze_map(prob, "prob").astype(np.float64, copy=False)
    if min_pixels < 1:
        raise ValueError(f"min_pixels must be >= 1, got {min_pixels}")
    binary = p >= threshold
    pred_pixels = int(np.count_nonzero(binary))
    out: dict[str, Any] = {
        "has_mask": False,
        "n_pixels": int(p.size),
        "threshold": float(threshold),
        "pred_pixels": pred_pixels,
        "pred_nonempty": pred_pixels >= min_pixels,
    }
    if mask is None:
        # still reject maps the metrics would reject, so a bad model output fails where it is produced
        out["map_max"] = float(saliency.as_prob_map(p).max())
        return out
    g = _squeeze_map(mask, "mask")
    g = g if g.dtype == bool else g >= 0.5
    if g.shape != p.shape:
        raise ValueError(
            f"mask shape {g.shape} does not match prediction shape {p.shape}; resize the map to the mask first"
        )
    p = saliency.as_prob_map(p)
    out["map_max"] = float(p.max())
    tp, fp, fn, tn = sample_metrics.confusion(binary, g)
    gt_pixels = tp + fn
    hist_pos, hist_neg = saliency.pr_curve_counts(p, g, n_bins=n_bins)
    out.update(
        {
            "has_mask": True,
            "gt_pixels": gt_pixels,
            "gt_nonempty": gt_pixels > 0,
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "tn": tn,
            "mae": saliency.mae(p, g),
            "iou": (tp + _IOU_SMOOTH) / (tp + fp + fn + _IOU_SMOOTH),  # == saliency.iou(p, g, threshold)
            "wfm": saliency.weighted_fmeasure(p, g) if gt_pixels else None,
            # on the 8-bit map references read: see the cliff in s_measure's docstring (the 0.012 PySODMetrics gap)
            "sm": saliency.s_measure(p, g, quantize=True),
            "e_measure_adaptive": saliency.e_measure(p, g),
            "hist_pos": [int(v) for v in hist_pos],
            "hist_neg": [int(v) for v in hist_neg],
            "pixel": anomaly.pixel_entry(p, g),
        }
    )
    return out


def threshold_warnings(metrics: Mapping[str, Any], threshold: float, calibrated: bool = False) -> list[str]:
    """Sentences for a person when the metrics at the pixel ``threshold`` (iou, pixel_f1, sample_miou, seg_recall,
    seg_accuracy) say nothing about the map: no pixel reaches it on any image, or it throws away most of the pooled
    F1 that the map itself allows (``pixel_f1_max``, threshold-free in effect). ``calibrated``: the threshold was
    already chosen on validation (then the advice is about validation, not about calibrating)."""
    out = []
    best, at = metrics.get("pixel_f1_max"), metrics.get("pixel_f1")
    if best is not None and at is not None and best >= 0.1 and at < 0.5 * best:
        advice = ("the threshold chosen on validation does not transfer to this split (too few or unlike "
                  "validation masks?)" if calibrated else
                  "calibrate it on validation (eval.threshold: auto, or evaluate --calibrate)")
        out.append(f"at the pixel threshold {threshold:.4g} the masks reach a pooled pixel F1 of {at:.3f}, where this "
                   f"map allows {best:.3f} (at {metrics['pixel_f1_max_threshold']:.4g}): iou, sample_miou, "
                   f"seg_recall and seg_accuracy at this threshold say little about the map; {advice}")
    if metrics.get("n_defective_masks") and metrics.get("pixel_f1") == 0.0:
        out.append(f"no defect pixel reaches the pixel threshold {threshold:.4g}: the predicted masks are empty")
    return out


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _clean(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _e_measures(masked: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Mean-E and max-E from the mean-over-images E-measure curve, and the mean adaptive E.

    Stats written before the E-measure existed carry the histograms but no adaptive value: the curve-based values
    are still computed, the adaptive one is None rather than a mean over part of the set.
    """
    curves = [saliency.e_measure_curve(s["hist_pos"], s["hist_neg"]) for s in masked]
    if len({c.size for c in curves}) != 1:
        raise ValueError("all histograms must have the same number of bins to average E-measure curves")
    curve = np.mean(curves, axis=0)
    adaptive = [s.get("e_measure_adaptive") for s in masked]
    return {
        "e_measure_mean": float(curve.mean()),
        "e_measure_max": float(curve.max()),
        "e_measure_adaptive": None if any(a is None for a in adaptive) else _mean(adaptive),
    }


def _anomaly_pixel_metrics(masked: Sequence[Mapping[str, Any]], fpr_limit: float) -> dict[str, Any]:
    """pixel_auroc / pixel_ap / aupro over the images with masks, None where undefined.

    All masked images must carry a pixel entry: dropping some would silently change which pixels the metric is
    about, so stats from an older version make these metrics None (with a warning) instead.
    """
    out: dict[str, Any] = {"pixel_auroc": None, "pixel_ap": None, "aupro": None, "n_defect_regions": 0,
                           "pixel_f1_max": None, "pixel_f1_max_threshold": None}
    if any("pixel" not in s for s in masked):
        logger.warning(
            "some images with masks carry no pixel entry (stats from an older version?): "
            "pixel_auroc, pixel_ap and aupro are not computed"
        )
        return out
    entries = [s["pixel"] for s in masked]
    out["n_defect_regions"] = sum(len(e["regions"]) for e in entries)
    n_pos = sum(sum(e["pos"]["c"]) for e in entries)
    n_neg = sum(sum(e["neg"]["c"]) for e in entries)
    if n_pos and n_neg:
        out["pixel_auroc"] = anomaly.pixel_auroc(entries)
        out["pixel_ap"] = anomaly.pixel_ap(entries)
        out["aupro"] = anomaly.aupro(entries, fpr_limit=fpr_limit)
        out["pixel_f1_max_threshold"], out["pixel_f1_max"] = anomaly.pixel_f1_max(entries)
    return out


def summarize(
    stats: Sequence[Mapping[str, Any]],
    labels: Sequence[int | bool | None],
    scores: Sequence[float | None],
    seg_iou_threshold: float = 0.5,
    *,
    include_pred_only: bool = False,
    beta2: float = 0.3,
    fpr_limit: float = 0.3,
) -> dict[str, float | int | None]:
    """Flat dataset summary from per-image stats (segmentation) and per-image labels/scores (classification).

    ``labels`` / ``scores`` are the image-level ground truth (1 = defective, None = unknown) and detector scores;
    they may be empty when only segmentation is evaluated, otherwise they describe the same images as ``stats``.
    Labels are not inferred from masks: the caller decides what counts as ground truth.

    A metric that is undefined on this set is None, never NaN and never an exception, because a sweep must be able
    to report on a defect-free or unlabelled split: image_auroc / image_ap need both classes among the labelled
    images; segmentation metrics need images with masks; wfm, f_max, sample_miou and seg_recall need defective
    masks. Averaging rules: mae, iou and sm are means over all images with masks (``iou`` uses the empty/empty = 1
    convention); so are the E-measures, as in PySODMetrics: e_measure_adaptive is the mean per-image E_ξ at the
    adaptive threshold, e_measure_mean / e_measure_max the mean / max over the ``n_bins`` thresholds of the
    mean-over-images E_ξ curve; wfm is a mean over defective masks only; f_max (β² = ``beta2``) averages
    precision/recall over defective masks; sample_miou, seg_recall (IoU >= ``seg_iou_threshold``, 0 = any
    overlap) and seg_accuracy follow :mod:`components.metrics.sample`.

    Anomaly-detection metrics (MVTec AD / anomalib / SuperSimpleNet conventions, see
    :mod:`components.metrics.anomaly` for the binning and its accuracy): image_auroc / image_ap rank the given
    ``scores``; seg_image_auroc ranks ``map_max`` (the segmentation head used as classifier) over the same labels,
    so images without masks count too. pixel_auroc, pixel_ap (pooled pixels) and aupro (FPR up to ``fpr_limit``,
    normalised) need pixel entries with both defect and normal pixels; ``n_defect_regions`` is how many connected
    regions AUPRO averages over. pixel_f1 is the pooled pixel F1 at the stats' threshold; pixel_f1_max and
    pixel_f1_max_threshold the best pooled F1 over all thresholds and where it is (what calibration picks).
    """
    stats = list(stats)
    labels = list(labels)
    scores = list(scores)
    if len(labels) != len(scores):
        raise ValueError(f"labels and scores differ in length: {len(labels)} vs {len(scores)}")
    if stats and labels and len(stats) != len(labels):
        raise ValueError(f"stats describe {len(stats)} images but labels/scores {len(labels)}")

    masked = [s for s in stats if s.get("has_mask")]
    defective = [s for s in masked if s["gt_pixels"] > 0]
    out: dict[str, Any] = {
        "n_images": len(stats) if stats else len(labels),
        "n_with_mask": len(masked),
        "n_defective_masks": len(defective),
        "n_labeled": 0,
        "mae": None,
        "iou": None,
        "iou_pooled": None,
        "wfm": None,
        "sm": None,
        "e_measure_mean": None,
        "e_measure_max": None,
        "e_measure_adaptive": None,
        "f_max": None,
        "sample_miou": None,
        "seg_recall": None,
        "seg_accuracy": None,
        "image_auroc": None,
        "image_ap": None,
        "seg_image_auroc": None,
        "n_defect_regions": 0,
        "pixel_auroc": None,
        "pixel_ap": None,
        "aupro": None,
        "pixel_f1": None,
        "pixel_f1_max": None,
        "pixel_f1_max_threshold": None,
    }

    if masked:
        out["mae"] = _mean(s["mae"] for s in masked)
        out["iou"] = _mean(s["iou"] for s in masked)
        out["sm"] = _mean(s["sm"] for s in masked)
        out["wfm"] = _mean(s["wfm"] for s in defective)
        out.update(_e_measures(masked))
        out["iou_pooled"] = sample_metrics.pooled_iou((s["tp"], s["fp"], s["fn"]) for s in masked)
        tp, fp, fn = (sum(s[k] for s in masked) for k in ("tp", "fp", "fn"))
        out["pixel_f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
        exact_iou = [sample_metrics.iou_from_counts(s["tp"], s["fp"], s["fn"]) for s in masked]
        gt_nonempty = [s["gt_pixels"] > 0 for s in masked]
        pred_nonempty = [bool(s["pred_nonempty"]) for s in masked]
        out["sample_miou"] = sample_metrics.sample_miou(
            exact_iou, gt_nonempty, pred_nonempty, include_pred_only=include_pred_only
        )
        out["seg_recall"] = sample_metrics.seg_recall(exact_iou, gt_nonempty, tau=seg_iou_threshold)
        out["seg_accuracy"] = sample_metrics.seg_accuracy(gt_nonempty, pred_nonempty)
        if defective:
            out["f_max"] = saliency.f_max(((s["hist_pos"], s["hist_neg"]) for s in defective), beta2=beta2)
        out.update(_anomaly_pixel_metrics(masked, fpr_limit))

    pairs = []
    for label, score in zip(labels, scores, strict=True):
        if label is None:
            continue
        if score is None or not math.isfinite(float(score)):
            logger.warning("skipping a labelled image with a non-finite score (%r) in the image-level metrics", score)
            continue
        pairs.append((int(bool(label)), float(score)))
    out["n_labeled"] = len(pairs)
    if pairs and len({lab for lab, _ in pairs}) == 2:
        y = [lab for lab, _ in pairs]
        s = [sc for _, sc in pairs]
        out["image_auroc"] = image_metrics.roc_auc(y, s)
        out["image_ap"] = image_metrics.average_precision(y, s)
    if stats and labels:
        seg = [
            (int(bool(lab)), float(st["map_max"]))
            for lab, st in zip(labels, stats, strict=True)
            if lab is not None and st.get("map_max") is not None
        ]
        if len({lab for lab, _ in seg}) == 2:
            out["seg_image_auroc"] = image_metrics.roc_auc([lab for lab, _ in seg], [m for _, m in seg])

    return {k: _clean(v) for k, v in out.items()}
