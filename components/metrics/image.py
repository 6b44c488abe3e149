"""Image-level (score per image) and pixel-level ranking metrics.

These reproduce scikit-learn's ``roc_auc_score`` / ``average_precision_score`` (ties included) so that numbers are
comparable with papers that evaluate with sklearn (ExDD does, on image scores and on flattened pixels), while keeping
scikit-learn out of the runtime dependencies: it stays a dev-only test oracle.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "auc_from_histograms",
    "average_precision",
    "f1_max_threshold",
    "pixel_roc_auc",
    "roc_auc",
]


def _binary_inputs(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    if y.size == 0:
        raise ValueError("labels and scores are empty")
    if y.dtype != bool:
        values = np.unique(y)
        if not np.all(np.isin(values, (0, 1))):
            raise ValueError(f"labels must be binary (0/1 or bool), got values {values[:10].tolist()}")
        y = y.astype(bool)
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values; fix the model output before evaluating")
    return y, s


def _require_both_classes(y: np.ndarray, what: str) -> None:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        only = "positive (defective)" if n_pos else "negative (good)"
        raise ValueError(
            f"{what} is undefined when only one class is present: all {y.size} labels are {only}. "
            "Evaluate on a set holding both good and defective samples."
        )


def _grouped_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores in decreasing order with their positive / negative counts.

    Grouping tied scores into one operating point is what makes the results match sklearn's handling of ties
    (a tie contributes a diagonal ROC segment, i.e. half credit, and a single precision value).
    """
    order = np.argsort(s, kind="stable")[::-1]
    s_sorted = s[order]
    y_sorted = y[order].astype(np.int64)
    starts = np.concatenate(([0], np.flatnonzero(np.diff(s_sorted)) + 1))
    pos = np.add.reduceat(y_sorted, starts)
    sizes = np.diff(np.append(starts, s_sorted.size))
    return s_sorted[starts], pos, sizes - pos


def _auc_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    """Trapezoidal ROC area from per-operating-point counts ordered by decreasing score.

    Equal to the Mann-Whitney statistic with half credit for ties: each negative earns one for every positive
    scored strictly above it and one half for every positive tied with it.
    """
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    tps_before = np.cumsum(pos) - pos
    return float(np.sum(neg * (tps_before + 0.5 * pos)) / (n_pos * n_neg))


def roc_auc(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray) -> float:
    """Area under the ROC curve, equal to ``sklearn.metrics.roc_auc_score`` for binary labels.

    Raises ValueError when only one class is present, because the area is then undefined (sklearn raises too).
    """
    y, s = _binary_inputs(labels, scores)
    _require_both_classes(y, "ROC AUC")
    _, pos, neg = _grouped_counts(y, s)
    return _auc_from_counts(pos, neg)


def average_precision(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray) -> float:
    """Average precision, equal to ``sklearn.metrics.average_precision_score`` (step-wise, not interpolated).

    Unlike sklearn, a set with a single class raises ValueError instead of returning a degenerate value, so that a
    defect-free evaluation set cannot silently report AP = 0 or 1.
    """
    y, s = _binary_inputs(labels, scores)
    _require_both_classes(y, "Average precision")
    _, pos, neg = _grouped_counts(y, s)
    tps = np.cumsum(pos)
    fps = np.cumsum(neg)
    precision = tps / (tps + fps)
    return float(np.sum(precision * pos) / tps[-1])


def f1_max_threshold(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds, and the threshold reaching it.

    The decision rule is ``score >= threshold`` and the returned threshold is an observed score, so re-applying
    it to the same data reproduces the F1 exactly. On ties in F1 the highest threshold wins (fewest alarms).
    Requires at least one positive; a set without negatives is allowed (F1 is then maximal at the lowest score).
    """
    y, s = _binary_inputs(labels, scores)
    if not y.any():
        raise ValueError("F1 is undefined without positive (defective) labels")
    thresholds, pos, neg = _grouped_counts(y, s)
    tps = np.cumsum(pos)
    fps = np.cumsum(neg)
    f1 = 2.0 * tps / (tps + fps + tps[-1])
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def auc_from_histograms(hist_pos: Sequence[int] | np.ndarray, hist_neg: Sequence[int] | np.ndarray) -> float:
    """ROC AUC from score histograms over the same ascending bins (e.g. summed per-image pixel histograms).

    This is the cheap, mergeable way to get a pixel AUROC from per-image statistics computed in workers. It is an
    approximation: pairs falling into the same bin count as ties (half credit), so the error is at most half the
    share of positive/negative pairs sharing a bin. Use :func:`pixel_roc_auc` when the maps are at hand.
    """
    hp = np.asarray(hist_pos, dtype=np.float64).ravel()
    hn = np.asarray(hist_neg, dtype=np.float64).ravel()
    if hp.shape != hn.shape:
        raise ValueError(f"histograms differ in length: {hp.size} vs {hn.size}")
    if hp.sum() == 0 or hn.sum() == 0:
        raise ValueError("ROC AUC is undefined when only one class is present (no positive or no negative pixels)")
    return _auc_from_counts(hp[::-1], hn[::-1])


def _as_bool_mask(gt: np.ndarray) -> np.ndarray:
    gt = np.asarray(gt)
    return gt if gt.dtype == bool else gt >= 0.5


def pixel_roc_auc(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """Exact pixel-level ROC AUC over many (pred, gt) maps, equal to sklearn on the concatenated pixels.

    Concatenating every pixel (hundreds of millions in float64, plus sklearn's sort) does not fit a worker, so only
    the minority class (the defect pixels, in practice) is gathered and sorted; the other class is streamed image
    by image and ranked against it with binary search, counting ties as half. Memory is O(minority pixels + one
    image), time O(N log minority). ``pairs`` may be a generator; it is materialised as a list of references.
    """
    items = list(pairs)  # references only; masks are binarised per pass to avoid a second copy of every mask
    if not items:
        raise ValueError("pixel_roc_auc needs at least one (pred, gt) pair")
    n_pos = n_neg = 0
    for pred, gt in items:
        pred, gt = np.asarray(pred), _as_bool_mask(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} does not match mask shape {gt.shape}")
        if not np.all(np.isfinite(pred)):
            raise ValueError("prediction maps contain NaN or infinite values")
        k = int(np.count_nonzero(gt))
        n_pos += k
        n_neg += gt.size - k
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            "Pixel ROC AUC is undefined when only one class is present: "
            + ("no defect pixels in any mask" if n_pos == 0 else "every pixel is a defect pixel")
        )
    keep_pos = n_pos <= n_neg
    kept = []
    for pred, gt in items:
        g = _as_bool_mask(gt)
        kept.append(np.asarray(pred)[g if keep_pos else ~g])
    ref = np.sort(np.concatenate(kept))
    del kept
    doubled = 0  # 2 * (pairs ranked correctly) + (tied pairs): an exact integer
    for pred, gt in items:
        g = _as_bool_mask(gt)
        other = np.sort(np.asarray(pred)[~g if keep_pos else g])  # sorted queries keep the binary search cache-warm
        if other.size == 0:
            continue
        left = np.searchsorted(ref, other, side="left")
        right = np.searchsorted(ref, other, side="right")
        # kept positives: each streamed negative wins over the positives above it; else each positive over the
        # negatives below it
        wins = ref.size - right if keep_pos else left
        doubled += int(np.sum(2 * wins + (right - left), dtype=np.int64))
    return doubled / (2.0 * n_pos * n_neg)
