"""KolektorSDD2 (Božič et al., Computers in Industry 2021): defects on coloured electrical commutators.

As in KolektorSDD, only the ground-truth image says whether a sample is defective, so the masks are decoded at
ingest (in threads). The authors' train/test split is the folder; val is carved out of their train set
(:func:`components.data.adapters.kolektorsdd.carve_val`) so the test set stays exactly the published one.

The official archive contains a stray duplicate, ``10301 (copy).png`` with ``10301_GT (copy).png``; any file
whose name contains ``(copy)`` is skipped (and logged), otherwise the published counts would be off by one.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field

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

GT_SUFFIX = "_gt"
COPY_MARK = "(copy)"
SPLIT_DIRS = ("train", "test")

DESCRIPTION = (
    "<root>/train/NNNNN.png and <root>/test/NNNNN.png are the images (RGB, about 230x630) and "
    "<root>/{train,test}/NNNNN_GT.png their pixel masks (same stem + '_GT', non-zero = defect). The masks are "
    "decoded: label = 1 when a defect pixel exists (defect_class 'defect'), else 0 with the empty mask kept (pixel "
    "supervision); an image without a mask gets label null. The authors' split is kept: test/ is the test split, "
    "and val_fraction of train/ (stratified by label, derived from the sample ids) becomes val, the rest train. "
    "Files whose name contains '(copy)' (the archive's duplicate 10301 pair) are skipped. Folder names are matched "
    "case-insensitively."
)


class KolektorSDD2Options(AdapterOptions):
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of the authors' train set carved out as val")


class KolektorSDD2Adapter(Adapter):
    name = "kolektorsdd2"
    description = DESCRIPTION
    Options = KolektorSDD2Options

    def scan(self, root_uri: str | None, dataset_name: str, options: AdapterOptions, *,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict[str, Any]]:
        assert root_uri is not None and isinstance(options, KolektorSDD2Options)
        images: list[tuple[str, str, str]] = []  # (uri, rel, split)
        masks: dict[tuple[str, str], str] = {}
        copies: list[str] = []
        for uri in list_files(root_uri):
            if not is_image(uri):
                continue
            rel = relative(root_uri, uri)
            parts = rel.split("/")
            if len(parts) != 2 or parts[0].lower() not in SPLIT_DIRS:
                continue
            if COPY_MARK in parts[1]:
                copies.append(rel)
                continue
            split, stem = parts[0].lower(), stem_of(parts[1])
            if stem.lower().endswith(GT_SUFFIX):
                masks[(split, stem[: -len(GT_SUFFIX)].lower())] = uri
            else:
                images.append((uri, rel, split))
        if copies:
            log.warning("kolektorsdd2: skipped %d duplicate '(copy)' file(s) of the official archive: %s",
                        len(copies), copies[:4])
        if not images:
            raise self.empty_error(root_uri, "no train/NNNNN.png or test/NNNNN.png")

        sizes = probe_sizes([u for u, _, _ in images], max_pixels)
        mask_uris = [masks.get((split, stem_of(rel.split("/")[1]).lower())) for _, rel, split in images]
        present = [u for u in mask_uris if u]
        decoded = dict(zip(present, read_masks(present, max_pixels), strict=True))

        rows, missing = [], []
        for (uri, rel, split), size, mask_uri in zip(images, sizes, mask_uris, strict=True):
            if isinstance(size, Unreadable):
                rows.append(unreadable_row(dataset_name, rel, size))
                continue
            w, h = size
            prov = {"adapter": self.name, "split_from": "authors"}
            if mask_uri is None:
                missing.append(rel)
            rows.append(mask_row(dataset_name, rel, uri, (w, h), split, mask_uri,
                                 decoded.get(mask_uri) if mask_uri else None, prov))
        if missing:
            log.warning("kolektorsdd2: %d image(s) have no <stem>_GT.png (label null), e.g. %s", len(missing),
                        missing[:3])
        orphans = sorted(set(masks.values()) - set(present))
        if orphans:
            log.warning("kolektorsdd2: %d mask(s) match no image, e.g. %s", len(orphans), orphans[:3])
        carve_val(rows, options.val_fraction)
        log.info("kolektorsdd2: %d images, (split, label) counts %s", len(rows),
                 count_by((r["split"], r["label"]) for r in rows))
        return rows


register(KolektorSDD2Adapter())
