"""Unit tests for components.metrics.anomaly: binned pixel AUROC / AP against sklearn, AUPRO against an exact sweep,
threshold choice, and the anomaly keys of image_stats / summarize."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from components.metrics import aupro, choose_threshold, image_stats, pixel_entry, pro_curve, summarize
from components.metrics.anomaly import N_BINS, bin_edges, bin_index, pixel_ap, pixel_auroc

# ---------------------------------------------------------------------------------------------------------------
# helpers: masks with several regions, realistic maps, and the exact references
# ---------------------------------------------------------------------------------------------------------------


def _blobs(rng, shape, n, rmin=2, rmax=10):
    g = np.zeros(shape, dtype=bool)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for _ in range(n):
        cy, cx, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(rmin, rmax)
        g |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return g


def _beta_map(rng, g):
    """Independent pixels: normal ~ Beta(1, 30) (SuperSimpleNet-like, piled up near 0), defects ~ Beta(5, 2)."""
    return np.where(g, rng.beta(5, 2, g.shape), rng.beta(1, 30, g.shape))


def _smooth_map(rng, g):
    """A float32 sigmoid of a blurred logit field, like an upsampled and smoothed detector output."""
    logit = -6.0 + rng.normal(size=g.shape) + 7.0 * ndimage.gaussian_filter(g.astype(float), 2)
    logit = ndimage.gaussian_filter(logit, 1.5)
    return (1.0 / (1.0 + np.exp(-logit))).astype(np.float32).astype(np.float64)


def _dataset(rng, make_map, n=8, shape=(96, 96), blobs=4):
    pairs = []
    for i in range(n):
        g = _blobs(rng, shape, blobs) if i % 4 else np.zeros(shape, dtype=bool)  # every 4th image defect-free
        pairs.append((make_map(rng, g), g))
    return pairs


def _flat(pairs):
    return np.concatenate([g.ravel() for _, g in pairs]), np.concatenate([p.ravel() for p, _ in pairs])


def _exact_pro_curve(pairs):
    """Straightforward MVTec-style sweep over every distinct map value, no binning."""
    neg = np.sort(np.concatenate([p[~g] for p, g in pairs]))
    regions = []
    for p, g in pairs:
        lab, n = ndimage.label(g, structure=np.ones((3, 3)))
        regions += [np.sort(p[lab == r]) for r in range(1, n + 1)]
    thresholds = np.unique(np.concatenate([p.ravel() for p, _ in pairs]))[::-1]
    fpr = (neg.size - np.searchsorted(neg, thresholds, side="left")) / neg.size
    pro = np.mean([(r.size - np.searchsorted(r, thresholds, side="left")) / r.size for r in regions], axis=0)
    return np.concatenate(([0.0], fpr)), np.concatenate(([0.0], pro))


def _exact_aupro(pairs, limit=0.3):
    fpr, pro = _exact_pro_curve(pairs)
    keep = fpr <= limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < limit:
        i = int(np.argmax(fpr > limit))
        y_lim = pro[i - 1] + (pro[i] - pro[i - 1]) * (limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
        x, y = np.append(x, limit), np.append(y, y_lim)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / limit)


# ---------------------------------------------------------------------------------------------------------------
# the grid
# ---------------------------------------------------------------------------------------------------------------


def test_grid_edges_and_extremes():
    edges = bin_edges()
    assert edges.shape == (N_BINS + 1,) and np.all(np.diff(edges) > 0)
    mids = np.sqrt(edges[:-1] * edges[1:])  # strictly inside each bin
    assert np.array_equal(bin_index(mids), np.arange(N_BINS))
    assert bin_index(np.array([0.0, 1e-30, 0.5, 1.0 - 1e-12, 1.0])).tolist() == [
        0,
        0,
        N_BINS // 2,
        N_BINS - 1,
        N_BINS - 1,
    ]
    # 8-bit grey levels never share a bin, so binned metrics are exact on uint8 maps
    assert np.unique(bin_index(np.arange(256) / 255)).size == 256


# ---------------------------------------------------------------------------------------------------------------
# pixel AUROC / AP vs sklearn
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_map", [_beta_map, _smooth_map], ids=["beta", "smooth"])
def test_pixel_auroc_and_ap_vs_sklearn(make_map):
    rng = np.random.default_rng(0)
    pairs = _dataset(rng, make_map)
    y, s = _flat(pairs)
    entries = [pixel_entry(p, g) for p, g in pairs]
    # measured: |ΔAUROC| ~ 1e-7, |ΔAP| ~ 1e-5 (beta) / 2e-4 (smooth)
    assert pixel_auroc(entries) == pytest.approx(roc_auc_score(y, s), abs=2e-3)
    assert pixel_ap(entries) == pytest.approx(average_precision_score(y, s), abs=2e-3)


def test_pixel_metrics_overlapping_classes_vs_sklearn():
    """A poor detector (classes overlapping around 0.5) is where bins are widest in probability: still accurate."""
    rng = np.random.default_rng(1)
    pairs = []
    for _ in range(4):
        g = _blobs(rng, (64, 64), 5)
        pairs.append((np.where(g, rng.beta(3, 2, g.shape), rng.beta(2, 3, g.shape)), g))
    y, s = _flat(pairs)
    entries = [pixel_entry(p, g) for p, g in pairs]
    assert pixel_auroc(entries) == pytest.approx(roc_auc_score(y, s), abs=2e-3)
    assert pixel_ap(entries) == pytest.approx(average_precision_score(y, s), abs=2e-3)


def test_pixel_metrics_exact_on_uint8_maps():
    rng = np.random.default_rng(2)
    pairs = [(np.round(p * 255) / 255, g) for p, g in _dataset(rng, _beta_map, n=4, shape=(48, 48))]
    y, s = _flat(pairs)
    entries = [pixel_entry(p, g) for p, g in pairs]
    assert pixel_auroc(entries) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert pixel_ap(entries) == pytest.approx(average_precision_score(y, s), abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# AUPRO vs the exact sweep
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_vs_exact_sweep(seed):
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(5):
        g = _blobs(rng, (40, 48), 4, rmin=1, rmax=7) if i else np.zeros((40, 48), dtype=bool)
        # overlapping classes and per-region difficulty, so the PRO curve is far from trivial
        p = np.clip(rng.random(g.shape) * 0.7 + g * rng.uniform(0.05, 0.4), 0, 1)
        pairs.append((p, g))
    entries = [pixel_entry(p, g) for p, g in pairs]
    exact = _exact_aupro(pairs)
    assert 0.05 < exact < 0.95
    assert aupro(entries) == pytest.approx(exact, abs=0.01)
    assert aupro(entries, fpr_limit=1.0) == pytest.approx(_exact_aupro(pairs, 1.0), abs=0.01)
    # extreme coarsening of the region histograms (at most 8 pairs per region, the default is 256) stays close
    coarse = [pixel_entry(p, g, max_region_bins=8) for p, g in pairs]
    assert any(r["f"] > 1 for e in coarse for r in e["regions"])
    assert aupro(coarse) == pytest.approx(exact, abs=0.02)


def test_aupro_with_default_coarsening_vs_exact_sweep():
    rng = np.random.default_rng(11)
    g = np.zeros((128, 128), dtype=bool)
    for k in range(6):
        g[4 + 60 * (k // 3) : 44 + 60 * (k // 3), 4 + 40 * (k % 3) : 38 + 40 * (k % 3)] = True  # 1360 px each
    p = np.clip(rng.random(g.shape) * 0.8 + g * rng.uniform(0.0, 0.3), 0, 1)  # noise: regions span many bins
    entry = pixel_entry(p, g)
    assert all(r["f"] > 1 and len(r["c"]) <= 256 for r in entry["regions"])
    assert aupro([entry]) == pytest.approx(_exact_aupro([(p, g)]), abs=1e-3)


def test_aupro_realistic_maps_vs_exact_sweep():
    rng = np.random.default_rng(3)
    for make_map in (_beta_map, _smooth_map):
        pairs = _dataset(rng, make_map, n=4, shape=(64, 64))
        assert aupro([pixel_entry(p, g) for p, g in pairs]) == pytest.approx(_exact_aupro(pairs), abs=0.01)


def test_perfect_and_inverted_maps():
    rng = np.random.default_rng(4)
    masks = [_blobs(rng, (32, 32), 3) for _ in range(3)] + [np.zeros((32, 32), dtype=bool)]
    perfect = [pixel_entry(g.astype(float), g) for g in masks]
    assert aupro(perfect) == pytest.approx(1.0, abs=1e-12)
    assert pixel_auroc(perfect) == pytest.approx(1.0, abs=1e-12)
    assert pixel_ap(perfect) == pytest.approx(1.0, abs=1e-12)
    inverted = [pixel_entry(1.0 - g, g) for g in masks]
    assert aupro(inverted) == pytest.approx(0.0, abs=1e-12)
    assert pixel_auroc(inverted) == pytest.approx(0.0, abs=1e-12)
    # soft but perfectly ranked maps, both halves near the extremes of a sigmoid
    soft = [pixel_entry(np.where(g, 0.999, 1e-4) + rng.random(g.shape) * 1e-5, g) for g in masks]
    assert aupro(soft) == pytest.approx(1.0, abs=1e-9) and pixel_auroc(soft) == pytest.approx(1.0, abs=1e-12)


def test_pro_curve_shape_and_region_weighting():
    # one large region found, one small region missed: PRO weighs regions equally, pixel AUROC weighs pixels
    g = np.zeros((40, 40), dtype=bool)
    g[2:22, 2:22] = True  # 400 px
    g[35:37, 35:37] = True  # 4 px, not 8-connected to the first
    p = np.where(g, 0.9, 0.1)
    p[35:37, 35:37] = 0.05
    entry = pixel_entry(p, g)
    assert [r["n"] for r in entry["regions"]] == [400, 4]
    fpr, pro = pro_curve([entry])
    assert fpr[0] == 0 and pro[0] == 0 and fpr[-1] == pytest.approx(1) and pro[-1] == pytest.approx(1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-15)
    assert aupro([entry]) == pytest.approx(0.5, abs=1e-9)  # half the regions overlap fully at FPR 0
    assert pixel_auroc([entry]) > 0.99
    # diagonal touch counts as connected (8-connectivity)
    d = np.zeros((6, 6), dtype=bool)
    d[1, 1] = d[2, 2] = True
    assert len(pixel_entry(np.zeros((6, 6)), d)["regions"]) == 1


def test_undefined_cases_raise():
    empty = pixel_entry(np.random.default_rng(5).random((8, 8)), np.zeros((8, 8), dtype=bool))
    full = pixel_entry(np.random.default_rng(5).random((8, 8)), np.ones((8, 8), dtype=bool))
    for fn in (aupro, pixel_auroc, pixel_ap):
        with pytest.raises(ValueError, match="undefined"):
            fn([empty])
        with pytest.raises(ValueError, match="undefined"):
            fn([full])
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro([empty, full], fpr_limit=0)
    with pytest.raises(ValueError, match="NaN"):
        pixel_entry(np.full((4, 4), np.nan), np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pixel_entry(np.full((4, 4), 3.0), np.zeros((4, 4)))
    assert pixel_entry(np.zeros((4, 4)), np.full((4, 4), 255, np.uint8))["regions"][0]["n"] == 16


def test_entries_accept_image_stats_and_skip_unmasked():
    rng = np.random.default_rng(6)
    pairs = _dataset(rng, _beta_map, n=4, shape=(32, 32))
    stats = [image_stats(p, g) for p, g in pairs] + [image_stats(rng.random((32, 32)), None)]
    entries = [pixel_entry(p, g) for p, g in pairs]
    assert aupro(stats) == aupro(entries)
    with pytest.raises(ValueError, match="grid"):
        aupro([{**entries[0], "bins": 256}])


# ---------------------------------------------------------------------------------------------------------------
# the per-image dict stays small
# ---------------------------------------------------------------------------------------------------------------


def _ten_region_mask():
    g = np.zeros((256, 256), dtype=bool)
    for k in range(10):
        y, x = 20 + 110 * (k // 5), 10 + 48 * (k % 5)
        g[y : y + 8 + 3 * k, x : x + 30] = True  # 10 disjoint rectangles, 240 to 1050 px
    assert ndimage.label(g, structure=np.ones((3, 3)))[1] == 10
    return g


def test_image_stats_json_size():
    rng = np.random.default_rng(7)
    g = _ten_region_mask()
    for make_map in (_beta_map, _smooth_map):
        stats = image_stats(make_map(rng, g), g)
        assert len(stats["pixel"]["regions"]) == 10
        size = len(json.dumps(stats, allow_nan=False))
        assert size < 25_000, size  # measured ~17-20 kB, of which ~3 kB are the legacy 256-bin histograms
    # worst case, a uniform-noise map on 20 regions: region histograms are coarsened to <= 256 pairs
    g20 = np.zeros((256, 256), dtype=bool)
    for k in range(20):
        y, x = 4 + 50 * (k // 5), 4 + 50 * (k % 5)
        g20[y : y + 40, x : x + 40] = True
    stats = image_stats(rng.random(g20.shape), g20)
    assert all(len(r["c"]) <= 256 for r in stats["pixel"]["regions"])
    assert len(json.dumps(stats)) < 50_000


# ---------------------------------------------------------------------------------------------------------------
# image_stats / summarize
# ---------------------------------------------------------------------------------------------------------------


def _assert_no_nan(summary):
    json.dumps(summary, allow_nan=False)
    for value in summary.values():
        assert value is None or (isinstance(value, int | float) and math.isfinite(value))


def test_summarize_anomaly_keys_on_a_mixed_set():
    rng = np.random.default_rng(8)
    shape = (48, 48)
    defect = [_blobs(rng, shape, 3) for _ in range(3)]
    maps_def = [_beta_map(rng, g) for g in defect]
    good = np.zeros(shape, dtype=bool)
    maps_good = [_beta_map(rng, good) for _ in range(2)]
    unmasked = [_beta_map(rng, _blobs(rng, shape, 2)), _beta_map(rng, good)]  # weak labels only: 1, then 0
    stats = (
        [image_stats(p, g) for p, g in zip(maps_def, defect, strict=True)]
        + [image_stats(p, good) for p in maps_good]
        + [image_stats(p, None) for p in unmasked]
    )
    stats = json.loads(json.dumps(stats, allow_nan=False))  # as shipped from the workers
    labels = [1, 1, 1, 0, 0, 1, 0]
    scores = [0.9, 0.4, 0.8, 0.3, 0.5, 0.7, 0.1]
    out = summarize(stats, labels, scores)
    _assert_no_nan(out)
    pairs = list(zip(maps_def + maps_good, [*defect, good, good], strict=True))
    y, s = _flat(pairs)
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=2e-3)
    assert "pixel_auroc_binned" not in out  # one pixel AUROC, not two keys with the same value
    assert out["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=2e-3)
    assert out["aupro"] == pytest.approx(_exact_aupro(pairs), abs=0.01)
    assert out["n_defect_regions"] == sum(ndimage.label(g, structure=np.ones((3, 3)))[1] for g in defect)
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert out["image_ap"] == pytest.approx(average_precision_score(labels, scores))
    map_max = [float(p.max()) for p in maps_def + maps_good + unmasked]  # unmasked images count too
    assert [st["map_max"] for st in stats] == map_max
    assert out["seg_image_auroc"] == pytest.approx(roc_auc_score(labels, map_max))


def test_summarize_anomaly_keys_none_when_not_computable():
    rng = np.random.default_rng(9)
    shape = (16, 16)
    good = np.zeros(shape, dtype=bool)
    only_good = [image_stats(rng.random(shape), good), image_stats(rng.random(shape), None)]
    out = summarize(only_good, [0, 1], [0.2, 0.8])  # labels disagree with masks: labels are the caller's truth
    _assert_no_nan(out)
    for key in ("pixel_auroc", "pixel_ap", "aupro"):
        assert out[key] is None
    assert out["n_defect_regions"] == 0
    assert out["image_auroc"] == 1.0 and out["seg_image_auroc"] is not None
    # all-defect mask: no normal pixels
    out = summarize([image_stats(rng.random(shape), np.ones(shape))], [1], [0.5])
    _assert_no_nan(out)
    assert out["pixel_auroc"] is None and out["aupro"] is None and out["seg_image_auroc"] is None
    # no masks at all, one class only, or no labels
    out = summarize([image_stats(rng.random(shape), None) for _ in range(3)], [0, 0, None], [0.1, 0.2, 0.3])
    _assert_no_nan(out)
    assert out["aupro"] is None and out["image_auroc"] is None and out["seg_image_auroc"] is None
    out = summarize([image_stats(rng.random(shape), good)], [], [])
    _assert_no_nan(out)
    assert out["seg_image_auroc"] is None
    out = summarize([], [], [])
    _assert_no_nan(out)
    assert out["aupro"] is None and out["n_defect_regions"] == 0


def test_summarize_refuses_pixel_metrics_for_stats_without_pixel_entries(caplog):
    rng = np.random.default_rng(10)
    g = _blobs(rng, (24, 24), 2)
    old = {k: v for k, v in image_stats(_beta_map(rng, g), g).items() if k not in ("pixel", "map_max")}
    with caplog.at_level(logging.WARNING, logger="components.metrics.aggregate"):
        out = summarize([old], [1], [0.5])
    _assert_no_nan(out)
    assert out["aupro"] is None and out["pixel_auroc"] is None
    assert "no pixel entry" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# thresholds
# ---------------------------------------------------------------------------------------------------------------


def test_choose_threshold_f1_max_branch():
    labels = [0, 0, 1, 1, 1, 0, None]
    scores = [0.1, 0.4, 0.35, 0.8, 0.9, 0.2, float("nan")]  # the unlabelled NaN is ignored
    thr, info = choose_threshold(labels, scores)
    assert thr == 0.35  # F1 = 6/7, hand-computed in test_metrics.py
    assert info == {
        "rule": "f1_max",
        "f1": pytest.approx(6 / 7),
        "n_normal": 3,
        "n_defective": 3,
        "margin": 0.0,
        "warning": None,
    }
    json.dumps(info, allow_nan=False)
    thr, info = choose_threshold([1, 1], [0.6, 0.7])  # no normal image: flag everything, and say so
    assert thr == 0.6 and info["rule"] == "f1_max" and "no normal image" in info["warning"]


def test_choose_threshold_max_normal_fallback(caplog):
    scores = [0.1, 0.25, 0.2]
    with caplog.at_level(logging.WARNING, logger="components.metrics.anomaly"):
        thr, info = choose_threshold([0, 0, 0], scores)
    assert info["rule"] == "max_normal" and info["f1"] is None and info["n_defective"] == 0
    assert "no defective image" in info["warning"] and "no defective image" in caplog.text
    assert 0.25 < thr == pytest.approx(0.25) and not any(s >= thr for s in scores)  # no validation alarm
    thr, info = choose_threshold([0, 0, 0], scores, margin=0.2)
    assert thr == pytest.approx(0.3) and "margin" in info["warning"]
    thr, _ = choose_threshold([0, 0], [-2.0, -1.0], margin=0.5)
    assert thr == pytest.approx(-0.5)  # the margin raises negative scores too
    thr, _ = choose_threshold([0], [0.0])
    assert thr > 0.0


def test_choose_threshold_errors():
    with pytest.raises(ValueError, match="no labelled image"):
        choose_threshold([], [])
    with pytest.raises(ValueError, match="no labelled image"):
        choose_threshold([None], [0.3])
    with pytest.raises(ValueError, match="no defective image"):
        choose_threshold([0, 0], [0.1, 0.2], fallback=None)
    with pytest.raises(ValueError, match="non-finite"):
        choose_threshold([0, 1], [0.1, float("inf")])
    with pytest.raises(ValueError, match="margin"):
        choose_threshold([0], [0.1], margin=-1)
    with pytest.raises(ValueError, match="fallback"):
        choose_threshold([0], [0.1], fallback="percentile")


# ---------------------------------------------------------------------------------------------------------------
# the pixel threshold: pooled F1-max, and the warning when a fixed threshold says nothing
# ---------------------------------------------------------------------------------------------------------------


def _f1_at(pairs, t):
    y, s = _flat(pairs)
    pred = s >= t
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    return 2 * tp / (2 * tp + fp + fn)


@pytest.mark.parametrize("make_map", [_beta_map, _smooth_map])
def test_pixel_f1_max_is_the_best_threshold_of_an_exact_sweep(make_map):
    from components.metrics.anomaly import pixel_f1_max

    rng = np.random.default_rng(7)
    pairs = _dataset(rng, make_map, n=6, shape=(64, 64))
    thr, f1 = pixel_f1_max([pixel_entry(p, g) for p, g in pairs])
    assert f1 == pytest.approx(_f1_at(pairs, thr), abs=1e-12)  # the reported F1 is the F1 of `map >= thr`
    _, s = _flat(pairs)
    candidates = np.unique(s)[:: max(1, np.unique(s).size // 4000)]
    best = max(_f1_at(pairs, t) for t in candidates)  # an exact sweep over (a dense subset of) the map values
    assert f1 >= best - 2e-3  # the grid's edges lose at most a sliver of F1 between two edges


def test_pixel_f1_max_on_a_shifted_map_and_the_warning_at_half():
    """A map that separates perfectly but sits at 0.4-0.45 on normal pixels and 0.46-0.49 on defects (what
    SuperSimpleNet's maps look like): at 0.5 nothing is predicted; calibration finds the gap."""
    from components.metrics.aggregate import threshold_warnings

    rng = np.random.default_rng(3)
    pairs = []
    for i in range(4):
        g = _blobs(rng, (48, 48), 2) if i else np.zeros((48, 48), dtype=bool)
        pairs.append((np.where(g, rng.uniform(0.46, 0.49, g.shape), rng.uniform(0.40, 0.45, g.shape)), g))
    at_half = summarize([image_stats(p, g, threshold=0.5) for p, g in pairs], [], [])
    assert at_half["pixel_f1"] == 0.0 and at_half["pixel_f1_max"] == pytest.approx(1.0)
    assert 0.45 <= at_half["pixel_f1_max_threshold"] <= 0.46
    warnings = threshold_warnings(at_half, 0.5)
    assert len(warnings) == 2 and "calibrate" in warnings[0] and "empty" in warnings[1]
    calibrated = at_half["pixel_f1_max_threshold"]
    at_best = summarize([image_stats(p, g, threshold=calibrated) for p, g in pairs], [], [])
    assert at_best["pixel_f1"] == pytest.approx(1.0) and at_best["seg_recall"] == 1.0
    assert threshold_warnings(at_best, calibrated) == []
