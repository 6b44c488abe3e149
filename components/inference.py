"""Run a Detector on numpy images: the one code path shared by evaluate, predict, serve and the demo."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from components.data.images import resize_image
from components.models.base import Detector

TILE_BATCH = 16  # tiles per forward pass


def pick_device(use_gpu: bool | str = "auto") -> torch.device:
    if use_gpu in (True, "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@torch.inference_mode()
def infer(detector: Detector, image: np.ndarray, device: torch.device | str | None = None) -> tuple[float, np.ndarray]:
    """One float RGB image (H, W, 3) in [0, 1] -> (score, defect map (H, W) float32 in [0, 1])."""
    scores, maps = infer_batch(detector, [image], device)
    return scores[0], maps[0]


@torch.inference_mode()
def infer_batch(detector: Detector, images: Sequence[np.ndarray],
                device: torch.device | str | None = None) -> tuple[list[float], list[np.ndarray]]:
    """Images of any sizes -> scores and maps at each image's size, following ``preprocessing.layout``: squash
    (images of equal size share one forward pass), letterbox or tile (one pass per image, its tiles batched)."""
    device = torch.device(device) if device is not None else detector._mean.device  # every Detector has it
    layout = detector.preprocessing.layout
    if layout == "letterbox":
        return _per_image(_letterbox, detector, images, device)
    if layout == "tile":
        return _per_image(_tiled, detector, images, device)
    scores: list[float] = [0.0] * len(images)
    maps: list[np.ndarray] = [np.zeros((1, 1), np.float32)] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape[:2]), []).append(i)
    for idx in groups.values():
        s, m = _forward(detector, np.stack([images[i] for i in idx]), device)
        for j, i in enumerate(idx):
            scores[i] = float(s[j])
            maps[i] = m[j]
    return scores, maps


def _forward(detector: Detector, batch: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(B, H, W, 3) float -> scores (B,), maps (B, H, W) float32."""
    x = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))).to(device)
    out = detector(x)
    return out.score.float().cpu().numpy(), out.anomaly_map.float().cpu().numpy()[:, 0].astype(np.float32)


def _per_image(fn, detector: Detector, images: Sequence[np.ndarray], device: torch.device
               ) -> tuple[list[float], list[np.ndarray]]:
    pairs = [fn(detector, img, device) for img in images]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _resize_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if m.shape == tuple(size):
        return m
    t = torch.from_numpy(m)[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def _letterbox(detector: Detector, img: np.ndarray, device: torch.device) -> tuple[float, np.ndarray]:
    """The longer side resized to fit input_size, the rest padded by repeating the border, the map cropped back and
    resized to the image: the aspect ratio is kept."""
    h, w = img.shape[:2]
    th, tw = detector.preprocessing.input_size
    s = min(th / h, tw / w)
    rh, rw = max(1, min(th, round(h * s))), max(1, min(tw, round(w * s)))
    resized = resize_image(img, (rh, rw)) if (rh, rw) != (h, w) else img
    padded = np.pad(resized, ((0, th - rh), (0, tw - rw), (0, 0)), mode="edge")
    score, m = _forward(detector, padded[None], device)
    return float(score[0]), np.clip(_resize_map(m[0][:rh, :rw], (h, w)), 0.0, 1.0)


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``length`` (>= tile) with at least ``overlap`` shared between
    neighbours; the last tile ends at the border."""
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    n = -(-(length - tile) // stride) + 1  # ceil
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def _tile_weight(th: int, tw: int) -> np.ndarray:
    """Stitching weight of a tile: highest in the middle, small but non-zero at the borders (where a network sees
    the least context), so overlaps blend smoothly and every pixel has weight."""
    wy = np.minimum(np.arange(th) + 1, th - np.arange(th)) / ((th + 1) / 2)
    wx = np.minimum(np.arange(tw) + 1, tw - np.arange(tw)) / ((tw + 1) / 2)
    return np.outer(wy, wx).astype(np.float32) + 1e-3


def _tiled(detector: Detector, img: np.ndarray, device: torch.device) -> tuple[float, np.ndarray]:
    """Overlapping input_size tiles of the image at ``tile_scale`` x its resolution (padded by reflection when
    smaller than a tile), one batched forward pass, maps stitched by weighted averaging and resized to the image."""
    pre = detector.preprocessing
    h, w = img.shape[:2]
    th, tw = pre.input_size
    sh, sw = max(1, round(h * pre.tile_scale)), max(1, round(w * pre.tile_scale))
    work = resize_image(img, (sh, sw)) if (sh, sw) != (h, w) else img
    ph, pw = max(0, th - sh), max(0, tw - sw)
    if ph or pw:
        work = np.pad(work, ((0, ph), (0, pw), (0, 0)), mode="reflect" if min(sh, sw) > 1 else "edge")
    H, W = work.shape[:2]
    boxes = [(y, x) for y in tile_starts(H, th, pre.tile_overlap) for x in tile_starts(W, tw, pre.tile_overlap)]
    scores, maps = [], []
    for k in range(0, len(boxes), TILE_BATCH):
        chunk = boxes[k:k + TILE_BATCH]
        s, m = _forward(detector, np.stack([work[y:y + th, x:x + tw] for y, x in chunk]), device)
        scores.extend(float(v) for v in s)
        maps.extend(m)
    weight = _tile_weight(th, tw)
    acc = np.zeros((H, W), np.float32)
    norm = np.zeros((H, W), np.float32)
    for (y, x), m in zip(boxes, maps, strict=True):
        acc[y:y + th, x:x + tw] += m * weight
        norm[y:y + th, x:x + tw] += weight
    stitched = np.clip(_resize_map((acc / norm)[:sh, :sw], (h, w)), 0.0, 1.0)
    if pre.tile_score == "tiles":
        return max(scores), stitched
    return float(Detector.image_score(detector, torch.from_numpy(stitched)[None, None], None)[0]), stitched


def map_to_png_array(prob: np.ndarray) -> np.ndarray:
    """Defect map in [0, 1] -> uint8 (map x 255, rounded)."""
    return (np.clip(prob, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
