"""LoRA fine-tuning of an inpainting pipeline's UNet on real defect crops (SynSur's "LoRA-adapted diffusion").

A base inpainting model knows "scratch" and "stain" from the web, not the pitting of one ball-screw drive; a few
hundred real defect crops and a rank-4 adapter on the attention projections teach it the look of *these* defects for
a few MB of weights, while the frozen base keeps its knowledge of surfaces. The adapter is saved in diffusers' LoRA
format, so the ``diffusion`` generator loads it with ``pipe.load_lora_weights`` like any community LoRA.

Pure functions, no Ray: the ``train-synth`` workflow (kind ``lora``) wraps them in a Ray Train loop::

    pipe = load_pipeline(uri, device)
    add_lora(pipe, rank=4, alpha=4)
    scheduler = training_scheduler(pipe)
    opt = torch.optim.AdamW(trainable_parameters(pipe), lr=1e-4)
    for crops, masks, classes in batches:
        batch = prepare_lora_batch(crops, masks, prompts, resolution=512)
        loss = lora_training_step(pipe, batch, scheduler, opt, generator=gen)
    save_lora(pipe, out_dir)        # then storage.upload_dir(out_dir, "s3://...")

The objective is the one the inpainting model was trained with (9-channel UNets: noisy latents + latent-size mask
+ masked-image latents in, noise out), so the adapter learns to *fill holes* with the defect, which is exactly how it
is used; a 4-channel (text-to-image) UNet, which diffusers' inpaint pipelines also accept, gets plain denoising of
the crop instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from components import storage
from components.errors import DataError, StorageError, WeightsError

log = logging.getLogger(__name__)

ADAPTER = "default"  # the name peft gives the adapter added for training
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@dataclass
class LoraBatch:
    """``images`` (B,3,R,R) in [-1,1]; ``masks`` (B,1,R,R) in {0,1}, 1 = defect; one prompt per image."""

    images: Any
    masks: Any
    prompts: list[str]


def add_lora(pipe: Any, rank: int = 4, alpha: float = 4.0,
             target_modules: Sequence[str] = TARGET_MODULES, dropout: float = 0.0,
             init_lora_weights: bool | str = "gaussian") -> list[Any]:
    """Freeze the pipeline and add a trainable LoRA adapter to the UNet's attention projections; returns the
    trainable parameters. They are kept in fp32 even on an fp16 pipeline, because Adam updates of fp16 weights
    underflow (diffusers' training examples cast them the same way; peft casts activations at the boundary).

    ``init_lora_weights="gaussian"`` (B = 0) starts as the base model, as training should; ``False`` starts
    random, which tests use to see an adapter change the output without training it for long."""
    import torch
    from peft import LoraConfig

    for module in (pipe.unet, pipe.vae, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout),
                        init_lora_weights=init_lora_weights, target_modules=list(target_modules))
    pipe.unet.add_adapter(config)
    if pipe.vae.dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.to(dtype=torch.float32)  # the SD/SDXL VAEs overflow to NaN when encoding in fp16
    params = trainable_parameters(pipe)
    for p in params:
        p.data = p.data.to(torch.float32)
    n = sum(p.numel() for p in params)
    log.info("LoRA rank %d alpha %g on %s: %d trainable parameters", rank, alpha, list(target_modules), n)
    return params


def trainable_parameters(pipe: Any) -> list[Any]:
    return [p for p in pipe.unet.parameters() if p.requires_grad]


def training_scheduler(pipe: Any) -> Any:
    """A DDPM noise scheduler with the pipeline's own beta schedule and prediction type: training adds noise with
    the forward process the model was trained on, whatever sampler the pipeline uses for inference."""
    from diffusers import DDPMScheduler

    cfg = dict(pipe.scheduler.config)
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
            "steps_offset", "timestep_spacing", "rescale_betas_zero_snr")
    return DDPMScheduler(**{k: cfg[k] for k in keep if k in cfg})


def prepare_lora_batch(crops: Any, masks: Any, prompts: Sequence[str], resolution: int) -> LoraBatch:
    """Tensors for :func:`lora_training_step` from crops (N,3,H,W) in [-1,1] (or (N,H,W,3) in [0,1]) and masks
    (N,1,H,W) / (N,H,W), resized to ``resolution`` (bilinear for images, nearest for masks)."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.asarray(crops), dtype=torch.float32)
    m = torch.as_tensor(np.asarray(masks), dtype=torch.float32)
    if x.ndim != 4:
        raise DataError(f"LoRA crops must be a batch (N,3,H,W), got shape {tuple(x.shape)}")
    if x.shape[1] != 3 and x.shape[-1] == 3:  # (N,H,W,3) in [0,1]
        x = x.permute(0, 3, 1, 2) * 2.0 - 1.0
    if m.ndim == 3:
        m = m[:, None]
    if x.shape[1] != 3 or m.ndim != 4 or m.shape[1] != 1 or m.shape[0] != x.shape[0]:
        raise DataError(f"LoRA crops {tuple(x.shape)} and masks {tuple(m.shape)} do not match",
                        "crops (N,3,H,W) in [-1,1], masks (N,1,H,W)")
    if len(prompts) != x.shape[0]:
        raise DataError(f"{len(prompts)} prompts for {x.shape[0]} crops")
    if resolution % 8:
        raise DataError(f"LoRA resolution {resolution} is not a multiple of 8")
    if tuple(x.shape[-2:]) != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    if tuple(m.shape[-2:]) != (resolution, resolution):
        m = F.interpolate(m, size=(resolution, resolution), mode="nearest")
    return LoraBatch(images=x.clamp(-1, 1), masks=(m > 0.5).float(), prompts=[str(p) for p in prompts])


def _encode_text(pipe: Any, prompts: list[str], device: Any, size: int) -> tuple[Any, dict[str, Any] | None]:
    """(encoder_hidden_states, added_cond_kwargs): SDXL also conditions on pooled text and size/crop time ids."""
    import torch

    if hasattr(pipe, "text_encoder_2"):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        if getattr(pipe.config, "requires_aesthetics_score", False):
            ids = [size, size, 0, 0, 6.0]  # original size, crop top-left, aesthetic score
        else:
            ids = [size, size, 0, 0, size, size]  # original size, crop top-left, target size
        time_ids = torch.tensor([ids] * len(prompts), device=device, dtype=embeds.dtype)
        return embeds, {"text_embeds": pooled, "time_ids": time_ids}
    embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    return embeds, None


def _vae_encode(pipe: Any, x: Any, generator: Any) -> Any:
    dist = pipe.vae.encode(x.to(pipe.vae.dtype)).latent_dist
    noise = _randn(dist.mean.shape, generator, dist.mean.device, dist.mean.dtype)
    latents = dist.mean + dist.std * noise
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * pipe.vae.config.scaling_factor


def _randn(shape: Any, generator: Any, device: Any, dtype: Any) -> Any:
    """Noise from ``generator`` wherever it lives (the Ray loop passes a CPU generator to a GPU worker)."""
    import torch

    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device, dtype)


def lora_loss(pipe: Any, batch: LoraBatch, noise_scheduler: Any, generator: Any = None) -> Any:
    """The noise-prediction MSE of one batch (differentiable in the LoRA parameters only)."""
    import torch
    import torch.nn.functional as F

    unet = pipe.unet
    device, dtype = unet.device, unet.conv_in.weight.dtype  # not unet.dtype: fp32 LoRA params on an fp16 UNet
    images = batch.images.to(device)
    masks = batch.masks.to(device)
    size = images.shape[-1]
    with torch.no_grad():
        latents = _vae_encode(pipe, images, generator).to(dtype)
        hidden, added = _encode_text(pipe, batch.prompts, device, size)
        inpaint = unet.config.in_channels == 9
        if inpaint:
            masked = _vae_encode(pipe, images * (masks < 0.5), generator).to(dtype)
            mask_lat = F.interpolate(masks, size=latents.shape[-2:]).to(dtype)
    noise = _randn(latents.shape, generator, device, dtype)
    n_train = noise_scheduler.config.num_train_timesteps
    gen_device = generator.device if generator is not None else device
    t = torch.randint(0, n_train, (latents.shape[0],), generator=generator, device=gen_device).to(device).long()
    noisy = noise_scheduler.add_noise(latents, noise, t)
    model_in = torch.cat([noisy, mask_lat, masked], dim=1) if inpaint else noisy
    pred = unet(model_in, t, encoder_hidden_states=hidden.to(dtype), added_cond_kwargs=added,
                return_dict=False)[0]
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, t)
    else:
        target = noise
    return F.mse_loss(pred.float(), target.float())


def lora_training_step(pipe: Any, batch: LoraBatch, noise_scheduler: Any, optimizer: Any,
                       generator: Any = None, max_grad_norm: float | None = 1.0) -> float:
    """One optimiser step on the LoRA parameters (gradient clipping as in diffusers' examples); returns the loss."""
    import torch

    was_training = pipe.unet.training
    pipe.unet.train()
    try:
        loss = lora_loss(pipe, batch, noise_scheduler, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable_parameters(pipe), max_grad_norm)
        optimizer.step()
    finally:
        pipe.unet.train(was_training)
    return float(loss.detach())


def _lora_metadata(pipe: Any) -> dict[str, Any] | None:
    """The LoraConfig, so loading restores rank *and* alpha (without it diffusers assumes alpha = rank)."""
    cfg = getattr(pipe.unet, "peft_config", {}).get(ADAPTER)
    if cfg is None:
        return None
    d = cfg.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}


def save_lora(pipe: Any, out_dir: str) -> str:
    """Write the trained adapter as ``pytorch_lora_weights.safetensors`` in diffusers' LoRA format to a local
    folder (upload it with ``storage.upload_dir``); returns the folder."""
    from peft.utils import get_peft_model_state_dict

    if not getattr(pipe.unet, "peft_config", None):
        raise WeightsError("the pipeline's UNet has no LoRA adapter to save", "call add_lora(pipe, ...) first")
    state = get_peft_model_state_dict(pipe.unet, adapter_name=ADAPTER)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    os.makedirs(out_dir, exist_ok=True)
    type(pipe).save_lora_weights(save_directory=out_dir, unet_lora_layers=state, safe_serialization=True,
                                 weight_name=WEIGHT_NAME, unet_lora_adapter_metadata=_lora_metadata(pipe))
    log.info("saved LoRA (%d tensors) to %s", len(state), out_dir)
    return out_dir


def load_lora_state(pipe: Any, lora_dir: str) -> None:
    """Put saved adapter weights back into the *trainable* adapter of :func:`add_lora` (resuming training), as
    opposed to :func:`load_lora`, which adds a new inference adapter."""
    from peft.utils import set_peft_model_state_dict

    state = type(pipe).lora_state_dict(lora_dir, weight_name=WEIGHT_NAME)
    state = state[0] if isinstance(state, tuple) else state
    prefix = "unet."
    unet_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not unet_state:
        raise WeightsError(f"{lora_dir} holds no UNet LoRA weights", "point to a folder written by save_lora")
    result = set_peft_model_state_dict(pipe.unet, unet_state, adapter_name=ADAPTER)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if unexpected:
        raise WeightsError(f"{lora_dir} does not match the adapter's layers ({len(unexpected)} unexpected keys, "
                           f"e.g. {unexpected[0]})", "resume with the same rank and target modules")


def load_lora(pipe: Any, dir_or_uri: str, adapter_name: str = "defect", weight: float = 1.0,
              activate: bool = True) -> str:
    """Load a diffusers-format LoRA (local folder, file or s3:// URI, cached once per process) as ``adapter_name``.
    With ``activate``, it joins the already active adapters at ``weight``; returns the adapter name."""
    try:
        local = storage.cached_local_dir(dir_or_uri)
    except StorageError as e:
        raise WeightsError(f"LoRA {dir_or_uri} is not readable: {e.message}",
                           "give a folder written by save_lora (or any diffusers LoRA), local or s3://") from e
    kwargs: dict[str, Any] = {}
    if os.path.isdir(local):
        if os.path.isfile(os.path.join(local, WEIGHT_NAME)):
            kwargs["weight_name"] = WEIGHT_NAME
        else:
            files = sorted(f for f in os.listdir(local) if f.endswith(".safetensors"))
            if len(files) != 1:
                raise WeightsError(f"LoRA folder {dir_or_uri} holds {len(files)} .safetensors files",
                                   f"expected one, normally {WEIGHT_NAME} (written by save_lora)")
            kwargs["weight_name"] = files[0]
    elif not os.path.isfile(local):
        raise WeightsError(f"LoRA {dir_or_uri} does not exist", "give a folder written by save_lora")
    try:
        pipe.load_lora_weights(local, adapter_name=adapter_name, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise WeightsError(f"cannot load LoRA {dir_or_uri} into {type(pipe).__name__}: {e}",
                           "the adapter must be trained on the same base model family") from e
    if activate:
        weights = dict(getattr(pipe, "_defectflow_lora_weights", {}))
        active = [a for a in pipe.get_active_adapters() if a != adapter_name]
        names = [*active, adapter_name]
        weights[adapter_name] = float(weight)
        pipe.set_adapters(names, adapter_weights=[weights.get(n, 1.0) for n in names])
        pipe._defectflow_lora_weights = weights
    log.info("loaded LoRA %s as %r (weight %g)", dir_or_uri, adapter_name, weight)
    return adapter_name
