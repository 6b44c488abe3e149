"""Boxes from masks: the automatic label derivation of SynSur.

A synthetic defect's mask is exact, so detector labels (YOLO/COCO boxes) need no annotator: one box per connected
component of the mask (8-connectivity, so a diagonal scratch stays one defect), dropping components smaller than
``min_area`` pixels (specks that a generator left behind are not defects a detector should learn to box).

Box convention: pixel-edge coordinates ``(x0, y0, x1, y1)`` with ``x0, y0`` the top-left pixel's corner and
``x1, y1`` exclusive, so ``x1 - x0`` is the width in pixels; ``area`` is the component's pixel count (not the box
area), as COCO's ``area`` is.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int, int]
_EIGHT = np.ones((3, 3), dtype=bool)


def components(mask: np.ndarray, min_area: int = 1) -> tuple[np.ndarray, list[Box]]:
    """(label image, boxes) of the 8-connected components with at least ``min_area`` pixels.

    The label image numbers the kept components 1..n in box order (top-to-bottom, then left-to-right); dropped
    components are 0, so exports can cut per-box segmentations from it.
    """
    m = np.asarray(mask) > 0
    labels, n = ndimage.label(m, structure=_EIGHT)
    if n == 0:
        return np.zeros(m.shape, np.int32), []
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    boxes: list[tuple[Box, int]] = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or areas[i] < min_area:
            continue
        boxes.append(((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop, int(areas[i])), i))
    boxes.sort(key=lambda b: (b[0][1], b[0][0], b[0][3], b[0][2]))
    remap = np.zeros(n + 1, np.int32)
    for new, (_, old) in enumerate(boxes, start=1):
        remap[old] = new
    return remap[labels], [tuple(int(v) for v in b) for b, _ in boxes]  # type: ignore[misc]


def boxes_from_mask(mask: np.ndarray, min_area: int = 1) -> list[Box]:
    """``[(x0, y0, x1, y1, area), ...]``, one per 8-connected component with ``area >= min_area``, sorted
    top-to-bottom then left-to-right; ``x1``/``y1`` are exclusive."""
    return components(mask, min_area)[1]


def label_record(mask: np.ndarray, defect_class: str | None, min_area: int = 1) -> dict[str, Any]:
    """JSON-able labels of one synthetic sample, for its provenance and for exporters.

    ``dropped`` counts the components below ``min_area`` so a sample that lost all its boxes is visible rather
    than silently unlabelled.
    """
    m = np.asarray(mask) > 0
    n = ndimage.label(m, structure=_EIGHT)[1]
    kept = boxes_from_mask(m, min_area)
    return {
        "class": defect_class,
        "boxes": [list(b) for b in kept],
        "min_area": int(min_area),
        "mask_area": int(m.sum()),
        "components": int(n),
        "dropped": int(n - len(kept)),
        "size": [int(m.shape[0]), int(m.shape[1])],
    }
