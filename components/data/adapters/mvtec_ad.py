"""MVTec AD (Bergmann et al., CVPR 2019 / IJCV 2021): the unsupervised anomaly-detection benchmark, 15 categories.

The training set holds defect-free images only, and the test set's defect-free images have no mask files: both
are known-empty ground truth (pixel supervision), which is what lets pixel metrics run on the whole test set.
The folder names carry every label, so nothing is decoded. All categories go into one manifest (one dataset name);
the category is the second level of the sample id and is in the provenance, so a per-category model is a
``categories`` option (or a filter) away.
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
    carve_val,
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
from components.errors import ConfigError

log = logging.getLogger(__name__)

GOOD = "good"
MASK_SUFFIX = "_mask"

DESCRIPTION = (
    "<root>/<category>/train/good/*.png are defect-free training images, <root>/<category>/test/good/*.png "
    "defect-free test images and <root>/<category>/test/<defect>/*.png defective ones (label 1, defect_class "
    "<defect>, e.g. crack), with pixel masks in <root>/<category>/ground_truth/<defect>/<stem>_mask.png "
    "(non-zero = defect). Defect-free images carry pixel supervision with a known-empty mask; a defective image "
    "without a mask gets image-level supervision. Sample ids are <dataset>/<category>/<path>; the category is also "
    "in the provenance. The authors' split is kept: test/ is the test split, and val_fraction of train/good "
    "(derived from the sample ids) becomes val, the rest train. Option categories limits the categories read "
    "(default: every folder that has train/ or test/)."
)


class MVTecADOptions(AdapterOptions):
    categories: list[str] | None = Field(None, description="categories to read, e.g. [bottle, screw] (default all)")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of train/good carved out as val")

    @field_validator("categories", mode="before")
    @classmethod
    def _csv(cls, v: Any) -> Any:
        return [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v


class MVTecADAdapter(Adapter):
    name = "mvtec_ad"
    description = DESCRIPTION
    Options = MVTecADOptions

    def scan(self, root_uri: str | None, dataset_name: str, options: AdapterOptions, *,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict[str, Any]]:
        assert root_uri is not None and isinstance(options, MVTecADOptions)
        images: list[tuple[str, str, str, str, str]] = []  # (uri, rel, category, split, defect folder)
        masks: dict[tuple[str, str, str], str] = {}
        stray: list[str] = []
        for uri in list_files(root_uri):
            if not is_image(uri):
                continue
            rel = relative(root_uri, uri)
            parts = rel.split("/")
            if len(parts) != 4:
                stray.append(rel)
                continue
            cat, kind, folder, file = parts
            if kind == "ground_truth":
                stem = stem_of(file)
                if stem.endswith(MASK_SUFFIX):
                    masks[(cat, folder, stem[: -len(MASK_SUFFIX)])] = uri
                else:
                    stray.append(rel)
            elif kind == "test" or (kind == "train" and folder == GOOD):
                images.append((uri, rel, cat, kind, folder))
            else:
                stray.append(rel)
        found = sorted({im[2] for im in images})
        if options.categories is not None:
            unknown = sorted(set(options.categories) - set(found))
            if unknown:
                raise ConfigError(f"mvtec_ad: categories {unknown} are not under {root_uri}",
                                  f"categories found: {found or 'none'}")
            wanted = set(options.categories)
            images = [im for im in images if im[2] in wanted]
            masks = {k: v for k, v in masks.items() if k[0] in wanted}
            stray = [s for s in stray if s.split("/")[0] in wanted]
        if stray:
            log.warning("mvtec_ad: ignored %d image(s) outside <category>/{train/good,test/<defect>,ground_truth/"
                        "<defect>}/, e.g. %s", len(stray), stray[:3])
        if not images:
            raise self.empty_error(root_uri, "no <category>/train/good/*.png or <category>/test/<defect>/*.png")

        sizes = probe_sizes([im[0] for im in images], max_pixels)
        rows, missing, used = [], [], set()
        for (uri, rel, cat, split, folder), size in zip(images, sizes, strict=True):
            if isinstance(size, Unreadable):
                rows.append(unreadable_row(dataset_name, rel, size))
                continue
            w, h = size
            prov = {"adapter": self.name, "category": cat, "split_from": "authors"}
            if folder == GOOD:
                rows.append(manifest.row(sample_id(dataset_name, rel), dataset_name, width=w, height=h,
                                         split=split, image_uri=uri, label=0, provenance=prov))
                continue
            key = (cat, folder, stem_of(rel.split("/")[3]))
            mask_uri = masks.get(key)
            if mask_uri is None:
                missing.append(rel)
            else:
                used.add(key)
            rows.append(manifest.row(sample_id(dataset_name, rel), dataset_name, width=w, height=h, split=split,
                                     image_uri=uri, label=1, mask_uri=mask_uri, defect_class=folder,
                                     provenance=prov))
        if missing:
            log.warning("mvtec_ad: %d defective image(s) lack ground_truth/<defect>/<stem>_mask.png (image-level "
                        "supervision), e.g. %s", len(missing), missing[:3])
        orphans = sorted(set(masks) - used)
        if orphans:
            log.warning("mvtec_ad: %d mask(s) match no test image, e.g. %s", len(orphans),
                        [masks[k] for k in orphans[:3]])
        carve_val(rows, options.val_fraction, group=lambda r: sample_category(r["sample_id"]))
        log.info("mvtec_ad: %d images in %d categories %s", len(rows), len({im[2] for im in images}),
                 count_by(im[2] for im in images))
        return rows


def sample_category(sid: str) -> str:
    """The category of an mvtec_ad sample id (``<dataset>/<category>/...``)."""
    return sid.split("/")[1]


register(MVTecADAdapter())
