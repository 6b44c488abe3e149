"""defectflow's own small pixel-space inpainting diffusion model: it needs no downloaded weights.

Pre-trained inpainting pipelines (Stable Diffusion, SDXL) are gigabytes from the hub and know nothing of a product
line's defects. A UNet of about a million parameters, trained in minutes on the dataset's own defect crops, runs
offline everywhere (CI, air-gapped plants) and draws *this* line's scratches and dents.

Two modes share one :class:`InpaintDDPM`:

``conditional`` (default)
    The UNet sees ``concat(x_t, image·(1−mask), mask)`` (7 channels). Trained on defect crops with the defect's own
    mask it learns p(defect pixels | surroundings, where the defect is): it *draws defects inside masks*.
``repaint``
    A plain unconditional DDPM (3 channels) over defect crops; the mask only enters at sampling, through known-region
    replacement (diffusers' ``RePaintScheduler`` with resampling jumps, or blended DDIM). It harmonises the masked
    region with its surroundings but is never told *where* the defect goes, so it tends to fill masks with whatever
    the context suggests — often background. Kept as the baseline of the RePaint paper.

Ranges: training speaks the diffusion range [−1, 1] (:func:`training_step`, :func:`crops_from_manifest_rows`);
sampling speaks the project's image range [0, 1] (:func:`sample`), so that pixels outside the mask come back
bit-exact instead of through a ``2x−1`` round trip. Masks are the project's convention everywhere: 1 = defect
(the region to draw); the inversion RePaint wants (0 = inpaint) happens inside :func:`sample`.

Artifact: a folder (local or ``s3://``) with ``model.safetensors`` and ``ddpm.json`` (format, params, training
info, code version). Never pickle.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from components import storage
from components.errors import DataError, StorageError, WeightsError
from components.progress import bar

log = logging.getLogger(__name__)

FORMAT = "defectflow-ddpm"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "ddpm.json"

Mode = Literal["conditional", "repaint"]
SchedulerName = Literal["ddim", "ddpm", "repaint"]
Generators = torch.Generator | Sequence[torch.Generator] | None

DEFAULT_CONTEXT = 0.5
"""Crop margin on each side of a defect's bounding box, as a fraction of the box's longer side: 0.5 makes a window
twice the defect's size, so the model sees as much surface as defect."""
DEFAULT_MIN_SIDE = 16
"""Smallest crop window in image pixels: a 2-px pit would otherwise be blown up to a featureless 64-px blob."""


class InpaintDDPMParams(BaseModel):
    """Architecture and noise schedule. Everything here is saved in ``ddpm.json`` and must match the weights."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode = Field("conditional", description="conditional (7-channel input) or repaint (unconditional)")
    resolution: int = Field(64, ge=8, le=1024, description="training/sampling side in pixels")
    block_out_channels: tuple[int, ...] = Field((32, 64, 64), min_length=1, max_length=6)
    layers_per_block: int = Field(1, ge=1, le=4)
    attention: bool = Field(True, description="self-attention in the lowest-resolution block (and the mid block)")
    attention_head_dim: int = Field(8, ge=1)
    norm_num_groups: int = Field(8, ge=1)
    num_train_timesteps: int = Field(1000, ge=10, le=10_000)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"

    @model_validator(mode="after")
    def _consistent(self) -> InpaintDDPMParams:
        levels = len(self.block_out_channels)
        if self.resolution % (2 ** (levels - 1)):
            raise ValueError(f"resolution {self.resolution} must be divisible by 2^{levels - 1} "
                             f"({levels} levels of block_out_channels)")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups {self.norm_num_groups}")
        if self.attention and self.block_out_channels[-1] % self.attention_head_dim:
            raise ValueError(f"the lowest level's {self.block_out_channels[-1]} channels are not divisible by "
                             f"attention_head_dim {self.attention_head_dim}")
        if self.beta_end <= self.beta_start:
            raise ValueError("beta_end must be larger than beta_start")
        if self.mode == "repaint" and self.prediction_type != "epsilon":
            raise ValueError("repaint mode samples with RePaintScheduler, which only understands epsilon prediction")
        return self


class InpaintDDPM(nn.Module):
    """A diffusers ``UNet2DModel`` plus the conditioning that makes it an inpainter (see the module docstring)."""

    def __init__(self, params: InpaintDDPMParams | None = None):
        super().__init__()
        from diffusers import UNet2DModel

        self.params = params or InpaintDDPMParams()
        p = self.params
        levels = len(p.block_out_channels)
        down = ["DownBlock2D"] * levels
        up = ["UpBlock2D"] * levels
        if p.attention:
            down[-1] = "AttnDownBlock2D"
            up[0] = "AttnUpBlock2D"
        self.unet = UNet2DModel(
            sample_size=p.resolution,
            in_channels=self.in_channels,
            out_channels=3,
            block_out_channels=tuple(p.block_out_channels),
            layers_per_block=p.layers_per_block,
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            norm_num_groups=p.norm_num_groups,
            attention_head_dim=p.attention_head_dim,
            add_attention=p.attention,
        )

    @property
    def conditional(self) -> bool:
        return self.params.mode == "conditional"

    @property
    def in_channels(self) -> int:
        return 7 if self.params.mode == "conditional" else 3

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int, masked_image: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """The prediction (ε, v or x0 per ``prediction_type``). Repaint mode ignores the conditioning."""
        if self.conditional:
            if masked_image is None or mask is None:
                raise ValueError("a conditional InpaintDDPM needs masked_image and mask")
            x_t = torch.cat([x_t, masked_image, mask.to(x_t.dtype)], dim=1)
        if not torch.is_tensor(t):
            t = torch.tensor([t], device=x_t.device)
        t = t.to(x_t.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(x_t.shape[0])
        return self.unet(x_t, t).sample


# ------------------------------------------------------------------------------------------- schedulers


def _schedule_kwargs(p: InpaintDDPMParams) -> dict[str, Any]:
    return {"num_train_timesteps": p.num_train_timesteps, "beta_start": p.beta_start, "beta_end": p.beta_end,
            "beta_schedule": p.beta_schedule}


def noise_scheduler(params: InpaintDDPMParams):
    """The training-time forward process; every sampler below is configured from the same betas."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**_schedule_kwargs(params), prediction_type=params.prediction_type, clip_sample=True)


def sampling_scheduler(params: InpaintDDPMParams, kind: SchedulerName, eta: float = 0.0):
    """A sampler over the training betas. DDIM and DDPM use trailing timestep spacing so that the first of a few
    steps starts from pure noise (t = T−1) rather than from T − T/steps, where the pure-noise start it is given
    does not match the marginal the model was trained on (Lin et al. 2023, "Common diffusion noise schedules...")."""
    from diffusers import DDIMScheduler, DDPMScheduler, RePaintScheduler

    if kind == "ddim":
        return DDIMScheduler(**_schedule_kwargs(params), prediction_type=params.prediction_type, clip_sample=True,
                             set_alpha_to_one=True, timestep_spacing="trailing")
    if kind == "ddpm":
        return DDPMScheduler(**_schedule_kwargs(params), prediction_type=params.prediction_type, clip_sample=True,
                             timestep_spacing="trailing")
    if kind == "repaint":
        if params.prediction_type != "epsilon":
            raise ValueError("the repaint scheduler needs an epsilon-prediction model")
        return RePaintScheduler(**_schedule_kwargs(params), eta=eta)
    raise ValueError(f"unknown scheduler {kind!r}; choose ddim, ddpm or repaint")


# --------------------------------------------------------------------------------------------- training


def _randn(shape: Sequence[int], generator: Generators, like: torch.Tensor) -> torch.Tensor:
    """Per-sample generators draw each sample's noise on its own, so a request's result does not depend on which
    other requests share its batch."""
    from diffusers.utils.torch_utils import randn_tensor

    gen = list(generator) if isinstance(generator, Sequence) else generator
    return randn_tensor(tuple(shape), generator=gen, device=like.device, dtype=like.dtype)


def _generator_device(generator: Generators) -> torch.device:
    if isinstance(generator, Sequence):
        return generator[0].device if generator else torch.device("cpu")
    return generator.device if generator is not None else torch.device("cpu")


def training_step(model: InpaintDDPM, scheduler: Any, crops: torch.Tensor, masks: torch.Tensor,
                  generator: Generators = None, *, mask_weight: float = 1.0) -> torch.Tensor:
    """One denoising loss on a batch of defect crops (B,3,H,W) in [−1, 1] with their masks (B,1,H,W) in {0, 1}.

    ``mask_weight`` weights the squared error inside the mask by that factor relative to outside (the loss stays a
    weighted *mean*, so 1.0 is exactly the plain MSE of the diffusers recipe). Defects cover a small share of a crop
    and, in conditional mode, everything outside the mask is given to the model and overwritten at sampling anyway,
    so a weight above 1 spends the small model's capacity on what it is there to draw (not yet tuned: the default
    stays the diffusers recipe). ``scheduler`` is the
    :func:`noise_scheduler` of the model's params (None builds it).
    """
    if scheduler is None:
        scheduler = noise_scheduler(model.params)
    if crops.ndim != 4 or crops.shape[1] != 3 or masks.shape != (crops.shape[0], 1, *crops.shape[2:]):
        raise ValueError(f"crops must be (B,3,H,W) and masks (B,1,H,W); got {tuple(crops.shape)} and "
                         f"{tuple(masks.shape)}")
    masks = (masks > 0.5).to(crops.dtype)
    b = crops.shape[0]
    noise = _randn(crops.shape, generator, crops)
    gen = generator[0] if isinstance(generator, Sequence) else generator
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen,
                      device=_generator_device(generator)).to(crops.device)
    x_t = scheduler.add_noise(crops, noise, t)
    pred = model(x_t, t, crops * (1 - masks), masks)
    if model.params.prediction_type == "epsilon":
        target = noise
    elif model.params.prediction_type == "v_prediction":
        target = scheduler.get_velocity(crops, noise, t)
    else:
        target = crops
    err = (pred.float() - target.float()) ** 2
    if mask_weight == 1.0:
        return err.mean()
    w = 1.0 + (float(mask_weight) - 1.0) * masks.float()
    return (err * w).sum() / (w.sum() * err.shape[1])


def fit(model: InpaintDDPM, crops: torch.Tensor, masks: torch.Tensor, *, steps: int, batch_size: int = 16,
        lr: float = 2e-4, mask_weight: float = 1.0, augment: bool = True, rotate: bool = True, seed: int = 0,
        warmup: int | None = None, grad_clip: float = 1.0, progress: bool = True) -> list[float]:
    """The diffusers unconditional-training recipe (AdamW β=(0.95, 0.999), wd 1e-6, grad clip 1.0, warmup then
    cosine) on in-memory crops: a few thousand crops of 64² fit in RAM, so a DataLoader would only add workers
    competing for the same cores. Returns the per-step losses; the model is left in eval mode."""
    if crops.shape[0] == 0:
        raise DataError("no training crops", "the dataset has no defects with pixel masks")
    device = next(model.parameters()).device
    scheduler = noise_scheduler(model.params)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    warm = min(500, max(1, steps // 10)) if warmup is None else max(0, warmup)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(seed)
    n = crops.shape[0]
    losses: list[float] = []
    model.train()
    order = torch.randperm(n, generator=gen)
    pos = 0
    for _ in bar(range(steps), total=steps, desc="ddpm training", unit="step", min_total=1, enabled=progress):
        if pos + min(batch_size, n) > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += len(idx)
        x, m = crops[idx], masks[idx]
        if augment:
            x, m = augment_dihedral(x, m, gen, rotate=rotate)
        loss = training_step(model, scheduler, x.to(device), m.to(device), gen, mask_weight=mask_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    if losses:
        tail = losses[-min(50, len(losses)):]
        log.info("ddpm: %d steps, loss %.4f -> %.4f (mean of the last %d)", steps, losses[0],
                 sum(tail) / len(tail), len(tail))
    return losses


def augment_dihedral(crops: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | None = None, *,
                     rotate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips and 90° rotations, the same per sample for crop and mask. Surface defects have no preferred
    orientation on most parts; pass ``rotate=False`` for textures with a direction (brushed metal, wood) where a
    rotated crop would teach an impossible texture."""
    b = crops.shape[0]
    ks = torch.randint(0, 4 if rotate else 1, (b,), generator=generator)
    flips = torch.randint(0, 2, (b,), generator=generator)
    out_c, out_m = [], []
    for i in range(b):
        c, m = crops[i], masks[i]
        if ks[i]:
            c, m = torch.rot90(c, int(ks[i]), dims=(-2, -1)), torch.rot90(m, int(ks[i]), dims=(-2, -1))
        if flips[i]:
            c, m = torch.flip(c, dims=(-1,)), torch.flip(m, dims=(-1,))
        out_c.append(c)
        out_m.append(m)
    return torch.stack(out_c), torch.stack(out_m)


# --------------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample(model: InpaintDDPM, images: torch.Tensor, masks: torch.Tensor, *, steps: int = 25,
           scheduler: SchedulerName = "ddim", generator: Generators = None, eta: float = 0.0,
           jump_length: int = 10, jump_n_sample: int = 1, progress: bool = False) -> torch.Tensor:
    """Inpaint ``images`` (B,3,H,W) in [0, 1] inside ``masks`` (B,1,H,W), 1 = draw; returns (B,3,H,W) in [0, 1].

    Content under the mask is ignored. The known region is re-imposed, noised to the current level, before every
    UNet call and exactly at the end (RePaint-style replacement), so the model denoises a sample whose surroundings
    are the real ones and the output equals the input outside the mask bit for bit. ``scheduler``: ``ddim``
    (deterministic for eta 0; the default), ``ddpm`` (ancestral) or ``repaint`` (diffusers' RePaintScheduler with
    ``jump_length``/``jump_n_sample`` resampling; with jump_n_sample 1 it reduces to DDIM with replacement).
    ``generator``: one generator, or one per sample so that a sample's result does not depend on its batch.
    """
    p = model.params
    if images.ndim != 4 or images.shape[1] != 3 or masks.shape != (images.shape[0], 1, *images.shape[2:]):
        raise ValueError(f"images must be (B,3,H,W) and masks (B,1,H,W); got {tuple(images.shape)} and "
                         f"{tuple(masks.shape)}")
    levels = len(p.block_out_channels)
    if images.shape[-1] % 2 ** (levels - 1) or images.shape[-2] % 2 ** (levels - 1):
        raise ValueError(f"image sides must be divisible by {2 ** (levels - 1)}; got {tuple(images.shape[-2:])}")
    if isinstance(generator, Sequence) and len(generator) != images.shape[0]:
        raise ValueError(f"{len(generator)} generators for {images.shape[0]} images")
    param = next(model.parameters())
    images = images.to(param.device)
    keep_images = images
    m = (masks.to(param.device) > 0.5).to(param.dtype)
    known = images.to(param.dtype) * 2 - 1
    cond = known * (1 - m)
    sched = sampling_scheduler(p, scheduler, eta)
    was_training = model.training
    model.eval()
    try:
        x = _randn(known.shape, generator, known) * float(getattr(sched, "init_noise_sigma", 1.0))
        if scheduler == "repaint":
            sched.set_timesteps(steps, jump_length, jump_n_sample, param.device)
            keep = 1 - m  # RePaint's convention: 1 = known
            t_last = sched.timesteps[0] + 1
            for t in bar(sched.timesteps, total=len(sched.timesteps), desc="repaint", min_total=1, enabled=progress):
                if t < t_last:
                    out = model(x, t, cond, m)
                    x = sched.step(out, t, x, known, keep, _gen_arg(generator)).prev_sample
                else:
                    x = sched.undo_step(x, t_last, _gen_arg(generator))
                t_last = t
        else:
            sched.set_timesteps(steps, device=param.device)
            for t in bar(sched.timesteps, total=len(sched.timesteps), desc=scheduler, min_total=1, enabled=progress):
                noised_known = sched.add_noise(known, _randn(known.shape, generator, known), t.reshape(1))
                x = m * x + (1 - m) * noised_known
                out = model(x, t, cond, m)
                if scheduler == "ddim":
                    vn = _randn(known.shape, generator, known) if eta > 0 else None
                    x = sched.step(out, t, x, eta=eta, variance_noise=vn).prev_sample
                else:
                    x = sched.step(out, t, x, generator=_gen_arg(generator)).prev_sample
        x = m * x + (1 - m) * known
        out01 = ((x.float() + 1) / 2).clamp(0, 1)
        return torch.where(m.float() > 0.5, out01, keep_images.float())
    finally:
        model.train(was_training)


def _gen_arg(generator: Generators) -> Any:
    return list(generator) if isinstance(generator, Sequence) else generator


# ------------------------------------------------------------------------------------------- save / load


def save(model: InpaintDDPM, params: InpaintDDPMParams | None, uri: str, *,
         training: Mapping[str, Any] | None = None) -> str:
    """Weights first, ddpm.json last: a folder with ddpm.json is complete. ``params`` defaults to the model's own
    and must equal them (it is the description the weights are rebuilt from)."""
    from components.artifact import code_version, state_dict_bytes

    params = params or model.params
    if params != model.params:
        raise ValueError("params differ from the model's own params; the saved description would not match")
    uri = storage.normalize(uri)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "params": params.model_dump(mode="json"),
        "training": dict(training or {}),
        "num_parameters": int(sum(v.numel() for v in model.parameters())),
        "code_version": code_version(),
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    storage.write_bytes(storage.join(uri, WEIGHTS), state_dict_bytes(model))
    storage.write_json(storage.join(uri, META), meta)
    log.info("ddpm written to %s", uri)
    return uri


def load(uri: str, device: str | torch.device = "cpu") -> tuple[InpaintDDPM, dict[str, Any]]:
    """Rebuild a saved model (eval mode) and return it with its ddpm.json (plus ``uri``)."""
    from components.artifact import read_state_dict

    uri = storage.normalize(uri)
    hint = "pass a folder written by components.synthesis.ddpm.save (model.safetensors + ddpm.json)"
    try:
        meta = storage.read_json(storage.join(uri, META))
    except StorageError as e:
        raise WeightsError(f"{uri} has no readable {META}: {e.message}", hint) from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise WeightsError(f"{uri}/{META} is not a defectflow DDPM description", hint)
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise WeightsError(f"{uri} was written by a newer defectflow (format {meta['format_version']})",
                           "upgrade defectflow")
    try:
        params = InpaintDDPMParams.model_validate(meta.get("params") or {})
    except ValidationError as e:
        raise WeightsError(f"{uri}/{META} holds invalid params: {e}", "the file is damaged; re-train or re-save") from e
    state = read_state_dict(storage.join(uri, WEIGHTS), "the folder is incomplete or damaged; re-save the model")
    model = InpaintDDPM(params)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        raise WeightsError(f"{uri}: {WEIGHTS} does not match the architecture in {META} "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]}, shape mismatches {mismatched[:3]})",
                           "the weights and ddpm.json come from different models; re-save the model")
    model.load_state_dict(state, strict=True)
    meta["uri"] = uri
    return model.to(device).eval(), meta


# ------------------------------------------------------------------------------------------ training data


def square_window(bbox: tuple[int, int, int, int], shape: tuple[int, int], context: float = DEFAULT_CONTEXT,
                  min_side: int = DEFAULT_MIN_SIDE, shift: tuple[float, float] = (0.0, 0.0)) -> tuple[int, int, int]:
    """``(top, left, side)`` of a square window around ``bbox = (y0, x0, y1, x1)`` (end-exclusive).

    Square, because the model's input is square and a stretched crop would teach stretched defects. The window is
    slid inside the image where it fits; when it is larger than the image along an axis it is centred and overhangs
    (the overhang is edge-padded by :func:`crop_square`). ``shift`` moves the centre by fractions of the side
    (training jitter).
    """
    y0, x0, y1, x1 = bbox
    h, w = shape
    side = math.ceil(max(y1 - y0, x1 - x0) * (1 + 2 * max(0.0, context)))
    side = max(side, min_side, 1)
    side = min(side, max(h, w))
    side = max(side, y1 - y0, x1 - x0)
    cy = (y0 + y1) / 2 + shift[0] * side
    cx = (x0 + x1) / 2 + shift[1] * side

    def place(c: float, lo_box: int, hi_box: int, n: int) -> int:
        start = round(c - side / 2)
        start = min(max(start, hi_box - side), lo_box)  # keep the box inside the window
        if side <= n:
            return min(max(start, 0), n - side)
        return -((side - n) // 2)

    return place(cy, y0, y1, h), place(cx, x0, x1, w), side


def crop_square(arr: np.ndarray, top: int, left: int, side: int) -> np.ndarray:
    """The window's pixels. Where the window overhangs the image, float images repeat their edge (plausible
    surface for the model to see) and uint8 masks pad with 0 (edge-repeating a mask would invent defects)."""
    h, w = arr.shape[:2]
    pt, pl = max(0, -top), max(0, -left)
    pb, pr = max(0, top + side - h), max(0, left + side - w)
    y0, x0 = max(0, top), max(0, left)
    piece = arr[y0:min(h, top + side), x0:min(w, left + side)]
    if pt or pl or pb or pr:
        pad = ((pt, pb), (pl, pr)) + ((0, 0),) * (arr.ndim - 2)
        piece = np.pad(piece, pad, mode="constant" if arr.dtype == np.uint8 else "edge")
    return piece


def mask_to_size(mask: np.ndarray, size: int) -> np.ndarray:
    """Area-resample then keep every pixel that any defect pixel touches: nearest-neighbour downscaling drops
    1-px scratches, and the model must be asked to draw wherever the defect is."""
    if mask.shape == (size, size):
        return (mask > 0).astype(np.uint8)
    img = Image.fromarray((mask > 0).astype(np.float32), mode="F")
    return (np.asarray(img.resize((size, size), Image.BOX)) > 1e-6).astype(np.uint8)


def image_to_size(image: np.ndarray, size: int) -> np.ndarray:
    from components.data.images import resize_image

    return resize_image(image.astype(np.float32), (size, size))


def defect_boxes(mask: np.ndarray, *, per_component: bool = True, min_area: int = 4,
                 max_boxes: int | None = 8) -> list[tuple[int, int, int, int]]:
    """``(y0, x0, y1, x1)`` of each defect (8-connected component, largest first), or of the whole mask."""
    from scipy import ndimage

    if not mask.any():
        return []
    if not per_component:
        ys, xs = np.nonzero(mask)
        return [(int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)]
    labels, n = ndimage.label(mask > 0, structure=np.ones((3, 3), dtype=bool))
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    boxes = []
    for i, sl in enumerate(ndimage.find_objects(labels)):
        if sl is not None and areas[i] >= min_area:
            boxes.append((int(areas[i]), (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)))
    if not boxes:  # only specks: one box around all of them rather than nothing
        return defect_boxes(mask, per_component=False)
    boxes.sort(key=lambda ab: -ab[0])
    return [b for _, b in boxes[:max_boxes]]


def crops_from_manifest_rows(rows: Iterable[Mapping[str, Any]] | Any, resolution: int, rng: np.random.Generator,
                             context: float = DEFAULT_CONTEXT, *, min_side: int = DEFAULT_MIN_SIDE,
                             jitter: float = 0.1, per_component: bool = True, min_area: int = 4,
                             max_per_image: int = 8,
                             include_synthetic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Training data: a square crop around each real defect (with ``context`` margin, see :func:`square_window`),
    resized to ``resolution``. Returns crops (N,3,R,R) in [−1, 1] and masks (N,1,R,R) in {0, 1}.

    ``rows``: manifest rows (dicts) or a manifest pyarrow Table; only rows with a non-empty pixel mask count, and
    synthetic rows only with ``include_synthetic`` (a model trained on its own output drifts). The mask of a crop
    holds *every* defect pixel in the window, so neighbouring defects are never taught as background. ``jitter``
    scales the context by a factor in [1 − 2.5·jitter, 1 + 2.5·jitter] (±25 % at 0.1) and shifts the centre by
    up to ``jitter`` of the side, drawn from ``rng``, so that the model sees defects at varied scales and positions
    (the generator uses the unjittered window).
    """
    from components.data.manifest import load_image, load_mask

    if hasattr(rows, "to_pylist"):
        rows = rows.to_pylist()
    crops, masks = [], []
    n_rows = 0
    for rec in rows:
        if rec.get("source", "real") != "real" and not include_synthetic:
            continue
        if rec.get("label") == 0 or not (rec.get("mask_bytes") or rec.get("mask_uri")):
            continue
        image = load_image(rec)
        mask = load_mask(rec, shape=image.shape[:2])
        if mask is None or not mask.any():
            continue
        n_rows += 1
        for box in defect_boxes(mask, per_component=per_component, min_area=min_area, max_boxes=max_per_image):
            ctx = context * (1 + rng.uniform(-2.5, 2.5) * jitter) if jitter else context
            shift = (rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter)) if jitter else (0.0, 0.0)
            top, left, side = square_window(box, mask.shape, max(0.0, ctx), min_side, shift)
            crops.append(image_to_size(crop_square(image, top, left, side), resolution))
            masks.append(mask_to_size(crop_square(mask, top, left, side), resolution))
    if not crops:
        raise DataError("no defect with a pixel mask among the manifest rows",
                        "train the DDPM on a dataset with defect masks (e.g. ingest --dataset procedural)")
    log.info("ddpm: %d defect crops of %d² from %d images", len(crops), resolution, n_rows)
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous() * 2 - 1
    m = torch.from_numpy(np.stack(masks)).unsqueeze(1).float()
    return x.float(), m


def train_on_rows(rows: Iterable[Mapping[str, Any]] | Any, params: InpaintDDPMParams | None = None, *,
                  steps: int = 2000, batch_size: int = 16, lr: float = 2e-4, mask_weight: float = 1.0,
                  context: float = DEFAULT_CONTEXT, min_side: int = DEFAULT_MIN_SIDE, jitter: float = 0.1,
                  rotate: bool = True, seed: int = 0, device: str | torch.device = "cpu",
                  progress: bool = True) -> tuple[InpaintDDPM, dict[str, Any]]:
    """Crops, a fresh model and :func:`fit` in one call; returns the model and the ``training`` dict for
    :func:`save`. Its ``crop`` entry is how the "ddpm" generator frames requests the way the model was trained."""
    params = params or InpaintDDPMParams()
    rng = np.random.default_rng(seed)
    crops, masks = crops_from_manifest_rows(rows, params.resolution, rng, context, min_side=min_side, jitter=jitter)
    torch.manual_seed(seed)
    model = InpaintDDPM(params).to(device)
    losses = fit(model, crops, masks, steps=steps, batch_size=batch_size, lr=lr, mask_weight=mask_weight,
                 rotate=rotate, seed=seed, progress=progress)
    tail = losses[-min(50, len(losses)):] or [float("nan")]
    training = {
        "crop": {"context": context, "min_side": min_side, "jitter": jitter},
        "num_crops": int(crops.shape[0]), "steps": steps, "batch_size": batch_size, "lr": lr,
        "mask_weight": mask_weight, "rotate": rotate, "seed": seed,
        "loss_first": losses[0] if losses else None, "loss_final": float(sum(tail) / len(tail)),
    }
    return model, training
