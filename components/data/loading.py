"""Manifest rows -> fixed-size training arrays, and tensors -> a training Batch.

Workflows run :func:`prepare_rows` inside Ray Data tasks; images travel as uint8 (3, H, W) to keep the object store
small, and become float only on the training worker (:func:`to_batch`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from components.data import manifest
from components.data.images import DEFAULT_MAX_PIXELS, resize_image, resize_mask


def prepare_row(rec: Mapping[str, Any], image_size: tuple[int, int],
                max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """One manifest row -> {image uint8 (3,H,W), mask uint8 (1,H,W), label float32, has_mask bool, sample_id}.

    ``label`` is -1 when unknown or hidden by the regime; ``has_mask`` is False when the mask is unknown or hidden
    (the mask is then all zeros and must not feed a pixel loss).
    """
    img = manifest.load_image(rec, max_pixels=max_pixels)
    h0, w0 = img.shape[:2]
    supervision = rec.get("supervision")
    mask = manifest.load_mask(rec, shape=(h0, w0), max_pixels=max_pixels) if supervision == "pixel" else None
    img = resize_image(img, image_size)
    if mask is None:
        mask_arr = np.zeros(image_size, dtype=np.uint8)
        has_mask = False
    else:
        mask_arr = resize_mask(mask, image_size)
        has_mask = True
    label = rec.get("label")
    label_f = -1.0 if supervision == "none" or label is None else float(label)
    return {
        "sample_id": rec["sample_id"],
        "image": (np.clip(img, 0, 1) * 255.0 + 0.5).astype(np.uint8).transpose(2, 0, 1),
        "mask": mask_arr[None].astype(np.uint8),
        "label": np.float32(label_f),
        "has_mask": bool(has_mask),
    }


def prepare_rows(rows: Sequence[Mapping[str, Any]], image_size: tuple[int, int],
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, np.ndarray]:
    """Column-wise batch of :func:`prepare_row` results (what a Ray Data ``map_batches`` returns)."""
    out = [prepare_row(r, image_size, max_pixels) for r in rows]
    return {
        "sample_id": np.array([o["sample_id"] for o in out], dtype=object),
        "image": np.stack([o["image"] for o in out]) if out else np.zeros((0, 3, *image_size), np.uint8),
        "mask": np.stack([o["mask"] for o in out]) if out else np.zeros((0, 1, *image_size), np.uint8),
        "label": np.array([o["label"] for o in out], dtype=np.float32),
        "has_mask": np.array([o["has_mask"] for o in out], dtype=bool),
    }


def to_batch(arrays: Mapping[str, Any], device: Any = "cpu", generator: Any = None, hflip: bool = False,
             vflip: bool = False) -> Any:
    """Arrays/tensors from a data loader -> a :class:`~components.models.base.Batch` of float tensors.

    Flips are applied per sample to image and mask together (seeded by ``generator``).
    """
    import torch

    from components.models.base import Batch

    def t(x: Any) -> torch.Tensor:
        return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))

    images = t(arrays["image"]).to(device).float() / 255.0
    masks = t(arrays["mask"]).to(device).float()
    labels = t(arrays["label"]).to(device).float()
    has_mask = t(arrays["has_mask"]).to(device).bool()
    if hflip or vflip:
        b = images.shape[0]
        for flag, dim in ((hflip, 3), (vflip, 2)):
            if not flag:
                continue
            sel = torch.rand(b, generator=generator) < 0.5
            if sel.any():
                idx = sel.nonzero().flatten().to(device)
                images[idx] = images[idx].flip(dim)
                masks[idx] = masks[idx].flip(dim)
    return Batch(images=images, masks=masks, labels=labels, has_mask=has_mask)
