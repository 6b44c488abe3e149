"""PySODMetrics as the oracle for the saliency metrics, as scikit-learn is for AUROC in test_metrics.py.

PySODMetrics (``py_sod_metrics``) is what salient-object-detection papers report with. Both sides see the same
input: every prediction is quantised to uint8 the way PySODMetrics reads maps, and built to span 0..255 (or to be
constant), so that PySODMetrics' per-map min-max normalisation, which defectflow deliberately does not do, is the
identity; defectflow then gets ``u8 / 255``. Values are compared per image and as dataset means.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import py_sod_metrics as psm
import pytest
from PIL import Image
from scipy import ndimage

from components.metrics import e_measure_curve, image_stats, s_measure, summarize

TOL = 1e-3
BETA2 = 0.3
SD900_MASKS = [f"{cls}_{n}.png" for cls in ("In", "Pa", "Sc") for n in (1, 50, 101, 250)]

Case = tuple[str, np.ndarray, np.ndarray]  # (name, uint8 prediction, uint8 {0, 255} mask)


def _quantise(p: np.ndarray) -> np.ndarray:
    """Stretch a map to [0, 1] (unless constant) and store it as uint8, as a saved saliency map would be."""
    p = np.clip(p, 0.0, 1.0)
    lo, hi = p.min(), p.max()
    if hi > lo:
        p = (p - lo) / (hi - lo)
    return np.round(p * 255).astype(np.uint8)


def _imperfect_predictions(g: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    gf = g.astype(np.float64)
    half_erased = gf.copy()
    half_erased[:, : g.shape[1] // 2] = 0.0
    maps = {
        "blurred": ndimage.gaussian_filter(gf, 2.0),
        "blurred_noisy": ndimage.gaussian_filter(gf, 2.0) + rng.normal(0.0, 0.05, g.shape),
        "shifted": ndimage.shift(gf, (3, -4), order=1),
        "noisy": 0.7 * gf + rng.normal(0.15, 0.12, g.shape),
        "partially_erased": ndimage.gaussian_filter(half_erased, 1.0),
        "empty": np.zeros(g.shape),
        "all_ones": np.ones(g.shape),
    }
    return {name: _quantise(p) for name, p in maps.items()}


def _cases_for_mask(name: str, gt: np.ndarray, rng: np.random.Generator) -> list[Case]:
    return [(f"{name}/{k}", u8, gt) for k, u8 in _imperfect_predictions(gt > 128, rng).items()]


def _synthetic_masks() -> dict[str, np.ndarray]:
    """Shapes that exercise the special paths: exact .5 centroids (even sizes, 2-pixel-high scratches), one pixel,
    a mask covering the image, and defect-free images."""
    masks: dict[str, np.ndarray] = {}
    shape = (48, 64)
    box = np.zeros(shape, np.uint8)
    box[10:24, 12:30] = 255  # 14 x 18: both centroid coordinates end in .5
    masks["even_box"] = box
    scratch = np.zeros(shape, np.uint8)
    scratch[20:22, 5:55] = 255  # 2 px high: the split row decides the region term
    masks["scratch"] = scratch
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    ellipse = ((yy - 30.3) / 9) ** 2 + ((xx - 20.7) / 14) ** 2 <= 1
    two_blobs = (np.hypot(yy - 10, xx - 50) <= 5) | (np.hypot(yy - 38, xx - 12) <= 4)
    masks["ellipse"] = ellipse.astype(np.uint8) * 255
    masks["two_blobs"] = two_blobs.astype(np.uint8) * 255
    single = np.zeros(shape, np.uint8)
    single[7, 40] = 255
    masks["single_pixel"] = single
    masks["all_defect"] = np.full((16, 16), 255, np.uint8)
    return masks


def _defect_free_cases(rng: np.random.Generator) -> list[Case]:
    gt = np.zeros((48, 64), np.uint8)
    alarm = np.zeros(gt.shape)
    alarm[30:36, 40:47] = 0.9
    maps = {
        "clean": np.zeros(gt.shape),
        "faint_noise": rng.random(gt.shape) * 0.2,
        "false_alarm": ndimage.gaussian_filter(alarm, 1.0),
        "all_ones": np.ones(gt.shape),
    }
    return [(f"defect_free/{k}", _quantise(p), gt) for k, p in maps.items()]


def _synthetic_cases() -> list[Case]:
    rng = np.random.default_rng(0)
    cases = [c for name, gt in _synthetic_masks().items() for c in _cases_for_mask(name, gt, rng)]
    return cases + _defect_free_cases(rng)


def _pysod_per_image(cases: list[Case]) -> dict[str, list]:
    sm, mae, wfm, em = psm.Smeasure(), psm.MAE(), psm.WeightedFmeasure(), psm.Emeasure()
    pr = psm.FmeasureV2(
        metric_handlers={
            "p": psm.PrecisionHandler(with_dynamic=True, with_adaptive=False),
            "r": psm.RecallHandler(with_dynamic=True, with_adaptive=False),
        }
    )
    for _, u8, gt in cases:
        for metric in (sm, mae, wfm, em):
            metric.step(pred=u8, gt=gt)
        if (gt > 128).any():  # defectflow's F_max skips defect-free images (documented in mean_pr_curve)
            pr.step(pred=u8, gt=gt)
    prs = pr.get_results()
    return {
        "sm": sm.sms,
        "mae": mae.maes,
        "wfm": wfm.weighted_fms,
        "em_adaptive": em.adaptive_ems,
        "em_curve": [c[::-1] for c in em.changeable_ems],  # PySODMetrics orders thresholds 255 .. 0
        "precision": prs["p"]["dynamic"][::-1],
        "recall": prs["r"]["dynamic"][::-1],
    }


def _assert_close(name: str, ours: float, theirs: float) -> None:
    assert ours == pytest.approx(float(theirs), abs=TOL), f"{name}: defectflow {ours:.6f} vs PySODMetrics {theirs:.6f}"


def _assert_per_image_parity(cases: list[Case], stats: list[dict], ref: dict[str, list]) -> None:
    for i, ((name, _, _), st) in enumerate(zip(cases, stats, strict=True)):
        _assert_close(f"{name} S-measure", st["sm"], ref["sm"][i])
        _assert_close(f"{name} MAE", st["mae"], ref["mae"][i])
        # an empty mask has no weighted F (None in the stats); PySODMetrics scores it 0
        _assert_close(f"{name} wF", 0.0 if st["wfm"] is None else st["wfm"], ref["wfm"][i])
        _assert_close(f"{name} adaptive E", st["e_measure_adaptive"], ref["em_adaptive"][i])
        curve = e_measure_curve(st["hist_pos"], st["hist_neg"])
        np.testing.assert_allclose(curve, ref["em_curve"][i], atol=TOL, rtol=0, err_msg=f"{name} E curve")


def _assert_dataset_parity(stats: list[dict], ref: dict[str, list]) -> None:
    out = summarize(stats, [], [], beta2=BETA2)
    _assert_close("mean S-measure", out["sm"], np.mean(ref["sm"]))
    _assert_close("mean MAE", out["mae"], np.mean(ref["mae"]))
    defective = [s["gt_pixels"] > 0 for s in stats]
    _assert_close("mean wF (defective masks)", out["wfm"], np.mean(np.array(ref["wfm"])[defective]))
    _assert_close("adaptive E", out["e_measure_adaptive"], np.mean(ref["em_adaptive"]))
    curve = np.mean(ref["em_curve"], axis=0)
    _assert_close("mean E", out["e_measure_mean"], curve.mean())
    _assert_close("max E", out["e_measure_max"], curve.max())
    p, r = ref["precision"], ref["recall"]
    denom = BETA2 * p + r
    f = np.divide((1 + BETA2) * p * r, denom, out=np.zeros_like(p), where=denom > 0)
    _assert_close("max F (mean PR curve, defective masks)", out["f_max"], f.max())


def _check_parity(cases: list[Case]) -> None:
    stats = [image_stats(u8 / 255, gt > 128) for _, u8, gt in cases]
    ref = _pysod_per_image(cases)
    _assert_per_image_parity(cases, stats, ref)
    _assert_dataset_parity(stats, ref)


def test_parity_with_pysodmetrics_on_synthetic_masks():
    cases = _synthetic_cases()
    assert sum(not (gt > 128).any() for _, _, gt in cases) >= 4  # defect-free images are part of the check
    _check_parity(cases)


def test_parity_with_pysodmetrics_on_sd_saliency_900(shared_datasets: Path):
    root = shared_datasets / "sd_saliency_900" / "Ground truth"
    if not root.is_dir():
        pytest.skip(f"SD-saliency-900 masks not found at {root}")
    rng = np.random.default_rng(1)
    cases: list[Case] = []
    for name in SD900_MASKS:
        gt = np.asarray(Image.open(root / name).convert("L"))
        cases += _cases_for_mask(name, gt, rng)
    _check_parity(cases + _defect_free_cases(rng))


def test_region_split_rounds_half_to_even_like_pysodmetrics():
    # a 2-px-high scratch on rows 0-1: the 0-based centroid row is 0.5. PySODMetrics rounds it to 0 and splits
    # below row 0; MATLAB's round(1.5) = 2 would split below row 1, and S would differ by ~0.16 here
    gt = np.zeros((21, 41), np.uint8)
    gt[0:2, 7:17] = 255
    pred = _quantise(ndimage.gaussian_filter(gt / 255.0, 1.5) + np.random.default_rng(0).normal(0, 0.05, gt.shape))
    theirs = psm.Smeasure().cal_sm(pred / 255, gt > 128)
    assert s_measure(pred / 255, gt > 128) == pytest.approx(theirs, abs=1e-12)


def test_pysodmetrics_min_max_normalises_each_map_and_we_do_not():
    # the deliberate input-side deviation: a faint map (max 0.5) is stretched to [0, 1] by PySODMetrics
    gt = _synthetic_masks()["ellipse"]
    faint = np.round(0.5 * ndimage.gaussian_filter(gt / 255.0, 2.0) * 255).astype(np.uint8)
    assert faint.max() < 255
    sm = psm.Smeasure()
    sm.step(pred=faint, gt=gt)
    stretched = (faint - faint.min()) / float(faint.max() - faint.min())
    assert s_measure(stretched, gt > 128) == pytest.approx(sm.sms[0], abs=1e-12)
    assert abs(s_measure(faint / 255, gt > 128) - sm.sms[0]) > 0.01


def test_s_measure_of_a_float_map_with_a_tiny_background_matches_its_png():
    """The cause of the 0.012 S-measure gap on SD-saliency-900: a trained sigmoid leaves a ~1e-6 background, S's
    region term scores a defect-free quadrant 0 unless the map is exactly constant there, and the PNG a user feeds
    PySODMetrics rounds that background to exactly 0. Evaluation scores the 8-bit map, so both agree."""
    from components.inference import map_to_png_array

    gt = np.zeros((40, 40), bool)
    gt[2:5, 2:38] = True
    gt[2:38, 2:5] = True  # an L: the quadrant right of and below its centroid holds no defect pixel
    prob = np.full(gt.shape, 1e-6)
    prob[gt] = 1.0  # min 0 and max 255 on the PNG: PySODMetrics' min-max stretch is then a no-op
    prob[20:24, 30:34] = 3e-4  # a faint, far-from-threshold blemish in an empty quadrant
    png = map_to_png_array(prob)
    ref = psm.Smeasure()
    ref.step(pred=png, gt=(gt * 255).astype(np.uint8))
    expected = float(ref.get_results()["sm"])
    assert image_stats(prob, gt)["sm"] == pytest.approx(expected, abs=1e-6)
    assert s_measure(prob, gt) < expected - 0.1  # the raw float map falls off the cliff
