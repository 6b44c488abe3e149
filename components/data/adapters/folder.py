"""The generic folder layout: what a quality engineer gets by sorting images into folders by hand.

Folder names carry the labels, so no annotation tool is needed; masks are optional and may exist for only a few
images, which is exactly the "mixed" supervision the regimes are built for.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field, field_validator

from components.data import manifest
from components.data.adapters.base import (
    Adapter,
    AdapterOptions,
    Unreadable,
    count_by,
    is_image,
    list_files,
    probe_sizes,
    register,
    relative,
    sample_id,
    stem_of,
    unreadable_row,
)
from components.data.images import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)

DESCRIPTION = (
    "<root>/[<split>/]good/*.<img> are defect-free images (label 0); <root>/[<split>/]<defect_class>/*.<img> are "
    "defective images of that class (label 1), e.g. scratch/ or dent/; optional pixel masks go to "
    "<root>/[<split>/]masks/<defect_class>/<stem>.png with the same stem as the image (non-zero = defect; a "
    "defective image without a mask gets image-level supervision); <root>/[<split>/]unlabeled/* holds images of "
    "unknown label (supervision none). The <split> level (train/, val/, test/) is optional: when present, that "
    "split is kept, otherwise a deterministic split is derived from the file paths. Images may sit in sub-folders "
    "of a class folder (their masks then mirror that sub-path). Image suffixes: png, jpg, jpeg, bmp, tif, tiff, "
    "webp; hidden files are skipped."
)


class FolderOptions(AdapterOptions):
    good_dirs: list[str] = Field(["good"], description="folder names holding defect-free images")
    unlabeled_dirs: list[str] = Field(["unlabeled", "unlabelled"], description="folder names of unknown label")
    masks_dir: str = Field("masks", description="folder holding <defect_class>/<stem>.png masks")
    mask_suffix: str = Field("", description="suffix of mask stems, e.g. '_mask' for <stem>_mask.png")

    @field_validator("good_dirs", "unlabeled_dirs", mode="before")
    @classmethod
    def _csv(cls, v: Any) -> Any:
        return [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v


class FolderAdapter(Adapter):
    name = "folder"
    description = DESCRIPTION
    Options = FolderOptions

    def scan(self, root_uri: str | None, dataset_name: str, options: AdapterOptions, *,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict[str, Any]]:
        assert root_uri is not None and isinstance(options, FolderOptions)
        splits = set(manifest.SPLITS)
        good, unlabeled = set(options.good_dirs), set(options.unlabeled_dirs)
        images: list[tuple[str, str, str, str, str]] = []  # (uri, rel, split, folder, key inside folder)
        masks: dict[tuple[str, str, str], str] = {}
        stray: list[str] = []
        for uri in list_files(root_uri):
            if not is_image(uri):
                continue
            rel = relative(root_uri, uri)
            parts = rel.split("/")
            split = ""
            if parts[0] in splits and len(parts) > 1:
                split, parts = parts[0], parts[1:]
            if len(parts) < 2:
                stray.append(rel)
                continue
            if parts[0] == options.masks_dir:
                if len(parts) < 3:
                    stray.append(rel)
                    continue
                key = stem_of("/".join(parts[2:]))
                if options.mask_suffix:
                    if not key.endswith(options.mask_suffix):
                        stray.append(rel)
                        continue
                    key = key[: -len(options.mask_suffix)]
                masks.setdefault((split, parts[1], key), uri)
                continue
            images.append((uri, rel, split, parts[0], stem_of("/".join(parts[1:]))))
        if stray:
            log.warning("folder layout: ignored %d image(s) outside class folders, e.g. %s", len(stray), stray[:3])
        if not images:
            raise self.empty_error(root_uri, "no image inside a class folder")

        sizes = probe_sizes([im[0] for im in images], max_pixels)
        rows = []
        used: set[tuple[str, str, str]] = set()
        for (uri, rel, split, folder, key), size in zip(images, sizes, strict=True):
            if isinstance(size, Unreadable):
                rows.append(unreadable_row(dataset_name, rel, size))
                continue
            w, h = size
            if folder in unlabeled:
                label, cls = None, None
            elif folder in good:
                label, cls = 0, None
            else:
                label, cls = 1, folder
            mask_uri = None
            if label is not None and (split, folder, key) in masks:
                mask_uri = masks[(split, folder, key)]
                used.add((split, folder, key))
            rows.append(manifest.row(
                sample_id(dataset_name, rel), dataset_name, width=w, height=h, split=split, image_uri=uri,
                label=label, mask_uri=mask_uri, defect_class=cls,
                provenance={"adapter": self.name, "split_from": "folder" if split else "ids"}))
        orphans = sorted(set(masks) - used)
        if orphans:
            log.warning("folder layout: %d mask(s) match no image (same split, class folder and stem), e.g. %s",
                        len(orphans), [masks[k] for k in orphans[:3]])
        log.info("folder layout: %d images per folder %s, %d with masks", len(rows),
                 count_by(im[3] for im in images), len(used))
        return rows


register(FolderAdapter())
