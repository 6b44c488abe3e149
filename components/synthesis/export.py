"""Export a manifest (real, synthetic or both) to the formats box and mask detectors train on.

SynSur trains YOLO, YOLOX and LW-DETR on real + synthetic defects; those tools read YOLO text labels or COCO json,
and segmentation tools read image/mask folder pairs. All three exporters walk the same rows and derive boxes from
masks with :mod:`components.synthesis.labels` (one box per 8-connected component of at least ``min_area``
pixels), so a synthetic sample exports exactly like a real one.

Which rows become what:

=======================================  ==========================================================================
row                                      exported as
=======================================  ==========================================================================
label 1 with a mask                      image + one box (and segment) per mask component; a mask whose components
                                         are all below ``min_area`` gives an image without boxes (counted)
label 0                                  image without boxes (a negative) / an all-zero mask
label 1 without a mask (image-level)     skipped by default: exporting it without boxes would teach a detector
                                         that its defect is background. ``include_unlabeled=True`` exports it as an
                                         image without boxes (COCO marks it ``"defectflow_label": 1``; a mask
                                         export writes the image and no mask file)
label unknown                            as image-level: skipped unless ``include_unlabeled``
=======================================  ==========================================================================

Every skip is counted in the returned summary (also written as ``export.json``), never silently dropped.

Layouts (``<out>`` is a local folder or ``s3://`` prefix; all writes go through :mod:`components.storage`):

* YOLO: ``images/<split>/<stem>.<ext>``, ``labels/<split>/<stem>.txt`` (``class cx cy w h``, normalised to
  [0, 1], one line per box; empty for negatives), ``<split>.txt`` listing ``./images/<split>/...`` and
  ``data.yaml`` (``train``/``val``/``test`` list files, ``nc``, ``names``). ``data.yaml`` has no ``path`` key, so
  Ultralytics resolves the lists next to the yaml wherever the folder is copied.
* COCO: ``images/<split>/<stem>.<ext>`` and ``annotations/instances_<split>.json`` with ``images``
  (``file_name`` relative to ``images/<split>/``), ``annotations`` (``bbox`` [x, y, w, h] in pixels, ``area`` =
  component pixel count, ``iscrowd`` 0, ``segmentation`` as **uncompressed RLE** ``{"size": [h, w], "counts":
  [...]}`` in column-major order, starting with a run of zeros) and ``categories`` (ids from 1). RLE rather than
  polygons because it is exact: a 1-pixel-wide scratch has no meaningful polygon, and pycocotools reads RLE for
  ``iscrowd`` 0 annotations too.
* Masks: ``images/<split>/<stem>.<ext>`` and ``masks/<split>/<stem>.png`` (8-bit, 0/255).

Image files are copied byte for byte (no re-encoding); ``<stem>`` is the sample id with ``/`` turned into ``__``
and other unsafe characters into ``_`` (a short hash is appended on collision).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import yaml
from scipy import ndimage

from components import storage
from components.data import manifest
from components.data.images import IMAGE_SUFFIXES, encode_mask_png
from components.errors import DataError
from components.synthesis.labels import components

log = logging.getLogger(__name__)

DEFAULT_CLASS = "defect"


# ---------------------------------------------------------------------------------------------- RLE


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE: ``{"size": [h, w], "counts": [zeros, ones, zeros, ...]}`` in column-major order."""
    m = np.asarray(mask) > 0
    flat = m.ravel(order="F")
    if flat.size == 0:
        return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": []}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat[0]:
        runs = [0, *runs]
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": [int(r) for r in runs]}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`rle_encode` (uint8 {0, 1})."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], np.int64)
    values = np.arange(counts.size) % 2
    flat = np.repeat(values, counts).astype(np.uint8)
    if flat.size != h * w:
        raise DataError(f"RLE counts sum to {flat.size}, expected {h}x{w} = {h * w}", "the RLE is damaged")
    return flat.reshape((w, h)).T.copy()


# ----------------------------------------------------------------------------------------- row walking


def _sniff_suffix(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data.startswith(b"\xff\xd8"):
        return ".jpg"
    if data.startswith(b"BM"):
        return ".bmp"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return ".tif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ".png"


def _image_payload(rec: dict[str, Any]) -> tuple[bytes, str]:
    """The image's encoded bytes and a file suffix; copied as they are (no re-encoding, no quality loss)."""
    if rec.get("image_bytes") is not None:
        data = rec["image_bytes"]
        return data, _sniff_suffix(data)
    uri = rec.get("image_uri")
    if not uri:
        raise DataError(f"sample {rec.get('sample_id')} has no image", "re-run ingest")
    data = storage.read_bytes(uri)
    suffix = "." + uri.rsplit(".", 1)[-1].lower() if "." in uri.rsplit("/", 1)[-1] else ""
    return data, suffix if suffix in IMAGE_SUFFIXES else _sniff_suffix(data)


class _Stems:
    """File stems from sample ids: readable, filesystem/S3-safe and unique within the export."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, sample_id: str) -> str:
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", sample_id.replace("/", "__")).strip(".") or "sample"
        if stem in self.used:
            stem = f"{stem}-{hashlib.sha1(sample_id.encode()).hexdigest()[:8]}"
        self.used.add(stem)
        return stem


def _kind(rec: dict[str, Any]) -> str:
    label = rec.get("label")
    has_mask = rec.get("mask_uri") is not None or rec.get("mask_bytes") is not None
    if label == 1:
        return "annotated" if has_mask else "image_level"
    if label == 0:
        return "negative"
    return "unlabeled"


def _rows(table: Any, splits: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Rows of the wanted splits in (split, sample id) order, so stems and ids do not depend on row order; read in
    batches so a manifest with embedded images is not turned into Python objects all at once."""
    keys = list(zip(table["split"].to_pylist(), table["sample_id"].to_pylist(), strict=True))
    order = sorted((k for k in range(len(keys)) if keys[k][0] in splits),
                   key=lambda k: (splits.index(keys[k][0]), keys[k][1]))
    if not order:
        return
    for batch in table.take(order).to_batches(max_chunksize=256):
        yield from batch.to_pylist()


class _Writer:
    """Parallel atomic writes (S3 PUTs are latency-bound); the first failure is raised at :meth:`close`."""

    def __init__(self, workers: int = 8):
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.futures: list[Future] = []

    def put(self, uri: str, data: bytes) -> None:
        self.futures.append(self.pool.submit(storage.write_bytes, uri, data))
        if len(self.futures) > 256:
            self._drain()

    def _drain(self) -> None:
        futures, self.futures = self.futures, []
        for f in futures:
            f.result()

    def close(self) -> None:
        try:
            self._drain()
        finally:
            self.pool.shutdown(wait=True)


def _class_list(table: Any, classes: Sequence[str] | None, splits: Sequence[str]) -> list[str]:
    if classes is not None:
        out = [str(c) for c in classes]
        if len(set(out)) != len(out) or not out:
            raise DataError(f"export classes {out} must be a non-empty list without repeats", "fix `classes`")
        return out
    import pyarrow.compute as pc

    has_mask = pc.or_(pc.is_valid(table["mask_uri"]), pc.is_valid(table["mask_bytes"]))
    keep = pc.and_(pc.and_(pc.is_in(table["split"], _pa_array(list(splits))), has_mask),
                   pc.fill_null(pc.equal(table["label"], 1), False))
    found = {c or DEFAULT_CLASS for c in table.filter(keep)["defect_class"].to_pylist()}
    return sorted(found) or [DEFAULT_CLASS]


def _pa_array(values: list[str]) -> Any:
    import pyarrow as pa

    return pa.array(values, pa.string())


def _walk(table: Any, out_uri: str, splits: Sequence[str], include_unlabeled: bool, min_area: int,
          classes: list[str] | None, on_image: Callable[[dict[str, Any], str, str, str, np.ndarray | None,
                                                         list[tuple[int, int, int, int, int]], np.ndarray | None,
                                                         int | None], None],
          writer: _Writer, want_mask: bool = True) -> dict[str, Any]:
    """Shared row loop: decides what each row becomes, copies its image, and hands boxes to the format writer."""
    table = manifest.validate(table)
    stems = _Stems()
    counts: Counter[str] = Counter()
    per_split: dict[str, Counter[str]] = {}
    for rec in _rows(table, splits):
        kind = _kind(rec)
        split = rec["split"]
        if kind in ("image_level", "unlabeled") and not include_unlabeled:
            counts[f"skipped_{kind}"] += 1
            continue
        mask = None
        boxes: list[tuple[int, int, int, int, int]] = []
        label_img = None
        class_id = None
        if kind == "annotated":
            name = rec.get("defect_class") or DEFAULT_CLASS
            if classes is not None:
                if name not in classes:
                    raise DataError(f"sample {rec['sample_id']} has class {name!r}, not in the export classes "
                                    f"{classes}", "add it to `classes` or leave `classes` unset to export all")
                class_id = classes.index(name)
            mask = manifest.load_mask(rec, shape=(int(rec["height"]), int(rec["width"])))
            label_img, boxes = components(mask, min_area)
            counts["dropped_components"] += int(ndimage.label(mask > 0, structure=np.ones((3, 3), bool))[1]
                                                - len(boxes))
            if not boxes:
                counts["defective_without_boxes"] += 1
        elif kind == "negative" and want_mask:
            known = manifest.load_mask(rec, shape=(int(rec["height"]), int(rec["width"])))
            if known is not None and known.any():
                counts["negatives_with_nonempty_mask"] += 1
            mask = np.zeros((int(rec["height"]), int(rec["width"])), np.uint8)
        rec["kind"] = kind
        data, suffix = _image_payload(rec)
        stem = stems(rec["sample_id"])
        image_name = f"{stem}{suffix}"
        writer.put(storage.join(out_uri, "images", split, image_name), data)
        on_image(rec, split, stem, image_name, mask, boxes, label_img, class_id)
        counts[f"images_{kind}"] += 1
        counts["boxes"] += len(boxes)
        per_split.setdefault(split, Counter())["images"] += 1
        per_split[split]["boxes"] += len(boxes)
    if counts["negatives_with_nonempty_mask"]:
        log.warning("export: %d rows labelled 0 carry a non-empty mask; exported as negatives",
                    counts["negatives_with_nonempty_mask"])
    skipped = counts["skipped_image_level"] + counts["skipped_unlabeled"]
    if skipped:
        log.info("export: skipped %d rows without pixel labels (%d image-level, %d unlabelled); "
                 "include_unlabeled=True exports them as images without boxes", skipped,
                 counts["skipped_image_level"], counts["skipped_unlabeled"])
    return {"counts": dict(counts), "splits": {k: dict(v) for k, v in per_split.items()}}


def _finish(out_uri: str, fmt: str, table: Any, summary: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    result = {"format": fmt, "out": storage.normalize(out_uri), "manifest_digest": manifest.digest(table),
              **extra, **summary}
    storage.write_json(storage.join(out_uri, "export.json"), result)
    log.info("exported %s to %s: %s", fmt, result["out"], summary["splits"])
    return result


def _splits(splits: Sequence[str] | None) -> list[str]:
    out = list(splits) if splits is not None else list(manifest.SPLITS)
    bad = [s for s in out if s not in manifest.SPLITS]
    if bad:
        raise DataError(f"unknown splits {bad}", f"choose from {manifest.SPLITS}")
    return out


# ---------------------------------------------------------------------------------------------- YOLO


def yolo_line(box: tuple[int, int, int, int, int], class_id: int, width: int, height: int) -> str:
    """``class cx cy w h`` normalised by the image size (boxes use exclusive x1/y1, so w = x1 - x0)."""
    x0, y0, x1, y1 = box[:4]
    cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
    return f"{class_id} {cx:.6f} {cy:.6f} {(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}"


def export_yolo(table: Any, out_uri: str, classes: Sequence[str] | None = None, min_area: int = 1,
                include_unlabeled: bool = False, splits: Sequence[str] | None = None) -> dict[str, Any]:
    """Write an Ultralytics-style YOLO dataset; returns (and writes as ``export.json``) the summary.

    ``classes`` fixes the class order (ids are positions); unset = sorted defect classes of the exported rows.
    """
    split_list = _splits(splits)
    class_list = _class_list(table, classes, split_list)
    lists: dict[str, list[str]] = {s: [] for s in split_list}
    writer = _Writer()

    def on_image(rec: dict[str, Any], split: str, stem: str, image_name: str, mask: Any, boxes: list,
                 label_img: Any, class_id: int | None) -> None:
        lines = [yolo_line(b, int(class_id or 0), int(rec["width"]), int(rec["height"])) for b in boxes]
        writer.put(storage.join(out_uri, "labels", split, f"{stem}.txt"),
                   ("\n".join(lines) + ("\n" if lines else "")).encode())
        lists[split].append(f"./images/{split}/{image_name}")

    try:
        summary = _walk(table, out_uri, split_list, include_unlabeled, min_area, class_list, on_image, writer,
                        want_mask=False)
    finally:
        writer.close()
    data: dict[str, Any] = {}
    for split in split_list:
        if lists[split]:
            storage.write_text(storage.join(out_uri, f"{split}.txt"), "\n".join(lists[split]) + "\n")
            data[split] = f"{split}.txt"
    for needed in ("train", "val"):
        if needed in split_list and needed not in data:
            log.warning("YOLO export has no %s images; Ultralytics needs train and val lists", needed)
    data["nc"] = len(class_list)
    data["names"] = dict(enumerate(class_list))
    storage.write_text(storage.join(out_uri, "data.yaml"), yaml.safe_dump(data, sort_keys=False))
    return _finish(out_uri, "yolo", table, summary, {"classes": class_list, "min_area": min_area})


# ---------------------------------------------------------------------------------------------- COCO


def export_coco(table: Any, out_uri: str, classes: Sequence[str] | None = None, min_area: int = 1,
                include_unlabeled: bool = False, splits: Sequence[str] | None = None) -> dict[str, Any]:
    """Write COCO detection/instance-segmentation json per split (see the module docstring for the fields)."""
    split_list = _splits(splits)
    class_list = _class_list(table, classes, split_list)
    categories = [{"id": i + 1, "name": c, "supercategory": "defect"} for i, c in enumerate(class_list)]
    docs: dict[str, dict[str, Any]] = {
        s: {"info": {"description": "defectflow export", "version": "1"}, "licenses": [], "images": [],
            "annotations": [], "categories": categories} for s in split_list}
    writer = _Writer()

    def on_image(rec: dict[str, Any], split: str, stem: str, image_name: str, mask: Any, boxes: list,
                 label_img: Any, class_id: int | None) -> None:
        doc = docs[split]
        image_id = len(doc["images"]) + 1
        entry = {"id": image_id, "file_name": image_name, "width": int(rec["width"]),
                 "height": int(rec["height"]), "sample_id": rec["sample_id"], "source": rec["source"],
                 "defect_class": rec.get("defect_class")}
        if rec["kind"] in ("image_level", "unlabeled"):  # included without pixel labels (include_unlabeled)
            entry["defectflow_label"] = rec.get("label")
        doc["images"].append(entry)
        for k, (x0, y0, x1, y1, area) in enumerate(boxes, start=1):
            doc["annotations"].append({
                "id": len(doc["annotations"]) + 1, "image_id": image_id, "category_id": int(class_id or 0) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(area), "iscrowd": 0,
                "segmentation": rle_encode(label_img == k)})

    try:
        summary = _walk(table, out_uri, split_list, include_unlabeled, min_area, class_list, on_image, writer,
                        want_mask=False)
    finally:
        writer.close()
    for split, doc in docs.items():
        if doc["images"]:
            storage.write_json(storage.join(out_uri, "annotations", f"instances_{split}.json"), doc, indent=None)
    return _finish(out_uri, "coco", table, summary, {"classes": class_list, "min_area": min_area})


# --------------------------------------------------------------------------------------------- masks


def export_masks(table: Any, out_uri: str, include_unlabeled: bool = False,
                 splits: Sequence[str] | None = None) -> dict[str, Any]:
    """Write ``images/<split>/`` + ``masks/<split>/`` PNG pairs (negatives get all-zero masks)."""
    split_list = _splits(splits)
    writer = _Writer()

    def on_image(rec: dict[str, Any], split: str, stem: str, image_name: str, mask: Any, boxes: list,
                 label_img: Any, class_id: int | None) -> None:
        if mask is not None:
            writer.put(storage.join(out_uri, "masks", split, f"{stem}.png"), encode_mask_png(mask))

    try:
        summary = _walk(table, out_uri, split_list, include_unlabeled, 1, None, on_image, writer, want_mask=True)
    finally:
        writer.close()
    return _finish(out_uri, "masks", table, summary, {})
