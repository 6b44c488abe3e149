"""Unit tests for components.metrics: hand-computed cases, sklearn as the oracle for ranking metrics."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from components.metrics import (
    auc_from_histograms,
    average_precision,
    confusion,
    e_measure,
    e_measure_curve,
    f1_max_threshold,
    f_max,
    image_stats,
    iou,
    iou_from_counts,
    mae,
    mean_pr_curve,
    pixel_roc_auc,
    pooled_iou,
    pr_curve_counts,
    roc_auc,
    s_measure,
    sample_miou,
    seg_accuracy,
    seg_recall,
    summarize,
    weighted_fmeasure,
)

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------------------
# saliency: mae, iou
# ---------------------------------------------------------------------------------------------------------------


def test_mae_hand_computed():
    pred = np.array([[0.2, 0.8], [1.0, 0.0]])
    gt = np.array([[0, 1], [1, 1]], dtype=np.uint8)
    # |0.2-0| + |0.8-1| + |1-1| + |0-1| = 0.2 + 0.2 + 0 + 1 = 1.4 ; / 4 pixels = 0.35
    assert mae(pred, gt) == pytest.approx(0.35)


def test_mae_normalize_matches_mae2_m():
    pred = np.array([[0.2, 0.6], [0.4, 0.2]])
    gt = np.array([[0, 1], [1, 0]], dtype=bool)
    # min-max: (p - 0.2) / 0.4 -> [[0, 1], [0.5, 0]]; uint8: 0.5*255 = 127.5 rounds half up to 128 -> 128/255
    # errors: 0, 0, 1 - 128/255 = 127/255, 0 -> mean = 127 / (255 * 4) = 127/1020
    assert mae(pred, gt, normalize=True) == pytest.approx(127 / 1020)
    # plain: |0.2| + |0.6-1| + |0.4-1| + |0.2| = 0.2 + 0.4 + 0.6 + 0.2 = 1.4 ; / 4 = 0.35
    assert mae(pred, gt) == pytest.approx(0.35)
    # a constant map becomes all zeros (MATLAB: 0/0 -> NaN -> im2uint8 -> 0): error = 1 defect pixel / 4
    const = np.full((2, 2), 0.7)
    assert mae(const, np.array([[0, 1], [0, 0]]), normalize=True) == pytest.approx(0.25)


def test_iou_hand_computed_and_empty_conventions():
    pred = np.array([[0.9, 0.6, 0.1], [0.5, 0.2, 0.0]])
    gt = np.array([[1, 0, 0], [1, 1, 0]], dtype=np.uint8)
    # pred >= 0.5 -> [[1,1,0],[1,0,0]] (0.5 counts); I = {(0,0),(1,0)} = 2 ; U = {(0,0),(0,1),(1,0),(1,1)} = 4
    assert iou(pred, gt) == pytest.approx((2 + 1e-7) / (4 + 1e-7))
    # threshold 0.95 -> nothing predicted; I = 0, U = 3 -> ~ 3e-8, not exactly 0
    assert 0 < iou(pred, gt, threshold=0.95) < 1e-7
    # both empty: (0 + 1e-7) / (0 + 1e-7) = 1
    assert iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0


def test_prediction_range_is_checked():
    gt = np.zeros((2, 2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mae(np.full((2, 2), 3.0), gt)
    with pytest.raises(ValueError, match="NaN"):
        iou(np.full((2, 2), np.nan), gt)
    with pytest.raises(ValueError, match="shape"):
        mae(np.zeros((2, 2)), np.zeros((2, 3)))
    # float round-off above 1 is tolerated (clipped)
    assert mae(np.full((2, 2), 1.0 + 1e-9), np.ones((2, 2))) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------------------------
# sample-centric metrics
# ---------------------------------------------------------------------------------------------------------------


def test_confusion_hand_computed():
    pred_bin = np.array([[1, 1, 0], [1, 0, 0]], dtype=bool)
    gt = np.array([[1, 0, 0], [1, 1, 0]], dtype=np.uint8)
    # tp: (0,0),(1,0) = 2 ; fp: (0,1) = 1 ; fn: (1,1) = 1 ; tn: 6 - 4 = 2
    assert confusion(pred_bin, gt) == (2, 1, 1, 2)
    assert all(isinstance(v, int) for v in confusion(pred_bin, gt))


def test_pooled_iou_hand_computed():
    counts = [(2, 1, 1, 2), (0, 0, 0, 6), (3, 0, 5, 0)]
    # ΣTP = 2 + 0 + 3 = 5 ; Σ(TP+FP+FN) = 4 + 0 + 8 = 12 -> 5/12
    assert pooled_iou(counts) == pytest.approx(5 / 12)
    # per-image mean would be (0.5 + 1 + 0.375) / 3 = 0.625: pooling is a different number
    assert pooled_iou([(0, 0, 0, 9)]) == 1.0
    assert iou_from_counts(2, 1, 1) == 0.5
    assert iou_from_counts(0, 0, 0) == 1.0
    assert iou_from_counts(0, 0, 4) == 0.0


# five samples: a hit (IoU 0.5), a clean good image (empty/empty), a false alarm on a good image,
# a partial hit (IoU 0.25), a miss (IoU 0)
IOUS = [0.5, 1.0, 0.0, 0.25, 0.0]
GT_NONEMPTY = [True, False, False, True, True]
PRED_NONEMPTY = [True, False, True, True, False]


def test_sample_miou_hand_computed():
    # defective samples: 0, 3, 4 -> (0.5 + 0.25 + 0) / 3 = 0.25
    assert sample_miou(IOUS, GT_NONEMPTY, PRED_NONEMPTY) == pytest.approx(0.25)
    # plus the pred-only sample 2 -> (0.5 + 0 + 0.25 + 0) / 4 = 0.1875
    assert sample_miou(IOUS, GT_NONEMPTY, PRED_NONEMPTY, include_pred_only=True) == pytest.approx(0.1875)
    # no defective sample -> undefined
    assert sample_miou([1.0, 1.0], [False, False]) is None
    with pytest.raises(ValueError):
        sample_miou(IOUS, GT_NONEMPTY, include_pred_only=True)


def test_seg_recall_hand_computed():
    # defective IoUs: 0.5, 0.25, 0.0
    # tau 0.5: only 0.5 >= 0.5 -> 1/3
    assert seg_recall(IOUS, GT_NONEMPTY, tau=0.5) == pytest.approx(1 / 3)
    # tau 0 (any overlap): 0.5 and 0.25 are > 0 -> 2/3
    assert seg_recall(IOUS, GT_NONEMPTY, tau=0.0) == pytest.approx(2 / 3)
    # tau 0.25 is inclusive -> 2/3
    assert seg_recall(IOUS, GT_NONEMPTY, tau=0.25) == pytest.approx(2 / 3)
    # a miss smoothed as (0 + 1e-7) / (10 + 1e-7) ~ 1e-8 is still a miss at tau 0
    smoothed = [0.5, 1.0, 1e-7 / (5 + 1e-7), 0.25, 1e-7 / (10 + 1e-7)]
    assert seg_recall(smoothed, GT_NONEMPTY, tau=0.0) == pytest.approx(2 / 3)
    assert seg_recall([1.0], [False]) is None


def test_seg_accuracy_hand_computed():
    # gt  [1,0,0,1,1] ; pred [1,0,1,1,0] -> correct: yes, yes, no, yes, no -> 3/5
    assert seg_accuracy(GT_NONEMPTY, PRED_NONEMPTY) == pytest.approx(3 / 5)
    # pixel counts [12,0,1,3,0] with min_pixels 2 -> decisions [1,0,0,1,0] -> correct: y,y,y,y,n -> 4/5
    assert seg_accuracy(GT_NONEMPTY, [12, 0, 1, 3, 0], min_pixels=2) == pytest.approx(4 / 5)
    # with min_pixels 1 the single-pixel speckle counts -> back to 3/5
    assert seg_accuracy(GT_NONEMPTY, [12, 0, 1, 3, 0]) == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="counts"):
        seg_accuracy(GT_NONEMPTY, PRED_NONEMPTY, min_pixels=2)
    assert seg_accuracy([], []) is None


# ---------------------------------------------------------------------------------------------------------------
# ranking metrics vs sklearn
# ---------------------------------------------------------------------------------------------------------------


def test_roc_auc_and_ap_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(2, 80))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            y[0] = 1 - y[0]
        s = rng.integers(0, 6, n) / 5.0  # heavy ties
        assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
        s = rng.normal(size=n)
        assert roc_auc(y.astype(bool), s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_ranking_metrics_reject_single_class():
    for fn in (roc_auc, average_precision):
        with pytest.raises(ValueError, match="only one class"):
            fn([1, 1, 1], [0.1, 0.2, 0.3])
        with pytest.raises(ValueError, match="only one class"):
            fn([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="binary"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0, 1], [0.1, np.nan])


def test_f1_max_threshold_hand_computed_and_vs_sklearn():
    y = [0, 0, 1, 1, 1, 0]
    s = [0.1, 0.4, 0.35, 0.8, 0.9, 0.2]
    # descending: 0.9(+) 0.8(+) 0.4(-) 0.35(+) 0.2(-) 0.1(-), P = 3, F1 = 2tp / (tp + fp + P)
    # t=0.9: 2/4 = .5 ; 0.8: 4/5 = .8 ; 0.4: 4/6 ; 0.35: 6/7 ; 0.2: 6/8 ; 0.1: 6/9  -> best 6/7 at 0.35
    best, thr = f1_max_threshold(y, s)
    assert best == pytest.approx(6 / 7)
    assert thr == 0.35
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    s = rng.integers(0, 10, 60) / 9
    best, thr = f1_max_threshold(y, s)
    brute = max(f1_score(y, (s >= t).astype(int)) for t in np.unique(s))
    assert best == pytest.approx(brute)
    assert f1_score(y, (s >= thr).astype(int)) == pytest.approx(best)


def _random_maps(rng, n, shape, levels, defect_share):
    pairs = []
    for _ in range(n):
        gt = rng.random(shape) < defect_share
        pred = np.clip(rng.integers(0, levels, shape) / (levels - 1) + 0.3 * gt, 0, 1)
        pairs.append((pred, gt.astype(np.uint8)))
    return pairs


@pytest.mark.parametrize("defect_share", [0.05, 0.9])  # keeps the positives / keeps the negatives
def test_pixel_roc_auc_exact_vs_sklearn(defect_share):
    rng = np.random.default_rng(2)
    pairs = _random_maps(rng, 6, (24, 17), levels=20, defect_share=defect_share)
    pairs.append((np.zeros((5, 5)), np.zeros((5, 5), np.uint8)))  # a defect-free image, clean prediction
    y = np.concatenate([g.ravel() for _, g in pairs])
    s = np.concatenate([p.ravel() for p, _ in pairs])
    assert pixel_roc_auc(pairs) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert pixel_roc_auc(iter(pairs)) == pytest.approx(roc_auc_score(y, s), abs=1e-12)  # generators work


def test_pixel_roc_auc_single_class_raises():
    with pytest.raises(ValueError, match="only one class"):
        pixel_roc_auc([(np.random.default_rng(0).random((4, 4)), np.zeros((4, 4)))])


def test_binned_pixel_auc_vs_sklearn():
    rng = np.random.default_rng(3)
    pairs = []
    for _ in range(5):
        gt = rng.random((32, 32)) < 0.1
        pred = np.where(gt, rng.beta(3, 2, gt.shape), rng.beta(2, 3, gt.shape))  # continuous, overlapping
        pairs.append((pred, gt))
    y = np.concatenate([g.ravel() for _, g in pairs])
    s = np.concatenate([p.ravel() for p, _ in pairs])
    hists = [pr_curve_counts(p, g, n_bins=4096) for p, g in pairs]
    approx = auc_from_histograms(sum(h[0] for h in hists), sum(h[1] for h in hists))
    assert approx == pytest.approx(roc_auc_score(y, s), abs=1e-3)
    # values already on the bin grid (uint8 / 255 with 256 bins): the binned AUC is exact
    quant = [(np.round(p * 255) / 255, g) for p, g in pairs]
    sq = np.concatenate([p.ravel() for p, _ in quant])
    hists = [pr_curve_counts(p, g) for p, g in quant]
    exact = auc_from_histograms(sum(h[0] for h in hists), sum(h[1] for h in hists))
    assert exact == pytest.approx(roc_auc_score(y, sq), abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# S-measure, weighted F-measure
# ---------------------------------------------------------------------------------------------------------------


def _blob_mask(shape=(40, 50), box=(10, 25, 12, 30)):
    gt = np.zeros(shape, dtype=np.uint8)
    y0, y1, x0, x1 = box
    gt[y0:y1, x0:x1] = 1
    return gt


def test_s_measure_sanity():
    gt = _blob_mask()
    assert s_measure(gt.astype(float), gt) == pytest.approx(1.0, abs=1e-9)
    assert s_measure(np.zeros((8, 8)), np.zeros((8, 8))) == pytest.approx(1.0)
    # all-zero GT scores 1 - mean(pred); all-one GT scores mean(pred)
    assert s_measure(np.full((4, 4), 0.25), np.zeros((4, 4))) == pytest.approx(0.75)
    assert s_measure(np.full((4, 4), 0.25), np.ones((4, 4))) == pytest.approx(0.25)
    inverted = 1.0 - gt.astype(float)
    assert s_measure(inverted, gt) < 0.1
    noisy = np.clip(gt + np.random.default_rng(4).normal(0, 0.2, gt.shape), 0, 1)
    assert s_measure(inverted, gt) < s_measure(noisy, gt) < 1.0


def test_s_measure_hand_computed():
    # 1x4 image, pred [0, .8, .2, 0], gt [0, 1, 1, 0]
    pred = np.array([[0.0, 0.8, 0.2, 0.0]])
    gt = np.array([[0, 1, 1, 0]])
    # object: fg values [.8, .2]: x = .5, std(ddof=1) = sqrt(.18); O_FG = 2*.5 / (.25 + 1 + sqrt(.18))
    #         bg values 1 - [0, 0] = [1, 1]: O_BG = 2 / (1 + 1 + 0) = 1 ; u = 2/4 -> S_o = .5 O_FG + .5
    o_fg = 1.0 / (1.25 + math.sqrt(0.18))
    s_obj = 0.5 * o_fg + 0.5
    # region: 0-based centroid column (1 + 2) / 2 = 1.5, rounded half to even (PySODMetrics) = 2, 1-based X = 3;
    #   row 0 -> Y = 1 (MATLAB's round(2.5) = 3 agrees here; the tie rule matters in test_metrics_sod_oracle.py)
    #   w1 = 3*1/4, w2 = (4-3)*1/4, w3 = w4 = 0
    #   LT: pred [0, .8, .2], gt [0, 1, 1]: x = 1/3, y = 2/3, N - 1 = 2
    #     var_x = (1/9 + (.8-1/3)^2 + (.2-1/3)^2) / 2 ; var_y = (4/9 + 1/9 + 1/9) / 2 = 1/3
    #     cov = ((-1/3)(-2/3) + (.8-1/3)(1/3) + (.2-1/3)(1/3)) / 2 = 1/6
    #     Q1 = 4 x y cov / ((x^2 + y^2)(var_x + var_y))
    #   RT: pred [0], gt [0]: alpha = beta = 0 -> Q2 = 1
    var_x = (1 / 9 + (0.8 - 1 / 3) ** 2 + (0.2 - 1 / 3) ** 2) / 2
    q1 = 4 * (1 / 3) * (2 / 3) * (1 / 6) / ((1 / 9 + 4 / 9) * (var_x + 1 / 3))  # = 0.5263...
    s_reg = 0.75 * q1 + 0.25 * 1.0
    assert s_measure(pred, gt) == pytest.approx(0.5 * s_obj + 0.5 * s_reg, abs=1e-9)  # 0.72169...


def test_weighted_fmeasure_sanity():
    gt = _blob_mask()
    perfect = weighted_fmeasure(gt.astype(float), gt)
    assert perfect == pytest.approx(1.0, abs=1e-9)
    shifted = np.roll(gt, 4, axis=1).astype(float)  # 4 px right: mostly overlapping
    far = np.roll(gt, 8, axis=0).astype(float)  # 8 of 15 rows down: half overlapping
    disjoint = np.roll(gt, 15, axis=0).astype(float)  # no overlap
    w_shift, w_far, w_disjoint = (weighted_fmeasure(p, gt) for p in (shifted, far, disjoint))
    assert 0 < w_far < w_shift < 1
    assert w_disjoint == pytest.approx(0.0, abs=1e-9)
    # uniform 0.7 inside the defect, 0 outside: error 0.3 on defect pixels, 0 outside; background pixels borrow
    # the nearest defect error (0.3), so the smoothed error is 0.3 too and nothing is forgiven.
    # R = 1 - 0.3 = 0.7 ; P = 0.7|G| / (0.7|G| + 0) = 1 ; F = 2 * 0.7 * 1 / (0.7 + 1) = 1.4 / 1.7
    assert weighted_fmeasure(gt * 0.7, gt) == pytest.approx(2 * 0.7 / 1.7, abs=1e-9)
    assert weighted_fmeasure(np.zeros(gt.shape), gt) == pytest.approx(0.0, abs=1e-9)
    # empty mask: no information; WFb.m returns 1, configurable
    assert weighted_fmeasure(np.ones((5, 5)), np.zeros((5, 5))) == 1.0
    assert weighted_fmeasure(np.ones((5, 5)), np.zeros((5, 5)), empty_value=0.0) == 0.0
    # a mask covering the whole image has no background term
    assert weighted_fmeasure(np.ones((5, 5)), np.ones((5, 5))) == pytest.approx(1.0, abs=1e-9)


def test_e_measure_hand_computed():
    pred = np.array([[0.9, 0.6], [0.1, 0.0]])
    gt = np.array([[1, 0], [0, 0]])
    # threshold 0.5 -> binary [[1, 1], [0, 0]]: tp 1, fp 1, fn 0, tn 2 ; mean(binary) = 0.5, mean(gt) = 0.25
    # deviations from the means: predicted fg +0.5, bg -0.5 ; gt fg +0.75, bg -0.25
    # align = 2ab / (a² + b²), enhanced = (1 + align)² / 4:
    #   tp: a .5,  b .75  -> align .75/.8125 = 12/13 -> (25/13)² / 4 = 625/676
    #   fp: a .5,  b -.25 -> align -.25/.3125 = -.8 -> .2² / 4 = .01
    #   tn: a -.5, b -.25 -> align .8                -> 1.8² / 4 = .81 (2 pixels)
    # E = sum / (n - 1) = (625/676 + .01 + 1.62) / 3
    assert e_measure(pred, gt, threshold=0.5) == pytest.approx((625 / 676 + 0.01 + 1.62) / 3, abs=1e-12)
    # adaptive threshold 2 * mean = 0.8 -> [[1, 0], [0, 0]] = the mask: every term is 1, E = n / (n - 1) = 4/3
    assert e_measure(pred, gt) == pytest.approx(4 / 3)
    # empty mask: pixels predicted clean / (n - 1); the adaptive threshold of an all-zero map is 0, so every pixel
    # counts as predicted defective and a clean map scores 0 (the references' behaviour, kept for comparability)
    clean = np.zeros((2, 2))
    assert e_measure(clean, np.zeros((2, 2)), threshold=0.5) == pytest.approx(4 / 3)
    assert e_measure(clean, np.zeros((2, 2))) == 0.0
    assert e_measure(np.array([[0.9, 0.0], [0.0, 0.0]]), np.zeros((2, 2))) == pytest.approx(3 / 3)
    # full mask: pixels predicted defective / (n - 1)
    assert e_measure(np.array([[0.9, 0.9], [0.9, 0.0]]), np.ones((2, 2)), threshold=0.5) == pytest.approx(3 / 3)


def test_e_measure_curve_matches_thresholding():
    rng = np.random.default_rng(6)
    for gt in (_blob_mask((20, 24), (3, 9, 5, 15)), np.zeros((20, 24)), np.ones((20, 24))):
        pred = rng.integers(0, 256, gt.shape) / 255  # on the uint8 grid: bin k holds grey level k
        curve = e_measure_curve(*pr_curve_counts(pred, gt))
        assert curve.shape == (256,)
        expected = [e_measure(pred, gt, threshold=k / 256) for k in range(256)]
        np.testing.assert_allclose(curve, expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# PR curve counts and F_max
# ---------------------------------------------------------------------------------------------------------------


def _brute_force_fmax(pairs, beta2, n_bins=256):
    best = 0.0
    for k in range(n_bins):
        t = k / n_bins
        ps, rs = [], []
        for pred, gt in pairs:
            g = gt.astype(bool)
            if not g.any():
                continue
            b = pred >= t
            tp = np.count_nonzero(b & g)
            ps.append(tp / b.sum() if b.sum() else 0.0)
            rs.append(tp / g.sum())
        p, r = np.mean(ps), np.mean(rs)
        if beta2 * p + r > 0:
            best = max(best, (1 + beta2) * p * r / (beta2 * p + r))
    return best


def test_pr_curve_counts_bins():
    pred = np.array([[0.0, 1 / 255, 0.5], [254 / 255, 1.0, 0.999]])
    gt = np.array([[1, 0, 1], [0, 1, 0]])
    hp, hn = pr_curve_counts(pred, gt)
    assert hp.sum() == 3 and hn.sum() == 3
    assert hp[0] == 1 and hp[128] == 1 and hp[255] == 1  # 0 -> bin 0, 0.5 -> 128, 1.0 -> last bin
    assert hn[1] == 1 and hn[254] == 1 and hn[255] == 1  # uint8 grey level v/255 lands in bin v


def test_f_max_vs_brute_force():
    rng = np.random.default_rng(5)
    pairs = []
    for _ in range(4):
        y0, y1 = sorted(int(v) for v in rng.integers(0, 20, 2))
        x0, x1 = sorted(int(v) for v in rng.integers(0, 24, 2))
        gt = _blob_mask((20, 24), (y0, y1 + 1, x0, x1 + 1))
        gt[0, 0] = 1  # never empty
        pred = np.clip(0.5 * gt + rng.random(gt.shape) * 0.6, 0, 1)
        pairs.append((pred, gt))
    pairs.append((rng.random((10, 10)), np.zeros((10, 10), np.uint8)))  # empty GT: skipped
    hists = [pr_curve_counts(p, g) for p, g in pairs]
    for beta2 in (0.3, 1.0):
        assert f_max(hists, beta2=beta2) == pytest.approx(_brute_force_fmax(pairs, beta2), abs=1e-12)
    precision, recall, thresholds = mean_pr_curve(hists)
    assert precision.shape == recall.shape == thresholds.shape == (256,)
    assert recall[0] == pytest.approx(1.0) and np.all(np.diff(recall) <= 1e-12)
    with pytest.raises(ValueError, match="defect pixels"):
        f_max([pr_curve_counts(np.zeros((3, 3)), np.zeros((3, 3)))])


# ---------------------------------------------------------------------------------------------------------------
# image_stats / summarize
# ---------------------------------------------------------------------------------------------------------------


def _mixed_set():
    gt_def = _blob_mask((16, 16), (4, 10, 4, 10))  # 36 defect pixels
    pred_hit = gt_def * 0.9  # perfect at 0.5
    gt_good = np.zeros((16, 16), np.uint8)
    pred_clean = np.full((16, 16), 0.1)
    pred_alarm = pred_clean.copy()
    pred_alarm[0, :3] = 0.8  # 3-pixel false alarm
    gt_miss = _blob_mask((16, 16), (0, 2, 0, 2))  # 4 defect pixels, missed
    return [
        image_stats(pred_hit, gt_def),
        image_stats(pred_clean, gt_good),
        image_stats(pred_alarm, gt_good),
        image_stats(pred_clean, gt_miss),
        image_stats(pred_alarm, None),
    ]


def test_image_stats_contract():
    stats = _mixed_set()
    json.dumps(stats, allow_nan=False)  # JSON-able, no NaN
    s0 = stats[0]
    keys = ("mae", "iou", "wfm", "sm", "e_measure_adaptive", "tp", "fp", "fn", "tn", "gt_pixels", "pred_pixels")
    for key in (*keys, "hist_pos", "hist_neg"):
        assert key in s0
    assert s0["has_mask"] is True
    assert (s0["tp"], s0["fp"], s0["fn"], s0["tn"]) == (36, 0, 0, 220)
    assert len(s0["hist_pos"]) == 256 and sum(s0["hist_pos"]) == 36 and sum(s0["hist_neg"]) == 220
    assert stats[1]["wfm"] is None and stats[1]["iou"] == 1.0
    pred_alarm = np.full((16, 16), 0.1)
    pred_alarm[0, :3] = 0.8
    assert stats[2]["iou"] == pytest.approx(iou(pred_alarm, np.zeros((16, 16))))
    assert stats[4] == {
        "has_mask": False,
        "n_pixels": 256,
        "threshold": 0.5,
        "pred_pixels": 3,
        "pred_nonempty": True,
        "map_max": 0.8,
    }
    assert image_stats(pred_alarm, None, min_pixels=4)["pred_nonempty"] is False
    assert image_stats(pred_alarm[None], np.zeros((1, 16, 16)))["has_mask"] is True  # (1, H, W) tolerated
    with pytest.raises(ValueError, match="resize"):
        image_stats(pred_alarm, np.zeros((8, 8)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        image_stats(pred_alarm * 10, None)


def _assert_no_nan(summary):
    json.dumps(summary, allow_nan=False)
    for value in summary.values():
        assert value is None or isinstance(value, int | float)
        assert value is None or math.isfinite(value)


def test_summarize_mixed_set():
    stats = _mixed_set()
    labels = [1, 0, 0, 1, None]
    scores = [0.9, 0.2, 0.6, 0.3, 0.7]
    out = summarize(stats, labels, scores)
    _assert_no_nan(out)
    assert out["n_images"] == 5 and out["n_with_mask"] == 4 and out["n_defective_masks"] == 2
    assert out["n_labeled"] == 4
    # smoothed IoUs: hit 1, clean 1 (empty/empty), alarm 1e-7/(3+1e-7), miss 1e-7/(4+1e-7) -> ~ 2/4
    assert out["iou"] == pytest.approx(0.5, abs=1e-7)
    # pooled: ΣTP = 36 ; Σ(TP+FP+FN) = 36 + 3 + 4 = 43
    assert out["iou_pooled"] == pytest.approx(36 / 43)
    # defective samples: hit (1) and miss (0)
    assert out["sample_miou"] == pytest.approx(0.5)
    assert out["seg_recall"] == pytest.approx(0.5)
    # decisions "mask non-empty": hit yes/yes, clean no/no, alarm yes/no, miss no/yes -> 2/4
    assert out["seg_accuracy"] == pytest.approx(0.5)
    # image level, labelled: (1, .9) (0, .2) (0, .6) (1, .3): pairs pos>neg: .9>.2, .9>.6, .3>.2 -> 3/4
    assert out["image_auroc"] == pytest.approx(0.75)
    assert out["image_ap"] == pytest.approx(average_precision_score([1, 0, 0, 1], [0.9, 0.2, 0.6, 0.3]))
    assert 0 < out["f_max"] <= 1 and 0 < out["wfm"] <= 1 and 0 < out["sm"] <= 1
    # E-measures average over all masked images (defect-free ones too, as PySODMetrics); max >= mean of one curve
    assert 0 < out["e_measure_mean"] <= out["e_measure_max"] <= 1 + 1 / 255
    assert out["e_measure_adaptive"] == pytest.approx(np.mean([s["e_measure_adaptive"] for s in stats[:4]]))
    assert out["pixel_auroc"] is not None
    # pred-only images join sample_miou on request: (1 + 0 + 0) / 3
    assert summarize(stats, labels, scores, include_pred_only=True)["sample_miou"] == pytest.approx(1 / 3)


def test_summarize_degenerate_sets_give_none():
    stats = _mixed_set()
    # one class among labelled images -> no AUROC / AP, no exception
    out = summarize(stats, [0, 0, None, 0, None], [0.1, 0.2, 0.3, float("nan"), 0.5])
    _assert_no_nan(out)
    assert out["image_auroc"] is None and out["image_ap"] is None
    assert out["n_labeled"] == 2  # the NaN score is skipped
    # only defect-free masks -> defect-based metrics are None, the rest is defined
    good = [stats[1], stats[2]]
    out = summarize(good, [], [])
    _assert_no_nan(out)
    for key in ("wfm", "f_max", "sample_miou", "seg_recall", "pixel_auroc"):
        assert out[key] is None
    for key in ("e_measure_mean", "e_measure_max", "e_measure_adaptive"):  # defined on defect-free images
        assert out[key] is not None
    # stats from before the E-measure: the curve comes from the histograms, the adaptive E is not half-computed
    old = [{k: v for k, v in s.items() if k != "e_measure_adaptive"} for s in stats[:2]] + stats[2:4]
    out = summarize(old, [], [])
    assert out["e_measure_adaptive"] is None and out["e_measure_mean"] == summarize(stats[:4], [], [])["e_measure_mean"]
    assert out["iou"] == pytest.approx(0.5, abs=1e-7) and out["seg_accuracy"] == pytest.approx(0.5)
    # nothing at all
    out = summarize([], [], [])
    _assert_no_nan(out)
    assert out["n_images"] == 0 and out["mae"] is None and out["image_auroc"] is None
    with pytest.raises(ValueError):
        summarize(stats, [1, 0], [0.1])


def test_runtime_does_not_import_sklearn_torch_or_ray():
    code = (
        "import sys, components.metrics\n"
        "bad = [m for m in ('sklearn', 'torch', 'ray') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env=env)
