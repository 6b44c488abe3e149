"""Where a synthetic defect goes and what shape it has.

A generator only fills a region; whether the result teaches a detector anything depends on that region looking
like a real defect's footprint (size, elongation, count) and sitting where defects can occur (on the part, not on
the background, and not on top of a defect that is already there). So shapes are drawn per class from a
:class:`MaskSpec` and placed with :func:`place` under explicit allowed/forbidden regions.

Design choices:

* **Exact size.** Every procedural shape is a scalar field over a small local box (distance to a polyline for
  scratches and cracks, an elliptic falloff for spots, smooth noise for blobs and Perlin patches); the mask is the
  ``k`` highest-valued pixels, ``k`` drawn from ``area_range``. Area is therefore hit exactly (to the pixel, or to
  the nearest connected level for blobs) instead of depending on a threshold, and a thin scratch is as wide as its
  area allows rather than as wide as a radius parameter says.
* **Aspect** is measured the same way for every kind: the square root of the ratio of the principal second moments
  of the pixels (a w x L bar gives L / w, a disc 1, an ellipse a / b). It is orientation-free, so it also holds for
  rotated and curved shapes; the builder rescales the skeleton until the measured value lands in ``aspect_range``.
* **Real masks** (ExDD): ground-truth masks of real defective images are reused on defect-free images, cropped to
  their bounding box and flipped / rotated by multiples of 90 degrees / rescaled when placed. Only dihedral
  rotations by default, so a cut-paste generator can re-align the matching defect crop to the placed mask.
* **Determinism.** Every function takes a ``numpy.random.Generator``; :class:`MaskSampler` mixes its seed with a
  per-call seed, so a (seed, call seed) pair always yields the same mask.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage

from components.data.images import resize_mask
from components.data.procedural import polyline_alpha, random_walk, smooth_noise
from components.errors import ConfigError, DataError
from components.noise import perlin_rotated

log = logging.getLogger(__name__)

MaskKind = Literal["perlin", "scratch", "spot", "crack", "blob", "real"]
KINDS: tuple[str, ...] = ("perlin", "scratch", "spot", "crack", "blob", "real")

# per-instance area as a fraction of the image, and elongation (principal-moment aspect), per kind
DEFAULT_AREA: dict[str, tuple[float, float] | None] = {
    "perlin": (0.005, 0.04), "scratch": (0.0008, 0.006), "spot": (0.0003, 0.003), "crack": (0.001, 0.01),
    "blob": (0.003, 0.03), "real": None,
}
DEFAULT_ASPECT: dict[str, tuple[float, float] | None] = {
    "perlin": (1.0, 3.0), "scratch": (8.0, 40.0), "spot": (1.0, 2.0), "crack": (3.0, 20.0), "blob": (1.0, 2.5),
    "real": None,
}
_EIGHT = np.ones((3, 3), dtype=bool)


class PlacementError(DataError):
    """No mask could be placed under the given constraints; the message says which constraint failed."""


class MaskSpec(BaseModel):
    """How one defect class's synthetic masks look.

    ``area_range`` is per instance, as a fraction of the image area (never below ``min_pixels``); unset takes the
    kind's default, and for ``real`` masks unset means "keep the source mask's share of its image" (times
    ``real_scale_range``). ``aspect_range`` is the principal-moment elongation (>= 1); it does not apply to ``real``.
    ``count_range`` instances are placed per sample, each ``margin`` pixels away from existing defects and from each
    other. ``foreground: otsu`` keeps masks on the bright part of images with a dark background.
    """

    model_config = ConfigDict(extra="forbid")

    kind: MaskKind = "perlin"
    area_range: tuple[float, float] | None = Field(None, description="per-instance area, fraction of the image")
    aspect_range: tuple[float, float] | None = Field(None, description="elongation: sqrt of moment ratio, >= 1")
    count_range: tuple[int, int] = Field((1, 1), description="instances per sample (inclusive)")
    margin: int = Field(4, ge=0, description="pixels kept free around existing defects")
    foreground: Literal["all", "otsu"] = Field("all", description="where masks may go: everywhere, or the part")
    curvature_range: tuple[float, float] = Field((0.0, 0.15), description="scratch bend, fraction of its length")
    scale_range: tuple[int, int] = Field((2, 6), description="perlin/blob noise cells per box side")
    real_scale_range: tuple[float, float] = Field((0.7, 1.4), description="linear rescale of reused real masks")
    rotate_any: bool = Field(False, description="real masks: any angle instead of multiples of 90 degrees")
    min_pixels: int = Field(6, ge=1, description="floor on instance area in pixels (tiny images)")
    max_tries: int = Field(20, ge=1, description="shapes drawn per instance before giving up")

    @model_validator(mode="after")
    def _check(self) -> MaskSpec:
        if self.area_range is None and DEFAULT_AREA[self.kind] is not None:
            self.area_range = DEFAULT_AREA[self.kind]
        if self.aspect_range is None and DEFAULT_ASPECT[self.kind] is not None:
            self.aspect_range = DEFAULT_ASPECT[self.kind]
        checks: list[tuple[str, Any, float, float]] = [
            ("area_range", self.area_range, 1e-9, 1.0), ("aspect_range", self.aspect_range, 1.0, math.inf),
            ("count_range", self.count_range, 1, math.inf), ("curvature_range", self.curvature_range, 0.0, 1.0),
            ("scale_range", self.scale_range, 1, 256), ("real_scale_range", self.real_scale_range, 1e-3, 100.0),
        ]
        for name, rng, lo, hi in checks:
            if rng is None:
                continue
            a, b = rng
            if not (lo <= a <= b <= hi):
                raise ValueError(f"{name} {tuple(rng)} must satisfy {lo} <= low <= high <= {hi}")
        return self


class RealMask(NamedTuple):
    """A real defect's mask cropped to its bounding box, with where it came from.

    ``area_fraction`` is the mask's share of its source image, so a reused mask keeps its relative size on a canvas
    of a different resolution.
    """

    mask: np.ndarray
    defect_class: str | None
    sample_id: str
    area_fraction: float


# ------------------------------------------------------------------------------------------- measurements


def crop_to_content(mask: np.ndarray) -> np.ndarray:
    """The bounding-box crop of a mask's nonzero pixels (empty (0, 0) array when there are none)."""
    m = np.asarray(mask) > 0
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return np.zeros((0, 0), dtype=np.uint8)
    return m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.uint8)


def aspect_ratio(mask: np.ndarray) -> float:
    """Orientation-free elongation: sqrt(major / minor principal second moment) of the pixel set.

    Each pixel counts as a unit square (the +1/12 on the diagonal), so a single pixel or a filled square is 1.0
    and a w x L bar is L / w.
    """
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return float("nan")
    cy, cx = ys.mean(), xs.mean()
    dy, dx = ys - cy, xs - cx
    syy = float((dy * dy).mean()) + 1 / 12
    sxx = float((dx * dx).mean()) + 1 / 12
    sxy = float((dy * dx).mean())
    tr, det = syy + sxx, syy * sxx - sxy * sxy
    disc = math.sqrt(max(tr * tr / 4 - det, 0.0))
    major, minor = tr / 2 + disc, max(tr / 2 - disc, 1e-12)
    return math.sqrt(major / minor)


# ------------------------------------------------------------------------------------------------ perlin


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) if hi > lo else float(lo)


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, threshold: float = 0.5,
                scale_range: tuple[float, float] = (2, 16)) -> np.ndarray:
    """DRAEM-style anomaly mask over a whole canvas: thresholded, rotated Perlin noise.

    The lattice has a log-uniform number of cells in ``scale_range`` per axis, drawn independently (so patches are
    elongated in a random direction). The result may be empty for high thresholds; callers redraw.
    """
    cells = (_log_uniform(rng, *scale_range), _log_uniform(rng, *scale_range))
    noise = perlin_rotated(shape, rng, cells, angle=float(rng.uniform(0, math.pi)))
    return (noise > threshold).astype(np.uint8)


# ------------------------------------------------------------------------------------------ local shapes


def _top_k(field: np.ndarray, k: int, connected: bool) -> np.ndarray:
    """The k highest pixels of ``field``; with ``connected``, the connected component holding the maximum at the
    highest level where it reaches k pixels (its area is then >= k, exact up to merging jumps)."""
    flat = field.ravel()
    k = int(min(max(k, 1), flat.size))
    if not connected:
        idx = np.argpartition(-flat, k - 1)[:k]
        out = np.zeros(flat.size, dtype=bool)
        out[idx] = True
        return out.reshape(field.shape)
    order = np.sort(flat)[::-1]
    peak = np.unravel_index(int(np.argmax(flat)), field.shape)
    lo, hi = k - 1, flat.size - 1  # search over ranks: component size grows as the level drops
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        labels, _ = ndimage.label(field >= order[mid], structure=_EIGHT)
        comp = labels == labels[peak]
        if comp.sum() >= k:
            best, hi = comp, mid - 1
        else:
            lo = mid + 1
    return best if best is not None else np.ones(field.shape, dtype=bool)


def _tiebreak(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.uniform(0.0, 1e-3, shape).astype(np.float32)


def _skeleton_shape(pts: np.ndarray, area: int, rng: np.random.Generator, wobble: float) -> np.ndarray:
    """Thicken a polyline skeleton (points in local coordinates) to exactly ``area`` pixels around it."""
    pad = math.ceil(math.sqrt(area)) + 3
    lo = np.floor(pts.min(axis=0)) - pad
    pts = pts - lo
    h = math.ceil(pts[:, 0].max()) + pad + 1
    w = math.ceil(pts[:, 1].max()) + pad + 1
    skel = polyline_alpha((h, w), pts, np.full(len(pts), 0.5)) >= 0.5
    if not skel.any():
        skel[int(pts[0, 0]), int(pts[0, 1])] = True
    dist = ndimage.distance_transform_edt(~skel).astype(np.float32)
    field = -dist + np.float32(wobble) * smooth_noise(rng, h, w, max(4.0, math.sqrt(area) / 2)) + _tiebreak(rng, (h, w))
    return crop_to_content(_top_k(field, area, connected=True))


def _scratch(rng: np.random.Generator, area: int, stretch: float, geo: dict[str, float]) -> np.ndarray:
    length = min(stretch * math.sqrt(area), 0.9 * area)
    t = np.linspace(0.0, 1.0, 24)
    along = (t - 0.5) * length
    curve = geo["straight"] * length
    lateral = geo["bend"] * curve * np.sin(np.pi * t) + geo["wiggle"] * curve * np.sin(2 * np.pi * t + geo["phase"])
    a = geo["angle"]
    pts = np.stack([along * math.sin(a) + lateral * math.cos(a), along * math.cos(a) - lateral * math.sin(a)], 1)
    return _skeleton_shape(pts, area, rng, wobble=0.4)


def _crack(rng: np.random.Generator, area: int, stretch: float, geo: dict[str, float]) -> np.ndarray:
    total = min(stretch * math.sqrt(area), 0.9 * area)
    walk = np.random.default_rng(int(geo["walk_seed"]))
    n_branches = int(geo["branches"])
    main = total / (1.0 + 0.35 * n_branches)
    step = max(1.0, main / 24)
    steps = max(int(main / step), 3)
    straight = geo["straight"]
    pts, heads = random_walk(walk, np.zeros(2), geo["angle"], steps, step, wiggle=0.45 * straight, pull=0.35)
    paths = [pts]
    for _ in range(n_branches):
        j = int(walk.integers(max(1, steps // 6), max(2, 5 * steps // 6)))
        side = 1.0 if walk.random() < 0.5 else -1.0
        heading = float(heads[min(j, len(heads) - 1)]) + side * walk.uniform(0.4, 1.1) * straight
        bsteps = max(int(0.35 * main * straight / step), 1)
        bpts, _ = random_walk(walk, pts[j], heading, bsteps, step, wiggle=0.5 * straight, pull=0.3)
        paths.append(bpts)
    # the main path and its branches share one local box; each is drawn as its own polyline
    allpts = np.concatenate(paths)
    pad = math.ceil(math.sqrt(area)) + 3
    lo = np.floor(allpts.min(axis=0)) - pad
    h = math.ceil((allpts - lo)[:, 0].max()) + pad + 1
    w = math.ceil((allpts - lo)[:, 1].max()) + pad + 1
    skel = np.zeros((h, w), dtype=bool)
    for p in paths:
        skel |= polyline_alpha((h, w), p - lo, np.full(len(p), 0.5)) >= 0.5
    dist = ndimage.distance_transform_edt(~skel).astype(np.float32)
    field = -dist + np.float32(0.5) * smooth_noise(rng, h, w, max(3.0, math.sqrt(area) / 3)) + _tiebreak(rng, (h, w))
    return crop_to_content(_top_k(field, area, connected=True))


def _ellipse_field(area: int, aspect: float, angle: float, pad: float) -> tuple[np.ndarray, np.ndarray]:
    """Normalised elliptic radius (1 on the ellipse of the given area and aspect) over a box around it."""
    a = math.sqrt(area * aspect / math.pi)  # semi-major
    b = math.sqrt(area / (math.pi * aspect))
    half = math.ceil(a * pad) + 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    ca, sa = math.cos(angle), math.sin(angle)
    u = (xx * ca + yy * sa) / np.float32(a)
    v = (yy * ca - xx * sa) / np.float32(max(b, 0.5))
    return np.sqrt(u * u + v * v), np.arctan2(v, u)


def _spot(rng: np.random.Generator, area: int, stretch: float, geo: dict[str, float]) -> np.ndarray:
    r, th = _ellipse_field(area, stretch, geo["angle"], pad=1.4)
    wob = geo["w2"] * np.cos(2 * th + geo["p2"]) + geo["w3"] * np.cos(3 * th + geo["p3"])
    field = -r * (1.0 + wob.astype(np.float32)) + _tiebreak(rng, r.shape)
    return crop_to_content(_top_k(field, area, connected=True))


def _blob(rng: np.random.Generator, area: int, stretch: float, geo: dict[str, float]) -> np.ndarray:
    r, _ = _ellipse_field(area, stretch, geo["angle"], pad=1.8)
    cells = max(r.shape[0] / max(geo["cells"], 1.0), 2.0)
    noise = smooth_noise(np.random.default_rng(int(geo["noise_seed"])), r.shape[0], r.shape[1], cells)
    field = -r + np.float32(1.4) * noise + _tiebreak(rng, r.shape)
    return crop_to_content(_top_k(field, area, connected=True))


def _perlin_patch(rng: np.random.Generator, area: int, stretch: float, geo: dict[str, float]) -> np.ndarray:
    r, _ = _ellipse_field(area * 2, stretch, geo["angle"], pad=1.3)
    noise = perlin_rotated(r.shape, np.random.default_rng(int(geo["noise_seed"])), (geo["cells"], geo["cells"]))
    field = np.clip(1.0 - r, 0.0, None) * (1.0 + noise) + _tiebreak(rng, r.shape)
    return crop_to_content(_top_k(field, area, connected=False))


_BUILDERS = {"scratch": _scratch, "crack": _crack, "spot": _spot, "blob": _blob, "perlin": _perlin_patch}


def _geometry(kind: str, rng: np.random.Generator, spec: MaskSpec) -> dict[str, float]:
    """The random choices of one shape, drawn once so re-rendering at another stretch keeps its identity."""
    angle = float(rng.uniform(0, math.pi))
    if kind == "scratch":
        sign = 1 if rng.random() < 0.5 else -1
        return {"angle": angle, "straight": 1.0, "bend": float(rng.uniform(*spec.curvature_range)) * sign,
                "wiggle": float(rng.uniform(0, 0.3)) * spec.curvature_range[1], "phase": float(rng.uniform(0, 6.3))}
    if kind == "crack":
        return {"angle": float(rng.uniform(0, 2 * math.pi)), "straight": 1.0,
                "branches": float(rng.choice([0, 1, 1, 2, 2, 3])), "walk_seed": float(rng.integers(2**31))}
    if kind == "spot":
        return {"angle": angle, "w2": float(rng.uniform(0, 0.12)), "w3": float(rng.uniform(0, 0.08)),
                "p2": float(rng.uniform(0, 6.3)), "p3": float(rng.uniform(0, 6.3))}
    return {"angle": angle, "cells": float(rng.integers(spec.scale_range[0], spec.scale_range[1] + 1)),
            "noise_seed": float(rng.integers(2**31))}


def shape_mask(kind: str, rng: np.random.Generator, area_px: int, aspect: float,
               aspect_range: tuple[float, float] | None = None, max_fix: int = 10) -> np.ndarray:
    """One local shape of ``kind`` with exactly ``area_px`` pixels (connected kinds: at least) and, when reachable,
    a measured aspect inside ``aspect_range`` (else as close as ``max_fix`` rescalings get).

    The result is cropped to its bounding box; :func:`place` puts it on a canvas.
    """
    if kind not in _BUILDERS:
        raise ConfigError(f"unknown mask kind {kind!r}", f"choose one of {sorted(_BUILDERS)} (or 'real')")
    geo = _geometry(kind, rng, MaskSpec(kind=kind))  # type: ignore[arg-type]
    return _build(kind, rng, int(area_px), aspect, aspect_range, geo, max_fix)


def _build(kind: str, rng: np.random.Generator, area: int, aspect: float, aspect_range: tuple[float, float] | None,
           geo: dict[str, float], max_fix: int) -> np.ndarray:
    """Render, measure the aspect, rescale; a bent shape whose aspect stops growing with length is straightened,
    because curvature caps the moment aspect (a sagitta of 0.1 L allows about 9): the aspect range is a hard
    constraint, the curvature a preference."""
    linear = kind in ("scratch", "crack")
    stretch = math.sqrt(aspect) if linear else aspect  # a bar of area A and length sqrt(A r) has aspect r
    geo = dict(geo)
    best, best_err, prev = None, math.inf, None
    for _ in range(max_fix):
        shape = _BUILDERS[kind](rng, area, stretch, geo)
        got = aspect_ratio(shape)
        lo, hi = aspect_range if aspect_range is not None else (got, got)
        err = 0.0 if lo <= got <= hi else min(abs(math.log(got / lo)), abs(math.log(got / hi)))
        if err < best_err:
            best, best_err = shape, err
        if err == 0.0 or not np.isfinite(got):
            break
        if linear and got < lo and prev is not None and got < prev * 1.1:
            geo["straight"] *= 0.4
        prev = got
        factor = aspect / got
        stretch = max(stretch * (math.sqrt(factor) if linear else factor), 1.0)
    assert best is not None
    return best


# -------------------------------------------------------------------------------------------- placement


def foreground_mask(image: np.ndarray, method: Literal["otsu", "all"] = "otsu", erode: int = 0,
                    dark_max: float = 0.25, min_contrast: float = 0.15) -> np.ndarray:
    """Where the part is, for images of a bright part on a dark background (e.g. ball-screw crops).

    Otsu's threshold on the smoothed luminance splits part from background only when there is a background: the
    darker class must be dark (mean <= ``dark_max``) and the classes ``min_contrast`` apart. Otherwise the whole
    image is surface (a textured sheet would otherwise be cut into bright and dark grains). The largest bright
    component is kept with its holes filled (defects and dark features on the part are part of the part), then
    eroded by ``erode`` pixels so defects do not touch the silhouette.
    """
    h, w = image.shape[:2]
    full = np.ones((h, w), dtype=np.uint8)
    if method == "all":
        return full
    if method != "otsu":
        raise ConfigError(f"unknown foreground method {method!r}", "use 'otsu' or 'all'")
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:
        gray = img @ np.array([0.299, 0.587, 0.114], np.float32) if img.shape[2] == 3 else img.mean(axis=2)
    else:
        gray = img
    gray = ndimage.gaussian_filter(gray, sigma=max(1.0, 0.01 * min(h, w)))
    hist, edges = np.histogram(gray, bins=256, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centers)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 - m0) ** 2 / (w0 * (1 - w0))
    between[~np.isfinite(between)] = 0
    t = int(np.argmax(between))
    dark_mean = m0[t] / w0[t] if w0[t] > 0 else 0.0
    bright_mean = (mt - m0[t]) / (1 - w0[t]) if w0[t] < 1 else 1.0
    if dark_mean > dark_max or bright_mean - dark_mean < min_contrast:
        log.debug("foreground: no dark background (class means %.2f / %.2f); using the whole image",
                  dark_mean, bright_mean)
        return full
    fg = gray > edges[t + 1]
    labels, n = ndimage.label(fg, structure=_EIGHT)
    if n == 0:
        return full
    sizes = np.bincount(labels.ravel())[1:]
    fg = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)
    if erode > 0:
        fg = ndimage.distance_transform_edt(fg) > erode
    return fg.astype(np.uint8)


def _blocked(canvas_shape: tuple[int, int], allowed: np.ndarray | None, forbidden: np.ndarray | None,
             margin: int) -> np.ndarray:
    bad = np.zeros(canvas_shape, dtype=bool)
    if allowed is not None:
        bad |= ~(np.asarray(allowed) > 0)
    if forbidden is not None:
        f = np.asarray(forbidden) > 0
        if f.any():
            bad |= ndimage.distance_transform_edt(~f) <= margin if margin > 0 else f
    return bad


def place_with_reason(mask_or_shape: np.ndarray, canvas_shape: tuple[int, int], allowed: np.ndarray | None = None,
                      forbidden: np.ndarray | None = None, rng: np.random.Generator | None = None,
                      max_tries: int = 50, margin: int = 0) -> tuple[np.ndarray | None, str]:
    """:func:`place`, also returning why it failed ("" on success)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    canvas_shape = (int(canvas_shape[0]), int(canvas_shape[1]))
    for name, arr in (("allowed", allowed), ("forbidden", forbidden)):
        if arr is not None and np.asarray(arr).shape[:2] != canvas_shape:
            raise DataError(f"{name} mask is {np.asarray(arr).shape[:2]}, the canvas {canvas_shape}",
                            "pass masks of the image's size")
    shape = crop_to_content(mask_or_shape).astype(bool)
    if shape.size == 0:
        return None, "the shape is empty"
    sh, sw = shape.shape
    H, W = canvas_shape
    if sh > H or sw > W:
        return None, f"the shape ({sh}x{sw}) is larger than the canvas ({H}x{W})"
    bad = _blocked(canvas_shape, allowed, forbidden, margin)
    free = ~bad
    n_free = int(free.sum())
    need = int(shape.sum())
    if n_free < need:
        what = "allowed region" if forbidden is None else "region allowed and clear of existing defects"
        return None, f"the {what} has {n_free} pixels, the shape needs {need}"

    def result(y: int, x: int) -> np.ndarray:
        out = np.zeros(canvas_shape, dtype=np.uint8)
        out[y:y + sh, x:x + sw] = shape
        return out

    # cheap random tries first: centre the shape on a random free pixel
    fy, fx = np.nonzero(free)
    for _ in range(max_tries):
        i = int(rng.integers(fy.size))
        y = int(np.clip(fy[i] - sh // 2, 0, H - sh))
        x = int(np.clip(fx[i] - sw // 2, 0, W - sw))
        if not (bad[y:y + sh, x:x + sw] & shape).any():
            return result(y, x), ""
    # then the exact answer: every top-left corner where the shape meets no blocked pixel
    from scipy.signal import fftconvolve

    hits = fftconvolve(bad.astype(np.float32), shape[::-1, ::-1].astype(np.float32), mode="valid")
    ys, xs = np.nonzero(hits < 0.5)
    if ys.size == 0:
        clear = "inside the allowed region" if allowed is not None else "on the canvas"
        away = f" and {margin}px away from existing defects" if forbidden is not None else ""
        return None, f"no position keeps the {sh}x{sw} shape {clear}{away}"
    i = int(rng.integers(ys.size))
    return result(int(ys[i]), int(xs[i])), ""


def place(mask_or_shape: np.ndarray, canvas_shape: tuple[int, int], allowed: np.ndarray | None = None,
          forbidden: np.ndarray | None = None, rng: np.random.Generator | None = None, max_tries: int = 50,
          margin: int = 0) -> np.ndarray | None:
    """Put a shape (any mask; it is cropped to its content first) at a random position of a canvas.

    Every pixel of the placed shape lies inside ``allowed`` (None = anywhere) and more than ``margin`` pixels away
    from ``forbidden`` (existing defects). ``max_tries`` random positions are tried first; if they all collide, the
    full set of valid positions is computed (one FFT correlation) and one is drawn, so None means no position
    exists at all, not bad luck. The reason is logged; :func:`place_with_reason` returns it.
    """
    placed, reason = place_with_reason(mask_or_shape, canvas_shape, allowed, forbidden, rng, max_tries, margin)
    if placed is None:
        log.debug("place: %s", reason)
    return placed


# ------------------------------------------------------------------------------------------ real masks


def real_mask_pool(table: Any, classes: Iterable[str] | None = None, max_masks: int | None = None,
                   seed: int = 0) -> list[RealMask]:
    """Ground-truth masks of the real defective rows of a manifest table (ExDD reuses them on normal images).

    Rows count when they are real (not synthetic), labelled defective, carry a mask with at least one pixel, and
    (with ``classes``) have one of those classes. ``max_masks`` keeps a seeded, order-independent subset so large
    datasets need not decode every mask.
    """
    import pyarrow.compute as pc

    from components.data import manifest

    wanted = set(classes) if classes is not None else None
    keep = pc.and_(pc.and_(pc.equal(table["source"], "real"), pc.fill_null(pc.equal(table["label"], 1), False)),
                   pc.or_(pc.is_valid(table["mask_uri"]), pc.is_valid(table["mask_bytes"])))
    columns = [c for c in table.column_names if c != "image_bytes"]  # masks only: never materialise the images
    recs = [r for r in table.filter(keep).select(columns).to_pylist()
            if wanted is None or r.get("defect_class") in wanted]
    recs.sort(key=lambda r: manifest.unit_hash(r["sample_id"], seed))
    if max_masks is not None:
        recs = recs[:max_masks]
    pool = []
    for rec in recs:
        try:
            mask = manifest.load_mask(rec)
        except DataError as e:  # one unreadable mask costs its entry in the pool, not the job
            log.warning("real mask pool: %s skipped: %s", rec["sample_id"], e.message)
            continue
        if mask is None or not mask.any():
            log.debug("real mask pool: %s has an empty mask, skipped", rec["sample_id"])
            continue
        pool.append(RealMask(crop_to_content(mask), rec.get("defect_class"), rec["sample_id"],
                             float(mask.sum()) / mask.size))
    pool.sort(key=lambda m: m.sample_id)
    log.info("real mask pool: %d masks from %d candidate rows", len(pool), len(recs))
    return pool


def transform_real(entry: RealMask, canvas_shape: tuple[int, int], rng: np.random.Generator,
                   spec: MaskSpec) -> tuple[np.ndarray, dict[str, Any]]:
    """A pool mask flipped, rotated and rescaled for a canvas, with the transform (for provenance and for aligning
    the matching defect crop)."""
    m = entry.mask.astype(np.uint8)
    k = int(rng.integers(4))
    flip = bool(rng.random() < 0.5)
    if flip:
        m = m[:, ::-1]
    m = np.rot90(m, k)
    angle = 0.0
    if spec.rotate_any:
        angle = float(rng.uniform(-180, 180))
        m = crop_to_content(ndimage.rotate(m, angle, order=0, reshape=True))
    H, W = canvas_shape
    scale = float(rng.uniform(*spec.real_scale_range))
    target = entry.area_fraction * scale * scale * H * W
    if spec.area_range is not None:
        target = float(np.clip(target, spec.area_range[0] * H * W, spec.area_range[1] * H * W))
    target = max(target, float(spec.min_pixels))
    factor = math.sqrt(target / max(int(m.sum()), 1))
    size = (max(1, round(m.shape[0] * factor)), max(1, round(m.shape[1] * factor)))
    resized = resize_mask(np.ascontiguousarray(m), size)
    if not resized.any():  # a thin mask can vanish under nearest-neighbour shrinking
        resized = (resize_mask(np.ascontiguousarray(m) * 255, size) > 0).astype(np.uint8)
        if not resized.any():
            resized = np.ones((1, 1), dtype=np.uint8)
    info = {"source_id": entry.sample_id, "flip": flip, "rot90": k, "angle": angle, "scale": round(factor, 4)}
    return crop_to_content(resized), info


# ---------------------------------------------------------------------------------------------- sampler


class MaskSampler:
    """Draw placed defect masks per class: which spec applies, how many instances, where they go.

    ``specs`` maps a defect class to a spec (or a list of specs, one drawn per sample); the key ``default`` covers
    classes not listed. ``real_pool`` feeds ``kind: real`` specs; a class without pool masks of its own borrows
    masks of any class (logged once), as ExDD does.
    """

    def __init__(self, specs: Mapping[str, MaskSpec | Mapping[str, Any] | Sequence[MaskSpec | Mapping[str, Any]]],
                 real_pool: Sequence[RealMask] | None = None, seed: int = 0):
        self.specs: dict[str, list[MaskSpec]] = {}
        for cls, value in specs.items():
            items = list(value) if isinstance(value, Sequence) else [value]
            if not items:
                raise ConfigError(f"mask specs for class {cls!r} are empty", "give at least one spec")
            self.specs[cls] = [v if isinstance(v, MaskSpec) else MaskSpec.model_validate(v) for v in items]
        self.real_pool = list(real_pool or [])
        self.seed = int(seed)
        self._borrow_logged: set[str] = set()
        needs_real = [c for c, ss in self.specs.items() if any(s.kind == "real" for s in ss)]
        if needs_real and not self.real_pool:
            raise ConfigError(f"mask kind 'real' (classes {needs_real}) needs real defect masks, but the pool is empty",
                              "ingest a dataset with pixel masks, or use a procedural kind "
                              "(perlin, scratch, spot, crack, blob)")

    def _rng(self, rng: np.random.Generator | int) -> np.random.Generator:
        if isinstance(rng, np.random.Generator):
            return rng
        return np.random.default_rng([self.seed, int(rng)])

    def spec_for(self, defect_class: str | None, rng: np.random.Generator) -> MaskSpec:
        key = defect_class if defect_class in self.specs else "default"
        if key not in self.specs:
            raise ConfigError(f"no mask spec for defect class {defect_class!r}",
                              f"add it (or a 'default' entry) to the mask specs; known: {sorted(self.specs)}")
        options = self.specs[key]
        return options[int(rng.integers(len(options)))] if len(options) > 1 else options[0]

    def _real_entries(self, defect_class: str | None) -> list[RealMask]:
        own = [m for m in self.real_pool if m.defect_class == defect_class]
        if own:
            return own
        if str(defect_class) not in self._borrow_logged:
            log.info("no real masks of class %r; borrowing masks of any class", defect_class)
            self._borrow_logged.add(str(defect_class))
        return self.real_pool

    def _shape(self, spec: MaskSpec, canvas: tuple[int, int], defect_class: str | None,
               rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        if spec.kind == "real":
            entries = self._real_entries(defect_class)
            return transform_real(entries[int(rng.integers(len(entries)))], canvas, rng, spec)
        assert spec.area_range is not None and spec.aspect_range is not None
        total = canvas[0] * canvas[1]
        lo_px = max(spec.min_pixels, math.ceil(spec.area_range[0] * total))
        hi_px = max(lo_px, math.floor(spec.area_range[1] * total))
        # a shape at least one pixel wide cannot be more elongated than its area allows: on tiny images the area
        # is raised to what the lowest aspect needs rather than giving up the shape
        a_lo, a_hi = spec.aspect_range
        if spec.kind in ("scratch", "crack"):
            lo_px = max(lo_px, math.ceil(1.25 * a_lo))
            hi_px = max(hi_px, lo_px)
        best: tuple[float, np.ndarray] | None = None
        for _ in range(5):  # connected shapes can overshoot the area when two lobes merge: redraw those
            area = round(_log_uniform(rng, lo_px, hi_px))
            aspect = _log_uniform(rng, a_lo, max(min(a_hi, 0.8 * area), a_lo))
            shape = _build(spec.kind, rng, area, aspect, (a_lo, a_hi), _geometry(spec.kind, rng, spec), max_fix=10)
            got_area, got_aspect = int(shape.sum()), aspect_ratio(shape)
            miss = (max(0.0, math.log(got_area / (hi_px * 1.02))) + max(0.0, math.log(a_lo / got_aspect))
                    + max(0.0, math.log(got_aspect / a_hi)))
            if best is None or miss < best[0]:
                best = (miss, shape)
            if miss == 0.0:
                break
        assert best is not None
        shape = best[1]
        return shape, {"area": int(shape.sum()), "aspect": round(aspect_ratio(shape), 3), "in_spec": best[0] == 0.0}

    def sample_with_info(self, image: np.ndarray | None, existing_defect_mask: np.ndarray | None,
                         defect_class: str | None, rng: np.random.Generator | int,
                         allowed: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """:meth:`sample`, also returning provenance (spec kind, instances with area/aspect or real source ids)."""
        rng = self._rng(rng)
        if image is None and existing_defect_mask is None:
            raise DataError("MaskSampler.sample needs an image or a mask to know the canvas size")
        canvas = (image.shape[:2] if image is not None else existing_defect_mask.shape[:2])  # type: ignore[union-attr]
        canvas = (int(canvas[0]), int(canvas[1]))
        spec = self.spec_for(defect_class, rng)
        if allowed is None and spec.foreground != "all" and image is not None:
            allowed = foreground_mask(image, spec.foreground, erode=spec.margin)
        forbidden = np.zeros(canvas, dtype=bool)
        if existing_defect_mask is not None:
            forbidden |= np.asarray(existing_defect_mask) > 0
        out = np.zeros(canvas, dtype=np.uint8)
        n = int(rng.integers(spec.count_range[0], spec.count_range[1] + 1))
        instances: list[dict[str, Any]] = []
        reason = ""
        for _ in range(n):
            for _attempt in range(spec.max_tries):
                shape, info = self._shape(spec, canvas, defect_class, rng)
                placed, reason = place_with_reason(shape, canvas, allowed, forbidden | (out > 0), rng,
                                                   max_tries=30, margin=spec.margin)
                if placed is not None:
                    out |= placed
                    instances.append(info)
                    break
        if not instances:
            raise PlacementError(f"no {spec.kind} mask for class {defect_class!r} fits this image: {reason}",
                                 "lower area_range or margin, or check the foreground/existing-defect masks")
        if len(instances) < n:
            log.debug("placed %d of %d %s instances: %s", len(instances), n, spec.kind, reason)
        return out, {"kind": spec.kind, "instances": instances, "requested": n}

    def sample(self, image: np.ndarray | None, existing_defect_mask: np.ndarray | None, defect_class: str | None,
               rng: np.random.Generator | int, allowed: np.ndarray | None = None) -> np.ndarray:
        """A uint8 {0, 1} mask of the canvas with 1..count instances of the class's shape.

        ``rng`` may be an int: it is mixed with the sampler's seed, so (seed, int) always gives the same mask.
        Raises :class:`PlacementError` (with the failed constraint) when not even one instance fits.
        """
        return self.sample_with_info(image, existing_defect_mask, defect_class, rng, allowed)[0]
