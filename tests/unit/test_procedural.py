"""The procedural default data: determinism, exact masks, visible defects."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from components.data import procedural
from components.errors import DataError


@pytest.fixture(scope="module")
def samples():
    return procedural.generate(count=48, size=96, defect_fraction=0.5, seed=3)


def test_shapes_labels_and_masks(samples):
    assert len(samples) == 48
    assert Counter(s.label for s in samples) == {0: 24, 1: 24}
    for s in samples:
        assert s.image.dtype == np.uint8 and s.image.shape == (96, 96, 3)
        assert s.mask.dtype == np.uint8 and s.mask.shape == (96, 96) and set(np.unique(s.mask)) <= {0, 1}
        assert (s.mask.sum() > 0) == (s.label == 1)  # non-empty exactly for defective images
        assert (s.defect_class is None) == (s.label == 0)
        assert s.mask.mean() < 0.3  # a defect, not the whole surface
        prov = s.provenance
        assert prov["texture"] in procedural.TEXTURES and prov["seed"] == 3
        assert prov["defects"] == ([s.defect_class] if s.label else [])


def test_balanced_textures_and_kinds(samples):
    assert Counter(s.provenance["texture"] for s in samples) == {t: 12 for t in procedural.TEXTURES}
    assert Counter(s.defect_class for s in samples if s.label) == {k: 6 for k in procedural.DEFECT_KINDS}


def test_same_seed_is_bit_identical(samples):
    again = procedural.generate(count=48, size=96, defect_fraction=0.5, seed=3)
    for a, b in zip(samples, again, strict=True):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.provenance == b.provenance
    other = procedural.generate(count=4, size=96, defect_fraction=0.5, seed=4)
    assert not any(np.array_equal(a.image, b.image) for a, b in zip(samples, other, strict=False))


def test_render_matches_generate_and_ignores_count(samples):
    plan = procedural.plan(48, 0.5, seed=3)
    for i in (0, 7, 31):
        texture, kind = plan[i]
        one = procedural.render(i, seed=3, size=96, texture=texture, defect=kind)
        assert np.array_equal(one.image, samples[i].image) and np.array_equal(one.mask, samples[i].mask)


def test_mask_pixels_differ_from_the_clean_surface(samples):
    """Against the defect-free twin (same surface, light and noise): the mask is where the defect changed pixels."""
    plan = procedural.plan(48, 0.5, seed=3)
    for i, s in enumerate(samples):
        if not s.label:
            continue
        texture, kind = plan[i]
        clean = procedural.render(i, seed=3, size=96, texture=texture, defect=kind, clean=True)
        assert np.array_equal(clean.mask, s.mask)
        diff = np.abs(s.image.astype(np.int16) - clean.image.astype(np.int16)).max(axis=2)
        inside = diff[s.mask.astype(bool)].mean()
        outside = diff[~s.mask.astype(bool)].mean()
        assert inside > 10.0, (kind, texture, inside)  # a contrast a person sees (and a small model learns)
        assert outside < 1.0, (kind, texture, outside)  # nothing outside the mask but anti-aliased fringes


def test_defects_stand_out_from_their_surroundings(samples):
    """Without the twin: mask pixels deviate from the median of a ring around them more than the ring does."""
    from scipy import ndimage

    ratios = []
    for s in samples:
        if not s.label:
            continue
        gray = s.image.astype(np.float32).mean(axis=2)
        m = s.mask.astype(bool)
        ring = ndimage.binary_dilation(m, iterations=4) & ~ndimage.binary_dilation(m, iterations=1)
        med = np.median(gray[ring])
        ratios.append(np.abs(gray[m] - med).mean() / max(np.abs(gray[ring] - med).mean(), 1.0))
    assert np.median(ratios) > 1.5 and np.mean(np.asarray(ratios) > 1.0) > 0.85


def test_sizes_and_subsets():
    s = procedural.generate(count=4, size=(64, 160), defect_fraction=1.0, seed=0, textures=["woven"],
                            defects="crack,pit")
    assert all(x.image.shape == (64, 160, 3) and x.label == 1 for x in s)
    assert {x.defect_class for x in s} == {"crack", "pit"} and {x.provenance["texture"] for x in s} == {"woven"}
    none = procedural.generate(count=3, size=32, defect_fraction=0.0)
    assert all(x.label == 0 and x.mask.sum() == 0 for x in none)
    big = procedural.render(0, size=384, texture="turned", defect="stain")
    assert big.image.shape == (384, 384, 3) and big.mask.sum() > 100


@pytest.mark.parametrize("kwargs", [{"size": 8}, {"size": (64,)}, {"defect_fraction": 1.5}, {"count": -1},
                                    {"textures": ["marble"]}, {"defects": []}])
def test_bad_arguments(kwargs):
    with pytest.raises(DataError):
        procedural.generate(**{"count": 2, "size": 64, **kwargs})
