"""The "procedural" generator: texture and intensity perturbations inside the mask, numpy only.

It is the generator that always works (no weights, no GPU, milliseconds per image), so the synthesize step, the
tests and laptop demos have defects to train on even where no diffusion model is available. Its defects are not
meant to be photorealistic; they give a detector local changes of brightness, texture and colour at plausible
places and sizes, which is what DRAEM-/SuperSimpleNet-style training needs.

Each request gets a *recipe*: a list of effects applied in order, each blended with a weight ``alpha`` that is 1
inside the mask except for an inward ramp of ``feather`` pixels at the border (thin structures stay at full
strength: the ramp never exceeds half a component's thickness). Nothing outside the mask changes unless ``bleed``
is set, so the result mask can be the request mask (optionally tightened to the pixels that changed).

Effects: ``darken``/``brighten`` (multiplicative, modulated by smooth noise so the defect has texture),
``noise`` (grain), ``blur``/``sharpen``, ``contrast`` (local contrast raised or flattened), ``hue`` (a tint and a
hue rotation, for stains). A recipe entry ``"a|b"`` picks one of the alternatives per request.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import Field, field_validator
from scipy import ndimage

from components.data.procedural import smooth_noise
from components.errors import DataError
from components.synthesis.generators.base import (
    Generator,
    GeneratorOptions,
    SynthesisRequest,
    SynthesisResult,
    register,
)

log = logging.getLogger(__name__)

EFFECTS = ("darken", "brighten", "noise", "blur", "sharpen", "contrast", "hue")
DEFAULT_RECIPE = ["darken|brighten", "noise", "blur|sharpen|contrast"]
DEFAULT_CLASS_RECIPES = {
    "stain": ["hue", "darken|brighten", "blur"],
    "rust": ["hue", "darken", "noise"],
    "oil": ["hue", "darken", "blur"],
}


def _check_recipe(recipe: Sequence[str]) -> list[str]:
    out = []
    for entry in recipe:
        names = [n.strip() for n in str(entry).split("|") if n.strip()]
        bad = [n for n in names if n not in EFFECTS]
        if not names or bad:
            raise ValueError(f"recipe entry {entry!r} names unknown effects {bad}; effects: {list(EFFECTS)}")
        out.append("|".join(names))
    if not out:
        raise ValueError("a recipe needs at least one effect")
    return out


class ProceduralOptions(GeneratorOptions):
    """Strengths are in image units ([0, 1] intensities) unless said otherwise."""

    recipe: list[str] = Field(default_factory=lambda: list(DEFAULT_RECIPE),
                              description="effects applied in order; 'a|b' picks one per request")
    class_recipes: dict[str, list[str]] = Field(default_factory=lambda: dict(DEFAULT_CLASS_RECIPES),
                                                description="recipe per defect class (others use `recipe`)")
    intensity_range: tuple[float, float] = Field((0.2, 0.45), description="darken/brighten strength")
    texture: float = Field(0.5, ge=0, le=1, description="how much smooth noise modulates the strength")
    noise_std_range: tuple[float, float] = Field((0.02, 0.06), description="grain standard deviation")
    blur_sigma_range: tuple[float, float] = Field((0.8, 2.0), description="blur sigma, pixels")
    sharpen_amount_range: tuple[float, float] = Field((0.8, 2.0), description="unsharp-mask amount")
    contrast_gain_range: tuple[float, float] = Field((1.6, 2.6), description="local contrast gain; inverted half "
                                                                            "of the time (flattening)")
    hue_shift_range: tuple[float, float] = Field((15.0, 60.0), description="hue rotation, degrees (either sign)")
    tint_strength_range: tuple[float, float] = Field((0.1, 0.3), description="pull towards a random colour")
    feather: float = Field(2.0, ge=0, description="inward border ramp, pixels")
    bleed: float = Field(0.0, ge=0, description="outward soft spill, pixels (0 = nothing outside changes)")
    tighten_threshold: float | None = Field(None, ge=0, description="result mask = request mask pixels that "
                                                                    "changed by more than this (max over channels)")

    @field_validator("recipe")
    @classmethod
    def _recipe(cls, v: list[str]) -> list[str]:
        return _check_recipe(v)

    @field_validator("class_recipes")
    @classmethod
    def _class_recipes(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        return {k: _check_recipe(r) for k, r in v.items()}

    @field_validator("intensity_range", "noise_std_range", "blur_sigma_range", "sharpen_amount_range",
                     "contrast_gain_range", "hue_shift_range", "tint_strength_range")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] <= v[1]:
            raise ValueError(f"range {v} must satisfy 0 <= low <= high")
        return v


def blend_weight(mask: np.ndarray, feather: float, bleed: float = 0.0) -> np.ndarray:
    """Per-pixel effect weight: 1 deep inside, an inward ramp of ``feather`` px at the border, 0 outside.

    The ramp length is capped at each component's half thickness so a 2-px scratch is not faded to half strength;
    ``bleed`` adds a soft outward spill that decays to 0 within ``bleed`` px.
    """
    m = np.asarray(mask) > 0
    alpha = m.astype(np.float32)
    if not m.any():
        return alpha
    if feather > 0:
        inside = ndimage.distance_transform_edt(m).astype(np.float32)
        labels, n = ndimage.label(m, structure=np.ones((3, 3), bool))
        thick = np.asarray(ndimage.maximum(inside, labels, np.arange(1, n + 1)), np.float32)
        ramp = np.minimum(np.float32(feather), thick)[labels - 1]
        alpha = np.where(m, np.clip(inside / np.maximum(ramp, 1.0), 0.0, 1.0), 0.0).astype(np.float32)
    if bleed > 0:
        outside = ndimage.distance_transform_edt(~m).astype(np.float32)
        spill = np.clip(1.0 - outside / np.float32(bleed + 1.0), 0.0, 1.0) * np.float32(0.5)
        alpha = np.where(m, alpha, spill)
    return alpha


def _luma(img: np.ndarray) -> np.ndarray:
    return img @ np.array([0.299, 0.587, 0.114], np.float32)


def _rgb_to_yiq(img: np.ndarray) -> np.ndarray:
    m = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
    return img @ m.T


def _yiq_to_rgb(yiq: np.ndarray) -> np.ndarray:
    m = np.array([[1.0, 0.956, 0.621], [1.0, -0.272, -0.647], [1.0, -1.106, 1.703]], np.float32)
    return yiq @ m.T


def _hsv_colour(hue: float, sat: float) -> np.ndarray:
    """An RGB colour of the given hue (0..1) and saturation with mean 1 (a gain vector, not a pixel)."""
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0
    rgb = 1.0 - sat * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return (rgb / rgb.mean()).astype(np.float32)


class _Effects:
    """Effect implementations on a working crop; each returns the fully affected crop, blended by the caller."""

    def __init__(self, opts: ProceduralOptions, rng: np.random.Generator):
        self.o, self.rng = opts, rng

    def _u(self, r: tuple[float, float]) -> float:
        return float(self.rng.uniform(r[0], r[1]))

    def _modulation(self, shape: tuple[int, int]) -> np.ndarray:
        h, w = shape
        n = smooth_noise(self.rng, h, w, max(3.0, min(h, w) / 6.0)) * 2.0  # about [-1, 1]
        return (1.0 + self.o.texture * n).astype(np.float32)

    def darken(self, img: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        k = self._u(self.o.intensity_range)
        info["darken"] = round(k, 4)
        return img * np.clip(1.0 - k * self._modulation(img.shape[:2]), 0.0, 1.0)[:, :, None]

    def brighten(self, img: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        k = self._u(self.o.intensity_range)
        info["brighten"] = round(k, 4)
        return img + (1.0 - img) * np.clip(k * self._modulation(img.shape[:2]), 0.0, 1.0)[:, :, None]

    def noise(self, img: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        s = self._u(self.o.noise_std_range)
        info["noise_std"] = round(s, 4)
        grain = self.rng.standard_normal(img.shape[:2]).astype(np.float32) * np.float32(s)
        return img + grain[:, :, None]

    def blur(self, img: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        s = self._u(self.o.blur_sigma_range)
        info["blur_sigma"] = round(s, 3)
        return ndimage.gaussian_filter(img, sigma=(s, s, 0), mode="nearest")

    def sharpen(self, img: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        a = self._u(self.o.sharpen_amount_range)
        info["sharpen"] = round(a, 3)
        soft = ndimage.gaussian_filter(img, sigma=(1.2, 1.2, 0), mode="nearest")
        return img + np.float32(a) * (img - soft)

    def contrast(self, img: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        g = self._u(self.o.contrast_gain_range)
        if self.rng.random() < 0.5:
            g = 1.0 / max(g, 1e-3)
        info["contrast_gain"] = round(g, 3)
        sigma = max(2.0, min(img.shape[:2]) / 8.0)
        local = ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0), mode="nearest")
        return local + np.float32(g) * (img - local)

    def hue(self, img: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        deg = self._u(self.o.hue_shift_range) * (1 if self.rng.random() < 0.5 else -1)
        tint = self._u(self.o.tint_strength_range)
        colour = _hsv_colour(float(self.rng.random()), float(self.rng.uniform(0.4, 0.9)))
        info["hue_shift"] = round(deg, 2)
        info["tint"] = [round(tint, 3), [round(float(c), 3) for c in colour]]
        yiq = _rgb_to_yiq(img)
        c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        i, q = yiq[..., 1].copy(), yiq[..., 2].copy()
        yiq[..., 1], yiq[..., 2] = c * i - s * q, s * i + c * q
        rotated = _yiq_to_rgb(yiq)
        # grey surfaces have no hue to rotate: the tint is what makes a stain coloured
        return rotated * (1.0 + np.float32(tint) * (colour - 1.0))[None, None, :]


@register
class ProceduralGenerator(Generator):
    """Seeded texture/intensity perturbation inside the mask; see the module docstring."""

    name = "procedural"
    Options = ProceduralOptions

    def __init__(self, options: ProceduralOptions):
        super().__init__(options)
        self.options: ProceduralOptions = options

    def recipe_for(self, defect_class: str | None) -> list[str]:
        o = self.options
        if defect_class is not None:
            if defect_class in o.class_recipes:
                return o.class_recipes[defect_class]
            low = defect_class.lower()
            for key, recipe in o.class_recipes.items():  # "oil_stain" gets the stain recipe
                if key.lower() in low:
                    return recipe
        return o.recipe

    def generate(self, requests: Sequence[SynthesisRequest]) -> list[SynthesisResult]:
        return [self._one(r) for r in requests]

    def _one(self, req: SynthesisRequest) -> SynthesisResult:
        o = self.options
        image = np.asarray(req.image, dtype=np.float32)
        mask = (np.asarray(req.mask) > 0)
        if image.ndim != 3 or image.shape[2] != 3 or mask.shape != image.shape[:2]:
            raise DataError(f"procedural: image {image.shape} and mask {mask.shape} do not match",
                            "pass float RGB (H, W, 3) and a (H, W) mask")
        rng = np.random.default_rng([int(req.seed), 0x9C0D])
        info: dict[str, Any] = {"generator": self.name, "seed": int(req.seed), "defect_class": req.defect_class}
        if req.source_id is not None:
            info["source_id"] = req.source_id
        out = image.copy()
        if not mask.any():
            info["effects"] = []
            log.debug("procedural: empty mask for seed %s, image unchanged", req.seed)
            return SynthesisResult(out, mask.astype(np.uint8), info)
        # work on the mask's bounding box plus room for filters, not the whole image
        pad = math.ceil(3 * max(o.blur_sigma_range[1], 1.2) + o.bleed + 2)
        ys, xs = np.nonzero(mask)
        y0, y1 = max(int(ys.min()) - pad, 0), min(int(ys.max()) + pad + 1, mask.shape[0])
        x0, x1 = max(int(xs.min()) - pad, 0), min(int(xs.max()) + pad + 1, mask.shape[1])
        crop = image[y0:y1, x0:x1].copy()
        alpha = blend_weight(mask[y0:y1, x0:x1], o.feather, o.bleed)[:, :, None]
        fx = _Effects(o, rng)
        applied = []
        for entry in self.recipe_for(req.defect_class):
            choices = entry.split("|")
            name = choices[int(rng.integers(len(choices)))] if len(choices) > 1 else choices[0]
            affected = getattr(fx, name)(crop, info)
            crop = np.clip(crop + alpha * (affected - crop), 0.0, 1.0).astype(np.float32)
            applied.append(name)
        info["effects"] = applied
        out[y0:y1, x0:x1] = crop
        result_mask = mask
        if o.tighten_threshold is not None:
            changed = np.abs(out - image).max(axis=2) > o.tighten_threshold
            result_mask = mask & changed
            info["tightened"] = {"threshold": o.tighten_threshold, "kept": int(result_mask.sum()),
                                 "of": int(mask.sum())}
        return SynthesisResult(out, result_mask.astype(np.uint8), info)
