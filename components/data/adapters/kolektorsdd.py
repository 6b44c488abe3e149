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
from typing import Any

from pydantic import Field, model_validator

from components.data.adapters.base import (
    Adapter,
    AdapterOptions,
    Unreadable,
    carve_val,
    count_by,
    is_image,
    list_files,
    mask_row,
    probe_sizes,
    read_masks,
    register,
    relative,
    stem_of,
    unreadable_row,
)
from components.data.images import DEFAULT_MAX_PIXELS

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
        for (uri, rel, part), size, label_uri in zip(images, sizes, label_uris, strict=True):
            if isinstance(size, Unreadable):
                rows.append(unreadable_row(dataset_name, rel, size))
                continue
            w, h = size
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


register(KolektorSDDAdapter())
