"""Anomaly-detection metrics (pixel AUROC / AP, AUPRO) from small per-image entries, and threshold choice.

The numbers follow the MVTec AD / anomalib conventions that SuperSimpleNet and PatchCore papers report, but they
have to be computed without ever gathering full-size maps on the driver. Every image therefore becomes a
:func:`pixel_entry` in the worker: histograms of its map values over one fixed grid, split by ground truth, plus one
histogram per connected defect region. Counts on a shared grid are additive across images, so the driver merges
them and reads every threshold-swept metric off the merged counts.

**The grid.** ``N_BINS = 2048`` bins uniform in logit space over ``[-LOGIT_RANGE, LOGIT_RANGE] = [-16, 16]``
(width 1/64 in logit); values below / above the range fall into the first / last bin, so 0 and 1 are valid.
Detector maps are sigmoid outputs: normal pixels pile up near 0 and confident defects near 1, where a uniform grid
in probability would put almost every pixel into its first or last bin. In logit space the bins are fine exactly
there (about 1.5 % relative width near 0 and 1) and still 0.0039 wide at p = 0.5. ±16 covers what a float32
sigmoid can tell apart from 1 (1 - 2^-24 is logit 16.6). The step between two 8-bit grey levels (k/255) is at
least 4/255 > 1/64 in logit, so maps stored as uint8 never share a bin and their binned metrics are exact.

**What is exact and what is not.** Counts at bin edges are exact, so every metric is evaluated exactly at the 2049
edge thresholds; only the curve between two neighbouring edges is approximated (pixels sharing a bin are treated
as tied: half credit in AUROC, a straight segment in the PRO curve, one operating point in AP). Measured against
scikit-learn / an exact sweep (tests/unit/test_metrics_anomaly.py, five seeds each), the largest absolute errors
were: on realistic maps (normal pixels ~ Beta(1, 30), defects ~ Beta(5, 2); or a blurred float32 sigmoid field)
pixel AUROC 3e-7, pixel AP 2e-4, AUPRO 7e-6; on a poor detector whose classes overlap around p = 0.5 (Beta(2, 3)
vs Beta(3, 2)), where bins are widest in probability, AUROC 3e-5 and AP 1.3e-3. The AP error is a systematic
underestimate (a bin is one operating point, scored at its lowest precision) and halves with twice the bins; it
was judged not worth the ~30 % larger entries. Region histograms coarsened to fit (see :func:`pixel_entry`; 20
regions of 1600 px on a noise map, merged 2 bins at a time) moved AUPRO by 3e-5.

**Size.** A 256×256 image with 10 regions serialises to about 17-20 kB of JSON for realistic maps and 24 kB for
uniform noise (the whole :func:`components.metrics.aggregate.image_stats` dict adds ~3 kB); 20 regions on noise
stay under 40 kB, because a region never takes more than ``max_region_bins`` (256) pairs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from components.metrics import image as image_metrics
from components.metrics import saliency

__all__ = [
    "LOGIT_RANGE",
    "N_BINS",
    "aupro",
    "bin_edges",
    "bin_index",
    "choose_threshold",
    "pixel_ap",
    "pixel_auroc",
    "pixel_entry",
    "pixel_f1_max",
    "pro_curve",
]

logger = logging.getLogger(__name__)

N_BINS = 2048
LOGIT_RANGE = 16.0
_BINS_PER_LOGIT = N_BINS / (2.0 * LOGIT_RANGE)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
DEFAULT_MAX_REGION_BINS = 256


# ---------------------------------------------------------------------------------------------------------------
# the shared grid
# ---------------------------------------------------------------------------------------------------------------


def bin_index(prob: np.ndarray) -> np.ndarray:
    """Grid bin of every value of a probability map (int64, same shape); 0 and 1 land in the first / last bin."""
    p = np.asarray(prob, dtype=np.float64)
    with np.errstate(divide="ignore"):
        logit = np.log(p) - np.log1p(-p)  # -inf at 0, +inf at 1: clipped below
    idx = np.floor((logit + LOGIT_RANGE) * _BINS_PER_LOGIT)
    return np.clip(idx, 0, N_BINS - 1).astype(np.int64)


def bin_edges() -> np.ndarray:
    """The N_BINS + 1 thresholds (in probability) at which binned metrics are exact.

    Bin k holds values in [edges[k], edges[k + 1]); the first bin extends down to 0 and the last up to 1, so
    edges[0] and edges[-1] are nominal (the sigmoid of ∓LOGIT_RANGE), not bounds of the data.
    """
    logits = -LOGIT_RANGE + np.arange(N_BINS + 1) / _BINS_PER_LOGIT
    return 1.0 / (1.0 + np.exp(-logits))


# ---------------------------------------------------------------------------------------------------------------
# per-image entry (worker side)
# ---------------------------------------------------------------------------------------------------------------


def _sparse(bins: np.ndarray, counts: np.ndarray) -> dict[str, list[int]]:
    """Non-empty bins as delta-coded indices plus counts: the smallest plain-JSON form of a histogram.

    Maps are smooth, so occupied bins form long runs and their deltas are mostly 1: one or two characters per
    bin instead of four for the absolute index.
    """
    bins = np.asarray(bins, dtype=np.int64)
    deltas = np.diff(bins, prepend=0) if bins.size else bins
    return {"b": [int(v) for v in deltas], "c": [int(v) for v in counts]}


def _sparse_hist(bins: np.ndarray) -> dict[str, list[int]]:
    counts = np.bincount(bins, minlength=N_BINS)  # O(n), unlike np.unique: maps can be megapixels
    occupied = np.flatnonzero(counts)
    return _sparse(occupied, counts[occupied])


def _dense(sparse: Mapping[str, Sequence[int]], factor: int = 1) -> np.ndarray:
    """Decode :func:`_sparse` back onto the full grid, spreading each coarse bin's count evenly over its fine bins.

    Even spreading is linear interpolation of the cumulative count inside the coarse bin, the least biased guess
    without further information; with ``factor == 1`` the decoding is exact.
    """
    bins = np.cumsum(np.asarray(sparse["b"], dtype=np.int64))
    counts = np.asarray(sparse["c"], dtype=np.float64)
    if bins.shape != counts.shape:
        raise ValueError(f"corrupt histogram: {bins.size} bins but {counts.size} counts")
    if bins.size and (bins[0] < 0 or bins[-1] >= N_BINS // factor):
        raise ValueError(f"histogram bin out of range for a {N_BINS}-bin grid (coarsening factor {factor})")
    coarse = np.bincount(bins, weights=counts, minlength=N_BINS // factor)
    return np.repeat(coarse / factor, factor) if factor > 1 else coarse


def _region_entries(bins: np.ndarray, labels: np.ndarray, n_regions: int, max_region_bins: int) -> list[dict]:
    """One histogram per connected region, coarsened by powers of two when it would exceed ``max_region_bins``.

    A region's overlap curve only needs its cumulative count at each threshold; a region whose values are spread
    over many bins (a poor map) would otherwise dominate the entry size, so its histogram is merged 2, 4, ...
    bins at a time until it fits. That bounds the entry at ``max_region_bins`` pairs per region while small or
    well-separated regions, the usual case, stay exact.
    """
    if n_regions == 0:
        return []
    sel = labels > 0
    keys, counts = np.unique((labels[sel].astype(np.int64) - 1) * N_BINS + bins[sel], return_counts=True)
    region_of, bin_of = np.divmod(keys, N_BINS)
    starts = np.searchsorted(region_of, np.arange(n_regions + 1))
    out = []
    for r in range(n_regions):
        b, c = bin_of[starts[r] : starts[r + 1]], counts[starts[r] : starts[r + 1]]
        area = int(c.sum())
        factor = 1
        while b.size > max_region_bins:
            factor *= 2
            b, inverse = np.unique(b // 2, return_inverse=True)
            c = np.bincount(inverse, weights=c).astype(np.int64)
        out.append({"n": area, "f": factor, **_sparse(b, c)})
    return out


def pixel_entry(
    prob: np.ndarray, mask: np.ndarray, *, max_region_bins: int = DEFAULT_MAX_REGION_BINS
) -> dict[str, Any]:
    """What the driver needs from one image for pixel AUROC / AP and AUPRO: a small JSON-able dict.

    ``prob`` is an (H, W) map in [0, 1] and ``mask`` a mask of the same shape, binarised at 0.5 unless bool
    (:func:`components.metrics.aggregate.image_stats` calls this and stores the result under ``"pixel"``).
    Regions are the 8-connected components of the mask, per image, as in the MVTec AD evaluation code (anomalib
    labels with OpenCV's default 8-connectivity too). Layout: ``neg`` / ``pos`` sparse histograms of normal /
    defect pixels, ``regions`` one sparse histogram per region with its area ``n`` and coarsening factor ``f``.
    """
    if max_region_bins < 1:
        raise ValueError(f"max_region_bins must be >= 1, got {max_region_bins}")
    p = saliency.as_prob_map(prob)  # NaN or unbounded scores would land in arbitrary bins
    g = np.asarray(mask)
    g = g if g.dtype == bool else g >= 0.5  # the 0.5 rule of the other metrics, so {0, 255} masks work too
    if p.shape != g.shape:
        raise ValueError(f"prob and mask must be 2-D maps of one shape, got {p.shape} and {g.shape}")
    bins = bin_index(p)
    labels, n_regions = ndimage.label(g, structure=_EIGHT_CONNECTED)
    return {
        "bins": N_BINS,
        "neg": _sparse_hist(bins[~g]),
        "pos": _sparse_hist(bins[g]),
        "regions": _region_entries(bins, labels, int(n_regions), max_region_bins),
    }


# ---------------------------------------------------------------------------------------------------------------
# aggregation (driver side)
# ---------------------------------------------------------------------------------------------------------------


def _entries(items: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Accept pixel entries or whole ``image_stats`` dicts; images without a mask carry no pixel truth and are
    skipped, so a mixed list of stats can be passed as is."""
    out = []
    for item in items:
        entry = item.get("pixel", item) if "neg" not in item else item
        if "neg" not in entry:
            if item.get("has_mask") is False:
                continue
            raise ValueError("item carries no pixel entry; compute stats with the current image_stats / pixel_entry")
        if entry.get("bins") != N_BINS:
            raise ValueError(f"pixel entry built on a {entry.get('bins')}-bin grid, this code uses {N_BINS}")
        out.append(entry)
    return out


def _merged_hists(entries: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    pos = np.zeros(N_BINS)
    neg = np.zeros(N_BINS)
    for e in entries:
        pos += _dense(e["pos"])
        neg += _dense(e["neg"])
    return pos, neg


def _require_pixels(pos: np.ndarray, neg: np.ndarray, what: str) -> None:
    if pos.sum() == 0 or neg.sum() == 0:
        missing = "defect (positive)" if pos.sum() == 0 else "normal (negative)"
        raise ValueError(f"{what} is undefined without {missing} pixels in the masks")


def pixel_auroc(entries: Iterable[Mapping[str, Any]]) -> float:
    """Pixel AUROC over all pixels of all entries (pooled, as anomalib and the MVTec tables do).

    Use :func:`components.metrics.image.pixel_roc_auc` instead when the maps themselves are at hand and exactness
    matters more than memory. Raises ValueError without positive or without negative pixels.
    """
    pos, neg = _merged_hists(_entries(entries))
    _require_pixels(pos, neg, "Pixel AUROC")
    return image_metrics.auc_from_histograms(pos, neg)


def pixel_ap(entries: Iterable[Mapping[str, Any]]) -> float:
    """Pixel average precision (sklearn's step-wise AP, the "AP-loc" of SuperSimpleNet) over pooled pixels.

    AP rewards ranking the few defect pixels above millions of normal ones, which AUROC on imbalanced pixels hides;
    that is why the SuperSimpleNet tables report it next to pixel AUROC. Each bin is one operating point.
    """
    pos, neg = _merged_hists(_entries(entries))
    _require_pixels(pos, neg, "Pixel AP")
    tps = np.cumsum(pos[::-1])
    fps = np.cumsum(neg[::-1])
    predicted = tps + fps
    precision = np.divide(tps, predicted, out=np.zeros_like(tps), where=predicted > 0)
    return float(np.sum(precision * pos[::-1]) / tps[-1])


def pro_curve(entries: Iterable[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-region-overlap curve: (global FPR, mean region overlap) at every grid edge, FPR ascending from 0 to 1.

    The overlap of a region at a threshold is the share of its pixels at or above it; PRO is the plain mean over
    all regions of all images, so a small scratch weighs as much as a large stain (the point of AUPRO compared with
    pixel AUROC). The FPR is over all normal pixels of all images with masks, defect-free images included.
    """
    entries = _entries(entries)
    neg = np.zeros(N_BINS)
    overlap = np.zeros(N_BINS)  # Σ_r hist_r / area_r: cumulated from the top it is Σ_r overlap_r(threshold)
    n_regions = 0
    for e in entries:
        neg += _dense(e["neg"])
        for region in e["regions"]:
            if region["n"] <= 0:
                raise ValueError("corrupt pixel entry: a region with no pixels")
            overlap += _dense(region, int(region["f"])) / region["n"]
            n_regions += 1
    if n_regions == 0 or neg.sum() == 0:
        raise ValueError(
            "the PRO curve is undefined without "
            + ("defect regions in the masks" if n_regions == 0 else "normal pixels in the masks")
        )
    # thresholds from above the last bin (nothing predicted) down to the first edge (everything predicted)
    fpr = np.concatenate(([0.0], np.cumsum(neg[::-1]) / neg.sum()))
    pro = np.concatenate(([0.0], np.cumsum(overlap[::-1]) / n_regions))
    return fpr, np.minimum(pro, 1.0)  # float round-off of the per-region shares must not exceed full overlap


def aupro(entries: Iterable[Mapping[str, Any]], fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve for FPR in [0, ``fpr_limit``], divided by ``fpr_limit`` (MVTec AD / anomalib).

    Beyond 30 % false-positive rate a defect map is useless on a production line, so the area stops there; the
    curve is linearly interpolated at exactly ``fpr_limit`` and integrated with the trapezoidal rule, as in the
    MVTec evaluation script, so a perfect map scores 1 and a map ranking every defect pixel below every normal
    pixel scores 0. Raises ValueError without defect regions or without normal pixels.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(entries)
    return _area_to_limit(fpr, pro, fpr_limit) / fpr_limit


def _area_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoidal area under (x ascending, y) up to ``x = limit``, interpolating y there."""
    inside = int(np.searchsorted(x, limit, side="right"))  # x[:inside] <= limit
    xs, ys = x[:inside], y[:inside]
    if inside < x.size and xs[-1] < limit:
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        xs = np.append(xs, limit)
        ys = np.append(ys, y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))


# ---------------------------------------------------------------------------------------------------------------
# thresholds
# ---------------------------------------------------------------------------------------------------------------


def pixel_f1_max(entries: Iterable[Mapping[str, Any]]) -> tuple[float, float]:
    """The pixel threshold with the highest pooled pixel F1 (= the highest pooled IoU: IoU = F1 / (2 - F1)), and
    that F1: ``(threshold, f1)``, decisions ``map >= threshold``.

    Evaluated exactly at the grid's edges (see the module docstring): predicting every bin from ``k`` up is
    exactly ``map >= edges[k]`` (``edges[0]`` is taken as 0, since the first bin reaches down to 0). A threshold
    chosen on validation maps is what a detector's masks need when its map has no natural 0.5 (SuperSimpleNet's
    sigmoid maps sit near 0.4 on normal pixels). Ties go to the highest threshold (the fewest false alarms).
    Raises ValueError without defect or without normal pixels.
    """
    pos, neg = _merged_hists(_entries(entries))
    _require_pixels(pos, neg, "A pixel F1 threshold")
    tp = np.cumsum(pos[::-1])[::-1]  # tp[k]: defect pixels in bins >= k
    fp = np.cumsum(neg[::-1])[::-1]
    fn = pos.sum() - tp
    f1 = 2.0 * tp / np.maximum(2.0 * tp + fp + fn, 1e-12)
    k = int(np.flatnonzero(f1 >= f1.max() - 1e-12)[-1])
    edges = bin_edges()
    return (0.0 if k == 0 else float(edges[k])), float(f1[k])


def choose_threshold(
    labels: Sequence[int | bool | None],
    scores: Sequence[float],
    fallback: str | None = "max_normal",
    margin: float = 0.0,
) -> tuple[float, dict[str, Any]]:
    """Image-level decision threshold from a validation set; decisions are ``score >= threshold``.

    Rule, in order (images whose label is None are ignored):

    1. No labelled image: ValueError, since nothing supports any threshold.
    2. At least one defective image: the F1-max threshold (:func:`components.metrics.image.f1_max_threshold`),
       as anomalib's ``F1AdaptiveThreshold``. It is an observed score, so it reproduces the validation F1. Without
       normal images it is the lowest defective score (everything flagged) and ``info["warning"]`` says that the
       false-alarm rate is unknown.
    3. Only normal images and ``fallback="max_normal"``: the maximum normal score, anomalib's fallback (with
       a warning there too), raised to ``m + margin * |m|`` (i.e. scaled by 1 + margin for positive scores) and
       at least to the next float above ``m``, so that no validation image raises an alarm under the ``>=`` rule.
       It is the tightest threshold with zero false alarms on the data at hand: any defect scoring above every
       normal image is caught. It overfits to the validation maximum, so unseen normal images will trip it at some
       rate; ``margin`` trades recall for fewer alarms (SuperADD uses 1.421 × the 95th percentile for this case).
       ``fallback=None`` raises ValueError instead.

    ``info`` is JSON-able, for the artifact's detector.json: ``rule`` ("f1_max" or "max_normal"), ``f1`` (None for
    the fallback), ``n_normal``, ``n_defective``, ``margin`` and ``warning`` (None or a sentence; also logged).
    Non-finite scores raise ValueError: a threshold chosen around a broken score would be meaningless.
    """
    if fallback not in ("max_normal", None):
        raise ValueError(f"fallback must be 'max_normal' or None, got {fallback!r}")
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    labels = list(labels)
    scores = list(scores)
    if len(labels) != len(scores):
        raise ValueError(f"labels and scores differ in length: {len(labels)} vs {len(scores)}")
    y, s = [], []
    for label, score in zip(labels, scores, strict=True):
        if label is None:
            continue
        if score is None or not math.isfinite(float(score)):
            raise ValueError(f"a labelled validation image has a non-finite score ({score!r}); fix the model output")
        y.append(int(bool(label)))
        s.append(float(score))
    if not y:
        raise ValueError("cannot choose a threshold: the validation set has no labelled image")
    n_def = sum(y)
    n_norm = len(y) - n_def
    info: dict[str, Any] = {
        "rule": "f1_max",
        "f1": None,
        "n_normal": n_norm,
        "n_defective": n_def,
        "margin": float(margin),
        "warning": None,
    }
    if n_def:
        f1, threshold = image_metrics.f1_max_threshold(y, s)
        info["f1"] = f1
        if not n_norm:
            info["warning"] = (
                f"validation has no normal image: the threshold is the lowest of {n_def} defective scores, so every "
                "validation image is flagged and the false-alarm rate is unknown"
            )
    else:
        if fallback is None:
            raise ValueError(
                f"validation has {n_norm} normal and no defective image, so F1 is undefined; add defective "
                "images to the validation split or allow the 'max_normal' fallback"
            )
        top = max(s)
        threshold = max(top + margin * abs(top), float(np.nextafter(top, math.inf)))
        info["rule"] = "max_normal"
        info["warning"] = (
            f"validation has no defective image: the threshold is the maximum of {n_norm} normal scores"
            + (f" with a margin of {margin:g}" if margin else "")
            + ", which catches only defects scoring above every normal image; recall is unknown"
        )
    if info["warning"]:
        logger.warning("%s", info["warning"])
    return float(threshold), info
