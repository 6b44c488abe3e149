"""Procedural default data: textured industrial surfaces with defects drawn from exact geometry.

defectflow must run end to end on a laptop with no dataset at hand, and its tests need data whose ground truth is
exact. Real datasets cannot be shipped, so this module draws surfaces (brushed metal, woven fabric, speckled cast
iron, turned metal) and defects (scratches, pits, cracks, stains) from a seed with numpy alone.

Design choices:

* Each defect is rendered from a coverage map ``alpha`` in [0, 1] computed from its geometry (distance to a
  polyline, a perturbed radius, a level set of smooth noise); the mask is ``alpha > 0.5``, so the mask is exactly
  the set of pixels the defect changed by at least half its contrast, not a hand-tuned annotation.
* Every image draws from three independent random streams (surface, defect, capture), all derived from
  ``(seed, index)``. The same seed gives bit-identical images whatever ``count`` is, and :func:`render` with
  ``clean=True`` gives the defect-free twin of a defective image (same surface, lighting and noise), which tests and
  residual-style synthesis use.
* Textures and defect kinds are assigned round-robin over a seeded permutation, so even a small set has every
  texture and every defect kind in (nearly) equal numbers.
* Sizes scale with the image (``s = min(H, W) / 256``) but never below a pixel-level floor, so 64-px images still
  carry visible thin defects and 512-px images get proportionally larger ones.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from components.errors import DataError

log = logging.getLogger(__name__)

TEXTURES = ("brushed", "woven", "cast", "turned")
DEFECT_KINDS = ("scratch", "pit", "crack", "stain")
MIN_SIZE, MAX_SIZE = 32, 4096
GENERATOR = "defectflow.procedural/1"


@dataclass(frozen=True)
class Sample:
    """One generated image. ``mask`` is all-zero exactly when ``label`` is 0."""

    image: np.ndarray  # uint8 (H, W, 3)
    mask: np.ndarray  # uint8 (H, W) in {0, 1}
    label: int
    defect_class: str | None
    provenance: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- public


def generate(count: int = 64, size: int | tuple[int, int] = 128, defect_fraction: float = 0.5, seed: int = 0,
             textures: Sequence[str] = TEXTURES, defects: Sequence[str] = DEFECT_KINDS) -> list[Sample]:
    """``count`` samples; exactly ``round(count * defect_fraction)`` of them defective."""
    return list(iter_samples(count, size, defect_fraction, seed, textures, defects))


def iter_samples(count: int = 64, size: int | tuple[int, int] = 128, defect_fraction: float = 0.5, seed: int = 0,
                 textures: Sequence[str] = TEXTURES, defects: Sequence[str] = DEFECT_KINDS) -> Iterator[Sample]:
    """Like :func:`generate`, one sample at a time (large counts need not fit in memory)."""
    for index, (texture, kind) in enumerate(plan(count, defect_fraction, seed, textures, defects)):
        yield render(index, seed=seed, size=size, texture=texture, defect=kind)


def plan(count: int, defect_fraction: float = 0.5, seed: int = 0, textures: Sequence[str] = TEXTURES,
         defects: Sequence[str] = DEFECT_KINDS) -> list[tuple[str, str | None]]:
    """(texture, defect kind or None) per index, balanced over textures and kinds and fixed by the seed."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise DataError(f"procedural count must be a non-negative integer, got {count!r}", "e.g. count=200")
    if not 0.0 <= float(defect_fraction) <= 1.0:
        raise DataError(f"defect_fraction must be in [0, 1], got {defect_fraction}", "e.g. defect_fraction=0.5")
    textures = _check_names(textures, TEXTURES, "texture")
    defects = _check_names(defects, DEFECT_KINDS, "defect kind")
    rng = np.random.default_rng([int(seed), 0x5EED_0F_DA7A])
    n_def = math.floor(count * float(defect_fraction) + 0.5)
    defective = np.zeros(count, dtype=bool)
    defective[rng.permutation(count)[:n_def]] = True
    tex_order = rng.permutation(count)
    kind_order = rng.permutation(n_def)
    out: list[tuple[str, str | None]] = []
    j = 0
    for i in range(count):
        texture = textures[int(tex_order[i]) % len(textures)]
        kind = None
        if defective[i]:
            kind = defects[int(kind_order[j]) % len(defects)]
            j += 1
        out.append((texture, kind))
    return out


def render(index: int, *, seed: int = 0, size: int | tuple[int, int] = 128, texture: str = "brushed",
           defect: str | None = None, clean: bool = False) -> Sample:
    """Render sample ``index`` of the stream ``seed``.

    ``clean=True`` renders the same surface, lighting and sensor noise without the defect (the defect-free twin);
    its label and mask still describe the defective sample, so callers can compare the two.
    """
    h, w = _check_size(size)
    if texture not in _TEXTURES:
        raise DataError(f"unknown texture {texture!r}", f"choose from {TEXTURES}")
    if defect is not None and defect not in _DEFECTS:
        raise DataError(f"unknown defect kind {defect!r}", f"choose from {DEFECT_KINDS}")
    ss = np.random.SeedSequence([int(seed), int(index)])
    r_surface, r_defect, r_capture = (np.random.default_rng(s) for s in ss.spawn(3))
    s = min(h, w) / 256.0

    gray, tint = _TEXTURES[texture](r_surface, h, w, s)
    img = gray[:, :, None] * tint[None, None, :]
    mask = np.zeros((h, w), dtype=bool)
    details: dict[str, Any] = {}
    if defect is not None:
        details = _draw_defect(defect, r_defect, img, mask, s, clean)

    img *= _illumination(r_capture, h, w)[:, :, None]
    sigma = r_capture.uniform(0.004, 0.018)
    img += r_capture.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    image = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    provenance = {"generator": GENERATOR, "seed": int(seed), "index": int(index), "texture": texture,
                  "defects": [defect] if defect else [], "size": [h, w], **details}
    return Sample(image=image, mask=mask.astype(np.uint8), label=int(defect is not None), defect_class=defect,
                  provenance=provenance)


# --------------------------------------------------------------------------------------------- helpers


def _check_names(names: Sequence[str] | str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = tuple(names)
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise DataError(f"unknown or empty {what} list {list(names)}", f"choose from {list(allowed)}")
    return names


def _check_size(size: int | tuple[int, int] | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        h = w = int(size)
    elif isinstance(size, Sequence) and len(size) == 2 and all(isinstance(v, (int, np.integer)) for v in size):
        h, w = int(size[0]), int(size[1])
    else:
        raise DataError(f"procedural size must be an int or (height, width), got {size!r}", "e.g. size=128")
    if not (MIN_SIZE <= h <= MAX_SIZE and MIN_SIZE <= w <= MAX_SIZE):
        raise DataError(f"procedural size {h}x{w} is outside [{MIN_SIZE}, {MAX_SIZE}]", "use e.g. 128 to 512")
    return h, w


@lru_cache(maxsize=16)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def _lattice(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Value noise in [0, 1] at lattice coordinates (u, v), smoothstep-interpolated."""
    u = u - np.floor(u.min())
    v = v - np.floor(v.min())
    iu = u.astype(np.int32)
    iv = v.astype(np.int32)
    fu = _smooth(u - iu)
    fv = _smooth(v - iv)
    gw = int(iu.max()) + 2
    lat = rng.random((int(iv.max()) + 2) * gw, dtype=np.float32)
    idx = iv * gw + iu
    a = lat[idx]
    b = lat[idx + 1]
    c = lat[idx + gw]
    d = lat[idx + gw + 1]
    top = a + (b - a) * fu
    return top + (c + (d - c) * fu - top) * fv


def _interp_matrix(n: int, scale: float) -> np.ndarray:
    """(n, cells) smoothstep interpolation weights from a 1-D lattice of spacing ``scale`` to n pixels."""
    u = np.arange(n, dtype=np.float64) / scale
    iu = u.astype(np.int64)
    f = _smooth(u - iu).astype(np.float32)
    m = np.zeros((n, int(iu.max()) + 2), np.float32)
    m[np.arange(n), iu] = 1.0 - f
    m[np.arange(n), iu + 1] = f
    return m


def smooth_noise(rng: np.random.Generator, h: int, w: int, scale_along: float, scale_across: float | None = None,
           angle: float = 0.0) -> np.ndarray:
    """Zero-mean smooth noise (about [-0.5, 0.5]); anisotropic when the two scales differ, rotated by ``angle``."""
    across = scale_along if scale_across is None else scale_across
    if angle == 0.0:
        # axis-aligned: separable interpolation is two small matrix products instead of four gathers per pixel
        mx = _interp_matrix(w, scale_along)
        my = _interp_matrix(h, across)
        lat = rng.random((my.shape[1], mx.shape[1]), dtype=np.float32)
        return my @ lat @ mx.T - np.float32(0.5)
    yy, xx = _grid(h, w)
    ca, sa = math.cos(angle), math.sin(angle)
    u = (xx * ca + yy * sa) / np.float32(scale_along)
    v = (yy * ca - xx * sa) / np.float32(across)
    return _lattice(rng, u, v) - np.float32(0.5)


def _fbm(rng: np.random.Generator, h: int, w: int, scale: float, octaves: int = 4, gain: float = 0.5) -> np.ndarray:
    out = np.zeros((h, w), np.float32)
    amp, norm = 1.0, 0.0
    for _ in range(octaves):
        out += np.float32(amp) * smooth_noise(rng, h, w, max(scale, 1.0))
        norm += amp
        amp *= gain
        scale /= 2.0
    return out / np.float32(norm)


def _box_blur(a: np.ndarray, r: int) -> np.ndarray:
    """Separable box blur of radius r (edge-replicated); three passes approximate a Gaussian."""
    if r <= 0:
        return a
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r + 1, r)
        c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis, dtype=np.float32)
        n = a.shape[axis]
        hi = np.take(c, np.arange(2 * r + 1, 2 * r + 1 + n), axis=axis)
        lo = np.take(c, np.arange(0, n), axis=axis)
        a = (hi - lo) / np.float32(2 * r + 1)
    return a


def _jitter_tint(rng: np.random.Generator, base: Sequence[float], amount: float = 0.03) -> np.ndarray:
    t = np.asarray(base, np.float32) * (1.0 + rng.uniform(-amount, amount, 3).astype(np.float32))
    return t / np.float32(t.mean())


# -------------------------------------------------------------------------------------------- textures


def _brushed(rng: np.random.Generator, h: int, w: int, s: float) -> tuple[np.ndarray, np.ndarray]:
    """Brushed metal: fine streaks along the brushing direction, coarser bands, and an anisotropic sheen."""
    angle = rng.uniform(0, math.pi) if rng.random() < 0.5 else rng.choice([0.0, math.pi / 2]) + rng.normal(0, 0.03)
    base = rng.uniform(0.45, 0.68)
    g = np.full((h, w), base, np.float32)
    g += rng.uniform(0.10, 0.17) * smooth_noise(rng, h, w, rng.uniform(25, 90) * max(s, 0.4),
                                                rng.uniform(0.6, 1.1), angle)
    g += rng.uniform(0.05, 0.10) * smooth_noise(rng, h, w, rng.uniform(60, 200) * max(s, 0.4),
                                                rng.uniform(2, 5) * max(s, .5), angle)
    g += rng.uniform(0.03, 0.07) * _fbm(rng, h, w, 80 * s, octaves=2)
    yy, xx = _grid(h, w)
    along = ((xx - w / 2) * math.cos(angle) + (yy - h / 2) * math.sin(angle)) / max(h, w)
    center = rng.uniform(-0.4, 0.4)
    width = rng.uniform(0.15, 0.4)
    g += rng.uniform(0.04, 0.12) * np.exp(-(((along - center) / width) ** 2))
    tint = _jitter_tint(rng, (0.97, 1.0, 1.04))
    return g, tint


_FABRIC = ((1.0, 0.95, 0.82), (0.86, 0.93, 1.08), (1.0, 1.0, 1.0), (0.9, 1.0, 0.88), (1.05, 0.97, 0.92))


def _woven(rng: np.random.Generator, h: int, w: int, s: float) -> tuple[np.ndarray, np.ndarray]:
    """Woven fabric / carbon weave: plain or twill interlacing of rounded threads with per-thread variation."""
    period = max(4.0, rng.uniform(6.0, 12.0) * max(s, 0.5) ** 0.6)
    angle = rng.normal(0, 0.06) + (math.pi / 4 if rng.random() < 0.25 else 0.0)
    yy, xx = _grid(h, w)
    ca, sa = math.cos(angle), math.sin(angle)
    u = (xx * ca + yy * sa) / np.float32(period) + np.float32(rng.uniform(0, 1))
    v = (yy * ca - xx * sa) / np.float32(period) + np.float32(rng.uniform(0, 1))
    u -= np.floor(u.min())
    v -= np.floor(v.min())
    iu = np.floor(u).astype(np.int32)
    iv = np.floor(v).astype(np.int32)
    fu = u - iu
    fv = v - iv
    twill = rng.random() < 0.4
    over = ((iu + iv) % 4 < 2) if twill else ((iu + iv) % 2 == 0)
    warp_var = rng.uniform(0.88, 1.12, int(iu.max()) + 1).astype(np.float32)
    weft_var = rng.uniform(0.88, 1.12, int(iv.max()) + 1).astype(np.float32)
    prof_u = np.sin(np.pi * fu) ** 0.7
    prof_v = np.sin(np.pi * fv) ** 0.7
    warp = prof_u * (0.78 + 0.22 * np.sin(np.pi * fv)) * warp_var[iu]
    weft = prof_v * (0.78 + 0.22 * np.sin(np.pi * fu)) * weft_var[iv]
    val = np.where(over, warp, weft)
    # fibres run along each thread: streaky noise in both directions, picked by which thread is on top
    fib_a = smooth_noise(rng, h, w, period * 1.5, 0.7, angle + math.pi / 2)
    fib_b = smooth_noise(rng, h, w, period * 1.5, 0.7, angle)
    val = val + 0.12 * np.where(over, fib_a, fib_b)
    dark = rng.uniform(0.12, 0.3)
    bright = rng.uniform(0.55, 0.8)
    g = dark + (bright - dark) * val.astype(np.float32)
    g += 0.04 * _fbm(rng, h, w, 64 * s, octaves=2)
    tint = _jitter_tint(rng, _FABRIC[int(rng.integers(len(_FABRIC)))], 0.02)
    return g.astype(np.float32), tint


def _cast(rng: np.random.Generator, h: int, w: int, s: float) -> tuple[np.ndarray, np.ndarray]:
    """Speckled cast iron / sintered part: mottled low-frequency relief, fine grain, speckles and a few pores."""
    g = np.full((h, w), rng.uniform(0.4, 0.62), np.float32)
    g += rng.uniform(0.08, 0.14) * _fbm(rng, h, w, 48 * max(s, 0.4), octaves=3)
    g += rng.uniform(0.05, 0.09) * smooth_noise(rng, h, w, 1.2)
    r = 1 if s < 1.5 else 2
    density = rng.uniform(0.004, 0.012)
    for sign, amp, share in ((-1.0, rng.uniform(0.2, 0.35), 1.0), (1.0, rng.uniform(0.1, 0.2), 0.7)):
        n = int(density * share * h * w)
        imp = np.zeros((h, w), np.float32)
        imp[rng.integers(0, h, n), rng.integers(0, w, n)] = rng.uniform(0.3, 1.0, n).astype(np.float32)
        # two box passes make a tent: round-ish grains instead of squares
        g += np.float32(sign * amp * (2 * r + 1) ** 2) * _box_blur(_box_blur(imp, r), r)
    tint = _jitter_tint(rng, (1.02, 1.0, 0.97), 0.015)
    return g, tint


def _turned(rng: np.random.Generator, h: int, w: int, s: float) -> tuple[np.ndarray, np.ndarray]:
    """Turned / faced metal: concentric tool marks around a far-away centre, periodic feed marks and a sheen."""
    yy, xx = _grid(h, w)
    direction = rng.uniform(0, 2 * math.pi)
    dist = rng.uniform(0.9, 4.0) * max(h, w)
    cy = h / 2 + dist * math.sin(direction)
    cx = w / 2 + dist * math.cos(direction)
    r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    r0 = float(r.min())
    spacing = rng.uniform(0.7, 1.4)
    knots = rng.random(int((float(r.max()) - r0) / spacing) + 3).astype(np.float32) - 0.5
    grooves = np.interp(r - r0, np.arange(knots.size, dtype=np.float32) * spacing, knots).astype(np.float32)
    feed = rng.uniform(3.0, 7.0) * max(s, 0.5)
    g = np.full((h, w), rng.uniform(0.42, 0.62), np.float32)
    g += rng.uniform(0.08, 0.14) * grooves
    g += rng.uniform(0.03, 0.06) * np.sin(2 * np.pi * (r - r0) / feed).astype(np.float32)
    g += rng.uniform(0.02, 0.05) * _fbm(rng, h, w, 70 * s, octaves=2)
    theta = np.arctan2(yy - cy, xx - cx)
    t0 = math.atan2(h / 2 - cy, w / 2 - cx) + rng.normal(0, 0.15)
    g += rng.uniform(0.05, 0.12) * np.cos(theta - t0).astype(np.float32) ** 40
    tint = _jitter_tint(rng, (1.0, 1.0, 1.01))
    return g, tint


_TEXTURES: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "brushed": _brushed, "woven": _woven, "cast": _cast, "turned": _turned,
}


def _illumination(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Uneven lighting: gain, a linear gradient in a random direction and an off-centre vignette."""
    yy, xx = _grid(h, w)
    d = max(h, w)
    b = rng.uniform(0, 2 * math.pi)
    grad = ((xx - w / 2) * math.cos(b) + (yy - h / 2) * math.sin(b)) / d
    cy, cx = h * rng.uniform(0.2, 0.8), w * rng.uniform(0.2, 0.8)
    vig = ((yy - cy) ** 2 + (xx - cx) ** 2) / (d * d)
    return (rng.uniform(0.85, 1.15) * (1.0 + rng.uniform(-0.4, 0.4) * grad - rng.uniform(0.0, 0.5) * vig)).astype(
        np.float32)


# --------------------------------------------------------------------------------------------- defects


def polyline_alpha(shape: tuple[int, int], pts: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of a polyline with per-vertex radius, drawn segment by segment in small windows."""
    h, w = shape
    alpha = np.zeros(shape, np.float32)
    for i in range(len(pts) - 1):
        y0, x0 = float(pts[i][0]), float(pts[i][1])
        y1, x1 = float(pts[i + 1][0]), float(pts[i + 1][1])
        r0, r1 = float(radii[i]), float(radii[i + 1])
        pad = max(r0, r1) + 1.5
        ya, yb = max(math.floor(min(y0, y1) - pad), 0), min(math.ceil(max(y0, y1) + pad) + 1, h)
        xa, xb = max(math.floor(min(x0, x1) - pad), 0), min(math.ceil(max(x0, x1) + pad) + 1, w)
        if ya >= yb or xa >= xb:
            continue
        yy = np.arange(ya, yb, dtype=np.float32)[:, None]
        xx = np.arange(xa, xb, dtype=np.float32)[None, :]
        dy, dx = y1 - y0, x1 - x0
        l2 = dy * dy + dx * dx
        t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / l2, 0.0, 1.0) if l2 > 1e-9 else np.zeros((1, 1), np.float32)
        d = np.sqrt((yy - (y0 + t * dy)) ** 2 + (xx - (x0 + t * dx)) ** 2)
        a = np.clip(r0 + t * (r1 - r0) + 0.5 - d, 0.0, 1.0)
        win = alpha[ya:yb, xa:xb]
        np.maximum(win, a, out=win)
    return alpha


def random_walk(rng: np.random.Generator, start: np.ndarray, heading: float, steps: int, step: float,
                 wiggle: float, pull: float) -> tuple[np.ndarray, np.ndarray]:
    """Jagged path: the heading does a mean-reverting random walk around its initial value."""
    pts = [start.astype(np.float64)]
    heads = []
    cur = heading
    for _ in range(steps):
        cur = heading + (1.0 - pull) * (cur - heading) + rng.normal(0, wiggle)
        heads.append(cur)
        pts.append(pts[-1] + step * np.array([math.sin(cur), math.cos(cur)]))
    return np.asarray(pts), np.asarray(heads)


def _scratches(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, s: float, clean: bool) -> dict:
    """1-3 near-parallel thin lines, bright (polished groove) or dark, with a faint opposite-polarity halo."""
    h, w = mask.shape
    m = min(h, w)
    n = int(rng.choice([1, 1, 2, 3]))
    bright = bool(rng.random() < 0.6)
    sign = 1.0 if bright else -1.0
    amp = rng.uniform(0.2, 0.36)
    angle = rng.uniform(0, math.pi)
    center = np.array([rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w])
    normal = np.array([math.cos(angle), -math.sin(angle)])
    widths = []
    for _ in range(n):
        length = rng.uniform(0.2, 0.65) * m
        a = angle + rng.normal(0, 0.06)
        direction = np.array([math.sin(a), math.cos(a)])
        c = center + normal * rng.normal(0, 0.06 * m) + direction * rng.normal(0, 0.1 * m)
        t = np.linspace(0.0, 1.0, 9)
        bend = rng.normal(0, 0.04) * length
        pts = (c[None, :] + (t[:, None] - 0.5) * length * direction[None, :]
               + (np.sin(np.pi * t) * bend)[:, None] * normal[None, :])
        width = rng.uniform(1.2, 2.6) * max(s, 0.7) ** 0.5
        widths.append(round(width, 2))
        radii = np.maximum(width / 2 * (0.55 + 0.45 * np.sin(np.pi * t) ** 0.5), 0.5)
        alpha = polyline_alpha((h, w), pts, radii)
        halo = np.clip(polyline_alpha((h, w), pts, radii + 1.2) - alpha, 0, 1)
        strength = np.float32(amp * rng.uniform(0.85, 1.0))
        if not clean:
            img += (sign * strength * (alpha - 0.3 * halo))[:, :, None]
        mask |= alpha > 0.5
    return {"polarity": "bright" if bright else "dark", "instances": n, "widths": widths}


def _pits(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, s: float, clean: bool) -> dict:
    """A cluster of 1-6 small dark craters with irregular outlines and a raised rim lit from one side."""
    h, w = mask.shape
    n = int(rng.integers(1, 7))
    center = np.array([rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w])
    spread = rng.uniform(2.0, 18.0) * max(s, 0.3)
    light = rng.uniform(0, 2 * math.pi)
    depth = rng.uniform(0.3, 0.5)
    radii_out = []
    for _ in range(n):
        r0 = rng.uniform(1.8, 5.0) * max(s, 0.45) ** 0.7
        radii_out.append(round(r0, 2))
        cy, cx = center + rng.normal(0, spread, 2)
        rim_w = max(0.8, 0.35 * r0)
        pad = r0 * 1.5 + rim_w + 2
        ya, yb = max(int(cy - pad), 0), min(int(cy + pad) + 2, h)
        xa, xb = max(int(cx - pad), 0), min(int(cx + pad) + 2, w)
        if ya >= yb or xa >= xb:
            continue
        yy = np.arange(ya, yb, dtype=np.float32)[:, None] - np.float32(cy)
        xx = np.arange(xa, xb, dtype=np.float32)[None, :] - np.float32(cx)
        d = np.sqrt(yy * yy + xx * xx)
        th = np.arctan2(yy, xx)
        rr = r0 * (1 + rng.uniform(0, 0.2) * np.cos(2 * th + rng.uniform(0, 6.3))
                   + rng.uniform(0, 0.12) * np.cos(3 * th + rng.uniform(0, 6.3)))
        core = np.clip(rr + 0.5 - d, 0, 1)
        rim = np.clip(1.0 - np.abs(d - (rr + 0.6 * rim_w)) / rim_w, 0, 1) * (1 - core)
        lit = np.cos(th - light)
        shade = depth * (0.75 + 0.25 * (1 - np.clip(d / np.maximum(rr, 1e-3), 0, 1) ** 2)) - 0.08 * lit
        delta = -core * shade + rim * rng.uniform(0.08, 0.16) * (0.7 + 0.3 * lit)
        if not clean:
            img[ya:yb, xa:xb] += delta.astype(np.float32)[:, :, None]
        mask[ya:yb, xa:xb] |= (core > 0.5) | (rim > 0.5)
    return {"instances": n, "radii": radii_out}


def _cracks(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, s: float, clean: bool) -> dict:
    """A jagged dark line with 0-3 thinner branches, tapering towards its tips."""
    h, w = mask.shape
    m = min(h, w)
    length = rng.uniform(0.35, 0.85) * m
    step = max(1.5, rng.uniform(1.5, 3.0) * max(s, 0.5) ** 0.5)
    steps = max(int(length / step), 4)
    heading = rng.uniform(0, 2 * math.pi)
    start = np.array([rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w])
    start = start - np.array([math.sin(heading), math.cos(heading)]) * length * rng.uniform(0.2, 0.5)
    pts, heads = random_walk(rng, start, heading, steps, step, wiggle=0.45, pull=0.35)
    width = rng.uniform(1.4, 3.2) * max(s, 0.5) ** 0.5
    t = np.linspace(0, 1, len(pts))
    taper = 0.3 + 0.7 * np.sin(np.pi * np.clip(t * rng.uniform(0.8, 1.2), 0, 1)) ** 0.6
    radii = np.maximum(width / 2 * taper * rng.uniform(0.85, 1.15, len(pts)), 0.5)
    alpha = polyline_alpha((h, w), pts, radii)
    n_branches = int(rng.choice([0, 1, 1, 2, 2, 3]))
    for _ in range(n_branches):
        j = int(rng.integers(int(0.15 * steps), max(int(0.85 * steps), int(0.15 * steps) + 1)))
        side = 1 if rng.random() < 0.5 else -1
        bh = float(heads[min(j, len(heads) - 1)]) + side * rng.uniform(0.4, 1.1)
        bl = rng.uniform(0.15, 0.45) * length
        bsteps = max(int(bl / step), 3)
        bpts, _ = random_walk(rng, pts[j], bh, bsteps, step, wiggle=0.5, pull=0.3)
        bt = np.linspace(0, 1, len(bpts))
        bradii = np.maximum(radii[j] * 0.75 * (1 - 0.6 * bt), 0.5)
        np.maximum(alpha, polyline_alpha((h, w), bpts, bradii), out=alpha)
    depth = np.float32(rng.uniform(0.45, 0.65))
    if not clean:
        img *= (1.0 - depth * alpha)[:, :, None]
    mask |= alpha > 0.5
    return {"branches": n_branches, "width": round(width, 2)}


def _stains(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, s: float, clean: bool) -> dict:
    """A smooth, low-contrast, tinted blob (oil, rust, water mark) with a faint tide line at its edge."""
    h, w = mask.shape
    m = min(h, w)
    rx, ry = rng.uniform(0.07, 0.22, 2) * m
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    a = rng.uniform(0, math.pi)
    pad = 1.5 * max(rx, ry) + 2
    ya, yb = max(int(cy - pad), 0), min(int(cy + pad) + 1, h)
    xa, xb = max(int(cx - pad), 0), min(int(cx + pad) + 1, w)
    wh, ww = yb - ya, xb - xa
    yy = np.arange(ya, yb, dtype=np.float32)[:, None] - np.float32(cy)
    xx = np.arange(xa, xb, dtype=np.float32)[None, :] - np.float32(cx)
    u = (xx * math.cos(a) + yy * math.sin(a)) / rx
    v = (yy * math.cos(a) - xx * math.sin(a)) / ry
    wobble = smooth_noise(rng, wh, ww, max(rx, ry) * 0.6)
    f = 1.0 - np.sqrt(u * u + v * v) + 0.5 * wobble
    soft = rng.uniform(0.12, 0.3)
    alpha = _smooth(np.clip(f / soft + 0.5, 0, 1))
    kind = str(rng.choice(["rust", "oil", "water"]))
    colour = {"rust": (-0.6, -1.0, -1.4), "oil": (-1.05, -1.0, -0.9), "water": (1.0, 1.0, 1.05)}[kind]
    contrast = rng.uniform(0.09, 0.16) * (0.8 if kind == "water" else 1.0)
    col = np.asarray(colour, np.float32) / np.float32(np.abs(colour).mean()) * np.float32(contrast)
    texture = 0.85 + 0.3 * (smooth_noise(rng, wh, ww, max(3.0, 0.15 * max(rx, ry))) + 0.5)
    tide = np.exp(-(((alpha - 0.55) / 0.12) ** 2)) * 0.35
    if not clean:
        img[ya:yb, xa:xb] += ((alpha * texture + tide * (alpha < 0.9))[:, :, None] * col[None, None, :]).astype(
            np.float32)
    mask[ya:yb, xa:xb] |= alpha > 0.5
    return {"stain": kind, "radii": [round(float(rx), 1), round(float(ry), 1)]}


_DEFECTS: dict[str, Callable[..., dict]] = {"scratch": _scratches, "pit": _pits, "crack": _cracks, "stain": _stains}


def _draw_defect(kind: str, rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, s: float,
                 clean: bool) -> dict[str, Any]:
    """Draw until the defect leaves a non-empty mask (a path can wander off the image); redraws are seeded too."""
    backup = img.copy()
    for _attempt in range(20):
        details = _DEFECTS[kind](rng, img, mask, s, clean)
        if mask.any():
            return details
        img[...] = backup
    raise DataError(f"could not place a {kind} defect in a {mask.shape[1]}x{mask.shape[0]} image",
                    f"use a larger size (>= {MIN_SIZE})")
