"""KolektorSDD (Tabernik et al., J. Intell. Manuf. 2020): cracks on electrical commutators, one folder per part.

Whether an image is defective is written nowhere but in its label bitmap, so the bitmaps are decoded at ingest
(they are small, and read in threads). The all-zero bitmaps of defect-free images are kept as masks: an empty mask
is known ground truth, so those rows carry pixel supervision.

The published protocol is 3-fold cross-validation by part (images of one commutator never straddle train and
test). ``fold`` reproduces it; the other folds' images are the training set, of which ``val_fraction`` is carved
out as val here (:func:`carve_val`), because :func:`components.data.adapters.ingest` only fills *empty* splits
and would deal them over train/val/test with the full split fractions, leaking a test share into the training
parts. This module also holds the helpers the other authors'-split layouts share (:func:`carve_val`,
:func:`read_masks`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
from pydantic import Field, model_validator

from components import storage
from components.data import manifest
from components.data.adapters import (
    Adapter,
    AdapterOptions,
    count_by,
    is_image,
    list_files,
    parallel_map,
    probe_sizes,
    register,
    relative,
    sample_id,
    stem_of,
)
from components.data.images import DEFAULT_MAX_PIXELS, decode_mask
from components.errors import DataError

log = logging.getLogger(__name__)

_PART = re.compile(r"^kos(\d+)$", re.IGNORECASE)
LABEL_SUFFIX = "_label"
DEFECT = "defect"

DESCRIPTION = (
    "<root>/kosNN/PartK.jpg are the images (grayscale, about 500x1250; one folder per physical part, kos01..kos50, "
    "8 images each) and <root>/kosNN/PartK_label.bmp their pixel masks (same stem + '_label', non-zero = defect). "
    "The masks are decoded: label = 1 when a defect pixel exists (defect_class 'defect'), else 0 with the empty "
    "mask kept (pixel supervision); an image without a label bitmap gets label null. Option fold (0..folds-1, "
    "folds = 3 by default) reproduces the authors' cross-validation by part: the part folders, sorted by number, "
    "are dealt round-robin to the folds, the chosen fold's images are the test split, and val_fraction of the "
    "other parts' labelled images (stratified by label, derived from the sample ids) becomes val, the rest train. "
    "Without fold there is no authors' split: a deterministic train/val/test split is derived from the file names."
)


class KolektorSDDOptions(AdapterOptions):
    fold: int | None = Field(None, ge=0, description="cross-validation fold used as the test split (null: none)")
    folds: int = Field(3, ge=2, description="number of cross-validation folds parts are dealt into")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of the non-test images carved out as val "
                                                             "(only with fold)")

    @model_validator(mode="after")
    def _fold_in_range(self) -> KolektorSDDOptions:
        if self.fold is not None and self.fold >= self.folds:
            raise ValueError(f"fold {self.fold} is out of range for folds = {self.folds} (use 0..{self.folds - 1})")
        return self


class KolektorSDDAdapter(Adapter):
    name = "kolektorsdd"
    description = DESCRIPTION
    Options = KolektorSDDOptions

    def scan(self, root_uri: str | None, dataset_name: str, options: AdapterOptions, *,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict[str, Any]]:
        assert root_uri is not None and isinstance(options, KolektorSDDOptions)
        images: list[tuple[str, str, str]] = []  # (uri, rel, part folder)
        labels: dict[str, str] = {}
        stray: list[str] = []
        for uri in list_files(root_uri):
            if not is_image(uri):
                continue
            rel = relative(root_uri, uri)
            parts = rel.split("/")
            if len(parts) != 2 or not _PART.match(parts[0]):
                stray.append(rel)
                continue
            stem = stem_of(rel)
            if stem.lower().endswith(LABEL_SUFFIX):
                labels[stem[: -len(LABEL_SUFFIX)].lower()] = uri
            else:
                images.append((uri, rel, parts[0]))
        if stray:
            log.warning("kolektorsdd: ignored %d image(s) outside kosNN/ folders, e.g. %s", len(stray), stray[:3])
        if not images:
            raise self.empty_error(root_uri, "no kosNN/PartK.jpg")

        part_names = sorted({p for _, _, p in images}, key=_part_key)
        fold_of = {p: i % options.folds for i, p in enumerate(part_names)}
        sizes = probe_sizes([u for u, _, _ in images], max_pixels)
        label_uris = [labels.get(stem_of(rel).lower()) for _, rel, _ in images]
        masks = read_masks([u for u in label_uris if u], max_pixels)
        found = dict(zip([u for u in label_uris if u], masks, strict=True))

        rows, missing = [], []
        for (uri, rel, part), (w, h), label_uri in zip(images, sizes, label_uris, strict=True):
            fold = fold_of[part]
            split = "" if options.fold is None else ("test" if fold == options.fold else "train")
            prov: dict[str, Any] = {"adapter": self.name, "part": part, "fold": fold, "folds": options.folds}
            if options.fold is not None:
                prov["split_from"] = "fold"
            if label_uri is None:
                missing.append(rel)
            rows.append(mask_row(dataset_name, rel, uri, (w, h), split, label_uri,
                                 found.get(label_uri) if label_uri else None, prov))
        if missing:
            log.warning("kolektorsdd: %d image(s) have no <stem>_label.bmp (label null), e.g. %s", len(missing),
                        missing[:3])
        used = {u for u in label_uris if u}
        orphans = sorted(set(labels.values()) - used)
        if orphans:
            log.warning("kolektorsdd: %d label bitmap(s) match no image, e.g. %s", len(orphans), orphans[:3])
        if options.fold is not None:
            carve_val(rows, options.val_fraction)
        log.info("kolektorsdd: %d images in %d parts, labels %s%s", len(rows), len(part_names),
                 count_by(r["label"] for r in rows),
                 "" if options.fold is None else f", fold {options.fold}/{options.folds} is test")
        return rows


def _part_key(part: str) -> tuple[int, str]:
    m = _PART.match(part)
    return (int(m.group(1)) if m else -1, part)


# ------------------------------------------------------------------ helpers shared by the authors'-split layouts


def read_masks(uris: Sequence[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[tuple[bool, tuple[int, int]]]:
    """(has a defect pixel, (width, height)) of each mask file, decoded in threads."""

    def one(uri: str) -> tuple[bool, tuple[int, int]]:
        m = decode_mask(storage.read_bytes(uri), name=uri, max_pixels=max_pixels)
        return bool(m.any()), (int(m.shape[1]), int(m.shape[0]))

    return parallel_map(one, list(uris), desc="reading masks")


def mask_row(dataset_name: str, rel: str, uri: str, size: tuple[int, int], split: str, mask_uri: str | None,
             decoded: tuple[bool, tuple[int, int]] | None, prov: dict[str, Any]) -> dict[str, Any]:
    """A manifest row whose label comes from its decoded mask (KolektorSDD layouts); no mask -> label null."""
    w, h = size
    if mask_uri is None or decoded is None:
        return manifest.row(sample_id(dataset_name, rel), dataset_name, width=w, height=h, split=split,
                            image_uri=uri, label=None, provenance=prov)
    defective, shape = decoded
    check_mask_shape(mask_uri, shape, uri, (w, h))
    return manifest.row(sample_id(dataset_name, rel), dataset_name, width=w, height=h, split=split, image_uri=uri,
                        label=int(defective), mask_uri=mask_uri, defect_class=DEFECT if defective else None,
                        provenance=prov)


def check_mask_shape(mask_uri: str, mask_size: tuple[int, int], image_uri: str, image_size: tuple[int, int]) -> None:
    if tuple(mask_size) != tuple(image_size):
        raise DataError(f"{mask_uri} is {mask_size[0]}x{mask_size[1]} but {image_uri} is "
                        f"{image_size[0]}x{image_size[1]}", "fix or remove the mask (masks must match their image)")


def carve_val(rows: list[dict[str, Any]], fraction: float, seed: int = 0,
              group: Callable[[dict[str, Any]], str | None] | None = None) -> list[dict[str, Any]]:
    """Turn ``fraction`` of the rows in the authors' train split into val, in place.

    ``ingest`` keeps every non-empty split and deals only empty ones over train/val/test with the full fractions,
    so an adapter that keeps the authors' test split must carve val itself, or leave train rows empty and lose a
    test share of them. The carving is :func:`manifest.assign_splits` over those rows alone: deterministic from the
    sample ids, stratified by label and spread over defect classes (or over ``group(row)``, e.g. a category).
    Rows of unknown label stay in train: there is nothing to validate against.
    """
    group = group or (lambda r: r["defect_class"])
    idx = [i for i, r in enumerate(rows) if r["split"] == "train" and r["label"] is not None]
    if not idx or fraction <= 0:
        return rows
    sub = pa.table({
        "sample_id": pa.array([rows[i]["sample_id"] for i in idx], pa.string()),
        "label": pa.array([rows[i]["label"] for i in idx], pa.int8()),
        "defect_class": pa.array([group(rows[i]) for i in idx], pa.string()),
        "split": pa.array(["" for _ in idx], pa.string()),
    })
    carved = manifest.assign_splits(sub, {"train": 1.0 - fraction, "val": fraction}, seed=seed)
    for i, s in zip(idx, carved["split"].to_pylist(), strict=True):
        rows[i]["split"] = s
    return rows


register(KolektorSDDAdapter())
