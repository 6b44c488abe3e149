"""Manifest rows -> fixed-size training arrays, and arrays -> a training Batch (pixels or cached features).

Workflows run :func:`prepare_rows` inside Ray Data tasks; images travel as uint8 (3, H, W) to keep the object store
small, and become float only on the training worker (:func:`to_batch`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from components.data import manifest
from components.data.images import DEFAULT_MAX_PIXELS, resize_image, resize_mask
from components.errors import DataError

log = logging.getLogger(__name__)


def prepare_target(rec: Mapping[str, Any], image_size: tuple[int, int], shape: tuple[int, int] | None = None,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """What a trainer may see of a row, at ``image_size``: {mask uint8 (1,H,W), label float32, has_mask bool}.

    ``label`` is -1 when unknown or hidden by the regime; ``has_mask`` is False when the mask is unknown or hidden
    (the mask is then all zeros and must not feed a pixel loss). ``shape`` is the original (H, W) when known.
    """
    supervision = rec.get("supervision")
    shape = shape or (int(rec["height"]), int(rec["width"]))
    mask = manifest.load_mask(rec, shape=shape, max_pixels=max_pixels) if supervision == "pixel" else None
    label = rec.get("label")
    return {
        "mask": (np.zeros(image_size, np.uint8) if mask is None else resize_mask(mask, image_size))[None],
        "label": np.float32(-1.0 if supervision == "none" or label is None else float(label)),
        "has_mask": mask is not None,
    }


def prepare_row(rec: Mapping[str, Any], image_size: tuple[int, int],
                max_pixels: int = DEFAULT_MAX_PIXELS, layout: str = "squash") -> dict[str, Any]:
    """One manifest row -> {image uint8 (3,H,W), mask uint8 (1,H,W), label float32, has_mask bool, sample_id}:
    resized to ``image_size`` (``squash``) or letterboxed into it (``letterbox``, see :func:`letterbox_arrays`)."""
    img = manifest.load_image(rec, max_pixels=max_pixels)
    if layout == "letterbox":
        target = prepare_target(rec, img.shape[:2], shape=img.shape[:2], max_pixels=max_pixels)
        img, m = letterbox_arrays(img, target["mask"][0], image_size)
        target["mask"] = m[None]
        return {"sample_id": rec["sample_id"],
                "image": (np.clip(img, 0, 1) * 255.0 + 0.5).astype(np.uint8).transpose(2, 0, 1), **target}
    target = prepare_target(rec, image_size, shape=img.shape[:2], max_pixels=max_pixels)
    img = resize_image(img, image_size)
    return {"sample_id": rec["sample_id"],
            "image": (np.clip(img, 0, 1) * 255.0 + 0.5).astype(np.uint8).transpose(2, 0, 1), **target}


UNKNOWN_NOT_NORMAL = -2.0  # a tile of a defective image without a mask: may hold the defect, never assume normal


def letterbox_arrays(img: np.ndarray, mask: np.ndarray | None, size: tuple[int, int]
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """The longer side resized to fit ``size``, the image padded by repeating its border and the mask with zeros
    (as :func:`components.inference` does at inference)."""
    h, w = img.shape[:2]
    th, tw = size
    s = min(th / h, tw / w)
    rh, rw = max(1, min(th, round(h * s))), max(1, min(tw, round(w * s)))
    img = np.pad(resize_image(img, (rh, rw)), ((0, th - rh), (0, tw - rw), (0, 0)), mode="edge")
    if mask is not None:
        mask = np.pad(resize_mask(mask, (rh, rw)), ((0, th - rh), (0, tw - rw)))
    return img, mask


def tile_rows(rec: Mapping[str, Any], tile: tuple[int, int], overlap: float, scale: float,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict[str, Any]]:
    """One manifest row -> its overlapping tiles at ``scale`` x native resolution (the inference grid of
    :func:`components.inference.tile_starts`), each a training row ``<sample_id>#<y>,<x>``. A tile's label comes
    from its own mask when the mask is known; a tile of a defect-free image is normal; a tile of a defective image
    without a mask is ``UNKNOWN_NOT_NORMAL``, and of an unlabelled one -1."""
    from components.inference import tile_starts

    img = manifest.load_image(rec, max_pixels=max_pixels)
    target = prepare_target(rec, img.shape[:2], shape=img.shape[:2], max_pixels=max_pixels)
    mask = target["mask"][0] if target["has_mask"] else None
    h, w = img.shape[:2]
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    if (sh, sw) != (h, w):
        img = resize_image(img, (sh, sw))
        mask = resize_mask(mask, (sh, sw)) if mask is not None else None
    th, tw = tile
    ph, pw = max(0, th - sh), max(0, tw - sw)
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="reflect" if min(sh, sw) > 1 else "edge")
        mask = np.pad(mask, ((0, ph), (0, pw))) if mask is not None else None
    image_label = float(target["label"])
    out = []
    for y in tile_starts(img.shape[0], th, overlap):
        for x in tile_starts(img.shape[1], tw, overlap):
            m = mask[y:y + th, x:x + tw] if mask is not None else None
            if m is not None:
                label = float(m.any())
            elif image_label == 0.0:
                label = 0.0
            else:
                label = UNKNOWN_NOT_NORMAL if image_label == 1.0 else -1.0
            out.append({"sample_id": f"{rec['sample_id']}#{y},{x}",
                        "image": (np.clip(img[y:y + th, x:x + tw], 0, 1) * 255.0 + 0.5).astype(np.uint8)
                        .transpose(2, 0, 1),
                        "mask": (m if m is not None else np.zeros((th, tw), np.uint8))[None].astype(np.uint8),
                        "label": np.float32(label), "has_mask": m is not None})
    return out


def prepare_rows(rows: Sequence[Mapping[str, Any]], image_size: tuple[int, int],
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, np.ndarray]:
    """Column-wise batch of :func:`prepare_row` results (what a Ray Data ``map_batches`` returns)."""
    return _columns([prepare_row(r, image_size, max_pixels) for r in rows], image_size)


def _columns(out: list[dict[str, Any]], image_size: tuple[int, int]) -> dict[str, np.ndarray]:
    return {
        "sample_id": np.array([o["sample_id"] for o in out], dtype=object),
        "image": np.stack([o["image"] for o in out]) if out else np.zeros((0, 3, *image_size), np.uint8),
        "mask": np.stack([o["mask"] for o in out]) if out else np.zeros((0, 1, *image_size), np.uint8),
        "label": np.array([o["label"] for o in out], dtype=np.float32),
        "has_mask": np.array([o["has_mask"] for o in out], dtype=bool),
    }


def prepare_rows_checked(rows: Sequence[Mapping[str, Any]], image_size: tuple[int, int],
                         max_pixels: int = DEFAULT_MAX_PIXELS, layout: str = "squash", tile_overlap: float = 0.25,
                         tile_scale: float = 1.0) -> dict[str, np.ndarray]:
    """:func:`prepare_rows` plus a boolean ``ok`` column: a row whose image or mask cannot be read is logged and
    kept as an all-zero placeholder with ``ok`` False, for the caller to filter out. One bad file never costs a
    training run, and a batch never comes out empty (Ray Data cannot type a zero-row tensor column).
    ``layout`` ``tile``: every row becomes its tiles (:func:`tile_rows`), so a batch out may be longer than in."""
    out, ok = [], []
    for r in rows:
        try:
            if layout == "tile":
                tiles = tile_rows(r, image_size, tile_overlap, tile_scale, max_pixels)
                out.extend(tiles)
                ok.extend([True] * len(tiles))
                continue
            out.append(prepare_row(r, image_size, max_pixels, layout))
            ok.append(True)
        except DataError as e:
            log.warning("skipping %s: %s", r.get("sample_id"), e.message)
            out.append({"sample_id": r["sample_id"], "image": np.zeros((3, *image_size), np.uint8),
                        "mask": np.zeros((1, *image_size), np.uint8), "label": np.float32(-1), "has_mask": False})
            ok.append(False)
    return {**_columns(out, image_size), "ok": np.array(ok, bool)}


def to_batch(arrays: Mapping[str, Any], device: Any = "cpu", generator: Any = None,
             augment: Mapping[str, Any] | None = None) -> Any:
    """Arrays/tensors from a data loader -> a :class:`~components.models.base.Batch` of float tensors.

    ``augment`` (the ``data.augment`` section as a dict) is applied per sample to image, mask and cached features
    together, drawn from ``generator`` (see :func:`augment_batch`).
    """
    import torch

    from components.models.base import Batch

    def t(x: Any) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x
        a = np.asarray(x)
        return torch.from_numpy(a if a.flags.writeable else a.copy())  # Ray hands out read-only arrays

    masks = t(arrays["mask"]).to(device).float()
    labels = t(arrays["label"]).to(device).float()
    has_mask = t(arrays["has_mask"]).to(device).bool()
    features = t(arrays["features"]).to(device).float() if "features" in arrays else None
    if "image" in arrays:
        images = t(arrays["image"]).to(device).float() / 255.0
    else:  # training from cached features: no pixels travel
        images = torch.zeros((masks.shape[0], 0, *masks.shape[-2:]), device=device)
    if augment:
        images, masks, features = augment_batch(images, masks, features, augment, generator)
    return Batch(images=images, masks=masks, labels=labels, has_mask=has_mask, features=features)


def augment_batch(images: Any, masks: Any, features: Any, augment: Mapping[str, Any], generator: Any = None
                  ) -> tuple[Any, Any, Any]:
    """Per-sample augmentation of a batch (images (B,3,H,W) in [0, 1] or (B,0,H,W), masks (B,1,H,W), features
    (B,C,h,w) or None), every draw from ``generator``:

    - ``hflip``, ``vflip``: each with probability 0.5; ``rot90``: a random multiple of 90 degrees (of 180 when the
      images are not square). Also applied to cached features, which approximates transforming the image
      (convolutions are not flip/rotation-equivariant).
    - ``scale_jitter`` s: zoom in by U(1, 1+s), a random crop resized back (bilinear images, nearest masks).
    - ``brightness`` b, ``contrast`` c: ``img <- (img - mean) * U(1-c, 1+c) + mean + U(-b, b)``, clipped to [0, 1].
    The last two need pixels (``images`` with 3 channels); callers refuse them for cached features.
    """
    import torch
    import torch.nn.functional as F

    b = masks.shape[0]
    pixels = images.shape[1] > 0
    images, masks = images.clone(), masks.clone()
    features = features.clone() if features is not None else None

    def each(fn: Any, sel: torch.Tensor, *args: Any) -> None:
        for i in sel.nonzero().flatten().tolist():
            masks[i] = fn(masks[i], *args)
            if pixels:
                images[i] = fn(images[i], *args)
            if features is not None:
                features[i] = fn(features[i], *args)

    for flag, dim in (("hflip", 2), ("vflip", 1)):
        if augment.get(flag):
            each(lambda x, d: x.flip(d), torch.rand(b, generator=generator) < 0.5, dim)
    if augment.get("rot90"):
        square = masks.shape[-1] == masks.shape[-2] and (features is None or features.shape[-1] == features.shape[-2])
        ks = torch.randint(0, 4, (b,), generator=generator) if square else 2 * torch.randint(0, 2, (b,),
                                                                                              generator=generator)
        for k in (1, 2, 3):
            each(lambda x, kk: torch.rot90(x, kk, dims=(1, 2)), ks == k, k)
    s = float(augment.get("scale_jitter") or 0.0)
    if s > 0 and pixels:
        h, w = masks.shape[-2:]
        zoom = 1.0 + s * torch.rand(b, generator=generator)
        oy, ox = torch.rand(b, generator=generator), torch.rand(b, generator=generator)
        for i in range(b):
            ch, cw = max(1, round(h / float(zoom[i]))), max(1, round(w / float(zoom[i])))
            y, x = int(float(oy[i]) * (h - ch)), int(float(ox[i]) * (w - cw))
            images[i] = F.interpolate(images[i:i + 1, :, y:y + ch, x:x + cw], size=(h, w), mode="bilinear",
                                      align_corners=False)[0]
            masks[i] = F.interpolate(masks[i:i + 1, :, y:y + ch, x:x + cw], size=(h, w), mode="nearest")[0]
    bright, contrast = float(augment.get("brightness") or 0.0), float(augment.get("contrast") or 0.0)
    if (bright or contrast) and pixels:
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        c = 1.0 + contrast * (2.0 * torch.rand(b, 1, 1, 1, generator=generator) - 1.0)
        d = bright * (2.0 * torch.rand(b, 1, 1, 1, generator=generator) - 1.0)
        images = ((images - mean) * c.to(images) + mean + d.to(images)).clamp(0.0, 1.0)
    return images, masks, features
