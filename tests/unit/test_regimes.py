"""Supervision regimes: deterministic row filters that touch only the train split."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest

from components.data import manifest, regimes
from components.errors import DataError


def _table():
    rows = []
    for i in range(4):
        rows.append(manifest.row(f"d/good/{i}", "d", width=8, height=8, image_uri=f"/x/g{i}.png", label=0))
    for i in range(10):
        rows.append(manifest.row(f"d/scratch/{i}", "d", width=8, height=8, image_uri=f"/x/s{i}.png", label=1,
                                 mask_uri=f"/x/m{i}.png", defect_class="scratch"))
    for i in range(3):
        rows.append(manifest.row(f"d/dent/{i}", "d", width=8, height=8, image_uri=f"/x/d{i}.png", label=1,
                                 defect_class="dent"))
    for i in range(2):
        rows.append(manifest.row(f"d/unlabeled/{i}", "d", width=8, height=8, image_uri=f"/x/u{i}.png"))
    rows.append(manifest.row("d/good/mt", "d", width=8, height=8, image_uri="/x/gm.png", label=0,
                             mask_uri="/x/empty.png"))
    for split in ("val", "test"):
        for i in range(2):
            rows.append(manifest.row(f"d/{split}/s{i}", "d", width=8, height=8, split=split, image_uri="/x/v.png",
                                     label=1, mask_bytes=b"png", defect_class="scratch"))
        rows.append(manifest.row(f"d/{split}/g", "d", width=8, height=8, split=split, image_uri="/x/v.png",
                                 label=0))
        rows.append(manifest.row(f"d/{split}/u", "d", width=8, height=8, split=split, image_uri="/x/v.png"))
    return manifest.make_table(rows)


def _train(t):
    return {r["sample_id"]: r for r in manifest.split(t, "train").to_pylist()}


def _not_train(t):
    return t.filter(pc.not_equal(t["split"], "train"))


@pytest.mark.parametrize("regime,kw", [("unsupervised", {}), ("weak", {}), ("mixed", {"mixed_masks": 3}),
                                       ("full", {})])
def test_val_and_test_untouched(regime, kw):
    t = _table()
    out = regimes.apply(t, regime, **kw)
    assert _not_train(out).equals(_not_train(t))


def test_full_is_identity():
    t = _table()
    assert regimes.apply(t, "full").equals(t)


def test_unsupervised():
    out = _train(regimes.apply(_table(), "unsupervised"))
    assert len(out) == 7 and all(r["label"] in (0, None) for r in out.values())
    assert {r["supervision"] for r in out.values()} == {"none"}


def test_weak():
    out = _train(regimes.apply(_table(), "weak"))
    assert len(out) == 18  # 5 good + 13 defective; unlabelled rows dropped
    assert {r["supervision"] for r in out.values()} == {"image"}
    assert all(r["mask_uri"] is None and r["mask_bytes"] is None for r in out.values())
    assert out["d/scratch/0"]["label"] == 1 and out["d/scratch/0"]["defect_class"] == "scratch"


def test_mixed_with_a_count():
    out = _train(regimes.apply(_table(), "mixed", mixed_masks=3, seed=0))
    assert len(out) == 18
    masked = sorted(k for k, r in out.items() if r["label"] == 1 and r["supervision"] == "pixel")
    assert len(masked) == 3 and all(out[k]["mask_uri"] for k in masked)
    others = [r for r in out.values() if r["label"] == 1 and r["supervision"] != "pixel"]
    assert all(r["supervision"] == "image" and r["mask_uri"] is None for r in others)
    goods = [r for r in out.values() if r["label"] == 0]
    assert len(goods) == 5 and all(r["supervision"] == "pixel" for r in goods)
    assert out["d/good/mt"]["mask_uri"] == "/x/empty.png"
    # more masks than exist: all of them
    allm = _train(regimes.apply(_table(), "mixed", mixed_masks=50))
    assert sum(1 for r in allm.values() if r["label"] == 1 and r["supervision"] == "pixel") == 10
    none = _train(regimes.apply(_table(), "mixed", mixed_masks=0))
    assert sum(1 for r in none.values() if r["label"] == 1 and r["supervision"] == "pixel") == 0


def test_mixed_with_a_fraction():
    out = _train(regimes.apply(_table(), "mixed", mixed_masks=0.5))
    assert sum(1 for r in out.values() if r["label"] == 1 and r["supervision"] == "pixel") == 5
    tiny = _train(regimes.apply(_table(), "mixed", mixed_masks=0.01))
    assert sum(1 for r in tiny.values() if r["label"] == 1 and r["supervision"] == "pixel") == 1
    full = _train(regimes.apply(_table(), "mixed", mixed_masks=1.0))
    assert sum(1 for r in full.values() if r["label"] == 1 and r["supervision"] == "pixel") == 10


def _masked(t):
    return {r["sample_id"] for r in manifest.split(t, "train").to_pylist() if r["label"] == 1
            and r["supervision"] == "pixel"}


def test_mixed_is_deterministic_nested_and_order_free():
    t = _table()
    a = _masked(regimes.apply(t, "mixed", mixed_masks=4, seed=1))
    assert a == _masked(regimes.apply(t, "mixed", mixed_masks=4, seed=1))
    reversed_t = t.take(list(range(t.num_rows - 1, -1, -1)))
    assert a == _masked(regimes.apply(reversed_t, "mixed", mixed_masks=4, seed=1))
    assert _masked(regimes.apply(t, "mixed", mixed_masks=2, seed=1)) < a
    others = [_masked(regimes.apply(t, "mixed", mixed_masks=4, seed=s)) for s in range(2, 6)]
    assert any(o != a for o in others)


def test_describe():
    t = _table()
    d = regimes.describe(t)
    assert d == {"train": 20, "none": 2, "image": 3, "pixel": 15, "defective": 13, "defective_with_mask": 10}
    d = regimes.describe(regimes.apply(t, "mixed", mixed_masks=2))
    assert d["pixel"] == 7 and d["image"] == 11 and d["none"] == 0 and d["defective_with_mask"] == 2


def test_bad_inputs():
    t = _table()
    with pytest.raises(DataError, match="unknown supervision regime"):
        regimes.apply(t, "semi")
    with pytest.raises(DataError, match="mixed_masks"):
        regimes.apply(t, "mixed")
    for bad in (-1, 0.0, 1.5, True, "3"):
        with pytest.raises(DataError):
            regimes.apply(t, "mixed", mixed_masks=bad)
    assert regimes.apply(t, "weak", mixed_masks=3).num_rows == regimes.apply(t, "weak").num_rows
