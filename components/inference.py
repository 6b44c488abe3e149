"""Run a Detector on numpy images: the one code path shared by evaluate, predict, serve and the demo."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from components.models.base import Detector


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
    """Images of any sizes -> scores and maps; images of equal size share one forward pass."""
    device = torch.device(device) if device is not None else next(detector.parameters()).device
    scores: list[float] = [0.0] * len(images)
    maps: list[np.ndarray] = [np.zeros((1, 1), np.float32)] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape[:2]), []).append(i)
    for idx in groups.values():
        x = torch.from_numpy(np.stack([images[i] for i in idx]).transpose(0, 3, 1, 2).copy()).to(device)
        out = detector(x)
        s = out.score.float().cpu().numpy()
        m = out.anomaly_map.float().cpu().numpy()[:, 0]
        for j, i in enumerate(idx):
            scores[i] = float(s[j])
            maps[i] = m[j].astype(np.float32)
    return scores, maps


def map_to_png_array(prob: np.ndarray) -> np.ndarray:
    """Defect map in [0, 1] -> uint8 (map x 255, rounded)."""
    return (np.clip(prob, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
