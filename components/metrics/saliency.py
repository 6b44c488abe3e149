"""Saliency-style segmentation metrics, as used by the surface-defect saliency literature (GMBINet, EDRNet, ...).

The GMBINet authors evaluate with MATLAB scripts (MAE, weighted F-measure, overlap ratio, S-measure, PFOM) plus a
Python per-image IoU; many salient-object-detection papers report with PySODMetrics (``py_sod_metrics``), which
follows the same MATLAB code. The functions here re-implement those definitions in numpy so that our numbers are
comparable with the published tables; every deviation from the references is stated in the function's docstring,
and the unit tests check S-measure, weighted F-measure, MAE, F_max and E-measure against PySODMetrics.

Conventions: ``pred`` is a float map in [0, 1]; ``gt`` is a {0, 1} / bool mask of the same shape (non-bool masks are
binarised at 0.5, so {0, 255} masks also work).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "as_prob_map",
    "e_measure",
    "e_measure_curve",
    "e_measure_from_counts",
    "f_max",
    "iou",
    "mae",
    "mean_pr_curve",
    "pr_curve_counts",
    "s_measure",
    "weighted_fmeasure",
]

_EPS = float(np.finfo(np.float64).eps)  # MATLAB's `eps`, kept where the reference code adds it
_IOU_SMOOTH = 1e-7
_RANGE_TOL = 1e-6


def as_prob_map(pred: np.ndarray) -> np.ndarray:
    """Validate a defect probability map and return it as float64.

    Raising on out-of-range values (beyond float round-off, which is clipped) catches unbounded anomaly scores fed
    to metrics whose definitions assume probabilities, instead of silently producing meaningless numbers.
    """
    p = np.asarray(pred, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"prediction must be a 2-D (H, W) map, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("prediction contains NaN or infinite values")
    lo, hi = float(p.min()), float(p.max())
    if lo < -_RANGE_TOL or hi > 1.0 + _RANGE_TOL:
        raise ValueError(
            f"prediction must be a probability map in [0, 1], got range [{lo:.4g}, {hi:.4g}]; "
            "normalise unbounded anomaly maps (e.g. distance ratios) before computing segmentation metrics"
        )
    if lo < 0.0 or hi > 1.0:
        p = np.clip(p, 0.0, 1.0)
    return p


def _gt(gt: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    g = np.asarray(gt)
    if g.dtype != bool:
        g = g >= 0.5
    if shape is not None and g.shape != shape:
        raise ValueError(f"mask shape {g.shape} does not match prediction shape {shape}")
    return g


def _inputs(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = as_prob_map(pred)
    return p, _gt(gt, p.shape)


def mae(pred: np.ndarray, gt: np.ndarray, normalize: bool = False) -> float:
    """Mean absolute error between the map and the mask, in [0, 1].

    The default is the plain definition on the calibrated probabilities, which is what a production threshold sees.
    The GMBINet authors' ``MAE2.m`` instead min-max normalises each prediction, quantises it to uint8 and divides by
    255 again; ``normalize=True`` does exactly that, including its corner case: a constant map becomes all zeros
    (MATLAB turns the 0/0 NaNs into 0 in ``im2uint8``). Use it only to compare with published tables: it rewards
    maps whose ranking is right but whose scale is not, and makes a clean defect-free map look as bad as a noisy one.
    """
    p, g = _inputs(pred, gt)
    if normalize:
        lo, hi = float(p.min()), float(p.max())
        p = np.floor((p - lo) / (hi - lo) * 255.0 + 0.5) / 255.0 if hi > lo else np.zeros_like(p)
    return float(np.mean(np.abs(p - g)))


def iou(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> float:
    """Per-image IoU of ``pred >= threshold`` with the mask, smoothed as ``(I + 1e-7) / (U + 1e-7)``.

    The smoothing is the GMBINet training/validation convention: an image where both masks are empty scores 1, so a
    defect-free image predicted clean is a success rather than a 0/0. The flip side is that a miss is ~1e-7/U, never
    exactly 0; use :func:`components.metrics.sample.iou_from_counts` when an exact zero matters.
    """
    p, g = _inputs(pred, gt)
    b = p >= threshold
    inter = float(np.count_nonzero(b & g))
    union = float(np.count_nonzero(b | g))
    return (inter + _IOU_SMOOTH) / (union + _IOU_SMOOTH)


def _matlab_gaussian(size: int = 7, sigma: float = 5.0) -> np.ndarray:
    """``fspecial('gaussian', size, sigma)``: a normalised, truncated Gaussian."""
    r = (size - 1) / 2.0
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    h = np.exp(-(x * x + y * y) / (2.0 * sigma * sigma))
    h[h < _EPS * h.max()] = 0.0
    return h / h.sum()


def weighted_fmeasure(pred: np.ndarray, gt: np.ndarray, beta2: float = 1.0, empty_value: float = 1.0) -> float:
    """Weighted F-beta measure F^w_β (Margolin, Zelnik-Manor, Tal, "How to Evaluate Foreground Maps?", CVPR 2014).

    It fixes two flaws of the plain F-measure on soft maps: errors near a defect are partly forgiven (the error map
    is smoothed by a 7x7, σ=5 Gaussian after each background pixel borrows the error of its nearest defect pixel, and
    the smaller of raw and smoothed error is kept inside the defect), and false alarms far from any defect cost more
    (importance ``2 - exp(log(0.5)/5 · distance)``). The GMBINet tables use β² = 1.

    Deviations from the authors' ``WFb.m``: the prediction is used as given, not min-max normalised per image (that
    normalisation would turn a faint, correct background into false alarms); and an empty mask returns
    ``empty_value``. ``WFb.m`` returns 1 for an empty mask whatever the prediction; other toolkits (PySODMetrics)
    return 0. Both merely count defect-free images, so aggregates should average this metric over defective images.
    """
    p, g = _inputs(pred, gt)
    if not g.any():
        return float(empty_value)
    gd = g.astype(np.float64)
    err = np.abs(p - gd)
    bg = ~g
    # distance to, and index of, the nearest defect pixel (MATLAB: [Dst, IDXT] = bwdist(GT))
    dist, (iy, ix) = ndimage.distance_transform_edt(bg, return_indices=True)
    err_t = err.copy()
    err_t[bg] = err[iy[bg], ix[bg]]
    err_a = ndimage.correlate(err_t, _matlab_gaussian(7, 5.0), mode="constant", cval=0.0)
    min_err = np.where(g & (err_a < err), err_a, err)
    importance = np.ones_like(p)
    importance[bg] = 2.0 - np.exp(math.log(0.5) / 5.0 * dist[bg])
    err_w = min_err * importance
    tp_w = gd.sum() - err_w[g].sum()
    fp_w = err_w[bg].sum()
    recall = 1.0 - float(np.mean(err_w[g]))
    precision = tp_w / (_EPS + tp_w + fp_w)
    return float((1.0 + beta2) * recall * precision / (_EPS + recall + beta2 * precision))


def _object_score(values: np.ndarray) -> float:
    if values.size == 0:
        return 0.0
    x = float(values.mean())
    sigma = float(values.std(ddof=1)) if values.size > 1 else 0.0  # MATLAB std of a scalar is 0
    return 2.0 * x / (x * x + 1.0 + sigma + _EPS)


def _s_object(p: np.ndarray, g: np.ndarray) -> float:
    u = float(g.mean())
    return u * _object_score(p[g]) + (1.0 - u) * _object_score(1.0 - p[~g])


def _region_ssim(p: np.ndarray, g: np.ndarray) -> float:
    n = p.size
    gd = g.astype(np.float64)
    x, y = float(p.mean()), float(gd.mean())
    sx2 = float(np.sum((p - x) ** 2)) / (n - 1 + _EPS)
    sy2 = float(np.sum((gd - y) ** 2)) / (n - 1 + _EPS)
    sxy = float(np.sum((p - x) * (gd - y))) / (n - 1 + _EPS)
    alpha = 4.0 * x * y * sxy
    beta = (x * x + y * y) * (sx2 + sy2)
    if alpha != 0:
        return alpha / (beta + _EPS)
    return 1.0 if beta == 0 else 0.0


def _split_point(g: np.ndarray) -> tuple[int, int]:
    """Where the region term splits the image: the rounded mask centroid, as a 1-based (row, column).

    PySODMetrics rounds the 0-based centroid half to even and adds 1; MATLAB's ``centroid`` rounds the 1-based one
    half away from zero. They disagree only when a coordinate ends in exactly .5, which is common on thin or
    symmetric masks (a 2-pixel-high scratch, an even-sized box), and there moving the split by one line can change
    S by more than 0.1. We follow PySODMetrics, the implementation papers report.
    """
    rows, cols = np.nonzero(g)
    return int(np.round(rows.mean())) + 1, int(np.round(cols.mean())) + 1


def _s_region(p: np.ndarray, g: np.ndarray) -> float:
    h, w = g.shape
    cy, cx = _split_point(g)
    area = float(h * w)
    w1 = cx * cy / area
    w2 = (w - cx) * cy / area
    w3 = cx * (h - cy) / area
    w4 = 1.0 - w1 - w2 - w3
    quadrants = (
        (w1, np.s_[:cy, :cx]),
        (w2, np.s_[:cy, cx:]),
        (w3, np.s_[cy:, :cx]),
        (w4, np.s_[cy:, cx:]),
    )
    score = 0.0
    for weight, sl in quadrants:
        if p[sl].size:  # an empty quadrant has weight 0; MATLAB would turn it into 0 * NaN
            score += weight * _region_ssim(p[sl], g[sl])
    return score


def s_measure(pred: np.ndarray, gt: np.ndarray, alpha: float = 0.5, quantize: bool = False) -> float:
    """Structure measure S_α (Fan, Cheng, Liu, Li, Borji, "Structure-measure", ICCV 2017).

    Pixel-wise scores ignore shape; S_α blends an object-aware term (foreground/background contrast and uniformity)
    with a region-aware term (SSIM over the four quadrants around the mask centroid). Follows the reference MATLAB
    ``StructureMeasure.m``, including its special cases that make it defined on defect-free images: an all-zero
    mask scores ``1 - mean(pred)`` and an all-one mask scores ``mean(pred)``; the blend is floored at 0. The split
    point of the region term is rounded as PySODMetrics does (see :func:`_split_point`), which differs from MATLAB
    on exact .5 centroids. The GMBINet demo script and PySODMetrics (by default) min-max normalise each prediction
    first (``mapminmax``); here the map is used as given, for the same reason as in :func:`weighted_fmeasure`.

    Beware a cliff in the region term (there and in PySODMetrics): a quadrant with no defect pixel scores 1 only
    if the map is *exactly* constant there, else 0, so a map with a 1e-6 background loses up to half that
    quadrant's weight which the same map saved as an 8-bit PNG keeps. ``quantize`` scores the map on the 8-bit
    grid a PNG holds (evaluation does, :func:`components.metrics.aggregate.image_stats`, as every reference
    implementation reads maps from PNGs).
    """
    p, g = _inputs(pred, gt)
    if quantize:
        p = np.floor(p * 255.0 + 0.5) / 255.0
    y = float(g.mean())
    if y == 0.0:
        return 1.0 - float(p.mean())
    if y == 1.0:
        return float(p.mean())
    q = alpha * _s_object(p, g) + (1.0 - alpha) * _s_region(p, g)
    return max(q, 0.0)


def pr_curve_counts(pred: np.ndarray, gt: np.ndarray, n_bins: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Histograms of prediction values over defect (positive) and background (negative) pixels.

    Per-image histograms are small, integer and additive, so workers can ship them to the driver and the driver can
    rebuild any threshold-swept metric (per-image precision/recall, F_max, a binned pixel AUROC). Bin k holds values
    in [k/n_bins, (k+1)/n_bins), the last bin also holds 1.0; with 256 bins a map saved as uint8/255 lands exactly
    in the bin of its grey level, as in the saliency toolkits that sweep 256 thresholds.
    """
    if n_bins < 2:
        raise ValueError(f"n_bins must be >= 2, got {n_bins}")
    p, g = _inputs(pred, gt)
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    hist_pos = np.bincount(idx[g], minlength=n_bins)
    hist_neg = np.bincount(idx[~g], minlength=n_bins)
    return hist_pos, hist_neg


def mean_pr_curve(
    hist_pairs: Iterable[tuple[Sequence[int] | np.ndarray, Sequence[int] | np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean-over-images precision and recall at thresholds ``k / n_bins`` (decision ``pred >= threshold``).

    Images whose mask is empty are skipped: their recall is 0/0, and counting them would make F_max depend on how
    many defect-free images the set holds. Precision with no predicted pixel is taken as 0 (PySODMetrics does the
    same). Returns (precision, recall, thresholds), each of length n_bins, thresholds ascending.
    """
    precisions: list[np.ndarray] = []
    recalls: list[np.ndarray] = []
    n_bins: int | None = None
    for hist_pos, hist_neg in hist_pairs:
        hp = np.asarray(hist_pos, dtype=np.float64).ravel()
        hn = np.asarray(hist_neg, dtype=np.float64).ravel()
        if hp.shape != hn.shape:
            raise ValueError(f"positive and negative histograms differ in length: {hp.size} vs {hn.size}")
        if n_bins is None:
            n_bins = hp.size
        elif hp.size != n_bins:
            raise ValueError(f"all histograms must have the same number of bins: {n_bins} vs {hp.size}")
        n_gt = hp.sum()
        if n_gt == 0:
            continue
        tp = np.cumsum(hp[::-1])[::-1]  # tp[k] = positives with value in bin >= k
        fp = np.cumsum(hn[::-1])[::-1]
        predicted = tp + fp
        precisions.append(np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0))
        recalls.append(tp / n_gt)
    if not precisions:
        raise ValueError("precision/recall curves need at least one image with defect pixels in its mask")
    assert n_bins is not None
    thresholds = np.arange(n_bins, dtype=np.float64) / n_bins
    return np.mean(precisions, axis=0), np.mean(recalls, axis=0), thresholds


def f_max(
    hist_pairs: Iterable[tuple[Sequence[int] | np.ndarray, Sequence[int] | np.ndarray]], beta2: float = 0.3
) -> float:
    """Maximum F-measure over thresholds of the mean-over-images PR curve (the saliency "max F_β").

    β² = 0.3 weighs precision over recall, the usual saliency choice. Averaging precision and recall over images
    before taking F, rather than pooling pixels, keeps small defects from being drowned by large ones. Images with
    an empty mask are skipped (see :func:`mean_pr_curve`); raises ValueError when no image has defect pixels.

    PySODMetrics returns both this value (F of its mean precision/recall curves, which the unit tests match) and
    the max of the mean per-image F curve, a different and usually lower number; tables made with its
    ``Fmeasure``/``FmeasureV2`` "maxF" report the latter.
    """
    precision, recall, _ = mean_pr_curve(hist_pairs)
    denom = beta2 * precision + recall
    num = (1.0 + beta2) * precision * recall
    f = np.divide(num, denom, out=np.zeros_like(num), where=denom > 0)
    return float(f.max())


def _enhanced_alignment_sum(tp: np.ndarray, fp: np.ndarray, n_pos: int, n: int) -> np.ndarray:
    """Sum over pixels of the enhanced alignment term, from confusion counts (one entry per threshold).

    A binarised map and a mask take two values each, so every pixel falls in one of four (prediction, mask) cells
    and its alignment term depends on the cell only: the sum is four counts times four constants.
    """
    pred_fg = tp + fp
    pred_bg = n - pred_fg
    if n_pos == 0:  # no defect: only the pixels predicted clean agree with the mask (MATLAB: 1 - FM)
        return pred_bg
    if n_pos == n:
        return pred_fg
    fn = n_pos - tp
    tn = pred_bg - fn
    mean_pred, mean_gt = pred_fg / n, n_pos / n
    cells = (
        (tp, 1.0 - mean_pred, 1.0 - mean_gt),
        (fp, 1.0 - mean_pred, -mean_gt),
        (fn, -mean_pred, 1.0 - mean_gt),
        (tn, -mean_pred, -mean_gt),
    )
    total = np.zeros_like(pred_fg)
    for count, phi_pred, phi_gt in cells:
        align = 2.0 * phi_pred * phi_gt / (phi_pred * phi_pred + phi_gt * phi_gt + _EPS)
        total = total + count * (align + 1.0) ** 2 / 4.0
    return total


def e_measure_from_counts(
    tp: np.ndarray | Sequence[int] | int, fp: np.ndarray | Sequence[int] | int, n_pos: int, n: int
) -> np.ndarray:
    """E-measure of one image binarised at one or more thresholds, from its confusion counts.

    ``tp`` / ``fp`` are the defect / background pixels predicted defective (one entry per threshold), ``n_pos`` the
    defect pixels of the mask and ``n`` all pixels. Counts are all the measure needs, which is what lets the
    driver rebuild the threshold curve from the per-image histograms. Divides by ``n - 1`` as the references do.
    """
    tp_a = np.asarray(tp, dtype=np.float64)
    fp_a = np.asarray(fp, dtype=np.float64)
    if n < 1 or not 0 <= n_pos <= n:
        raise ValueError(f"need 0 <= n_pos <= n and n >= 1, got n_pos={n_pos}, n={n}")
    return _enhanced_alignment_sum(tp_a, fp_a, int(n_pos), int(n)) / (n - 1 + _EPS)


def e_measure(pred: np.ndarray, gt: np.ndarray, threshold: float | None = None) -> float:
    """Enhanced-alignment measure E_ξ (Fan, Gong, Cao, Ren, Cheng, Borji, IJCAI 2018) of the binarised map.

    The map is binarised as ``pred >= threshold``; None means the adaptive threshold ``min(2 · mean(pred), 1)``
    (the "adaptive E" of the tables). E_ξ judges a binary map by local and global agreement at once: each pixel's
    deviation from the map's mean is compared with the mask's deviation from its mean, so a map with the right
    pixels but the wrong amount of foreground still loses. Computed as PySODMetrics' ``Emeasure`` (itself the
    authors' MATLAB code), except that the map is used as given where PySODMetrics min-max normalises it (see
    :func:`weighted_fmeasure`).

    Quirks of the references are kept so that the numbers stay comparable. The pixel sum is divided by ``n - 1``,
    so a perfect map scores n/(n-1), a hair above 1. An empty mask (defect-free image) scores the number of pixels
    predicted clean over ``n - 1``; but the adaptive threshold of an all-zero map is 0, which binarises every pixel
    as defective, so a perfectly clean map on a defect-free image scores 0 at the adaptive threshold. On the curve
    (:func:`e_measure_curve`) only the first threshold, 0, has that flaw.
    """
    p, g = _inputs(pred, gt)
    t = min(2.0 * float(p.mean()), 1.0) if threshold is None else float(threshold)
    b = p >= t
    tp = np.count_nonzero(b & g)
    fp = np.count_nonzero(b & ~g)
    return float(e_measure_from_counts(tp, fp, int(np.count_nonzero(g)), p.size))


def e_measure_curve(hist_pos: Sequence[int] | np.ndarray, hist_neg: Sequence[int] | np.ndarray) -> np.ndarray:
    """One image's E-measure at each threshold ``k / n_bins`` (ascending), from its :func:`pr_curve_counts`.

    The histograms workers already ship hold the counts at every threshold, so the 256-point curve whose mean
    and max papers report (mean-E, max-E) costs no extra payload. Unlike :func:`mean_pr_curve`, images with an
    empty mask are defined here and PySODMetrics averages them in; so does :func:`components.metrics.summarize`.
    """
    hp = np.asarray(hist_pos, dtype=np.float64).ravel()
    hn = np.asarray(hist_neg, dtype=np.float64).ravel()
    if hp.shape != hn.shape:
        raise ValueError(f"positive and negative histograms differ in length: {hp.size} vs {hn.size}")
    tp = np.cumsum(hp[::-1])[::-1]
    fp = np.cumsum(hn[::-1])[::-1]
    return e_measure_from_counts(tp, fp, int(hp.sum()), int(hp.sum() + hn.sum()))
