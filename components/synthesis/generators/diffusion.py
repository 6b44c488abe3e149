"""The ``diffusion`` generator: text-guided inpainting with a diffusers pipeline (SD / SDXL inpaint, plus LoRA).

This is how ExDD and SynSur make their synthetic defects: a defect-free image, a defect-shaped mask and a prompt
("copper metal scratches") go through an inpainting pipeline, which repaints the masked region only. The pipeline is
any local folder or S3 prefix that ``AutoPipelineForInpainting.from_pretrained`` can read; nothing is ever fetched
from the Hugging Face hub, so offline clusters work and runs are reproducible (the model is an artifact with a URI,
not a moving hub revision). For smoke tests without real weights, :mod:`components.synthesis.tiny_pipelines` builds
a tiny random pipeline in a second.

Why the extra steps around the pipeline call:

- **resolution**: SD/SDXL generate poorly far from their training size, and SDXL has a strong square-shape bias, so
  each image is inpainted at ``resolution`` x ``resolution`` (ExDD: 1024) and resized back to the request's size.
- **paste_back**: the VAE round trip changes every pixel a little, so the image outside the mask is not the input
  anymore; production inpainting tools composite the original back outside a dilated, feathered copy of the mask.
  Pixels farther than ``paste_back_dilate`` + the feather band from the mask are then bit-identical to the input,
  which keeps the synthetic image's "normal" part truly normal for the detectors trained on it.
- **per-request seeds**: each request gets its own ``torch.Generator``, so an image depends on its seed, not on the
  batch it happened to land in.

Options (YAML ``synthesis.generator.options``)::

    model: s3://bucket/models/sdxl-inpaint      # or a local folder (required)
    preset: exdd_sdxl                            # optional defaults, see PRESETS; explicit options win
    lora: [{uri: s3://bucket/models/pitting-lora, weight: 0.8, adapter_name: pitting}]
    surface: "a ball screw drive"
    template: "{defect} on {surface}"            # or a list: one is picked by seed % len
    prompts: {pitting: {prompt: "pitting corrosion on {surface}", negative_prompt: "smooth"}}
    negative_prompt: ""
    strength: 1.0
    num_inference_steps: 30
    guidance_scale: 7.5
    padding_mask_crop: null                      # int: inpaint a crop around the mask (+margin), paste it back
    resolution: null                             # null = the pipeline's native size (UNet sample_size x VAE factor)
    batch_size: 4
    mask_blur: null                              # blur factor for pipe.mask_processor.blur
    paste_back: true
    device: auto                                 # auto | cpu | cuda (fp16 on cuda)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageFilter
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from components import storage
from components.errors import ConfigError, DataError, StorageError, WeightsError
from components.synthesis.generators.base import (
    Generator,
    GeneratorOptions,
    SynthesisRequest,
    SynthesisResult,
    register,
)

log = logging.getLogger(__name__)

EXDD_PROMPTS = ("white marks on the wall", "copper metal scratches")
EXDD_NEGATIVE_PROMPT = "smooth, plain, black, dark, shadow"

PRESETS: dict[str, dict[str, Any]] = {
    # ExDD (arXiv 2507.15335, src/utils/generate_augmented_images.py): SDXL inpaint 1.0, no LoRA, two fixed prompts
    # used equally often, images and masks resized to 1024x1024 and back.
    "exdd_sdxl": {
        "template": list(EXDD_PROMPTS),
        "negative_prompt": EXDD_NEGATIVE_PROMPT,
        "strength": 0.99,
        "num_inference_steps": 30,
        "guidance_scale": 20.0,
        "padding_mask_crop": 2,
        "resolution": 1024,
    },
}

OFFLINE_HINT = ("give `model` a local folder or s3:// URI holding a diffusers inpainting pipeline (model_index.json "
                "plus component folders; save one with pipe.save_pretrained(dir) on a machine with hub access). "
                "defectflow never downloads from the hub. For a smoke test without real weights, build a tiny random "
                "pipeline: python -m components.synthesis.tiny_pipelines <dir> [--sdxl]")


# ------------------------------------------------------------------------------------------------ options


class LoraSpec(BaseModel):
    """One LoRA adapter in diffusers format (a folder with ``pytorch_lora_weights.safetensors``), local or S3."""

    model_config = ConfigDict(extra="forbid")

    uri: str
    weight: float = 1.0
    adapter_name: str | None = Field(None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


class PromptSpec(BaseModel):
    """The prompt of one defect class. A list of prompts is cycled by seed (``seed % len``), as ExDD alternates its
    two prompts. ``{defect}`` and ``{surface}`` are filled in."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | list[str]
    negative_prompt: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("prompt list is empty")
        return v


class DiffusionOptions(GeneratorOptions):
    model: str = Field(..., description="local folder or s3:// URI of a diffusers inpainting pipeline")
    preset: Literal["exdd_sdxl"] | None = Field(None, description="defaults from a paper; explicit options win")
    lora: list[LoraSpec] = Field(default_factory=list)
    surface: str = Field("an industrial surface", description="fills {surface} in prompts")
    template: str | list[str] = Field("{defect} on {surface}",
                                      description="prompt for classes without an entry in `prompts`")
    prompts: dict[str, PromptSpec | str] = Field(default_factory=dict, description="per defect class")
    negative_prompt: str = ""
    strength: float = Field(1.0, gt=0, le=1)
    num_inference_steps: int = Field(30, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0)
    padding_mask_crop: int | None = Field(None, ge=0)
    resolution: int | None = Field(None, ge=8, le=4096,
                                   description="square inpainting size (multiple of 8); null = pipeline native")
    batch_size: int = Field(4, ge=1)
    mask_blur: float | None = Field(None, ge=0, description="pipe.mask_processor.blur factor")
    paste_back: bool = Field(True, description="keep the original pixels outside the dilated, feathered mask")
    paste_back_dilate: int = Field(4, ge=0, description="pixels (at request size) the mask grows before feathering")
    paste_back_feather: float = Field(3.0, ge=0, description="Gaussian radius (pixels) of the blend band")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    attention_slicing: bool = Field(False, description="less GPU memory, a little slower")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("preset") is None:
            return data
        preset = data["preset"]
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        return {**PRESETS[preset], **data}

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and v % 8:
            raise ValueError(f"resolution {v} is not a multiple of 8 (the VAE downsamples by 8)")
        return v

    @field_validator("template")
    @classmethod
    def _template_non_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("template list is empty")
        return v


# ------------------------------------------------------------------------------------------------ loading

def resolve_device(device: Any = "auto") -> Any:
    import torch

    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available", "use device: auto or cpu")
    return torch.device(device)


class _EmptyFp32ListFilter(logging.Filter):
    """diffusers 0.42 warns "modules ... should be kept in float32: []" (an empty list) every time the SDXL
    inpaint pipeline moves its VAE with ``vae.to(dtype=float32)`` before encoding: a false positive, once per
    image, that would flood Ray worker logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


_filter_installed = False


def _quiet_diffusers() -> None:
    global _filter_installed
    if not _filter_installed:
        logging.getLogger("diffusers.models.modeling_utils").addFilter(_EmptyFp32ListFilter())
        _filter_installed = True


def pipeline_class_name(folder: str) -> str:
    """The pipeline class saved in ``model_index.json``; raises WeightsError with the offline hint otherwise."""
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        raise WeightsError(f"{folder} is not a diffusers pipeline folder (no model_index.json)", OFFLINE_HINT)
    try:
        with open(index) as f:
            return str(json.load(f).get("_class_name", "?"))
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{index} is unreadable: {e}", OFFLINE_HINT) from e


def load_pipeline(uri: str, device: Any = "auto", dtype: Any = None) -> Any:
    """An inpainting pipeline from a local folder or S3 URI, on ``device`` (fp16 on CUDA, fp32 on CPU unless
    ``dtype`` says otherwise), with progress bars off. Never touches the hub (``local_files_only``)."""
    import torch
    from diffusers import AutoPipelineForInpainting

    try:
        folder = storage.cached_local_dir(uri)
    except StorageError as e:
        raise WeightsError(f"inpainting pipeline {uri} is not readable: {e.message}", OFFLINE_HINT) from e
    if not os.path.isdir(folder):
        raise WeightsError(f"inpainting pipeline {uri} does not exist", OFFLINE_HINT)
    class_name = pipeline_class_name(folder)
    dev = resolve_device(device)
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    _quiet_diffusers()
    try:
        pipe = AutoPipelineForInpainting.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"cannot load {class_name} from {uri} as an inpainting pipeline: {e}",
                           f"{OFFLINE_HINT}; the folder must hold every component of model_index.json") from e
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    if not isinstance(pipe, StableDiffusionInpaintPipeline | StableDiffusionXLInpaintPipeline):
        raise WeightsError(f"{uri} loads as {type(pipe).__name__}; the diffusion generator and LoRA training "
                           "support the SD and SDXL inpainting pipelines (UNet-based)",
                           "use an SD 1.x/2.x or SDXL (inpainting) pipeline folder")
    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    log.info("loaded %s (%s) from %s on %s", type(pipe).__name__, class_name, uri, dev)
    return pipe


def native_resolution(pipe: Any) -> int:
    """The size the pipeline generates by default (UNet sample size x VAE factor): 512 for SD 1.5, 1024 for SDXL,
    64 for the tiny test pipelines."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def is_sdxl(pipe: Any) -> bool:
    return hasattr(pipe, "text_encoder_2")


# ------------------------------------------------------------------------------------------------ helpers


class _Keep(dict):
    """format_map mapping that leaves unknown ``{placeholders}`` as they are (VLM prompts may contain braces)."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def fill(text: str, defect: str, surface: str) -> str:
    try:
        return text.format_map(_Keep(defect=defect, surface=surface))
    except (ValueError, IndexError):  # stray braces: use the text as written
        return text


def _pick(choice: str | list[str], seed: int) -> str:
    return choice if isinstance(choice, str) else choice[seed % len(choice)]


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(image, 0, 1) * 255.0 + 0.5).astype(np.uint8), "RGB")


def _mask_pil(mask: np.ndarray, size: int, blur: float | None, pipe: Any) -> Image.Image:
    """White = repaint at ``size``; bilinear + threshold keeps thin defects that nearest resizing could drop."""
    m = Image.fromarray((mask > 0).astype(np.uint8) * 255, "L")
    if m.size != (size, size):
        m = m.resize((size, size), Image.Resampling.BILINEAR).point(lambda v: 255 if v >= 128 else 0)
    if blur:
        m = pipe.mask_processor.blur(m, blur_factor=blur)
    return m


def paste_alpha(mask: np.ndarray, dilate: int, feather: float) -> np.ndarray:
    """Blend weight of the generated image: 1 on the mask, falling to exactly 0 beyond the dilated, feathered band
    (computed on uint8 so the tail quantises to 0 and the far outside stays bit-identical)."""
    m = Image.fromarray((mask > 0).astype(np.uint8) * 255, "L")
    if dilate > 0:
        m = m.filter(ImageFilter.MaxFilter(2 * dilate + 1))
    if feather > 0:
        m = m.filter(ImageFilter.GaussianBlur(feather))
    alpha = np.asarray(m, dtype=np.float32) / 255.0
    return np.maximum(alpha, (mask > 0).astype(np.float32))


def composite(original: np.ndarray, generated: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    out = original * (1.0 - a) + generated * a
    return np.where(a > 0, out, original).astype(np.float32)


# ------------------------------------------------------------------------------------------------ generator


@register
class DiffusionGenerator(Generator):
    """Inpaints defects with a diffusers pipeline; weights load once per instance (one per Ray Data actor)."""

    name = "diffusion"
    Options = DiffusionOptions

    def __init__(self, options: DiffusionOptions):
        super().__init__(options)
        self.device = resolve_device(options.device)
        self.pipe = load_pipeline(options.model, device=self.device)
        self.model_class = pipeline_class_name(storage.cached_local_dir(options.model))
        self.sdxl = is_sdxl(self.pipe)
        if options.preset == "exdd_sdxl" and not self.sdxl:
            log.warning("preset exdd_sdxl expects an SDXL inpainting pipeline; %s is %s", options.model,
                        self.model_class)
        self.resolution = options.resolution or native_resolution(self.pipe)
        if options.attention_slicing:
            self.pipe.enable_attention_slicing()
        self.adapters: list[dict[str, Any]] = []
        if options.lora:
            from components.synthesis.lora import load_lora

            for i, spec in enumerate(options.lora):
                name = spec.adapter_name or f"lora{i}"
                load_lora(self.pipe, spec.uri, adapter_name=name, weight=spec.weight, activate=False)
                self.adapters.append({"uri": spec.uri, "weight": spec.weight, "adapter_name": name})
            self.pipe.set_adapters([a["adapter_name"] for a in self.adapters],
                                   adapter_weights=[a["weight"] for a in self.adapters])

    # ---- prompts

    def prompts_for(self, r: SynthesisRequest) -> tuple[str, str]:
        """(prompt, negative prompt): the request's own first (e.g. from a VLM), then the class entry, then the
        template; ``{defect}`` is the class name with underscores as spaces."""
        o = self.options
        defect = (r.defect_class or "defect").replace("_", " ")
        spec = o.prompts.get(r.defect_class) if r.defect_class else None
        if isinstance(spec, str):
            spec = PromptSpec(prompt=spec)
        if r.prompt:
            prompt = r.prompt
        elif spec is not None:
            prompt = _pick(spec.prompt, r.seed)
        else:
            prompt = _pick(o.template, r.seed)
        if r.negative_prompt is not None:
            negative = r.negative_prompt
        elif spec is not None and spec.negative_prompt is not None:
            negative = spec.negative_prompt
        else:
            negative = o.negative_prompt
        return fill(prompt, defect, o.surface), fill(negative, defect, o.surface)

    # ---- generation

    def generate(self, requests: Sequence[SynthesisRequest]) -> list[SynthesisResult]:
        results: list[SynthesisResult | None] = [None] * len(requests)
        todo: list[int] = []
        for i, r in enumerate(requests):
            _check(r)
            if not (r.mask > 0).any():
                results[i] = SynthesisResult(image=r.image.astype(np.float32), mask=r.mask.astype(np.uint8),
                                             info={**self._info(r, *self.prompts_for(r)), "skipped": "empty mask"})
            else:
                todo.append(i)
        # the pipeline derives one crop box per call, so padding_mask_crop inpaints one image at a time
        step = 1 if self.options.padding_mask_crop is not None else self.options.batch_size
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            for i, res in zip(chunk, self._run([requests[i] for i in chunk]), strict=True):
                results[i] = res
        return [r for r in results if r is not None]

    def _run(self, reqs: list[SynthesisRequest]) -> list[SynthesisResult]:
        import torch

        o, res = self.options, self.resolution
        images = [_to_pil(r.image).resize((res, res), Image.Resampling.BICUBIC) for r in reqs]
        masks = [_mask_pil(r.mask, res, o.mask_blur, self.pipe) for r in reqs]
        texts = [self.prompts_for(r) for r in reqs]
        negatives = [n for _, n in texts]
        gen_device = "cuda" if self.device.type == "cuda" else "cpu"
        kwargs: dict[str, Any] = dict(
            prompt=[p for p, _ in texts],
            negative_prompt=negatives if any(negatives) else None,
            image=images if len(images) > 1 else images[0],
            mask_image=masks if len(masks) > 1 else masks[0],
            height=res, width=res, strength=o.strength, num_inference_steps=o.num_inference_steps,
            guidance_scale=o.guidance_scale, padding_mask_crop=o.padding_mask_crop,
            generator=[torch.Generator(device=gen_device).manual_seed(int(r.seed)) for r in reqs],
            output_type="pil")
        if self.sdxl:
            kwargs.update(original_size=(res, res), target_size=(res, res))
        with torch.inference_mode():
            out = self.pipe(**kwargs).images
        results = []
        for r, img, (prompt, negative) in zip(reqs, out, texts, strict=True):
            h, w = r.mask.shape
            gen = np.asarray(img.convert("RGB").resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
            original = r.image.astype(np.float32)
            if o.paste_back:
                gen = composite(original, gen, paste_alpha(r.mask, o.paste_back_dilate, o.paste_back_feather))
            results.append(SynthesisResult(image=gen, mask=(r.mask > 0).astype(np.uint8),
                                           info=self._info(r, prompt, negative)))
        return results

    def _info(self, r: SynthesisRequest, prompt: str, negative: str) -> dict[str, Any]:
        o = self.options
        return {"generator": self.name, "model": {"uri": o.model, "class": self.model_class},
                "lora": [dict(a) for a in self.adapters], "prompt": prompt, "negative_prompt": negative,
                "strength": o.strength, "steps": o.num_inference_steps, "guidance": o.guidance_scale,
                "resolution": self.resolution, "padding_mask_crop": o.padding_mask_crop,
                "paste_back": o.paste_back, "preset": o.preset, "seed": int(r.seed)}


def _check(r: SynthesisRequest) -> None:
    if r.image.ndim != 3 or r.image.shape[2] != 3:
        raise DataError(f"diffusion generator needs RGB (H, W, 3) images, got shape {r.image.shape}",
                        "decode images with components.data.images")
    if r.mask.shape != r.image.shape[:2]:
        raise DataError(f"mask shape {r.mask.shape} does not match image shape {r.image.shape[:2]}",
                        "resize the mask to the image (nearest)")
