"""The manifest: one Parquet row per sample, the record every step reads and writes.

Columns (Arrow schema :data:`SCHEMA`):

==============  ==========  =====================================================================================
sample_id       string      unique and stable: ``<dataset>/<relative path without suffix>``; splits derive from it
dataset         string      dataset name
split           string      ``train`` | ``val`` | ``test``
image_uri       string?     local path or ``s3://`` URI of the image (null when ``image_bytes`` is set)
image_bytes     binary?     the encoded image itself (procedural/synthetic data, or ``ingest --embed``)
width, height   int32       image size in pixels
label           int8?       1 = defective, 0 = defect-free, null = unknown
mask_uri        string?     the pixel mask (non-zero = defect); null when ``mask_bytes`` is set or no mask exists
mask_bytes      binary?     the encoded mask itself
defect_class    string?     e.g. ``scratch``; null for defect-free or unknown
supervision     string      what a trainer may see: ``none`` | ``image`` (label) | ``pixel`` (label + mask)
source          string      ``real`` | ``synthetic``
provenance      string?     JSON: where the row came from (adapter, generator, prompt, seed, filter scores, ...)
==============  ==========  =====================================================================================

A defect-free row with ``supervision == "pixel"`` and no mask has an all-zero mask: an empty mask is known.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components import storage
from components.data.images import DEFAULT_MAX_PIXELS, decode_image, decode_mask
from components.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SUPERVISION = ("none", "image", "pixel")
SOURCES = ("real", "synthetic")

SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("image_uri", pa.string()),
    pa.field("image_bytes", pa.binary()),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("label", pa.int8()),
    pa.field("mask_uri", pa.string()),
    pa.field("mask_bytes", pa.binary()),
    pa.field("defect_class", pa.string()),
    pa.field("supervision", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("provenance", pa.string()),
])

COLUMNS = tuple(SCHEMA.names)


def row(sample_id: str, dataset: str, *, width: int, height: int, split: str = "train",
        image_uri: str | None = None, image_bytes: bytes | None = None, label: int | None = None,
        mask_uri: str | None = None, mask_bytes: bytes | None = None, defect_class: str | None = None,
        supervision: str | None = None, source: str = "real",
        provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One manifest row with the supervision level inferred when not given."""
    if supervision is None:
        has_mask = mask_uri is not None or mask_bytes is not None
        if label is None:
            supervision = "none"
        elif has_mask or label == 0:
            supervision = "pixel"
        else:
            supervision = "image"
    return {
        "sample_id": sample_id, "dataset": dataset, "split": split,
        "image_uri": image_uri, "image_bytes": image_bytes, "width": int(width), "height": int(height),
        "label": None if label is None else int(label), "mask_uri": mask_uri, "mask_bytes": mask_bytes,
        "defect_class": defect_class, "supervision": supervision, "source": source,
        "provenance": json.dumps(dict(provenance), sort_keys=True) if provenance else None,
    }


def make_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows (dicts with the manifest columns) -> a validated manifest Table."""
    rows = list(rows)
    cols = {name: [r.get(name) for r in rows] for name in COLUMNS}
    table = pa.table(cols, schema=SCHEMA)
    validate(table)
    return table


def empty_table() -> pa.Table:
    return SCHEMA.empty_table()


def validate(table: pa.Table) -> pa.Table:
    """Check the schema and the invariants; raise DataError naming the first offending rows."""
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"manifest lacks columns {missing}", "re-run `defectflow ingest` to rebuild it")
    table = table.select(list(COLUMNS)).cast(SCHEMA)
    if table.num_rows == 0:
        return table
    ids = table.column("sample_id").to_pylist()
    if len(set(ids)) != len(ids):
        seen, dup = set(), []
        for i in ids:
            if i in seen:
                dup.append(i)
            seen.add(i)
        raise DataError(f"manifest has duplicate sample ids, e.g. {dup[:3]}", "sample ids must be unique")

    def bad(mask: pa.ChunkedArray, what: str, fix: str) -> None:
        idx = np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool))
        if idx.size:
            raise DataError(f"manifest: {idx.size} row(s) {what}, e.g. {[ids[i] for i in idx[:3]]}", fix)

    bad(pc.invert(pc.is_in(table["split"], pa.array(SPLITS))), f"have a split outside {SPLITS}", "fix the split")
    bad(pc.invert(pc.is_in(table["supervision"], pa.array(SUPERVISION))),
        f"have a supervision outside {SUPERVISION}", "fix the supervision column")
    bad(pc.invert(pc.is_in(table["source"], pa.array(SOURCES))), f"have a source outside {SOURCES}", "fix source")
    no_image = pc.and_(pc.is_null(table["image_uri"]), pc.is_null(table["image_bytes"]))
    bad(no_image, "have neither image_uri nor image_bytes", "every sample needs an image")
    label_ok = pc.or_(pc.is_null(table["label"]), pc.is_in(table["label"], pa.array([0, 1], pa.int8())))
    bad(pc.invert(label_ok), "have a label other than 0, 1 or null", "labels are 0/1/null")
    has_mask = pc.or_(pc.is_valid(table["mask_uri"]), pc.is_valid(table["mask_bytes"]))
    pixel = pc.equal(table["supervision"], "pixel")
    pixel_no_mask = pc.and_(pc.and_(pixel, pc.invert(has_mask)), pc.fill_null(pc.equal(table["label"], 1), True))
    bad(pixel_no_mask, "claim pixel supervision for a defective/unknown image without a mask",
        "give the mask or set supervision to 'image'")
    needs_label = pc.and_(pc.not_equal(table["supervision"], "none"), pc.is_null(table["label"]))
    bad(needs_label, "claim image/pixel supervision without a label", "set the label or supervision 'none'")
    return table


def read(uri: str) -> pa.Table:
    """Read and validate a manifest (a Parquet file, or a folder/prefix of Parquet shards)."""
    return validate(storage.read_parquet(uri))


def write(table: pa.Table, uri: str) -> None:
    storage.write_parquet(validate(table), uri)


def digest(table: pa.Table) -> str:
    """A short content digest for lineage: ids, splits, labels, supervision and image/mask references."""
    h = hashlib.sha256()
    cols = ["sample_id", "split", "label", "supervision", "image_uri", "mask_uri", "source"]
    order = np.argsort(np.asarray(table["sample_id"].to_pylist(), dtype=object), kind="stable")
    lists = {c: table[c].to_pylist() for c in cols}
    for i in order:
        h.update(json.dumps([lists[c][i] for c in cols]).encode())
        h.update(b"\n")
    for c in ("image_bytes", "mask_bytes"):
        for v in (table[c].to_pylist()[i] for i in order):
            if v is not None:
                h.update(hashlib.sha256(v).digest())
    return "sha256:" + h.hexdigest()[:16]


def summary(table: pa.Table) -> dict[str, Any]:
    """Counts per split, label and supervision, for logs and reports."""
    out: dict[str, Any] = {"rows": table.num_rows}
    for split in SPLITS:
        sub = table.filter(pc.equal(table["split"], split))
        if sub.num_rows == 0:
            continue
        labels = sub["label"].to_pylist()
        out[split] = {
            "rows": sub.num_rows,
            "defective": sum(1 for v in labels if v == 1),
            "normal": sum(1 for v in labels if v == 0),
            "unlabelled": sum(1 for v in labels if v is None),
            "with_mask": int(pc.sum(pc.or_(pc.is_valid(sub["mask_uri"]), pc.is_valid(sub["mask_bytes"]))).as_py()
                             or 0),
        }
    return out


# ------------------------------------------------------------------------------------------ splits


def unit_hash(sample_id: str, seed: int) -> float:
    """A sample's seeded position in [0, 1): the basis of every deterministic split and subset."""
    d = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(d[:8], "big") / 2.0**64


_unit_hash = unit_hash


def assign_splits(table: pa.Table, fractions: Mapping[str, float] | None = None, seed: int = 0,
                  keep_existing: bool = False) -> pa.Table:
    """Deterministic train/val/test split derived from sample ids, stratified by label and spread over classes.

    Within each label, samples are ordered by (defect_class, seeded hash of the id) and dealt out one by one to the
    split furthest below its target share (largest-remainder dealing). Totals per label are exact, every class is
    spread over the splits in proportion (even small ones), and a sample's split depends only on the ids, never on
    file order. ``keep_existing`` leaves rows whose split came from the dataset's authors untouched (it only fills
    rows whose split is empty).
    """
    fr = dict(fractions or {"train": 0.7, "val": 0.1, "test": 0.2})
    if set(fr) - set(SPLITS) or abs(sum(fr.values()) - 1.0) > 1e-6 or any(v < 0 for v in fr.values()):
        raise DataError(f"split fractions {fr} must be over {SPLITS} and sum to 1", "e.g. train 0.7, val 0.1, test 0.2")
    ids = table["sample_id"].to_pylist()
    labels = table["label"].to_pylist()
    classes = table["defect_class"].to_pylist()
    splits = table["split"].to_pylist()
    strata: dict[int | None, list[int]] = {}
    for i, lab in enumerate(labels):
        if keep_existing and splits[i] in SPLITS:
            continue
        strata.setdefault(lab, []).append(i)
    new = list(splits)
    names = [s for s in SPLITS if fr.get(s, 0) > 0]
    for members in strata.values():
        members.sort(key=lambda i: (classes[i] or "", unit_hash(ids[i], seed)))
        dealt = dict.fromkeys(names, 0)
        for k, i in enumerate(members, start=1):
            pick = max(names, key=lambda s: (fr[s] * k - dealt[s], fr[s]))
            dealt[pick] += 1
            new[i] = pick
    return table.set_column(table.schema.get_field_index("split"), "split", pa.array(new, pa.string()))


def split(table: pa.Table, name: str) -> pa.Table:
    return table.filter(pc.equal(table["split"], name))


# ---------------------------------------------------------------------------------------- loading


def load_image(rec: Mapping[str, Any], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A manifest row -> float32 RGB (H, W, 3) in [0, 1]."""
    data = rec.get("image_bytes")
    name = rec.get("image_uri") or rec.get("sample_id", "<image>")
    if data is None:
        if not rec.get("image_uri"):
            raise DataError(f"sample {rec.get('sample_id')} has no image", "re-run ingest")
        data = storage.read_bytes(rec["image_uri"])
    return decode_image(data, name=name, max_pixels=max_pixels)


def load_mask(rec: Mapping[str, Any], shape: tuple[int, int] | None = None,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | None:
    """A manifest row -> uint8 {0,1} mask (H, W), zeros for a known-empty mask, None when no mask is known."""
    data = rec.get("mask_bytes")
    if data is None and rec.get("mask_uri"):
        data = storage.read_bytes(rec["mask_uri"])
    if data is not None:
        mask = decode_mask(data, name=rec.get("mask_uri") or f"{rec.get('sample_id')} mask", max_pixels=max_pixels)
        if shape is not None and mask.shape != tuple(shape):
            raise DataError(f"sample {rec.get('sample_id')}: mask is {mask.shape[1]}x{mask.shape[0]} but the image "
                            f"is {shape[1]}x{shape[0]}", "fix the mask file")
        return mask
    if rec.get("label") == 0 and rec.get("supervision") == "pixel":
        h, w = shape if shape is not None else (int(rec["height"]), int(rec["width"]))
        return np.zeros((h, w), dtype=np.uint8)
    return None
