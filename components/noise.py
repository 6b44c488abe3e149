"""Perlin (gradient) noise, the one implementation behind feature-space anomalies and synthetic defect masks.

SuperSimpleNet's feature noise needs it in torch, on the features' device and reproducible from a
``torch.Generator``; mask synthesis needs it in numpy on rotated, stretched lattices. Both evaluate the same
function: random unit gradients on the integer lattice corners, each point blending the four corner dot products
with the quintic fade (Perlin 2002; the SuperSimpleNet/DRAEM authors' ``rand_perlin_2d``), scaled by sqrt(2) so the
values span about [-1, 1].
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_at(yy: torch.Tensor, xx: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Noise at lattice coordinates ``yy``, ``xx`` (same shape, non-negative; one lattice cell = 1.0).

    ``angles`` holds the gradient direction of every lattice corner the coordinates touch: at least
    ``floor(max(yy)) + 2`` rows and ``floor(max(xx)) + 2`` columns.
    """
    iy, ix = yy.floor().long(), xx.floor().long()
    fy, fx = yy - iy, xx - ix
    gy, gx = torch.cos(angles), torch.sin(angles)

    def corner(dy: int, dx: int) -> torch.Tensor:
        return gy[iy + dy, ix + dx] * (fy - dy) + gx[iy + dy, ix + dx] * (fx - dx)

    ty, tx = _fade(fy), _fade(fx)
    left = torch.lerp(corner(0, 0), corner(1, 0), ty)
    right = torch.lerp(corner(0, 1), corner(1, 1), ty)
    return math.sqrt(2.0) * torch.lerp(left, right, tx)


def perlin_grid(shape: tuple[int, int], scale: tuple[int, int], generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Noise of ``shape`` on an axis-aligned lattice of ``scale`` = (rows, cols) cells (the authors' layout)."""
    h, w = (int(s) for s in shape)
    sy, sx = (int(s) for s in scale)
    if h < 1 or w < 1 or sy < 1 or sx < 1:
        raise ValueError(f"shape and scale must be positive, got shape={shape}, scale={scale}")
    device = generator.device if generator is not None else torch.device(device or "cpu")
    angles = 2.0 * math.pi * torch.rand(sy + 1, sx + 1, generator=generator, device=device)
    ys = torch.arange(h, device=device, dtype=torch.float32) * (sy / h)
    xs = torch.arange(w, device=device, dtype=torch.float32) * (sx / w)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return perlin_at(yy, xx, angles)


def perlin_rotated(shape: tuple[int, int], rng: np.random.Generator, cells: tuple[float, float],
                   angle: float = 0.0) -> np.ndarray:
    """Noise over ``shape`` (numpy, float32) with ``cells`` (rows, cols) lattice cells, rotated by ``angle``."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy - h / 2, xx - w / 2
    ca, sa = math.cos(angle), math.sin(angle)
    u = (yy * ca - xx * sa) * np.float32(cells[0] / max(h, 1))
    v = (yy * sa + xx * ca) * np.float32(cells[1] / max(w, 1))
    u, v = u - np.floor(u.min()), v - np.floor(v.min())
    rows, cols = int(np.floor(u.max())) + 2, int(np.floor(v.max())) + 2
    angles = rng.uniform(0.0, 2.0 * np.pi, (rows, cols)).astype(np.float32)
    out = perlin_at(torch.from_numpy(u), torch.from_numpy(v), torch.from_numpy(angles))
    return out.numpy()
