"""Magnetic-tile surface defects (Huang et al., "Saliency of magnetic tile surface defects").

Images and masks share one folder and a stem, told apart only by suffix (.jpg image, .png mask). MT_Free is the
defect-free class; its masks are empty, so its rows keep pixel supervision: an empty mask is known ground truth.
"""

from __future__ import annotations

import logging
from typing import Any

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

FREE = "free"

DESCRIPTION = (
    "<root>/MT_<Class>/Imgs/<name>.jpg are the images (grayscale, about 100-600 px a side) and "
    "<root>/MT_<Class>/Imgs/<name>.png their pixel masks (same stem, non-zero = defect). MT_Free holds the "
    "defect-free images (label 0, empty masks, pixel supervision); MT_Blowhole, MT_Break, MT_Crack, MT_Fray and "
    "MT_Uneven the defective ones (label 1, defect_class blowhole/break/crack/fray/uneven). Other MT_<Class> "
    "folders are read as further defect classes. There is no official split: a deterministic one is derived from "
    "the file names."
)


class MagneticTileOptions(AdapterOptions):
    pass


class MagneticTileAdapter(Adapter):
    name = "magnetic_tile"
    description = DESCRIPTION
    Options = MagneticTileOptions

    def scan(self, root_uri: str | None, dataset_name: str, options: AdapterOptions, *,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict[str, Any]]:
        assert root_uri is not None
        images: list[tuple[str, str, str]] = []  # (uri, rel, class)
        masks: dict[str, str] = {}
        for uri in list_files(root_uri):
            if not is_image(uri):
                continue
            rel = relative(root_uri, uri)
            parts = rel.split("/")
            if len(parts) != 3 or not parts[0].startswith("MT_") or parts[1].lower() != "imgs":
                continue
            if rel.lower().endswith(".png"):
                masks[stem_of(rel)] = uri
            else:
                images.append((uri, rel, parts[0][3:].lower()))
        if not images:
            raise self.empty_error(root_uri, "no MT_<Class>/Imgs/<name>.jpg")

        sizes = probe_sizes([im[0] for im in images], max_pixels)
        rows, missing = [], []
        for (uri, rel, cls), size in zip(images, sizes, strict=True):
            if isinstance(size, Unreadable):
                rows.append(unreadable_row(dataset_name, rel, size))
                continue
            w, h = size
            mask_uri = masks.get(stem_of(rel))
            free = cls == FREE
            if mask_uri is None and not free:
                missing.append(rel)
            rows.append(manifest.row(sample_id(dataset_name, rel), dataset_name, width=w, height=h, split="",
                                     image_uri=uri, label=0 if free else 1, mask_uri=mask_uri,
                                     defect_class=None if free else cls, provenance={"adapter": self.name}))
        if missing:
            log.warning("magnetic_tile: %d defective image(s) lack a .png mask (image-level supervision), e.g. %s",
                        len(missing), missing[:3])
        log.info("magnetic_tile: %d images %s", len(rows), count_by(im[2] for im in images))
        return rows


register(MagneticTileAdapter())
