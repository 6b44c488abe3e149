"""NEU-DET (He et al., IEEE TIM 2020): hot-rolled strip steel, six defect classes, Pascal VOC boxes.

There are no pixel masks, only boxes. The boxes are filled into a mask so box-supervised and pixel-supervised code
paths can share the data, but such a mask is coarse (every pixel of a box counts as defect, most of a box is
often clean steel): rows say so with ``mask_kind: "boxes"`` in the provenance, next to the boxes themselves, so
pixel metrics on this dataset can be read (or skipped) accordingly. Every image is defective; nothing is defect-free.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections import Counter
from typing import Any

import numpy as np
from pydantic import Field

from components import storage
from components.data import manifest
from components.data.adapters.base import (
    Adapter,
    AdapterOptions,
    Unreadable,
    count_by,
    is_image,
    list_files,
    parallel_map,
    probe_sizes,
    register,
    relative,
    sample_id,
    stem_of,
    unreadable_row,
)
from components.data.images import DEFAULT_MAX_PIXELS, encode_mask_png
from components.errors import DataError

log = logging.getLogger(__name__)

CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")

DESCRIPTION = (
    "<root>/IMAGES/*.jpg are the images (200x200 grayscale strip steel) and <root>/ANNOTATIONS/*.xml their Pascal "
    "VOC annotations (same stem; object/name one of crazing, inclusion, patches, pitted_surface, rolled-in_scale, "
    "scratches; bndbox xmin/ymin/xmax/ymax, 1-based inclusive). Every image is defective (label 1); defect_class is "
    "the most frequent object name. The boxes are filled into an embedded PNG mask, which is COARSE (a whole box "
    "counts as defect, not the defect's outline): the provenance marks it mask_kind 'boxes' and lists the boxes "
    "([x0, y0, x1, y1], 0-based, end-exclusive) with their classes. An image without an annotation keeps label 1 "
    "with image-level supervision (class from a <class>_<n> file name). Files may sit in sub-folders of the two "
    "folders (matched by stem); folder names are matched case-insensitively. There is no official split: a "
    "deterministic one is derived from the file names."
)


class NEUDETOptions(AdapterOptions):
    images_dir: str = Field("IMAGES", description="folder of the images")
    annotations_dir: str = Field("ANNOTATIONS", description="folder of the Pascal VOC .xml files")


class NEUDETAdapter(Adapter):
    name = "neu_det"
    description = DESCRIPTION
    Options = NEUDETOptions

    def scan(self, root_uri: str | None, dataset_name: str, options: AdapterOptions, *,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict[str, Any]]:
        assert root_uri is not None and isinstance(options, NEUDETOptions)
        img_dir, ann_dir = options.images_dir.lower(), options.annotations_dir.lower()
        images: list[tuple[str, str]] = []
        xmls: dict[str, str] = {}
        for uri in list_files(root_uri):
            rel = relative(root_uri, uri)
            parts = rel.split("/")
            if len(parts) < 2:
                continue
            if parts[0].lower() == img_dir and is_image(uri):
                images.append((uri, rel))
            elif parts[0].lower() == ann_dir and rel.lower().endswith(".xml"):
                xmls.setdefault(stem_of(parts[-1]), uri)
        if not images:
            raise self.empty_error(root_uri, f"no {options.images_dir}/*.jpg")

        sizes = probe_sizes([u for u, _ in images], max_pixels)
        stems = [stem_of(rel.split("/")[-1]) for _, rel in images]
        with_xml = [i for i, s in enumerate(stems) if s in xmls]
        parsed = dict(zip(with_xml, parallel_map(lambda i: read_voc(xmls[stems[i]]), with_xml,
                                                 desc="reading annotations"), strict=True))
        rows, missing, empty = [], [], []
        for i, ((uri, rel), size) in enumerate(zip(images, sizes, strict=True)):
            if isinstance(size, Unreadable):
                rows.append(unreadable_row(dataset_name, rel, size))
                continue
            w, h = size
            prov: dict[str, Any] = {"adapter": self.name}
            objects = parsed.get(i)
            mask, boxes, names = None, [], []
            if objects is not None:
                prov["annotation_uri"] = xmls[stems[i]]
                mask, boxes, names = box_mask(objects, (w, h))
                if not boxes:
                    empty.append(rel)
            if not boxes:
                if objects is None:
                    missing.append(rel)
                rows.append(manifest.row(sample_id(dataset_name, rel), dataset_name, width=w, height=h, split="",
                                         image_uri=uri, label=1, defect_class=_class_from_name(stems[i]),
                                         provenance=prov))
                continue
            prov.update({"mask_kind": "boxes", "boxes": boxes, "box_classes": names})
            rows.append(manifest.row(sample_id(dataset_name, rel), dataset_name, width=w, height=h, split="",
                                     image_uri=uri, label=1, mask_bytes=encode_mask_png(mask),
                                     defect_class=majority(names), provenance=prov))
        if missing:
            log.warning("neu_det: %d image(s) have no %s/<stem>.xml (image-level supervision), e.g. %s",
                        len(missing), options.annotations_dir, missing[:3])
        if empty:
            log.warning("neu_det: %d annotation(s) hold no box inside the image (image-level supervision), e.g. %s",
                        len(empty), empty[:3])
        orphans = sorted(set(xmls) - set(stems))
        if orphans:
            log.warning("neu_det: %d annotation(s) match no image, e.g. %s", len(orphans),
                        [xmls[s] for s in orphans[:3]])
        log.info("neu_det: %d images %s", len(rows), count_by(r["defect_class"] for r in rows))
        return rows


def read_voc(uri: str) -> list[tuple[str, tuple[float, float, float, float]]]:
    """A Pascal VOC file -> [(object name, (xmin, ymin, xmax, ymax))] as written (1-based, inclusive)."""
    try:
        root = ET.fromstring(storage.read_bytes(uri))
    except ET.ParseError as e:
        raise DataError(f"{uri}: not readable XML ({e})", "fix or remove the annotation file") from e
    out: list[tuple[str, tuple[float, float, float, float]]] = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip().lower()
        bb = obj.find("bndbox")
        if bb is None:
            continue
        try:
            xmin, ymin, xmax, ymax = (float(bb.findtext(k) or "nan") for k in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as e:
            raise DataError(f"{uri}: object {name!r} has a non-numeric bndbox", "fix the annotation file") from e
        if np.isnan([xmin, ymin, xmax, ymax]).any():
            raise DataError(f"{uri}: object {name!r} lacks xmin/ymin/xmax/ymax", "fix the annotation file")
        out.append((name or "defect", (xmin, ymin, xmax, ymax)))
    return out


def _clip(box: tuple[float, float, float, float], w: int, h: int) -> list[int] | None:
    """VOC (1-based, inclusive) -> [x0, y0, x1, y1] 0-based end-exclusive inside the image, or None if empty."""
    xmin, ymin, xmax, ymax = box
    x0, y0 = max(0, round(xmin) - 1), max(0, round(ymin) - 1)
    x1, y1 = min(w, round(xmax)), min(h, round(ymax))
    return [x0, y0, x1, y1] if x1 > x0 and y1 > y0 else None


def box_mask(objects: list[tuple[str, tuple[float, float, float, float]]],
             size: tuple[int, int]) -> tuple[np.ndarray, list[list[int]], list[str]]:
    """VOC objects -> (uint8 {0,1} mask (h, w) of the filled boxes, the clipped boxes drawn, their names)."""
    w, h = size
    mask = np.zeros((h, w), np.uint8)
    boxes, names = [], []
    for name, box in objects:
        b = _clip(box, w, h)
        if b is None:
            continue
        x0, y0, x1, y1 = b
        mask[y0:y1, x0:x1] = 1
        boxes.append(b)
        names.append(name)
    return mask, boxes, names


def majority(names: list[str]) -> str:
    """The most frequent object name (ties: alphabetical, so the choice does not depend on object order)."""
    counts = Counter(names)
    return min(counts, key=lambda n: (-counts[n], n))


def _class_from_name(stem: str) -> str | None:
    low = stem.lower()
    return next((c for c in CLASSES if low.startswith(c + "_")), None)


register(NEUDETAdapter())
