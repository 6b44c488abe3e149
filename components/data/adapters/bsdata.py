"""BSData (Schlagenhauf & Brückner, arXiv 2103.13003): pitting on ball-screw drives, labelme polygons.

No image decoder reads labelme JSON, so the polygons are rasterised at ingest (at the image size, PIL
``ImageDraw``) and embedded as PNG ``mask_bytes``; the per-shape bounding boxes go to the provenance for box
metrics. The published release drops the labelme ``imageData`` and names the image in ``imagePath``; the authors'
80/20 train/test split lives in ``image_data.json``, not in the folders.

What the shared copy (the 394 annotated images) holds, and what this adapter therefore expects: one label JSON per
image (``label/<stem>.json`` beside ``data/<stem>.jpg``), every one with at least one polygon (331 with one, up to
6; 485 in all, every label ``Pitting``), float sub-pixel vertices, a few polygons with repeated vertices, 57
distinct image sizes (two ball-screw types: 325 images in 2 sizes, 69 in 55), and a 324/70 split (82/18, the
"80/20" of the README). So the annotated set has no defect-free image. The full release's further 710 images in
``data/`` have no label file: they are kept as unlabelled rows (label null, supervision none) unless
``include_unlabeled`` is false, and go to train unless ``image_data.json`` says otherwise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pydantic import Field

from components import storage
from components.data import manifest
from components.data.adapters.base import (
    Adapter,
    AdapterOptions,
    Unreadable,
    carve_val,
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

PITTING = "pitting"
IMAGE_DATA = "image_data.json"
SHAPES = ("polygon", "rectangle")

DESCRIPTION = (
    "<root>/data/<name>.jpg are the images (RGB ball-screw drive crops of varying size) and "
    "<root>/label/<name>.json their labelme annotations (shapes with label 'Pitting', shape_type 'polygon' or "
    "'rectangle', points in pixels; imageData may be removed, imagePath names the image). The shapes are "
    "rasterised at the image size into an embedded PNG mask: label = 1 (defect_class 'pitting') when a shape "
    "covers a pixel, else 0; each shape's box [x0, y0, x1, y1] (pixels, end-exclusive) is in the provenance. "
    "<root>/image_data.json (a list 'images' of {filename, train_test_split, type, wear_dev, annotations}) gives the "
    "authors' split: test stays test, and val_fraction of train (stratified, derived from the sample ids) becomes "
    "val; labelled images it does not list get a split derived from the file names. Images without a label file "
    "are unlabelled (label null, supervision none, kept in train; drop them with include_unlabeled: false); label "
    "files without an image are skipped."
)


class BSDataOptions(AdapterOptions):
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of the authors' train set carved out as val")
    include_unlabeled: bool = Field(True, description="keep images of data/ that have no label/<name>.json")


class BSDataAdapter(Adapter):
    name = "bsdata"
    description = DESCRIPTION
    Options = BSDataOptions

    def scan(self, root_uri: str | None, dataset_name: str, options: AdapterOptions, *,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict[str, Any]]:
        assert root_uri is not None and isinstance(options, BSDataOptions)
        images: dict[str, tuple[str, str]] = {}  # stem -> (uri, rel)
        labels: dict[str, str] = {}  # stem -> uri
        info_uri = None
        for uri in list_files(root_uri):
            rel = relative(root_uri, uri)
            parts = rel.split("/")
            if rel == IMAGE_DATA:
                info_uri = uri
            elif len(parts) == 2 and parts[0] == "data" and is_image(uri):
                images[stem_of(parts[1])] = (uri, rel)
            elif len(parts) == 2 and parts[0] == "label" and parts[1].lower().endswith(".json"):
                labels[stem_of(parts[1])] = uri
        if not images:
            raise self.empty_error(root_uri, "no data/<name>.jpg")

        info = read_image_data(info_uri) if info_uri else {}
        if info_uri is None:
            log.warning("bsdata: no %s under %s: no authors' split, a split is derived from the file names",
                        IMAGE_DATA, root_uri)
        docs = dict(zip(labels, parallel_map(lambda s: _read_label(labels[s]), list(labels), desc="reading labels"),
                        strict=True))
        label_of: dict[str, str] = {}
        for stem, doc in docs.items():
            target = stem if stem in images else stem_of(_basename(str(doc.get("imagePath") or "")))
            if target in images and target not in label_of:
                label_of[target] = stem
        orphans = sorted(set(labels) - set(label_of.values()))
        if orphans:
            log.warning("bsdata: skipped %d label file(s) whose image is not in data/, e.g. %s", len(orphans),
                        [labels[s] for s in orphans[:3]])

        stems = sorted(images)
        unlabeled = [s for s in stems if s not in label_of]
        if unlabeled:
            log.warning("bsdata: %d image(s) in data/ have no label file: %s", len(unlabeled),
                        "kept unlabelled (label null)" if options.include_unlabeled else "skipped")
            if not options.include_unlabeled:
                stems = [s for s in stems if s in label_of]
                if not stems:
                    raise self.empty_error(root_uri, "no data/<name>.jpg has a label/<name>.json")
        sizes = probe_sizes([images[s][0] for s in stems], max_pixels)
        work = [(s, size) for s, size in zip(stems, sizes, strict=True)
                if s in label_of and not isinstance(size, Unreadable)]

        def draw(item: tuple[str, tuple[int, int]]) -> tuple[bytes | None, list[list[int]], list[str]]:
            mask, boxes, classes = rasterize(labels[label_of[item[0]]], docs[label_of[item[0]]], item[1])
            return (encode_mask_png(mask) if boxes else None), boxes, classes

        rasters = dict(zip([s for s, _ in work], parallel_map(draw, work, desc="rasterising polygons"), strict=True))

        rows, unlisted, n_shapes = [], [], 0
        for stem, size in zip(stems, sizes, strict=True):
            uri, rel = images[stem]
            if isinstance(size, Unreadable):
                rows.append(unreadable_row(dataset_name, rel, size))
                continue
            w, h = size
            meta = info.get(storage.basename(uri))
            prov: dict[str, Any] = {"adapter": self.name}
            split = ""
            if meta is not None:
                split = meta["split"]
                prov["split_from"] = "authors"
                prov.update({k: meta[k] for k in ("type", "wear_dev") if meta.get(k) is not None})
            if stem not in label_of:
                rows.append(manifest.row(sample_id(dataset_name, rel), dataset_name, width=w, height=h,
                                         split=split or "train", image_uri=uri, label=None, provenance=prov))
                continue
            if meta is None:
                unlisted.append(rel)
            mask_png, boxes, classes = rasters[stem]
            n_shapes += len(boxes)
            label = int(bool(boxes))
            prov.update({"label_uri": labels[label_of[stem]], "mask_kind": "polygons", "boxes": boxes})
            if set(classes) - {PITTING}:
                prov["shape_labels"] = classes
            rows.append(manifest.row(sample_id(dataset_name, rel), dataset_name, width=w, height=h, split=split,
                                     image_uri=uri, label=label,
                                     mask_bytes=mask_png,
                                     defect_class=PITTING if label else None, provenance=prov))
        if unlisted:
            log.warning("bsdata: %d labelled image(s) are not in %s (split derived from the file names), e.g. %s",
                        len(unlisted), IMAGE_DATA, unlisted[:3])
        listed_missing = sorted(set(info) - {storage.basename(images[s][0]) for s in images})
        if listed_missing:
            log.warning("bsdata: %d image(s) listed in %s are not in data/, e.g. %s", len(listed_missing),
                        IMAGE_DATA, listed_missing[:3])
        carve_val(rows, options.val_fraction)
        log.info("bsdata: %d images, %d with pitting (%d shapes); (split, label) counts %s", len(rows),
                 sum(1 for r in rows if r["label"] == 1),
                 n_shapes, count_by((r["split"], r["label"]) for r in rows))
        return rows


def read_image_data(uri: str) -> dict[str, dict[str, Any]]:
    """``image_data.json`` -> {image file name: {split, type, wear_dev}}."""
    doc = storage.read_json(uri)
    entries = doc.get("images") if isinstance(doc, Mapping) else doc
    if not isinstance(entries, list):
        raise DataError(f"{uri}: expected a list 'images' of per-image records", "restore the file from the release")
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        if not isinstance(e, Mapping) or not e.get("filename"):
            raise DataError(f"{uri}: a record without 'filename': {str(e)[:120]}", "restore the file from the release")
        split = str(e.get("train_test_split", "")).strip().lower()
        if split not in ("train", "test"):
            raise DataError(f"{uri}: {e['filename']} has train_test_split {e.get('train_test_split')!r}",
                            "expected 'train' or 'test'")
        out[_basename(str(e["filename"]))] = {"split": split, "type": e.get("type"), "wear_dev": e.get("wear_dev")}
    return out


def _read_label(uri: str) -> dict[str, Any]:
    doc = storage.read_json(uri)
    if not isinstance(doc, Mapping) or not isinstance(doc.get("shapes", []), list):
        raise DataError(f"{uri}: not a labelme annotation (no 'shapes' list)", "fix or remove the label file")
    return dict(doc)


def rasterize(uri: str, doc: Mapping[str, Any], size: tuple[int, int]) -> tuple[np.ndarray, list[list[int]],
                                                                                  list[str]]:
    """labelme shapes -> (uint8 {0,1} mask at ``size`` = (w, h), one box per drawn shape, their lower-case labels).

    Each box is the pixel extent of that shape's raster ([x0, y0, x1, y1], end-exclusive), so boxes and mask agree.
    """
    w, h = size
    jw, jh = doc.get("imageWidth"), doc.get("imageHeight")
    if jw and jh and (int(jw), int(jh)) != (w, h):
        log.warning("bsdata: %s says the image is %sx%s but it is %dx%d; drawing the points as they are", uri, jw,
                    jh, w, h)
    mask = np.zeros((h, w), np.uint8)
    boxes: list[list[int]] = []
    classes: list[str] = []
    for k, shape in enumerate(doc.get("shapes") or []):
        kind = str(shape.get("shape_type") or "polygon")
        try:
            pts = [(float(x), float(y)) for x, y in shape.get("points") or []]
        except (TypeError, ValueError) as e:
            raise DataError(f"{uri}: shape {k} has malformed points", "fix or remove the label file") from e
        if not pts:
            log.warning("bsdata: %s: skipped shape %d (no points)", uri, k)
            continue
        # draw on a canvas around the shape only (translation by whole pixels rasterises identically)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ox, oy = max(0, math.floor(min(xs)) - 1), max(0, math.floor(min(ys)) - 1)
        cw, ch = min(w, math.ceil(max(xs)) + 2) - ox, min(h, math.ceil(max(ys)) + 2) - oy
        if cw <= 0 or ch <= 0:
            log.warning("bsdata: %s: shape %d lies outside the %dx%d image", uri, k, w, h)
            continue
        local = [(x - ox, y - oy) for x, y in pts]
        canvas = Image.new("L", (cw, ch), 0)
        draw = ImageDraw.Draw(canvas)
        if kind == "polygon" and len(pts) >= 3:
            draw.polygon(local, fill=1, outline=1)
        elif kind == "rectangle" and len(pts) == 2:
            (x0, y0), (x1, y1) = local
            draw.rectangle((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), fill=1, outline=1)
        else:
            log.warning("bsdata: %s: skipped shape %d (%s with %d point(s); supported: polygon, rectangle)", uri, k,
                        kind, len(pts))
            continue
        bbox = canvas.getbbox()
        if bbox is None:
            log.warning("bsdata: %s: shape %d lies outside the %dx%d image", uri, k, w, h)
            continue
        region = mask[oy:oy + ch, ox:ox + cw]
        np.maximum(region, np.asarray(canvas, dtype=np.uint8), out=region)
        boxes.append([bbox[0] + ox, bbox[1] + oy, bbox[2] + ox, bbox[3] + oy])
        classes.append(str(shape.get("label") or PITTING).strip().lower())
    return mask, boxes, classes


def _basename(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1]


register(BSDataAdapter())
