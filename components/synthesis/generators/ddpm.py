"""The "ddpm" generator: defectflow's own small inpainting diffusion model (:mod:`components.synthesis.ddpm`).

The model works at one small square resolution (64² by default) and was trained on square windows around real
defects, so each request is brought into that frame: a square window around the mask's bounding box with the same
context margin as in training, resized to the model's resolution, inpainted, resized back, and pasted into the
original image *only inside the mask*. Pixels outside the request mask are never touched, so the result mask is the
request mask and labels stay exact. The paste is feathered inward (a blurred mask, floored at one half so 1-px
scratches still show) to hide the seam between the upsampled drawing and the full-resolution surface.

Every request carries its own seed and its own noise generator, so a result does not depend on the other requests
in its batch (up to float rounding of batched convolutions).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from components.errors import ConfigError, DataError
from components.synthesis import ddpm
from components.synthesis.generators.base import (
    Generator,
    GeneratorOptions,
    SynthesisRequest,
    SynthesisResult,
    register,
)

log = logging.getLogger(__name__)


class DDPMOptions(GeneratorOptions):
    model: str = Field(..., description="URI (local folder or s3://) of a model saved by components.synthesis.ddpm")
    steps: int = Field(25, ge=1, le=1000, description="denoising steps (UNet calls for ddim/ddpm)")
    scheduler: Literal["ddim", "ddpm", "repaint"] = Field(
        "ddim", description="ddim (deterministic), ddpm (ancestral) or repaint (RePaintScheduler with jumps)")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM/RePaint stochasticity")
    jump_length: int = Field(10, ge=1, description="repaint only: steps per resampling jump")
    jump_n_sample: int = Field(1, ge=1, le=20, description="repaint only: resamplings per jump (1 = no jumps)")
    context: float | None = Field(None, ge=0.0, le=8.0,
                                  description="crop margin per side as a fraction of the defect's longer side; "
                                              "default: the value the model was trained with")
    min_window: int | None = Field(None, ge=1, description="smallest crop window in pixels; default: as trained")
    feather: float = Field(1.0, ge=0.0, le=16.0, description="inward paste feathering (Gaussian sigma, pixels)")
    batch_size: int = Field(16, ge=1, le=1024, description="windows per UNet batch")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:1, mps, ...")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"ddpm generator: invalid device {name!r}", "use auto, cpu, cuda or cuda:<index>") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"ddpm generator: device {name!r} requested but CUDA is not available",
                          "use device: auto or cpu")
    return dev


def feather_alpha(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Paste weights: 0 outside the mask (pixels there stay exact), rising to 1 inside over about ``sigma``."""
    m = (mask > 0).astype(np.float32)
    if sigma <= 0:
        return m
    from scipy import ndimage

    return m * np.maximum(ndimage.gaussian_filter(m, sigma, mode="nearest"), 0.5)


@register
class DDPMGenerator(Generator):
    name = "ddpm"
    Options = DDPMOptions

    def __init__(self, options: GeneratorOptions):
        super().__init__(options)
        assert isinstance(options, DDPMOptions)
        self.device = _device(options.device)
        self.model, self.meta = ddpm.load(options.model, device=self.device)
        p = self.model.params
        if options.scheduler == "repaint" and p.prediction_type != "epsilon":
            raise ConfigError(f"the model at {options.model} predicts {p.prediction_type}; the repaint scheduler "
                              "needs epsilon", "use scheduler: ddim")
        crop = (self.meta.get("training") or {}).get("crop") or {}
        self.context = float(options.context if options.context is not None
                             else crop.get("context", ddpm.DEFAULT_CONTEXT))
        self.min_window = int(options.min_window if options.min_window is not None
                              else crop.get("min_side", ddpm.DEFAULT_MIN_SIDE))
        log.info("ddpm generator: %s (%s, %d², %s %d steps) on %s", self.meta["uri"], p.mode, p.resolution,
                 options.scheduler, options.steps, self.device)

    def generate(self, requests: Sequence[SynthesisRequest]) -> list[SynthesisResult]:
        opts = self.options
        assert isinstance(opts, DDPMOptions)
        res = self.model.params.resolution
        results: list[SynthesisResult | None] = [None] * len(requests)
        windows: list[tuple[int, tuple[int, int, int], np.ndarray, np.ndarray]] = []
        for i, req in enumerate(requests):
            image = np.asarray(req.image, dtype=np.float32)
            mask = (np.asarray(req.mask) > 0).astype(np.uint8)
            if image.ndim != 3 or image.shape[2] != 3 or mask.shape != image.shape[:2]:
                raise DataError(f"ddpm generator: request {req.source_id or i} has image {image.shape} and mask "
                                f"{mask.shape}", "pass an RGB (H, W, 3) image and an (H, W) mask of the same size")
            if not mask.any():
                results[i] = SynthesisResult(image=image.copy(), mask=mask, info={**self._info(req), "skipped":
                                                                                   "empty mask"})
                continue
            box = ddpm.defect_boxes(mask, per_component=False)[0]
            win = ddpm.square_window(box, mask.shape, self.context, self.min_window)
            crop = ddpm.image_to_size(ddpm.crop_square(image, *win), res)
            cmask = ddpm.mask_to_size(ddpm.crop_square(mask, *win), res)
            windows.append((i, win, crop, cmask))

        for start in range(0, len(windows), opts.batch_size):
            chunk = windows[start:start + opts.batch_size]
            imgs = torch.from_numpy(np.stack([c for _, _, c, _ in chunk])).permute(0, 3, 1, 2).contiguous()
            msks = torch.from_numpy(np.stack([m for _, _, _, m in chunk])).unsqueeze(1).float()
            gens = [torch.Generator().manual_seed(int(requests[i].seed) % (2**63)) for i, _, _, _ in chunk]
            out = ddpm.sample(self.model, imgs, msks, steps=opts.steps, scheduler=opts.scheduler, generator=gens,
                              eta=opts.eta, jump_length=opts.jump_length, jump_n_sample=opts.jump_n_sample)
            out_np = out.permute(0, 2, 3, 1).cpu().numpy()
            for (i, win, _, _), drawn in zip(chunk, out_np, strict=True):
                req = requests[i]
                image = np.asarray(req.image, dtype=np.float32)
                mask = (np.asarray(req.mask) > 0).astype(np.uint8)
                results[i] = SynthesisResult(image=self._paste(image, mask, win, drawn), mask=mask,
                                             info=self._info(req))
        return [r for r in results if r is not None]

    def _paste(self, image: np.ndarray, mask: np.ndarray, win: tuple[int, int, int], drawn: np.ndarray) -> np.ndarray:
        top, left, side = win
        h, w = mask.shape
        big = ddpm.image_to_size(drawn, side)
        y0, x0, y1, x1 = max(0, top), max(0, left), min(h, top + side), min(w, left + side)
        piece = big[y0 - top:y1 - top, x0 - left:x1 - left]
        sigma = float(self.options.feather)  # type: ignore[attr-defined]
        r = int(4 * sigma + 0.5) + 1  # the blur's reach: a margin that makes the window's alpha equal the full image's
        ay0, ax0, ay1, ax1 = max(0, y0 - r), max(0, x0 - r), min(h, y1 + r), min(w, x1 + r)
        alpha = feather_alpha(mask[ay0:ay1, ax0:ax1], sigma)[y0 - ay0:y1 - ay0, x0 - ax0:x1 - ax0, None]
        out = image.copy()
        region = out[y0:y1, x0:x1]
        out[y0:y1, x0:x1] = np.where(alpha > 0, np.clip(alpha * piece + (1 - alpha) * region, 0, 1), region)
        return out

    def _info(self, req: SynthesisRequest) -> dict[str, Any]:
        opts = self.options
        assert isinstance(opts, DDPMOptions)
        return {"generator": self.name, "model": self.meta["uri"], "mode": self.model.params.mode,
                "scheduler": opts.scheduler, "steps": opts.steps, "seed": int(req.seed),
                "resolution": self.model.params.resolution, "context": self.context}
