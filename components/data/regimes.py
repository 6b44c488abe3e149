"""Supervision regimes: deterministic filters over manifest rows, so one model code path serves all four.

A regime rewrites only the train split. Validation and test rows keep every label and mask they have: a model is
always judged against the full ground truth, whatever it was allowed to see while training.

=============  =====================================================================================================
unsupervised   train on defect-free and unlabelled images only (label 0 or null); supervision ``none``
weak           labelled images only; image-level labels, every mask dropped; supervision ``image``
mixed          like weak, but defect-free rows keep ``pixel`` (an empty mask is known) and a seeded subset of the
               defective rows with masks keeps them (``mixed_masks``: N rows, or a fraction of them)
full           everything as ingested
=============  =====================================================================================================

The mixed subset ranks rows by a seeded hash of their sample id, so it does not depend on row order, and subsets
are nested: with the same seed, the rows keeping masks at N=10 include those at N=5. Sweeping the number of masks
therefore adds annotations instead of swapping them.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components.data import manifest
from components.errors import DataError

log = logging.getLogger(__name__)

REGIMES = ("unsupervised", "weak", "mixed", "full")


def apply(table: pa.Table, regime: str, *, mixed_masks: int | float | None = None, seed: int = 0) -> pa.Table:
    """The manifest as the trainer of ``regime`` may see it (only train rows change)."""
    if regime not in REGIMES:
        raise DataError(f"unknown supervision regime {regime!r}", f"choose one of {list(REGIMES)}")
    if regime == "mixed":
        _check_mixed(mixed_masks)
    elif mixed_masks is not None:
        log.debug("mixed_masks=%s ignored by regime %r", mixed_masks, regime)
    if regime == "full":
        return table

    train = pc.equal(table["split"], "train").to_numpy(zero_copy_only=False)
    labels = table["label"].to_pylist()
    sup = table["supervision"].to_pylist()
    mask_uri = table["mask_uri"].to_pylist()
    mask_bytes = table["mask_bytes"].to_pylist()
    has_mask = [u is not None or b is not None for u, b in zip(mask_uri, mask_bytes, strict=True)]
    keep = np.ones(table.num_rows, dtype=bool)
    drop_mask = np.zeros(table.num_rows, dtype=bool)

    if regime == "unsupervised":
        for i in np.flatnonzero(train):
            if labels[i] == 1:
                keep[i] = False
            else:
                sup[i] = "none"
    else:  # weak, mixed
        chosen: set[int] = set()
        if regime == "mixed":
            candidates = [int(i) for i in np.flatnonzero(train) if labels[i] == 1 and has_mask[i]]
            chosen = set(_choose(table, candidates, mixed_masks, seed))
        for i in np.flatnonzero(train):
            if labels[i] is None:
                keep[i] = False
            elif regime == "mixed" and (labels[i] == 0 or i in chosen):
                sup[i] = "pixel"
            else:
                sup[i] = "image"
                drop_mask[i] = has_mask[i]

    out = table.set_column(table.schema.get_field_index("supervision"), "supervision",
                           pa.array(sup, pa.string()))
    if drop_mask.any():
        dm = pa.array(drop_mask)
        for col in ("mask_uri", "mask_bytes"):
            idx = out.schema.get_field_index(col)
            out = out.set_column(idx, col, pc.if_else(dm, pa.scalar(None, out.schema.field(col).type), out[col]))
    if not keep.all():
        out = out.filter(pa.array(keep))
    log.info("regime %s: train rows %s", regime, describe(out))
    return manifest.validate(out)


def describe(table: pa.Table) -> dict[str, Any]:
    """Train rows per supervision level, plus how many defective train rows carry a mask (for logs and reports)."""
    train = table.filter(pc.equal(table["split"], "train"))
    sup = train["supervision"].to_pylist()
    labels = train["label"].to_pylist()
    has_mask = pc.or_(pc.is_valid(train["mask_uri"]), pc.is_valid(train["mask_bytes"])).to_pylist()
    out: dict[str, Any] = {"train": train.num_rows}
    for level in manifest.SUPERVISION:
        out[level] = sum(1 for s in sup if s == level)
    out["defective"] = sum(1 for v in labels if v == 1)
    out["defective_with_mask"] = sum(1 for v, m in zip(labels, has_mask, strict=True) if v == 1 and m)
    return out


def _check_mixed(mixed_masks: int | float | None) -> None:
    if mixed_masks is None:
        raise DataError("regime 'mixed' needs mixed_masks", "set data.mixed_masks to a count N or a fraction in (0, 1]")
    if isinstance(mixed_masks, bool) or not isinstance(mixed_masks, (int, float, np.integer, np.floating)):
        raise DataError(f"mixed_masks must be an int or a float, got {mixed_masks!r}", "e.g. 20 or 0.25")
    if isinstance(mixed_masks, (int, np.integer)):
        if mixed_masks < 0:
            raise DataError(f"mixed_masks must be >= 0, got {mixed_masks}", "a number of masks, e.g. 20")
    elif not (0.0 < float(mixed_masks) <= 1.0) or math.isnan(float(mixed_masks)):
        raise DataError(f"mixed_masks as a fraction must be in (0, 1], got {mixed_masks}",
                        "e.g. 0.25 for a quarter of the masks, or an int for a count")


def _choose(table: pa.Table, candidates: list[int], mixed_masks: int | float | None, seed: int) -> list[int]:
    """The first k candidates in seeded-hash order of their sample ids (nested in k for a fixed seed)."""
    n = len(candidates)
    if isinstance(mixed_masks, (int, np.integer)):
        k = min(int(mixed_masks), n)
    else:
        k = min(n, max(1, math.floor(float(mixed_masks) * n + 0.5))) if n else 0
    ids = table["sample_id"].to_pylist()
    ranked = sorted(candidates, key=lambda i: (manifest.unit_hash(ids[i], seed), ids[i]))
    if k < n:
        log.info("mixed regime: %d of %d defective train rows keep their masks", k, n)
    return ranked[:k]
