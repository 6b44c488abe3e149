"""Synthesis on the CPU: masks and placement, the procedural and cut-paste generators, labels, filters."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from components.data import manifest
from components.data import procedural as P
from components.data.images import encode_mask_png, encode_png
from components.errors import ConfigError, DataError
from components.synthesis import filters as F
from components.synthesis import masks as M
from components.synthesis.generators.base import SynthesisRequest, create_generator, generators
from components.synthesis.generators.cutpaste import defect_crop, poisson_blend
from components.synthesis.labels import boxes_from_mask, components, label_record

SIZE = 96


def _surface(index: int, texture: str = "cast", seed: int = 3, size: int = SIZE) -> np.ndarray:
    return P.render(index, seed=seed, size=size, texture=texture).image.astype(np.float32) / 255.0


def _defect(index: int, kind: str = "pit", texture: str = "cast", seed: int = 3, size: int = SIZE) -> P.Sample:
    return P.render(index, seed=seed, size=size, texture=texture, defect=kind)


def _dilate(mask: np.ndarray, r: float) -> np.ndarray:
    return ndimage.distance_transform_edt(~(mask > 0)) <= r


# ------------------------------------------------------------------------------------------------ masks


def test_perlin_mask_is_seeded():
    a = M.perlin_mask((64, 80), np.random.default_rng(1), threshold=0.3)
    b = M.perlin_mask((64, 80), np.random.default_rng(1), threshold=0.3)
    c = M.perlin_mask((64, 80), np.random.default_rng(2), threshold=0.3)
    assert a.shape == (64, 80) and a.dtype == np.uint8 and set(np.unique(a)) <= {0, 1}
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert 0 < a.mean() < 0.6


def test_sampler_is_deterministic_from_seeds():
    specs = {"scratch": {"kind": "scratch"}, "default": M.MaskSpec(kind="blob", count_range=(1, 3))}
    image = np.zeros((128, 128, 3), np.float32)
    s1, s2 = M.MaskSampler(specs, seed=7), M.MaskSampler(specs, seed=7)
    for cls in ("scratch", "anything"):
        assert np.array_equal(s1.sample(image, None, cls, 3), s2.sample(image, None, cls, 3))
        assert not np.array_equal(s1.sample(image, None, cls, 3), s1.sample(image, None, cls, 4))
    assert not np.array_equal(s1.sample(image, None, "scratch", 3), M.MaskSampler(specs, seed=8).sample(
        image, None, "scratch", 3))


@pytest.mark.parametrize("kind", ["scratch", "crack", "spot", "blob", "perlin"])
def test_sizes_and_aspects_within_spec(kind):
    spec = M.MaskSpec(kind=kind, count_range=(1, 3), margin=3)
    sampler = M.MaskSampler({"default": spec}, seed=0)
    canvas = 128 * 128
    lo, hi = spec.area_range
    lo_px = max(spec.min_pixels, np.ceil(lo * canvas), 1.25 * spec.aspect_range[0] if kind in ("scratch", "crack")
                else 0)
    for i in range(8):
        mask, info = sampler.sample_with_info(np.zeros((128, 128, 3), np.float32), None, "x", i)
        assert spec.count_range[0] <= len(info["instances"]) <= spec.count_range[1]
        for inst in info["instances"]:
            assert lo_px <= inst["area"] <= max(hi * canvas, lo_px) * 1.02, inst
            assert spec.aspect_range[0] <= inst["aspect"] <= spec.aspect_range[1], inst
        if kind != "perlin":  # perlin patches may be several pieces; the others are one component each
            boxes = boxes_from_mask(mask)
            assert len(boxes) == len(info["instances"])
            assert sum(b[4] for b in boxes) == int(mask.sum()) == sum(x["area"] for x in info["instances"])


def test_shape_mask_hits_the_area_exactly():
    rng = np.random.default_rng(0)
    for kind, area, aspect in (("scratch", 60, 20.0), ("spot", 30, 1.5), ("perlin", 200, 2.0)):
        shape = M.shape_mask(kind, rng, area, aspect)
        assert int(shape.sum()) == area
    assert M.aspect_ratio(np.ones((4, 40))) == pytest.approx(10.0, rel=1e-6)
    assert M.aspect_ratio(np.ones((5, 5))) == pytest.approx(1.0)


def test_placement_respects_allowed_and_forbidden():
    rng = np.random.default_rng(0)
    allowed = np.zeros((64, 64), np.uint8)
    allowed[:, :32] = 1
    forbidden = np.zeros((64, 64), np.uint8)
    forbidden[28:36, 10:18] = 1
    shape = np.ones((5, 9), np.uint8)
    for _ in range(30):
        placed = M.place(shape, (64, 64), allowed, forbidden, rng, margin=3)
        assert placed is not None and int(placed.sum()) == 45
        assert not (placed & ~allowed.astype(bool)).any()
        assert not (placed.astype(bool) & _dilate(forbidden, 3)).any()
    # a narrow corridor: random tries miss it, the exact search still finds the only valid spots
    allowed = np.zeros((64, 64), np.uint8)
    allowed[40:45, 3:12] = 1
    placed = M.place(shape, (64, 64), allowed, None, rng, max_tries=1)
    assert placed is not None and np.array_equal(placed, allowed)


def test_placement_returns_none_with_a_reason_when_impossible():
    rng = np.random.default_rng(0)
    allowed = np.zeros((32, 32), np.uint8)
    allowed[:, :3] = 1
    placed, reason = M.place_with_reason(np.ones((4, 4)), (32, 32), allowed, None, rng)
    assert placed is None and "no position" in reason
    placed, reason = M.place_with_reason(np.ones((4, 4)), (32, 32), None, np.ones((32, 32)), rng, margin=2)
    assert placed is None and "pixels" in reason
    assert M.place(np.ones((40, 4)), (32, 32), None, None, rng) is None
    assert M.place(np.zeros((4, 4)), (32, 32), None, None, rng) is None
    sampler = M.MaskSampler({"default": {"kind": "blob", "area_range": (0.2, 0.3)}})
    with pytest.raises(M.PlacementError, match="fits this image"):
        sampler.sample(np.zeros((32, 32, 3)), np.ones((32, 32)), "x", 0)


def test_foreground_mask_finds_the_part_on_a_dark_background():
    yy, xx = np.mgrid[0:80, 0:80]
    part = ((yy - 40) ** 2 + (xx - 40) ** 2) < 25 ** 2
    image = np.repeat(np.where(part, 0.6, 0.03)[:, :, None], 3, axis=2).astype(np.float32)
    image += np.random.default_rng(0).normal(0, 0.03, image.shape).astype(np.float32)
    fg = M.foreground_mask(np.clip(image, 0, 1), "otsu")
    assert (fg.astype(bool) == part).mean() > 0.98
    assert M.foreground_mask(_surface(0), "otsu").all()  # a textured sheet has no background
    sampler = M.MaskSampler({"default": {"kind": "spot", "foreground": "otsu", "margin": 2}})
    for i in range(5):
        assert not (sampler.sample(np.clip(image, 0, 1), None, "x", i).astype(bool) & ~part).any()


def _mask_rows() -> list[dict]:
    rows = []
    for i, kind in enumerate(("pit", "scratch", "pit")):
        s = _defect(i, kind)
        rows.append(manifest.row(f"d/{i}", "d", width=SIZE, height=SIZE, image_bytes=encode_png(s.image), label=1,
                                 mask_bytes=encode_mask_png(s.mask), defect_class=kind))
    s = _defect(9, "crack")
    rows.append(manifest.row("d/syn", "d", width=SIZE, height=SIZE, image_bytes=encode_png(s.image), label=1,
                             mask_bytes=encode_mask_png(s.mask), defect_class="crack", source="synthetic"))
    rows.append(manifest.row("d/img", "d", width=SIZE, height=SIZE, image_bytes=encode_png(s.image), label=1,
                             defect_class="crack"))
    rows.append(manifest.row("d/ok", "d", width=SIZE, height=SIZE, image_bytes=encode_png(s.image), label=0))
    return rows


def test_real_mask_pool_and_reuse():
    table = manifest.make_table(_mask_rows())
    pool = M.real_mask_pool(table)
    assert sorted(p.sample_id for p in pool) == ["d/0", "d/1", "d/2"]  # real, defective, with a mask
    assert [p.sample_id for p in M.real_mask_pool(table, classes=["scratch"])] == ["d/1"]
    by_id = {p.sample_id: p for p in pool}
    spec = M.MaskSpec(kind="real", real_scale_range=(1.0, 1.0), margin=0)
    sampler = M.MaskSampler({"pit": spec, "crack": spec}, real_pool=pool, seed=1)
    for i in range(6):
        mask, info = sampler.sample_with_info(np.zeros((SIZE, SIZE, 3)), None, "pit", i)
        inst = info["instances"][0]
        src = by_id[inst["source_id"]]
        assert src.defect_class == "pit"
        # same canvas size and scale 1: the placed mask is a flip/rotation of the real one
        placed = M.crop_to_content(mask)
        variants = [np.rot90(m, k) for m in (src.mask, src.mask[:, ::-1]) for k in range(4)]
        assert any(v.shape == placed.shape and np.array_equal(v, placed) for v in variants)
    # a class without real masks borrows any class's; an empty pool is a config error
    assert sampler.sample(np.zeros((SIZE, SIZE, 3)), None, "crack", 0).any()
    with pytest.raises(ConfigError, match="real"):
        M.MaskSampler({"default": spec}, real_pool=[])
    # rescaling to another resolution keeps the mask's share of the image
    big = M.MaskSampler({"default": spec}, real_pool=pool[:1]).sample(np.zeros((2 * SIZE, 2 * SIZE, 3)), None, "x", 0)
    assert big.sum() / big.size == pytest.approx(pool[0].area_fraction, rel=0.15)


def test_mask_spec_validation():
    with pytest.raises(ValueError):
        M.MaskSpec(kind="scratch", aspect_range=(0.5, 2))
    with pytest.raises(ValueError):
        M.MaskSpec(kind="spot", area_range=(0.1, 0.01))
    with pytest.raises(ValueError):
        M.MaskSpec(kind="spot", colour="red")
    assert M.MaskSpec(kind="real").aspect_range is None


# ------------------------------------------------------------------------------------------- generators


def test_generators_are_registered():
    assert {"procedural", "cutpaste"} <= set(generators())
    with pytest.raises(ConfigError, match="recipe entry"):
        create_generator("procedural", {"recipe": ["darken|sparkle"]})
    with pytest.raises(ConfigError):
        create_generator("cutpaste", {"blend": "poisson"})


def test_procedural_changes_only_inside_the_mask_and_is_seeded():
    image = _surface(0)
    sampler = M.MaskSampler({"stain": {"kind": "blob"}, "default": {"kind": "scratch"}}, seed=0)
    gen = create_generator("procedural", {})
    for cls in ("scratch", "stain"):
        mask = sampler.sample(image, None, cls, 1)
        req = SynthesisRequest(image=image, mask=mask, defect_class=cls, seed=5)
        out = gen.generate([req, req, SynthesisRequest(image=image, mask=mask, defect_class=cls, seed=6)])
        assert np.array_equal(out[0].image, out[1].image)
        assert not np.array_equal(out[0].image, out[2].image)
        diff = np.abs(out[0].image - image).max(axis=2)
        assert diff[mask == 0].max() == 0.0
        assert diff[mask > 0].mean() > 0.02
        assert np.array_equal(out[0].mask, mask) and out[0].image.dtype == np.float32
        assert out[0].info["generator"] == "procedural" and out[0].info["effects"]
        json.dumps(out[0].info)
    assert gen.recipe_for("oil_stain") == gen.options.class_recipes["stain"]
    # tightening keeps only pixels that changed enough; bleed lets a soft edge spill out
    tight = create_generator("procedural", {"tighten_threshold": 0.05}).generate([req])[0]
    assert tight.mask.sum() <= mask.sum() and not (tight.mask & (mask == 0)).any()
    spill = create_generator("procedural", {"bleed": 2.0}).generate([req])[0]
    outside = np.abs(spill.image - image).max(axis=2)[mask == 0]
    assert outside.max() > 0 and np.abs(spill.image - image).max(axis=2)[~_dilate(mask, 3)].max() == 0


def test_cutpaste_pastes_a_real_defect_inside_the_mask():
    image = _surface(1)
    real = _defect(2, "pit")
    crop, crop_mask = defect_crop(real.image / 255.0, real.mask, pad=6)
    target = M.place(crop_mask, image.shape[:2], None, None, np.random.default_rng(0))
    for blend, reach in (("seamless", 3 + 1), ("alpha", 3 * 2.0 * 2**0.5 + 1)):  # context; 3-sigma square kernel
        gen = create_generator("cutpaste", {"blend": blend})
        req = SynthesisRequest(image=image, mask=target, defect_class="pit", seed=1, reference=crop,
                               reference_mask=crop_mask, extra={"reference_id": "d/2"})
        a, b = gen.generate([req, req])
        assert np.array_equal(a.image, b.image)
        diff = np.abs(a.image - image).max(axis=2)
        assert diff[~_dilate(target, reach)].max() < 1e-6, blend
        assert diff[target > 0].mean() > 0.05
        # the placed mask is the real mask shifted, so orientation and overlap are exact
        assert a.info["overlap_iou"] == 1.0 and np.array_equal(a.mask, target)
        assert a.info["reference_id"] == "d/2"
        # the pasted pixels are the real defect's, up to the colour match
        changed_energy = (diff ** 2)[target > 0].sum() / (diff ** 2).sum()
        assert changed_energy > 0.6
    # a 90-degree rotated target: the generator finds the orientation that fits
    rotated = np.zeros_like(target)
    rm = np.rot90(crop_mask)
    rotated[10:10 + rm.shape[0], 20:20 + rm.shape[1]] = rm
    res = create_generator("cutpaste", {}).generate([SynthesisRequest(
        image=image, mask=rotated, defect_class="pit", seed=1, reference=crop, reference_mask=crop_mask)])[0]
    assert res.info["overlap_iou"] == 1.0 and np.array_equal(res.mask, rotated)
    with pytest.raises(DataError, match="reference"):
        create_generator("cutpaste", {}).generate([SynthesisRequest(image=image, mask=target, defect_class="pit",
                                                                    seed=1)])


def _seam(img: np.ndarray, region: np.ndarray) -> float:
    """Mean absolute step between 4-neighbours straddling the region's border."""
    steps = []
    for axis in (0, 1):
        a, b = np.moveaxis(img, axis, 0), np.moveaxis(region, axis, 0)
        cross = b[1:] != b[:-1]
        steps.append(np.abs(a[1:] - a[:-1]).mean(axis=-1)[cross])
    return float(np.concatenate(steps).mean())


def test_seamless_blend_has_no_seam():
    image = _surface(4)
    yy, xx = np.mgrid[0:40, 0:40]
    reference = np.clip(_surface(5)[:40, :40] * 0.6 + 0.35, 0, 1)  # a brighter, lower-contrast surface
    ref_mask = ((yy - 20) ** 2 + (xx - 20) ** 2 < 8 ** 2).astype(np.uint8)
    reference[ref_mask > 0] *= 0.3  # a dark pit in it
    target = np.zeros(image.shape[:2], np.uint8)
    target[30:70, 30:70] = 1
    common = {"defect_class": "pit", "seed": 0, "reference": reference, "reference_mask": np.ones((40, 40), np.uint8)}
    seamless = create_generator("cutpaste", {"blend": "seamless", "match_color": False, "context": 2}).generate(
        [SynthesisRequest(image=image, mask=target, **common)])[0].image
    hard = create_generator("cutpaste", {"blend": "alpha", "feather": 0, "match_color": False}).generate(
        [SynthesisRequest(image=image, mask=target, **common)])[0].image
    region = _dilate(target, 2)
    natural = _seam(image, region)
    assert _seam(hard, target > 0) > 4 * natural
    assert _seam(seamless, region) < 1.5 * natural
    # the dark pit survives the blend
    assert seamless[50, 50].mean() < seamless[35, 35].mean() - 0.1


def test_poisson_blend_reproduces_the_target_for_an_offset_source():
    target = _surface(6)[:30, :30]
    region = np.zeros((30, 30), bool)
    region[5:25, 8:22] = True
    out = poisson_blend(target, target + 0.3, region)
    assert np.abs(out - target).max() < 1e-6
    edge = np.zeros((30, 30), bool)
    edge[:10, :10] = True  # touching the array edge (Neumann border there)
    assert np.abs(poisson_blend(target, target - 0.2, edge) - target).max() < 1e-6


# ------------------------------------------------------------------------------------------------ labels


def test_boxes_from_mask_hand_cases():
    m = np.zeros((20, 30), np.uint8)
    m[2:5, 3:9] = 1  # 3x6 block
    for i in range(6):
        m[10 + i, 20 + i] = 1  # a diagonal: one component with 8-connectivity
    m[18, 1] = 1  # a speck
    assert boxes_from_mask(m) == [(3, 2, 9, 5, 18), (20, 10, 26, 16, 6), (1, 18, 2, 19, 1)]
    assert boxes_from_mask(m, min_area=2) == [(3, 2, 9, 5, 18), (20, 10, 26, 16, 6)]
    assert boxes_from_mask(np.zeros((5, 5))) == []
    labels, _ = components(m, min_area=2)
    assert labels.max() == 2 and int((labels == 2).sum()) == 6 and labels[18, 1] == 0
    rec = label_record(m, "scratch", min_area=2)
    assert rec["class"] == "scratch" and rec["components"] == 3 and rec["dropped"] == 1
    assert rec["boxes"] == [[3, 2, 9, 5, 18], [20, 10, 26, 16, 6]] and rec["mask_area"] == 25
    json.dumps(rec)


# ----------------------------------------------------------------------------------------------- filters


@pytest.fixture(scope="module")
def embedder():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tests share two cores with other work; one thread is faster here
    try:
        yield F.RegionEmbedder()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pit_samples():
    """Real pits on cast iron, normal cast surfaces, and a cut-paste synthetic made from a held-out real pit."""
    reals = [_defect(i, "pit") for i in range(5)]
    examples = [(s.image / 255.0, s.mask) for s in reals[:4]]
    normals = [_surface(50 + i) for i in range(3)]
    crop, crop_mask = defect_crop(reals[4].image / 255.0, reals[4].mask, pad=6)
    base = _surface(80)
    target = M.place(crop_mask, base.shape[:2], None, None, np.random.default_rng(0))
    synth = create_generator("cutpaste", {}).generate([SynthesisRequest(
        image=base, mask=target, defect_class="pit", seed=0, reference=crop, reference_mask=crop_mask)])[0]
    return examples, normals, base, synth


def test_filter_chain_accepts_realistic_and_reports_rejections(embedder, pit_samples):
    examples, normals, base, synth = pit_samples
    good = F.FilterInput(synth.image, synth.mask, base, sample_id="good")
    unchanged = F.FilterInput(base.copy(), synth.mask, base, sample_id="unchanged")
    outside = synth.image.copy()
    outside[:, :30] = np.clip(outside[:, :30] + 0.15, 0, 1)
    outside[synth.mask > 0] = synth.image[synth.mask > 0]
    spilled = F.FilterInput(outside, synth.mask, base, sample_id="spilled")
    chain = F.FilterChain([F.VisibleChange(), F.BackgroundPreserved(),
                           F.FeatureRealism.fit(embedder, examples, normals), F.DreamSimLike(embedder)])
    res = chain([good, unchanged, spilled])
    assert res[0]["passed"], res[0]
    assert set(res[0]["scores"]) == {"visible_change", "background_preserved", "feature_realism", "dreamsim_like"}
    assert res[0]["scores"]["feature_realism"] > 0
    assert not res[1]["passed"] and any(r.startswith("visible_change") for r in res[1]["reasons"])
    assert res[1]["scores"]["feature_realism"] < 0  # plain texture is closer to normal than to real pits
    assert not res[2]["passed"] and any(r.startswith("background_preserved") for r in res[2]["reasons"])
    assert res[2]["scores"]["visible_change"] >= 0.02  # the defect itself is still fine
    rep = chain.report
    assert (rep.total, rep.passed, rep.rejected) == (3, 1, 2)
    assert rep.per_filter["visible_change"]["rejected"] == 1
    assert rep.per_filter["visible_change"]["reasons"] == {F.BELOW: 1}
    assert rep.per_filter["background_preserved"]["reasons"] == {F.ABOVE: 1}
    assert rep.per_filter["background_preserved"]["examples"] == ["spilled"]
    assert rep.per_filter["dreamsim_like"]["reasons"].get(F.BELOW) == 1  # unchanged: below min_distance
    merged = rep.merge(F.FilterReport.from_dict(json.loads(json.dumps(rep.to_dict()))))
    assert (merged.total, merged.passed) == (6, 2)
    assert merged.per_filter["visible_change"]["reasons"] == {F.BELOW: 2}
    assert "1/3 passed" in rep.summary()


def test_pixel_filters_thresholds_and_empty_masks():
    base = _surface(7)
    mask = np.zeros(base.shape[:2], np.uint8)
    mask[40:50, 40:50] = 1
    img = base.copy()
    img[mask > 0] = np.clip(img[mask > 0] - 0.01, 0, 1)
    vc = F.VisibleChange(threshold=0.02)
    assert vc.scores([F.FilterInput(img, mask, base)])[0] == pytest.approx(0.01, abs=2e-3)
    assert not vc([F.FilterInput(img, mask, base)])[0].passed
    assert F.VisibleChange(threshold=0.005)([F.FilterInput(img, mask, base)])[0].passed
    empty = vc([F.FilterInput(img, np.zeros_like(mask), base)])[0]
    assert not empty.passed and empty.reason == F.EMPTY_MASK
    psnr = F.BackgroundPreserved(metric="psnr")
    assert psnr.threshold == 30.0 and psnr([F.FilterInput(img, mask, base)])[0].score == 100.0
    noisy = np.clip(base + np.random.default_rng(0).normal(0, 0.1, base.shape), 0, 1).astype(np.float32)
    assert not psnr([F.FilterInput(noisy, mask, base)])[0].passed
    with pytest.raises(DataError, match="original"):
        vc([F.FilterInput(img, mask)])


def test_dreamsim_like(embedder, pit_samples):
    examples, _, base, synth = pit_samples
    a = np.random.default_rng(0).normal(size=(3, 16))
    assert np.allclose(F.dreamsim_distance(a, a), 0.0)
    assert np.allclose(F.dreamsim_distance(a, 2 * a + 5), 0.0)  # mean-centred and normalised: scale/offset free
    wrecked = base.copy()
    y0, y1, x0, x1 = F.crop_box(synth.mask)
    wrecked[y0:y1, x0:x1] = np.random.default_rng(1).random((y1 - y0, x1 - x0, 3))
    ds = F.DreamSimLike(embedder)
    res = ds([F.FilterInput(synth.image, synth.mask, base), F.FilterInput(base, synth.mask, base),
              F.FilterInput(wrecked, synth.mask, base)])
    assert [r.passed for r in res] == [True, False, False]
    assert res[1].reason == F.BELOW and res[2].reason == F.ABOVE
    near = F.DreamSimLike.fit_defects(embedder, examples)
    assert near.defect_bank.shape[0] >= len(examples)
    d_good, d_wrecked = near.scores([F.FilterInput(synth.image, synth.mask),
                                     F.FilterInput(wrecked, synth.mask)])
    assert d_good < d_wrecked


def _tiny_clip(folder):
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = [chr(i) for i in range(33, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    special = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
               "pad_token_id": vocab["<|endoftext|>"]}
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                     "num_hidden_layers": 2, "max_position_embeddings": 77, **special},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(0)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    out = folder / "clip"
    CLIPModel(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_clip_score_filter_with_a_tiny_local_model(tmp_path, pit_samples):
    _, _, base, synth = pit_samples
    model_dir = _tiny_clip(tmp_path)
    flt = F.CLIPScoreFilter(str(model_dir), threshold=0.0)
    items = [F.FilterInput(synth.image, synth.mask, base, defect_class="pit"),
             F.FilterInput(synth.image, synth.mask, base, prompt="a scratch on metal")]
    scores = flt.scores(items)
    assert len(scores) == 2 and all(0.0 <= s <= 100.0 for s in scores)
    assert all(r.passed for r in flt(items))
    assert flt.prompt_for(items[0]) == "a photo of a pit defect on an industrial surface"
    with pytest.raises(ConfigError, match="local CLIP"):
        F.CLIPScoreFilter(str(tmp_path / "missing"))


def test_build_chain_from_config(embedder, pit_samples):
    examples, normals, base, synth = pit_samples
    chain = F.build_chain([{"name": "visible_change", "threshold": 0.5},
                           {"name": "background_preserved", "params": {"metric": "psnr", "margin": 2}},
                           {"name": "feature_realism", "params": {"k": 1}},
                           {"name": "dreamsim_like", "params": {"against": "defects"}}],
                          embedder=embedder, defect_examples=examples, normal_images=normals)
    assert [f.name for f in chain.filters] == ["visible_change", "background_preserved", "feature_realism",
                                               "dreamsim_like"]
    res = chain([F.FilterInput(synth.image, synth.mask, base)])[0]
    assert not res["passed"] and res["reasons"][0].startswith("visible_change")  # threshold 0.5 from config
    with pytest.raises(ConfigError):
        F.build_chain([{"name": "visible_change", "params": {"colour": 1}}])
    with pytest.raises(ConfigError):
        F.build_chain([{"name": "visible_change"}, {"name": "visible_change"}])


def test_source_regime_limits_what_synthesis_learns_from(tmp_path):
    """Small-real-data experiments: synthesis sees only the masks the training regime keeps (same seeded subset)."""
    from components.config import SynthesizeConfig, validate
    from components.data import regimes
    from components.synthesis import pipeline
    from components.synthesis.masks import real_mask_pool
    from tests.helpers import procedural_manifest

    man = procedural_manifest(str(tmp_path / "m.parquet"), count=40, size=32)

    def cfg(**over):
        return validate(SynthesizeConfig, {"name": "s", "manifest": man, **over}, "synth config")

    everything = pipeline.sources(cfg())
    few = pipeline.sources(cfg(source_regime={"regime": "mixed", "mixed_masks": 3, "seed": 7}))
    assert len(real_mask_pool(few)) == 3 < len(real_mask_pool(everything))
    import pyarrow.compute as pc

    trained_on = regimes.apply(manifest.read(man), "mixed", mixed_masks=3, seed=7)
    trained_on = trained_on.filter(pc.equal(trained_on["split"], "train"))
    assert {m.sample_id for m in real_mask_pool(few)} == {m.sample_id for m in real_mask_pool(trained_on)}
    assert pipeline.normal_ids(few) == pipeline.normal_ids(everything)
    with pytest.raises(ConfigError):
        cfg(source_regime={"regime": "mixed", "mixed_masks": 3, "bogus": 1})


def test_unusable_cutpaste_references_are_skipped_or_rejected_never_fatal(tmp_path):
    """A real defect whose mask is empty at the working size (a few pixels lost to a resize, an empty ground truth)
    is never used as a cut-paste reference; with no usable reference at all, requests become counted rejections."""
    from components import storage
    from components.config import SynthesizeConfig, validate
    from components.synthesis import pipeline
    from tests.helpers import procedural_manifest

    man = manifest.read(procedural_manifest(str(tmp_path / "m.parquet"), count=30, size=32))
    recs = man.to_pylist()
    defects = [r for r in recs if r["split"] == "train" and r["label"] == 1]
    assert len(defects) >= 3
    keep = defects[0]["sample_id"]
    for r in defects:
        if r["sample_id"] != keep:
            r["mask_bytes"], r["mask_uri"] = encode_mask_png(np.zeros((32, 32), np.uint8)), None

    def worker(rows, name):
        uri = str(tmp_path / f"{name}.parquet")
        manifest.write(manifest.make_table(rows), uri)
        cfg = validate(SynthesizeConfig, {
            "name": name, "manifest": uri, "generator": {"name": "cutpaste"}, "classes": ["defect"],
            "masks": {"default": {"kind": "blob", "area_range": [0.05, 0.1]}}, "min_box_area": 1,
            "filters": []}, "synth config")
        return pipeline.Synthesizer(cfg, str(tmp_path / name))

    broken = next(r for r in defects if r["sample_id"] != keep)
    broken["image_bytes"], broken["image_uri"] = b"not an image", None  # unreadable: skipped like an empty one
    w = worker(recs, "one-usable")
    ids = pipeline.normal_ids(pipeline.sources(w.cfg))
    status = w.write_shard("part-0", pipeline.plan_requests(ids, ["defect"], 0, 6, 0))
    got = manifest.read(str(tmp_path / "one-usable" / "part-0.parquet")).to_pylist()
    assert status["accepted"] == len(got) > 0
    assert {json.loads(r["provenance"])["reference_id"] for r in got} == {keep}

    for r in recs:
        if r["sample_id"] == keep:
            r["mask_bytes"], r["mask_uri"] = encode_mask_png(np.zeros((32, 32), np.uint8)), None
    w = worker(recs, "none-usable")
    status = w.write_shard("part-0", pipeline.plan_requests(ids, ["defect"], 0, 4, 0))
    assert status["accepted"] == 0 and len(status["rejected"]) == 4
    assert all(rej["reasons"][0].startswith("generator: ") for rej in status["rejected"])
    assert storage.exists(str(tmp_path / "none-usable" / "_shards" / "part-0.json"))
