"""The ``diffusion`` generator, the tiny offline pipelines and LoRA fine-tuning, on CPU without the hub.

Every pipeline here is a tiny random one built into tmp_path (SD inpaint with a 9-channel UNet, SDXL inpaint with a
4-channel UNet), run at 64 px with 2 steps. Torch runs single-threaded in this module: on a shared 2-core machine
OpenMP threads fighting another job made the tiny UNet 10x slower, not faster.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch

from components.errors import ConfigError, DataError, WeightsError
from components.synthesis import lora as lora_mod
from components.synthesis import tiny_pipelines
from components.synthesis.generators import diffusion
from components.synthesis.generators.base import SynthesisRequest, create_generator, generators

FAST = {"num_inference_steps": 2, "guidance_scale": 1.0, "device": "cpu"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> str:
    return tiny_pipelines.build_tiny_sd_inpaint(tmp_path_factory.mktemp("pipes") / "tiny-sd-inpaint")


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> str:
    return tiny_pipelines.build_tiny_sdxl_inpaint(tmp_path_factory.mktemp("pipes") / "tiny-sdxl-inpaint")


@pytest.fixture(scope="module")
def sd_gen(tiny_sd):
    return create_generator("diffusion", {"model": tiny_sd, **FAST})


def _image(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth gradient with mild noise: a stand-in surface whose pixels the VAE cannot reproduce exactly."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([0.3 + 0.4 * xx, 0.4 + 0.3 * yy, 0.5 + 0.2 * xx * yy], axis=-1)
    return np.clip(base + rng.normal(0, 0.03, base.shape), 0, 1).astype(np.float32)


def _mask(h: int = 64, w: int = 64) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[h // 4: h // 2, w // 4: w // 2 + 4] = 1
    return m


def _requests(h: int = 64, w: int = 64, seeds=(0, 1), cls: str = "scratch") -> list[SynthesisRequest]:
    img, m = _image(h, w), _mask(h, w)
    return [SynthesisRequest(image=img, mask=m, defect_class=cls, seed=s, source_id=f"n{s}") for s in seeds]


def _files(folder: str) -> dict[str, str]:
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


# ------------------------------------------------------------------------------------------ tiny pipelines


def test_tiny_builds_are_seeded_and_load_offline(tmp_path, tiny_sd, tiny_sdxl):
    from diffusers import AutoPipelineForInpainting

    again = tiny_pipelines.build_tiny_sd_inpaint(tmp_path / "again")
    weights = {k: v for k, v in _files(again).items() if k.endswith(".safetensors")}
    assert weights and weights == {k: v for k, v in _files(tiny_sd).items() if k.endswith(".safetensors")}
    other = tiny_pipelines.build_tiny_sd_inpaint(tmp_path / "other", seed=1)
    assert _files(other)["unet/diffusion_pytorch_model.safetensors"] != weights[
        "unet/diffusion_pytorch_model.safetensors"]

    sd = AutoPipelineForInpainting.from_pretrained(tiny_sd, local_files_only=True)
    xl = AutoPipelineForInpainting.from_pretrained(tiny_sdxl, local_files_only=True)
    assert type(sd).__name__ == "StableDiffusionInpaintPipeline" and sd.unet.config.in_channels == 9
    assert type(xl).__name__ == "StableDiffusionXLInpaintPipeline" and xl.unet.config.in_channels == 4
    assert diffusion.native_resolution(sd) == tiny_pipelines.SD_INPAINT_SIZE
    assert sd.scheduler.config.steps_offset == 1 and xl.scheduler.config.steps_offset == 1
    vocab = tiny_pipelines.char_vocab()
    ids = sd.tokenizer("Copper metal scratches!").input_ids
    assert ids[0] == vocab[tiny_pipelines.BOS] and ids[-1] == vocab[tiny_pipelines.EOS]
    assert len(ids) == len("coppermetalscratches!") + 2  # one token per character, lower-cased, no unknowns
    assert sd.tokenizer.model_max_length == 77 == xl.tokenizer_2.model_max_length
    assert sd.text_encoder.config.vocab_size == len(vocab) == xl.text_encoder_2.config.vocab_size
    assert sd.text_encoder.config.eos_token_id == vocab[tiny_pipelines.EOS]


# ------------------------------------------------------------------------------------------ generation


def test_registered_and_options_validated(tiny_sd):
    assert "diffusion" in generators()
    with pytest.raises(ConfigError, match="multiple of 8"):
        create_generator("diffusion", {"model": tiny_sd, "resolution": 60})
    with pytest.raises(ConfigError, match="unknown_key"):
        create_generator("diffusion", {"model": tiny_sd, "unknown_key": 1})
    with pytest.raises(ConfigError, match="preset"):
        create_generator("diffusion", {"model": tiny_sd, "preset": "nope"})


def test_sd_inpaint_size_determinism_and_paste_back(sd_gen):
    reqs = _requests()
    out = sd_gen.generate(reqs)
    assert len(out) == 2
    for r, res in zip(reqs, out, strict=True):
        assert res.image.shape == (64, 64, 3) and res.image.dtype == np.float32
        assert res.image.min() >= 0.0 and res.image.max() <= 1.0
        assert np.array_equal(res.mask, r.mask) and res.mask.dtype == np.uint8
        info = res.info
        assert info["generator"] == "diffusion" and info["seed"] == r.seed and info["steps"] == 2
        assert info["model"] == {"uri": sd_gen.options.model, "class": "StableDiffusionInpaintPipeline"}
        assert info["prompt"] == "scratch on an industrial surface" and info["resolution"] == 64
        assert info["lora"] == [] and info["strength"] == 1.0 and info["guidance"] == 1.0

    again = sd_gen.generate(reqs)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(out, again, strict=True))  # same seed, same image
    assert not np.array_equal(out[0].image, out[1].image)  # the seed matters

    # paste-back: bit-identical where the feathered band ends, repainted inside the mask
    img, m = reqs[0].image, reqs[0].mask
    alpha = diffusion.paste_alpha(m, sd_gen.options.paste_back_dilate, sd_gen.options.paste_back_feather)
    outside = alpha == 0
    assert outside.mean() > 0.4
    assert np.array_equal(out[0].image[outside], img[outside])
    inside = m > 0
    assert np.abs(out[0].image - img)[inside].mean() > 0.05
    # the band is no wider than dilate + 3 x feather (+1 for rounding)
    ys, xs = np.nonzero(alpha > 0)
    reach = sd_gen.options.paste_back_dilate + 3 * sd_gen.options.paste_back_feather + 1
    mys, mxs = np.nonzero(inside)
    assert ys.min() >= mys.min() - reach and xs.max() <= mxs.max() + reach


def test_without_paste_back_the_vae_changes_everything(tiny_sd, sd_gen):
    reqs = _requests(seeds=(0,))
    raw = create_generator("diffusion", {"model": tiny_sd, **FAST, "paste_back": False}).generate(reqs)[0]
    pasted = sd_gen.generate(reqs)[0]
    outside = diffusion.paste_alpha(reqs[0].mask, 4, 3.0) == 0
    assert np.abs(raw.image - reqs[0].image)[outside].mean() > 1e-3  # a random VAE is far from lossless
    inside = reqs[0].mask > 0
    assert np.array_equal(raw.image[inside], pasted.image[inside])


def test_batching_does_not_change_images(tiny_sd, sd_gen):
    """Per-request generators: an image depends on its seed, not on the batch it lands in."""
    reqs = _requests(seeds=(3, 4, 5))
    single = create_generator("diffusion", {"model": tiny_sd, **FAST, "batch_size": 1}).generate(reqs)
    batched = sd_gen.generate(reqs)
    for a, b in zip(single, batched, strict=True):
        assert np.abs(a.image - b.image).max() < 2 / 255  # batched matmuls may differ in the last bit


def test_empty_mask_passes_through_and_bad_shapes_fail(sd_gen):
    img = _image()
    res = sd_gen.generate([SynthesisRequest(image=img, mask=np.zeros((64, 64), np.uint8), defect_class="x",
                                            seed=0)])[0]
    assert np.array_equal(res.image, img) and res.info["skipped"] == "empty mask"
    with pytest.raises(DataError, match="mask shape"):
        sd_gen.generate([SynthesisRequest(image=img, mask=np.ones((32, 32), np.uint8), defect_class="x", seed=0)])


def test_prompts_per_class_template_and_request(tiny_sd):
    g = create_generator("diffusion", {
        "model": tiny_sd, **FAST, "mask_blur": 2, "attention_slicing": True,
        "surface": "a ball screw drive", "negative_prompt": "blurry",
        "template": ["{defect} on {surface}", "a {defect}"],
        "prompts": {"pitting": {"prompt": "pitting corrosion on {surface}", "negative_prompt": "smooth"},
                    "crack": "a thin {defect} in {surface}"}})
    r = SynthesisRequest(image=_image(), mask=_mask(), defect_class="pitting", seed=0)
    assert g.prompts_for(r) == ("pitting corrosion on a ball screw drive", "smooth")
    r.defect_class = "crack"
    assert g.prompts_for(r) == ("a thin crack in a ball screw drive", "blurry")
    r.defect_class, r.seed = "oil_stain", 1
    assert g.prompts_for(r) == ("a oil stain", "blurry")  # template list cycled by seed, underscores as spaces
    r.prompt, r.negative_prompt = "VLM says: {defect} with {odd} braces", ""
    assert g.prompts_for(r) == ("VLM says: oil stain with {odd} braces", "")
    res = g.generate([SynthesisRequest(image=_image(), mask=_mask(), defect_class="pitting", seed=2)])[0]
    assert res.info["prompt"] == "pitting corrosion on a ball screw drive" and res.info["negative_prompt"] == "smooth"


def test_exdd_preset_fills_defaults_and_yields_to_options():
    o = diffusion.DiffusionOptions.model_validate({"model": "/x", "preset": "exdd_sdxl"})
    assert (o.strength, o.num_inference_steps, o.guidance_scale, o.padding_mask_crop, o.resolution) == \
        (0.99, 30, 20.0, 2, 1024)
    assert o.negative_prompt == "smooth, plain, black, dark, shadow"
    assert o.template == ["white marks on the wall", "copper metal scratches"] and o.lora == []
    o = diffusion.DiffusionOptions.model_validate({"model": "/x", "preset": "exdd_sdxl", "num_inference_steps": 15,
                                                   "resolution": 512})
    assert (o.num_inference_steps, o.resolution, o.guidance_scale) == (15, 512, 20.0)


def test_sdxl_exdd_preset_generates_at_request_size(tiny_sdxl):
    """ExDD's call on the tiny SDXL pipeline: non-square images are inpainted square and resized back, with
    padding_mask_crop (one image per call) and CFG 20 with the negative prompt."""
    g = create_generator("diffusion", {"model": tiny_sdxl, "preset": "exdd_sdxl", "resolution": 64,
                                       "num_inference_steps": 2, "device": "cpu"})
    reqs = _requests(48, 80, seeds=(0, 1))
    out = g.generate(reqs)
    assert [o.image.shape for o in out] == [(48, 80, 3)] * 2
    assert [o.info["prompt"] for o in out] == ["white marks on the wall", "copper metal scratches"]
    assert out[0].info["negative_prompt"] == "smooth, plain, black, dark, shadow"
    assert out[0].info["model"]["class"] == "StableDiffusionXLInpaintPipeline" and out[0].info["guidance"] == 20.0
    assert out[0].info["preset"] == "exdd_sdxl" and out[0].info["padding_mask_crop"] == 2
    assert np.array_equal(g.generate(reqs[:1])[0].image, out[0].image)
    inside = reqs[0].mask > 0
    assert np.abs(out[0].image - reqs[0].image)[inside].mean() > 0.05


def test_missing_model_raises_weights_error_with_hint(tmp_path):
    with pytest.raises(WeightsError, match="does not exist") as e:
        create_generator("diffusion", {"model": str(tmp_path / "nowhere"), "device": "cpu"})
    assert "tiny_pipelines" in str(e.value) and "local folder" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=r"model_index\.json"):
        create_generator("diffusion", {"model": str(tmp_path / "empty"), "device": "cpu"})
    (tmp_path / "empty" / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionInpaintPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}')
    with pytest.raises(WeightsError, match="cannot load StableDiffusionInpaintPipeline"):
        create_generator("diffusion", {"model": str(tmp_path / "empty"), "device": "cpu"})


# ------------------------------------------------------------------------------------------ LoRA


def test_prepare_lora_batch_layouts_and_errors():
    rng = np.random.default_rng(0)
    b = lora_mod.prepare_lora_batch(rng.random((3, 40, 40, 3)), rng.random((3, 40, 40)) > 0.5, ["a", "b", "c"], 64)
    assert tuple(b.images.shape) == (3, 3, 64, 64) and tuple(b.masks.shape) == (3, 1, 64, 64)
    assert b.images.min() >= -1 and b.images.max() <= 1 and set(b.masks.unique().tolist()) <= {0.0, 1.0}
    b = lora_mod.prepare_lora_batch(rng.random((2, 3, 32, 32)) * 2 - 1, rng.random((2, 1, 32, 32)), ["a", "b"], 32)
    assert tuple(b.images.shape) == (2, 3, 32, 32)
    with pytest.raises(DataError, match="prompts"):
        lora_mod.prepare_lora_batch(rng.random((2, 3, 32, 32)), rng.random((2, 1, 32, 32)), ["a"], 32)


def _train(pipe, steps: int = 2) -> list[float]:
    opt = torch.optim.AdamW(lora_mod.trainable_parameters(pipe), lr=1e-3)
    sched = lora_mod.training_scheduler(pipe)
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    batch = lora_mod.prepare_lora_batch(rng.random((2, 3, 32, 32)) * 2 - 1, rng.random((2, 1, 32, 32)) > 0.5,
                                        ["scratch", "pit"], 64)
    return [lora_mod.lora_training_step(pipe, batch, sched, opt, generator=gen) for _ in range(steps)]


def test_lora_train_save_load_round_trip(tmp_path, tiny_sd, sd_gen):
    pipe = diffusion.load_pipeline(tiny_sd, device="cpu")
    params = lora_mod.add_lora(pipe, rank=4, alpha=4, init_lora_weights=False)
    assert params and all(p.dtype == torch.float32 for p in params)
    frozen = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "lora" not in k}
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if p.requires_grad}
    assert len(before) == len(params) and all("lora" in n for n in before)
    losses = _train(pipe)
    assert len(losses) == 2 and all(np.isfinite(losses))
    after = dict(pipe.unet.named_parameters())
    assert before and all(not torch.equal(before[n], after[n]) for n in before)  # LoRA parameters moved...
    now = pipe.unet.state_dict()
    assert all(torch.equal(frozen[k], now[k]) for k in frozen)  # ...and nothing else did

    out = lora_mod.save_lora(pipe, str(tmp_path / "lora"))
    assert os.listdir(out) == [lora_mod.WEIGHT_NAME]

    # resume: the saved weights go back into the trainable adapter
    trained = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in lora_mod.trainable_parameters(pipe):
            p.zero_()
    lora_mod.load_lora_state(pipe, out)
    assert all(torch.equal(trained[n], p) for n, p in pipe.unet.named_parameters() if p.requires_grad)

    g = create_generator("diffusion", {"model": tiny_sd, **FAST,
                                       "lora": [{"uri": out, "weight": 1.0, "adapter_name": "pitting"}]})
    assert "pitting" in g.pipe.get_active_adapters()
    reqs = _requests(seeds=(0,))
    with_lora, base = g.generate(reqs)[0], sd_gen.generate(reqs)[0]
    assert with_lora.info["lora"] == [{"uri": out, "weight": 1.0, "adapter_name": "pitting"}]
    inside, outside = reqs[0].mask > 0, diffusion.paste_alpha(reqs[0].mask, 4, 3.0) == 0
    assert np.abs(with_lora.image - base.image)[inside].mean() > 1e-3  # ~5e-3: the tiny UNet moves little
    assert np.array_equal(with_lora.image[outside], base.image[outside])


def test_lora_step_on_sdxl_4_channel_unet(tmp_path, tiny_sdxl):
    pipe = diffusion.load_pipeline(tiny_sdxl, device="cpu")
    lora_mod.add_lora(pipe, rank=4, alpha=8)
    losses = _train(pipe, steps=1)
    assert np.isfinite(losses[0])
    out = lora_mod.save_lora(pipe, str(tmp_path / "lora-xl"))
    fresh = diffusion.load_pipeline(tiny_sdxl, device="cpu")
    lora_mod.load_lora(fresh, out, adapter_name="xl", weight=0.5)
    assert fresh.get_active_adapters() == ["xl"]


def test_s3_model_and_lora_are_downloaded_once(tmp_path, tiny_sd, s3_bucket, monkeypatch):
    from components import storage

    monkeypatch.setenv("DEFECTFLOW_CACHE", str(tmp_path / "cache"))
    pipe = diffusion.load_pipeline(tiny_sd, device="cpu")
    lora_mod.add_lora(pipe, rank=2, alpha=2, init_lora_weights=False)
    lora_dir = lora_mod.save_lora(pipe, str(tmp_path / "lora"))
    storage.upload_dir(tiny_sd, f"{s3_bucket}/models/tiny-sd")
    storage.upload_dir(lora_dir, f"{s3_bucket}/models/tiny-sd-lora")
    opts = {"model": f"{s3_bucket}/models/tiny-sd", **FAST, "lora": [{"uri": f"{s3_bucket}/models/tiny-sd-lora"}]}
    g = create_generator("diffusion", opts)
    assert g.pipe.get_active_adapters() == ["lora0"]
    assert g.model_class == "StableDiffusionInpaintPipeline"
    cached = sorted(os.listdir(tmp_path / "cache" / "copies"))
    assert len(cached) == 2 and not any(c.startswith(".tmp") for c in cached)
    storage.delete(f"{s3_bucket}/models/tiny-sd", recursive=True)  # a second load must not need S3
    g2 = create_generator("diffusion", opts)
    res = g2.generate(_requests(seeds=(0,)))[0]
    assert res.info["model"]["uri"] == opts["model"] and res.image.shape == (64, 64, 3)
