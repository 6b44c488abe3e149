"""Tiny random diffusers inpainting pipelines, built and saved without the Hugging Face hub.

Real inpainting weights (SD 1.5/2 inpaint, SDXL inpaint) are gigabytes behind the hub, which CI, air-gapped
clusters and ``defectflow bench synth`` cannot reach. These builders assemble the same pipeline classes from random
components the size of diffusers' own fast tests (UNet ~1.4 M parameters), so the whole ``diffusion`` generator path
-- ``AutoPipelineForInpainting.from_pretrained``, prompts, masks, LoRA loading and training -- runs offline in
seconds. The images are noise-like: use them to check plumbing and speed, never quality.

The upstream tests load their tokenizer from the hub (``hf-internal-testing/tiny-random-clip``); here a character-level
CLIP vocabulary is written next to the pipeline instead, and the text encoders' ``vocab_size``/``bos``/``eos``/``pad``
ids match it. Everything is seeded, so two builds are bit-identical (the tests rely on it).

    python -m components.synthesis.tiny_pipelines /tmp/tiny-sd-inpaint            # SD inpaint (9-channel UNet)
    python -m components.synthesis.tiny_pipelines /tmp/tiny-sdxl-inpaint --sdxl   # SDXL inpaint (4-channel UNet)
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
SD_INPAINT_SIZE = 64    # native pixel size of the tiny SD inpaint pipeline (UNet sample_size 32 x VAE factor 2)
SDXL_INPAINT_SIZE = 64  # the size diffusers' fast SDXL inpaint tests run at


def char_vocab() -> dict[str, int]:
    """Printable ASCII, its end-of-word forms, then BOS and EOS: with an empty merges table CLIP's BPE falls back
    to single characters, so every ASCII prompt tokenizes without unknown tokens."""
    chars = [chr(c) for c in range(33, 127)]
    tokens = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer(folder: str | os.PathLike) -> Any:
    """A CLIPTokenizer from a locally written vocabulary. ``model_max_length`` must be explicit: transformers 5
    otherwise keeps its 'infinite' sentinel and truncation overflows (``OverflowError: int too big to convert``)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(char_vocab()))
    merges_file.write_text("#version: 0.2\n")
    return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=MODEL_MAX_LENGTH)


def _text_config(**extra: Any) -> Any:
    from transformers import CLIPTextConfig

    vocab = char_vocab()
    return CLIPTextConfig(bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS],
                          vocab_size=len(vocab), hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
                          num_attention_heads=4, num_hidden_layers=5, max_position_embeddings=MODEL_MAX_LENGTH,
                          **extra)


def _vae(**extra: Any) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=4, **extra)


def _save(pipe: Any, path: str | os.PathLike) -> str:
    """Save atomically (temp sibling + rename) so a half-written folder never looks like a pipeline."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(os.path.join(path, "model_index.json")):
        import shutil

        shutil.rmtree(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-pipeline-", dir=os.path.dirname(path) or ".")
    pipe.save_pretrained(tmp, safe_serialization=True)
    if os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)
    os.replace(tmp, path)
    log.info("saved tiny %s to %s", type(pipe).__name__, path)
    return path


def tiny_sd_inpaint_pipeline(seed: int = 0) -> Any:
    """The in-memory tiny SD inpaint pipeline (9-channel UNet: noisy latents + mask + masked-image latents)."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as tok_dir:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=9,
                                    out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
        scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1)
        torch.manual_seed(seed)
        vae = _vae()
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_text_config())
        tokenizer = build_tokenizer(tok_dir)
        return StableDiffusionInpaintPipeline(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                              tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                              image_encoder=None, requires_safety_checker=False)


def tiny_sdxl_inpaint_pipeline(seed: int = 0) -> Any:
    """The in-memory tiny SDXL inpaint pipeline (4-channel UNet: diffusers blends the known region per step)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as tok_dir:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
                                    out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                    use_linear_projection=True, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                    projection_class_embeddings_input_dim=72,  # 5 time ids x 8 + pooled text 32
                                    cross_attention_dim=64)
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                           beta_schedule="scaled_linear", timestep_spacing="leading")
        torch.manual_seed(seed)
        vae = _vae(sample_size=128)
        torch.manual_seed(seed)
        config = _text_config(hidden_act="gelu", projection_dim=32)
        text_encoder = CLIPTextModel(config)
        text_encoder_2 = CLIPTextModelWithProjection(config)
        tokenizer = build_tokenizer(os.path.join(tok_dir, "1"))
        tokenizer_2 = build_tokenizer(os.path.join(tok_dir, "2"))
        return StableDiffusionXLInpaintPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                                tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                                scheduler=scheduler, requires_aesthetics_score=True)


def build_tiny_sd_inpaint(path: str | os.PathLike, seed: int = 0) -> str:
    """Save a tiny random SD inpaint pipeline to ``path`` (a local folder); returns its absolute path."""
    return _save(tiny_sd_inpaint_pipeline(seed), path)


def build_tiny_sdxl_inpaint(path: str | os.PathLike, seed: int = 0) -> str:
    """Save a tiny random SDXL inpaint pipeline to ``path`` (a local folder); returns its absolute path."""
    return _save(tiny_sdxl_inpaint_pipeline(seed), path)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Build a tiny random diffusers inpainting pipeline for offline tests.")
    p.add_argument("path", help="output folder")
    p.add_argument("--sdxl", action="store_true", help="SDXL inpaint instead of SD inpaint")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    (build_tiny_sdxl_inpaint if args.sdxl else build_tiny_sd_inpaint)(args.path, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
