"""The "cutpaste" generator: a real defect, cut from a defective image, pasted into the request's mask.

Real defect pixels are the most realistic defect texture there is; what gives a paste away is the seam (a step in
brightness or colour around the patch) and a defect that does not fit the region it is put in. So:

* **Where the reference comes from.** The synthesize workflow fills ``request.reference`` (float RGB) and
  ``request.reference_mask`` from a real defective image (whole image or a crop; :func:`defect_crop` makes a
  small one) and records its id in ``request.extra["reference_id"]``. The generator does not pick references
  itself, so provenance stays in one place. A missing reference is an error.
* **Fitting.** The reference defect's bounding box is mapped onto the request mask's bounding box (stretching as
  needed). Of the 8 flips/90-degree rotations, the one whose warped reference mask overlaps the request mask best
  is used (ties are broken by the seed), so a mask placed by :class:`~components.synthesis.masks.MaskSampler`
  from the same real mask (``kind: real`` flips, rotates by 90 degrees and rescales) lines up with its defect.
* **Blending.** ``seamless`` solves the Poisson equation (gradient-domain blending, Pérez et al. 2003) on the
  request mask grown by ``context`` pixels: inside, the result has the reference's gradients (or, with
  ``mixed_gradients``, whichever of reference and target gradient is stronger); on the border it equals the target.
  The seam therefore sits in background texture and has no step. The sparse system is solved with SuperLU
  (``scipy.sparse``), or with conjugate gradients above ``direct_max_pixels``. ``alpha`` is a feathered alpha
  blend (1 inside the mask, a Gaussian fall-off of ``feather`` pixels outside).
* **Colour.** With ``match_color`` the reference is shifted and scaled per channel so the ring of background
  around its defect has the mean and spread of the ring around the target mask (needed for ``alpha``; it also
  keeps ``seamless`` from bleeding a large offset into the defect).

The result mask is the request mask intersected with the warped reference mask (the pixels that received defect
pixels), unless that keeps less than ``min_overlap`` of the request mask, in which case the request mask is kept.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field
from scipy import ndimage, sparse
from scipy.sparse import linalg as splinalg

from components.errors import DataError
from components.synthesis.generators.base import (
    Generator,
    GeneratorOptions,
    SynthesisRequest,
    SynthesisResult,
    register,
)

log = logging.getLogger(__name__)


class CutPasteOptions(GeneratorOptions):
    blend: Literal["seamless", "alpha"] = Field("seamless", description="Poisson blending or feathered alpha")
    mixed_gradients: bool = Field(False, description="seamless: keep the stronger of reference/target gradient")
    context: int = Field(3, ge=1, description="seamless: background ring (px) around the mask in the solve")
    feather: float = Field(2.0, ge=0, description="alpha: Gaussian fall-off outside the mask, px")
    match_color: bool = Field(True, description="match the reference's background ring to the target's")
    orient: bool = Field(True, description="try the 8 flips/90-degree rotations and keep the best overlap")
    mask_mode: Literal["intersect", "request"] = Field(
        "intersect", description="result mask: request ∩ warped reference mask, or the request mask")
    min_overlap: float = Field(0.3, ge=0, le=1, description="intersect: keep the request mask below this share")
    direct_max_pixels: int = Field(250_000, ge=1, description="seamless: SuperLU up to this many unknowns, else CG")
    cg_tol: float = Field(1e-5, gt=0)
    cg_maxiter: int = Field(3000, ge=1)


def defect_crop(image: np.ndarray, mask: np.ndarray, pad: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A small reference for cut-paste: the defect's bounding box plus ``pad`` pixels of its surroundings (the
    colour match and the seamless solve need some background around the defect)."""
    m = np.asarray(mask) > 0
    if not m.any():
        raise DataError("defect_crop: the mask is empty", "pass the mask of a defective image")
    ys, xs = np.nonzero(m)
    y0, y1 = max(int(ys.min()) - pad, 0), min(int(ys.max()) + pad + 1, m.shape[0])
    x0, x1 = max(int(xs.min()) - pad, 0), min(int(xs.max()) + pad + 1, m.shape[1])
    return np.asarray(image, np.float32)[y0:y1, x0:x1].copy(), m[y0:y1, x0:x1].astype(np.uint8)


def _bbox(m: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(m)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def _dihedral(a: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 flips/rotations (k in 0..7): rotate by (k % 4) * 90 degrees, flip for k >= 4."""
    out = np.rot90(a, k % 4, axes=(0, 1))
    return np.ascontiguousarray(out[:, ::-1] if k >= 4 else out)


def poisson_blend(target: np.ndarray, source: np.ndarray, region: np.ndarray, mixed: bool = False,
                  direct_max_pixels: int = 250_000, tol: float = 1e-5, maxiter: int = 3000) -> np.ndarray:
    """Gradient-domain blend of ``source`` into ``target`` over ``region`` (all the same (H, W[, C]) size).

    Solves ``Δf = div v`` in the region with ``f = target`` on its outer border; ``v`` is the source gradient (or the
    stronger of source and target gradient with ``mixed``). Pixels on the array edge use only their in-array
    neighbours (a Neumann border), so regions touching the image edge are fine. Pixels outside the region are the
    target's.
    """
    t = np.asarray(target, np.float64)
    s = np.asarray(source, np.float64)
    squeeze = t.ndim == 2
    if squeeze:
        t, s = t[:, :, None], s[:, :, None]
    omega = np.asarray(region) > 0
    h, w = omega.shape
    ys, xs = np.nonzero(omega)
    n = ys.size
    out = t.copy()
    if n == 0:
        return out[:, :, 0] if squeeze else out
    idx = np.full((h, w), -1, np.int64)
    idx[ys, xs] = np.arange(n)
    diag = np.zeros(n)
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    b = np.zeros((n, t.shape[2]))
    has_border = False
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        qy, qx = ys + dy, xs + dx
        valid = (qy >= 0) & (qy < h) & (qx >= 0) & (qx < w)
        p = np.flatnonzero(valid)
        qy, qx = qy[valid], qx[valid]
        diag[p] += 1.0
        inside = omega[qy, qx]
        rows.append(p[inside])
        cols.append(idx[qy[inside], qx[inside]])
        if (~inside).any():
            has_border = True
            b[p[~inside]] += t[qy[~inside], qx[~inside]]
        gs = s[ys[p], xs[p]] - s[qy, qx]
        if mixed:
            gt = t[ys[p], xs[p]] - t[qy, qx]
            gs = np.where(np.abs(gt) > np.abs(gs), gt, gs)
        b[p] += gs
    if not has_border:  # the region is the whole array: the Neumann problem fixes f only up to a constant
        log.debug("poisson_blend: region covers the whole array; returning the source")
        out[ys, xs] = s[ys, xs]
        return out[:, :, 0] if squeeze else out
    r = np.concatenate([np.arange(n), *rows])
    c = np.concatenate([np.arange(n), *cols])
    v = np.concatenate([diag, -np.ones(r.size - n)])
    a = sparse.csc_matrix((v, (r, c)), shape=(n, n))
    if n <= direct_max_pixels:
        f = splinalg.splu(a).solve(b)
    else:
        pre = sparse.diags(1.0 / diag)
        f = np.empty_like(b)
        for ch in range(b.shape[1]):
            sol, status = splinalg.cg(a, b[:, ch], x0=s[ys, xs, ch], rtol=tol, maxiter=maxiter, M=pre)
            if status > 0:
                log.warning("poisson_blend: CG did not converge in %d iterations (%d unknowns)", maxiter, n)
            f[:, ch] = sol
    out[ys, xs] = f
    return out[:, :, 0] if squeeze else out


@register
class CutPasteGenerator(Generator):
    """Paste a real defect crop into the request mask; see the module docstring."""

    name = "cutpaste"
    Options = CutPasteOptions

    def __init__(self, options: CutPasteOptions):
        super().__init__(options)
        self.options: CutPasteOptions = options

    def generate(self, requests: Sequence[SynthesisRequest]) -> list[SynthesisResult]:
        return [self._one(r) for r in requests]

    def _one(self, req: SynthesisRequest) -> SynthesisResult:
        o = self.options
        image = np.asarray(req.image, np.float32)
        target_mask = np.asarray(req.mask) > 0
        if image.ndim != 3 or image.shape[2] != 3 or target_mask.shape != image.shape[:2]:
            raise DataError(f"cutpaste: image {image.shape} and mask {target_mask.shape} do not match",
                            "pass float RGB (H, W, 3) and a (H, W) mask")
        if req.reference is None:
            raise DataError("cutpaste needs request.reference (a real defect image or crop)",
                            "the synthesize workflow fills reference/reference_mask from real defective images; "
                            "use generator 'procedural' when the dataset has no defect masks")
        ref = np.asarray(req.reference, np.float32)
        if ref.ndim == 2:
            ref = np.repeat(ref[:, :, None], 3, axis=2)
        ref_mask = (np.ones(ref.shape[:2], bool) if req.reference_mask is None
                    else np.asarray(req.reference_mask) > 0)
        if ref_mask.shape != ref.shape[:2] or not ref_mask.any():
            raise DataError(f"cutpaste: reference mask {ref_mask.shape} is empty or does not match the reference "
                            f"{ref.shape[:2]}", "pass the reference's defect mask (1 = defect)")
        rng = np.random.default_rng([int(req.seed), 0xC07])
        info: dict[str, Any] = {"generator": self.name, "seed": int(req.seed), "blend": o.blend,
                                "defect_class": req.defect_class}
        for key in ("reference_id", "reference_class"):
            if key in req.extra:
                info[key] = req.extra[key]
        if req.source_id is not None:
            info["source_id"] = req.source_id
        if not target_mask.any():
            log.debug("cutpaste: empty request mask for seed %s, image unchanged", req.seed)
            return SynthesisResult(image.copy(), target_mask.astype(np.uint8), info)

        H, W = target_mask.shape
        ty0, ty1, tx0, tx1 = _bbox(target_mask)
        th, tw = ty1 - ty0, tx1 - tx0
        pad = o.context + math.ceil(3 * o.feather) + 3
        wy0, wy1, wx0, wx1 = max(ty0 - pad, 0), min(ty1 + pad, H), max(tx0 - pad, 0), min(tx1 + pad, W)
        win_mask = target_mask[wy0:wy1, wx0:wx1]
        gy, gx = np.mgrid[wy0:wy1, wx0:wx1].astype(np.float64)

        ry0, ry1, rx0, rx1 = _bbox(ref_mask)
        # keep context around the reference defect at the same relative scale as the target window
        rpad = math.ceil(pad * max((ry1 - ry0) / th, (rx1 - rx0) / tw)) + 1
        cy0, cy1 = max(ry0 - rpad, 0), min(ry1 + rpad, ref.shape[0])
        cx0, cx1 = max(rx0 - rpad, 0), min(rx1 + rpad, ref.shape[1])
        ref_crop, ref_mcrop = ref[cy0:cy1, cx0:cx1], ref_mask[cy0:cy1, cx0:cx1]

        candidates = range(8) if o.orient else range(1)
        scored = []
        for k in candidates:
            mk = _dihedral(ref_mcrop, k)
            by0, by1, bx0, bx1 = _bbox(mk)
            sy, sx = (by1 - by0) / th, (bx1 - bx0) / tw
            coords = np.stack([by0 + (gy + 0.5 - ty0) * sy - 0.5, bx0 + (gx + 0.5 - tx0) * sx - 0.5])
            warped = ndimage.map_coordinates(mk.astype(np.float32), coords, order=1, mode="constant", cval=0) >= 0.5
            inter = float((warped & win_mask).sum())
            union = float((warped | win_mask).sum())
            scored.append((inter / max(union, 1.0), k, coords, warped, (1 / sy, 1 / sx)))
        best = max(s[0] for s in scored)
        ties = [s for s in scored if s[0] >= best - 1e-9]
        iou, k, coords, warped, scale = ties[int(rng.integers(len(ties)))] if len(ties) > 1 else ties[0]
        src_img = _dihedral(ref_crop, k)
        source = np.stack([ndimage.map_coordinates(src_img[:, :, c], coords, order=1, mode="nearest")
                           for c in range(3)], axis=2).astype(np.float32)
        info.update({"orientation": int(k), "overlap_iou": round(float(iou), 4),
                     "scale": [round(float(scale[0]), 4), round(float(scale[1]), 4)]})
        win = image[wy0:wy1, wx0:wx1]
        if o.match_color:
            source, gain = _match_color(source, win, win_mask, o.context + 2)
            if gain is not None:
                info["color_gain"] = gain
        if o.blend == "seamless":
            region = ndimage.distance_transform_edt(~win_mask) <= o.context
            blended = poisson_blend(win, source, region, mixed=o.mixed_gradients,
                                    direct_max_pixels=o.direct_max_pixels, tol=o.cg_tol, maxiter=o.cg_maxiter)
            info["region_pixels"] = int(region.sum())
        else:
            a = win_mask.astype(np.float32)
            if o.feather > 0:
                # truncated at 3 sigma so the change provably stays within the window (and ~3*feather px)
                a = np.maximum(a, np.clip(2.0 * ndimage.gaussian_filter(a, o.feather, truncate=3.0), 0.0, 1.0))
            blended = win + a[:, :, None] * (source - win)
        out = image.copy()
        out[wy0:wy1, wx0:wx1] = np.clip(blended, 0.0, 1.0)

        result = target_mask.copy()
        if o.mask_mode == "intersect" and req.reference_mask is not None:
            inter_mask = np.zeros_like(target_mask)
            inter_mask[wy0:wy1, wx0:wx1] = win_mask & warped
            if inter_mask.sum() >= o.min_overlap * target_mask.sum():
                result = inter_mask
            else:
                info["mask_fallback"] = "reference overlap below min_overlap; kept the request mask"
        return SynthesisResult(out.astype(np.float32), result.astype(np.uint8), info)


def _match_color(source: np.ndarray, target: np.ndarray, mask: np.ndarray, ring: int
                 ) -> tuple[np.ndarray, list[list[float]] | None]:
    """Shift/scale each channel of ``source`` so its background ring around ``mask`` matches the target's."""
    dist = ndimage.distance_transform_edt(~mask)
    band = (dist > 0) & (dist <= ring)
    if band.sum() < 8:
        return source, None
    s, t = source[band], target[band]
    mu_s, mu_t = s.mean(axis=0), t.mean(axis=0)
    sd_s, sd_t = s.std(axis=0), t.std(axis=0)
    gain = np.clip(sd_t / np.maximum(sd_s, 1e-4), 0.5, 2.0)
    gain = np.where(sd_s < 1e-4, 1.0, gain)
    out = (source - mu_s) * gain + mu_t
    return out.astype(np.float32), [[round(float(g), 3) for g in gain], [round(float(d), 3) for d in mu_t - mu_s]]
