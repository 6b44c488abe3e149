"""Feature-space synthetic anomalies: Gaussian noise inside Perlin-shaped regions of the feature map.

This is what lets SuperSimpleNet learn from defect-free images alone, and what keeps it learning when only a few
real defects are labelled: every training batch is duplicated, and each copy gets its own spatially coherent blob
of noise (or none), so the heads always see anomalous and normal regions with exact pixel labels.

All random draws take an optional ``torch.Generator``; with one, masks and noise are reproducible bit for bit on
its device (draws happen there and are then moved to the features' device).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F

from components.noise import perlin_grid

log = logging.getLogger(__name__)

# scales per axis are 2**randint(0, 6): 1, 2, ..., 32 lattice cells (the authors' perlin_range)
PERLIN_SCALE_EXPONENTS = (0, 6)


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def perlin_mask(height: int, width: int, threshold: float, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """One binary Perlin mask (height, width) as float {0, 1}.

    Noise is made on the next power-of-two grid (the authors' choice, which fixes the blob statistics) and resized
    bilinearly. Two guards the authors' code lacks: the lattice never gets finer than half the grid (at scale ==
    grid size every pixel is a lattice corner and the noise is identically 0, which happens on small feature maps),
    and, as anomalib does, noise that never exceeds the threshold is min-max rescaled to [-1, 1] so a non-empty
    mask stays possible at high thresholds.
    """
    device = generator.device if generator is not None else torch.device(device or "cpu")
    ph, pw = next_pow2(height), next_pow2(width)
    lo, hi = PERLIN_SCALE_EXPONENTS
    exps = torch.randint(lo, hi, (2,), generator=generator, device=device).tolist()
    scale = (min(2 ** exps[0], max(1, ph // 2)), min(2 ** exps[1], max(1, pw // 2)))
    noise = perlin_grid((ph, pw), scale, generator=generator, device=device)  # the authors' rand_perlin_2d
    if (ph, pw) != (height, width):
        noise = F.interpolate(noise.view(1, 1, ph, pw), size=(height, width), mode="bilinear",
                              align_corners=False).view(height, width)
    if not bool((noise > threshold).any()):
        n_min, n_max = noise.min(), noise.max()
        if float(n_max - n_min) > 1e-12:
            noise = (noise - n_min) / (n_max - n_min) * 2.0 - 1.0
    return (noise > threshold).float()


class SyntheticBatch(NamedTuple):
    """The doubled batch (2B rows: the originals, then their copies) the heads train on.

    ``adapted``: adapted features with noise; ``features``: raw features with the same noise (JIMS cls path) or
    None; ``masks``: binarised GT + noise mask; ``labels``: 1 where noise was added, else the original label
    (-1 unknown stays -1); ``has_mask``: the original flag, duplicated; ``noise_mask``: where noise went.
    """

    adapted: torch.Tensor
    features: torch.Tensor | None
    masks: torch.Tensor
    labels: torch.Tensor
    has_mask: torch.Tensor
    noise_mask: torch.Tensor


class AnomalyGenerator:
    """Duplicate a batch and add masked Gaussian noise to each copy (the authors' ``AnomalyGenerator``).

    ``overlap=False`` keeps noise off real defect pixels (supervised runs), so a synthetic blob never relabels a
    real defect; ``empty_prob`` is the share of copies left clean (the authors' ``no_anomaly="empty"``).
    """

    def __init__(self, perlin_threshold: float = 0.2, noise_std: float = 0.015, empty_prob: float = 0.5,
                 overlap: bool = False):
        if not 0.0 <= perlin_threshold < 1.0:
            raise ValueError(f"perlin_threshold must be in [0, 1), got {perlin_threshold}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        if not 0.0 <= empty_prob <= 1.0:
            raise ValueError(f"empty_prob must be in [0, 1], got {empty_prob}")
        self.perlin_threshold = perlin_threshold
        self.noise_std = noise_std
        self.empty_prob = empty_prob
        self.overlap = overlap

    def noise_masks(self, n: int, height: int, width: int, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> torch.Tensor:
        """``n`` independent masks (n, 1, height, width); each is empty with probability ``empty_prob``."""
        device = generator.device if generator is not None else torch.device(device or "cpu")
        empty = (torch.rand(n, generator=generator, device=device) < self.empty_prob).tolist()
        out = torch.zeros(n, 1, height, width, device=device)
        for i, is_empty in enumerate(empty):
            if not is_empty:
                out[i, 0] = perlin_mask(height, width, self.perlin_threshold, generator=generator, device=device)
        return out

    def __call__(self, adapted: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, has_mask: torch.Tensor,
                 features: torch.Tensor | None = None, *, overlap: bool | None = None,
                 generator: torch.Generator | None = None, noise_std: float | None = None) -> SyntheticBatch:
        """``masks`` are real GT masks at feature resolution (B,1,h,w) {0,1}; ``labels`` (B,) with -1 unknown.
        ``noise_std`` overrides the constructor's value for this call (relative noise scaling)."""
        b, _, h, w = adapted.shape
        if tuple(masks.shape) != (b, 1, h, w):
            raise ValueError(f"masks must be (B,1,h,w) = {(b, 1, h, w)} at feature resolution, got "
                             f"{tuple(masks.shape)}")
        if features is not None and tuple(features.shape) != tuple(adapted.shape):
            raise ValueError(f"features {tuple(features.shape)} and adapted {tuple(adapted.shape)} differ")
        overlap = self.overlap if overlap is None else overlap
        dev = adapted.device
        gdev = generator.device if generator is not None else dev

        adapted = torch.cat((adapted, adapted))
        features = torch.cat((features, features)) if features is not None else None
        gt = torch.cat((masks, masks)).to(adapted.dtype)
        labels = torch.cat((labels, labels)).to(adapted.dtype)
        has_mask = torch.cat((has_mask, has_mask))

        noise_mask = self.noise_masks(2 * b, h, w, generator=generator, device=gdev).to(dev, adapted.dtype)
        if not overlap:
            noise_mask = noise_mask * (1.0 - gt)
        noise = torch.randn(adapted.shape, generator=generator, device=gdev).to(dev, adapted.dtype)
        noise = noise * ((self.noise_std if noise_std is None else noise_std) * noise_mask)

        new_masks = ((gt + noise_mask) > 0).to(adapted.dtype)
        noised = noise_mask.flatten(1).amax(dim=1) > 0
        new_labels = torch.where(noised, torch.ones_like(labels), labels)
        return SyntheticBatch(
            adapted=adapted + noise,
            features=features + noise if features is not None else None,
            masks=new_masks,
            labels=new_labels,
            has_mask=has_mask,
            noise_mask=noise_mask,
        )
