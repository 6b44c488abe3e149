"""SD-saliency-900 (Song et al., EDRNet, IEEE TIM 2020): strip-steel defects, the GMBINet paper's dataset.

The class is encoded in the file-name prefix, not in a folder, and every image is defective: a model trained on
it alone never sees a defect-free surface, which is why it is used for saliency/segmentation, not anomaly scoring.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from pydantic import Field

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

CLASSES = {"in": "inclusion", "pa": "patches", "sc": "scratches"}
_NAME = re.compile(r"^(In|Pa|Sc)_(\d+)$", re.IGNORECASE)

DESCRIPTION = (
    "<root>/Source Images/{In,Pa,Sc}_<n>.bmp are the images (200x200 grayscale strip steel) and "
    "<root>/Ground truth/{In,Pa,Sc}_<n>.png their pixel masks (same stem, non-zero = defect). The prefix is the "
    "class: In = inclusion, Pa = patches, Sc = scratches. Every image is defective (label 1). Folder names are "
    "matched case-insensitively; there is no official split, so a deterministic one is derived from the file names."
)


class SDSaliencyOptions(AdapterOptions):
    images_dir: str = Field("Source Images", description="folder of the images")
    masks_dir: str = Field("Ground truth", description="folder of the masks")


class SDSaliency900Adapter(Adapter):
    name = "sd_saliency_900"
    description = DESCRIPTION
    Options = SDSaliencyOptions

    def scan(self, root_uri: str | None, dataset_name: str, options: AdapterOptions, *,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict[str, Any]]:
        assert root_uri is not None and isinstance(options, SDSaliencyOptions)
        img_dir, mask_dir = options.images_dir.lower(), options.masks_dir.lower()
        images: list[tuple[str, str, str]] = []  # (uri, rel, class)
        masks: dict[str, str] = {}
        skipped: list[str] = []
        for uri in list_files(root_uri):
            if not is_image(uri):
                continue
            rel = relative(root_uri, uri)
            parts = rel.split("/")
            if len(parts) != 2:
                continue
            stem = stem_of(parts[1])
            if parts[0].lower() == mask_dir:
                masks.setdefault(stem.lower(), uri)
                continue
            if parts[0].lower() != img_dir:
                continue
            m = _NAME.match(stem)
            if not m:
                skipped.append(rel)
                continue
            images.append((uri, rel, CLASSES[m.group(1).lower()]))
        if skipped:
            log.warning("sd_saliency_900: ignored %d image(s) not named {In,Pa,Sc}_<n>, e.g. %s", len(skipped),
                        skipped[:3])
        if not images:
            raise self.empty_error(root_uri, f"nothing in {options.images_dir!r} named {{In,Pa,Sc}}_<n>")

        sizes = probe_sizes([im[0] for im in images], max_pixels)
        rows, missing = [], []
        for (uri, rel, cls), size in zip(images, sizes, strict=True):
            if isinstance(size, Unreadable):
                rows.append(unreadable_row(dataset_name, rel, size))
                continue
            w, h = size
            mask_uri = masks.get(stem_of(rel.split("/")[1]).lower())
            if mask_uri is None:
                missing.append(rel)
            rows.append(manifest.row(sample_id(dataset_name, rel), dataset_name, width=w, height=h, split="",
                                     image_uri=uri, label=1, mask_uri=mask_uri, defect_class=cls,
                                     provenance={"adapter": self.name}))
        if missing:
            log.warning("sd_saliency_900: %d image(s) have no mask in %r (image-level supervision), e.g. %s",
                        len(missing), options.masks_dir, missing[:3])
        log.info("sd_saliency_900: %d images %s", len(rows), count_by(im[2] for im in images))
        return rows


register(SDSaliency900Adapter())
