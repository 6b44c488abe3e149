"""defectflow's own inpainting DDPM: training signal, sampling guarantees, artifact round trip, the "ddpm" generator
and the training crops (no Ray, no downloads).

Everything runs a UNet of ~0.2 M parameters at 32² on one thread: at this size the model is overhead-bound, and a
second thread only competes with whatever else the machine runs. What is tested does not need a good model: that
the loss falls when overfitting, that sampling is seeded and never touches pixels outside the mask, that a little
training moves the drawing toward the training data, and that weights survive the disk exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from components.data.adapters import ingest
from components.errors import ConfigError, DataError, WeightsError
from components.synthesis import ddpm
from components.synthesis.generators.base import SynthesisRequest, create_generator

RES = 32
TINY = {"resolution": RES, "block_out_channels": (16, 32)}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(seed: int = 0, **kw) -> ddpm.InpaintDDPM:
    torch.manual_seed(seed)
    return ddpm.InpaintDDPM(ddpm.InpaintDDPMParams(**{**TINY, **kw})).eval()


def squares(n: int, seed: int, *, bright: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Dark noisy surface in [−1, 1] with a square mask; with ``bright`` the square is painted near-white."""
    g = np.random.default_rng(seed)
    x = np.full((n, 3, RES, RES), -0.6, np.float32) + g.normal(0, 0.05, (n, 3, RES, RES)).astype(np.float32)
    m = np.zeros((n, 1, RES, RES), np.float32)
    for i in range(n):
        s = int(g.integers(8, 14))
        y, xx = (int(v) for v in g.integers(4, RES - s - 4, size=2))
        m[i, :, y:y + s, xx:xx + s] = 1
        if bright:
            x[i, :, y:y + s, xx:xx + s] = 0.9
    return torch.from_numpy(x).clamp(-1, 1), torch.from_numpy(m)


def gens(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def inside_mean(images: torch.Tensor, masks: torch.Tensor) -> float:
    return float((images * masks).sum() / (masks.sum() * images.shape[1]))


# ------------------------------------------------------------------------------------------------ params


def test_params_reject_inconsistent_architectures():
    with pytest.raises(ValidationError, match="divisible by 2"):
        ddpm.InpaintDDPMParams(resolution=36, block_out_channels=(16, 32, 32, 32))
    with pytest.raises(ValidationError, match="norm_num_groups"):
        ddpm.InpaintDDPMParams(block_out_channels=(12, 32))
    with pytest.raises(ValidationError, match="epsilon"):
        ddpm.InpaintDDPMParams(mode="repaint", prediction_type="v_prediction")
    with pytest.raises(ValidationError, match="extra"):
        ddpm.InpaintDDPMParams(resolutoin=64)


def test_modes_differ_in_what_the_unet_sees():
    cond, rep = tiny(), tiny(mode="repaint")
    assert cond.unet.config.in_channels == 7 and rep.unet.config.in_channels == 3
    x, m = squares(2, 0)
    assert cond(x, torch.tensor([10, 500]), x * (1 - m), m).shape == (2, 3, RES, RES)
    assert rep(x, 10).shape == (2, 3, RES, RES)
    with pytest.raises(ValueError, match="masked_image"):
        cond(x, 10)


# ---------------------------------------------------------------------------------------------- training


def test_training_step_loss_falls_when_overfitting_a_tiny_batch():
    model = tiny().train()
    sched = ddpm.noise_scheduler(model.params)
    x, m = squares(8, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        loss = ddpm.training_step(model, sched, x, m, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    assert last < 0.7 * first, (first, last)


def test_mask_weight_is_a_weighted_mean_that_reduces_to_mse():
    model = tiny()
    sched = ddpm.noise_scheduler(model.params)
    x, m = squares(4, 1)

    def loss(masks, w):
        with torch.no_grad():
            return float(ddpm.training_step(model, sched, x, masks, torch.Generator().manual_seed(3), mask_weight=w))

    # a uniform weight (all-outside or all-inside) is the plain MSE whatever its value
    zeros, ones = torch.zeros_like(m), torch.ones_like(m)
    assert loss(zeros, 5.0) == pytest.approx(loss(zeros, 1.0), rel=1e-5)
    # (the conditioning differs between all-zero and all-one masks, so compare each to itself)
    assert loss(ones, 5.0) == pytest.approx(loss(ones, 1.0), rel=1e-5)
    assert loss(m, 1.0 + 1e-6) == pytest.approx(loss(m, 1.0), rel=1e-4)
    assert loss(m, 10.0) != pytest.approx(loss(m, 1.0), rel=1e-3)


def test_augment_transforms_crop_and_mask_alike():
    _, m = squares(16, 2)
    crops = m.expand(-1, 3, -1, -1).clone()
    c2, m2 = ddpm.augment_dihedral(crops, m, torch.Generator().manual_seed(0))
    assert torch.equal(c2, m2.expand(-1, 3, -1, -1))
    assert not torch.equal(m2, m)  # 16 samples: some transform other than the identity was drawn


# ---------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(("mode", "scheduler"), [("conditional", "ddim"), ("conditional", "ddpm"),
                                                 ("conditional", "repaint"), ("repaint", "repaint"),
                                                 ("repaint", "ddim")])
def test_sampling_is_seeded_and_keeps_every_pixel_outside_the_mask(mode, scheduler):
    model = tiny(mode=mode)
    x, m = squares(2, 3)
    images = (x + 1) / 2
    kw = {"steps": 4, "scheduler": scheduler, "jump_length": 2, "jump_n_sample": 2}
    a = ddpm.sample(model, images, m, generator=gens([1, 2]), **kw)
    b = ddpm.sample(model, images, m, generator=gens([1, 2]), **kw)
    c = ddpm.sample(model, images, m, generator=gens([7, 8]), **kw)
    assert a.shape == images.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    outside = (m == 0).expand_as(images)
    assert torch.equal(a[outside], images[outside])
    assert torch.equal(c[outside], images[outside])
    assert not torch.allclose(a[~outside], c[~outside])


def test_a_sample_does_not_depend_on_its_batch():
    model = tiny()
    x, m = squares(3, 4)
    images = (x + 1) / 2
    batch = ddpm.sample(model, images, m, steps=3, generator=gens([5, 6, 7]))
    alone = ddpm.sample(model, images[1:2], m[1:2], steps=3, generator=gens([6]))
    torch.testing.assert_close(batch[1:2], alone, atol=1e-4, rtol=0)


def test_sample_rejects_bad_shapes():
    model = tiny()
    with pytest.raises(ValueError, match="masks"):
        ddpm.sample(model, torch.rand(1, 3, RES, RES), torch.ones(1, 3, RES, RES))
    with pytest.raises(ValueError, match="divisible"):
        ddpm.sample(model, torch.rand(1, 3, 31, 31), torch.ones(1, 1, 31, 31))


def test_a_little_training_draws_the_training_defects_inside_the_mask():
    """Crops whose masks always hold a bright square; sampling on plain dark surface must draw brighter inside
    the mask than the same network before training. v-prediction, because its target carries x0 even at high noise:
    the conditional mean is learnt in a few dozen steps, where epsilon prediction needs hundreds (it is the same
    code path otherwise: training_step, fit, DDIM with known-region replacement)."""
    untrained = tiny(seed=0, prediction_type="v_prediction")
    model = tiny(seed=0, prediction_type="v_prediction")
    x, m = squares(8, 0)
    losses = ddpm.fit(model, x, m, steps=40, batch_size=8, lr=3e-3, warmup=5, progress=False)
    assert np.mean(losses[-10:]) < np.mean(losses[:5])
    xt, mt = squares(4, 1, bright=False)
    images = (xt + 1) / 2
    before = inside_mean(ddpm.sample(untrained, images, mt, steps=10, generator=gens(range(4))), mt)
    after = inside_mean(ddpm.sample(model, images, mt, steps=10, generator=gens(range(4))), mt)
    target = inside_mean((x + 1) / 2, m)  # ~0.95, the painted squares
    assert after > before + 0.15, (before, after, target)
    assert abs(after - target) < abs(before - target)


# ------------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = tiny(seed=1)
    uri = ddpm.save(model, None, str(tmp_path / "m"), training={"crop": {"context": 0.3, "min_side": 8}})
    loaded, meta = ddpm.load(uri)
    assert loaded.params == model.params
    assert meta["training"]["crop"]["context"] == 0.3 and meta["uri"] == uri
    x, m = squares(2, 5)
    a = ddpm.sample(model, (x + 1) / 2, m, steps=3, generator=gens([0, 1]))
    b = ddpm.sample(loaded, (x + 1) / 2, m, steps=3, generator=gens([0, 1]))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="params"):
        ddpm.save(model, ddpm.InpaintDDPMParams(), str(tmp_path / "other"))


def test_damaged_or_mismatched_files_raise_weights_error(tmp_path):
    uri = ddpm.save(tiny(), None, str(tmp_path / "m"))
    meta_path, weights_path = tmp_path / "m" / ddpm.META, tmp_path / "m" / ddpm.WEIGHTS
    good_meta, good_weights = meta_path.read_text(), weights_path.read_bytes()

    with pytest.raises(WeightsError, match=r"ddpm\.json"):
        ddpm.load(str(tmp_path / "nowhere"))

    weights_path.write_bytes(good_weights[: len(good_weights) // 2])
    with pytest.raises(WeightsError, match="safetensors"):
        ddpm.load(uri)
    weights_path.write_bytes(good_weights)

    meta = json.loads(good_meta)
    meta["params"]["block_out_channels"] = [16, 64]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="shape mismatches"):
        ddpm.load(uri)

    meta = json.loads(good_meta)
    meta["params"]["mode"] = "repaint"  # 3 input channels instead of 7
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="does not match"):
        ddpm.load(uri)

    meta_path.write_text("{not json")
    with pytest.raises(WeightsError, match=r"ddpm\.json"):
        ddpm.load(uri)

    meta_path.write_text(json.dumps({"format": "defectflow-detector"}))
    with pytest.raises(WeightsError, match="not a defectflow DDPM"):
        ddpm.load(uri)


# --------------------------------------------------------------------------------------------- generator


def test_ddpm_generator_end_to_end(tmp_path):
    uri = ddpm.save(tiny(seed=2), None, str(tmp_path / "m"), training={"crop": {"context": 0.5, "min_side": 16}})
    gen = create_generator("ddpm", {"model": uri, "steps": 3, "device": "cpu", "batch_size": 2})
    rng = np.random.default_rng(0)
    image = rng.uniform(0.2, 0.4, (96, 96, 3)).astype(np.float32)
    corner = np.zeros((96, 96), np.uint8)
    corner[2:10, 84:95] = 1  # near the border: the window must be slid/clipped
    centre = np.zeros((96, 96), np.uint8)
    centre[40:46, 30:60] = 1  # a wide, thin scratch
    reqs = [SynthesisRequest(image=image, mask=corner, defect_class="scratch", seed=11),
            SynthesisRequest(image=image, mask=centre, defect_class="scratch", seed=12),
            SynthesisRequest(image=image, mask=np.zeros((96, 96), np.uint8), defect_class="scratch", seed=13),
            SynthesisRequest(image=image, mask=centre, defect_class="scratch", seed=11)]
    out = gen.generate(reqs)
    assert len(out) == 4
    for req, res in zip(reqs, out, strict=True):
        assert res.image.shape == (96, 96, 3) and res.image.dtype == np.float32
        assert np.array_equal(res.mask, req.mask)
        assert np.array_equal(res.image[req.mask == 0], image[req.mask == 0])
        assert res.image.min() >= 0 and res.image.max() <= 1
        assert res.info["generator"] == "ddpm" and res.info["model"] == uri and res.info["seed"] == req.seed
        assert res.info["steps"] == 3 and res.info["mode"] == "conditional"
    assert not np.array_equal(out[0].image, image) and not np.array_equal(out[1].image, image)
    assert np.array_equal(out[2].image, image) and out[2].info.get("skipped") == "empty mask"
    assert not np.allclose(out[1].image, out[3].image)  # same mask, different seed
    again = gen.generate([reqs[1]])[0]  # alone instead of in a batch: same drawing up to float rounding
    np.testing.assert_allclose(again.image, out[1].image, atol=1e-3)

    with pytest.raises(ConfigError, match="options"):
        create_generator("ddpm", {"model": uri, "stpes": 3})
    with pytest.raises(WeightsError):
        create_generator("ddpm", {"model": str(tmp_path / "missing")})


# ---------------------------------------------------------------------------------------------- crops


def test_crops_from_manifest_rows_on_procedural_data():
    table = ingest("procedural", None, options={"count": 8, "size": 64})
    defective = sum(1 for v in table.column("label").to_pylist() if v == 1)
    x, m = ddpm.crops_from_manifest_rows(table, RES, np.random.default_rng(0))
    assert x.shape[0] >= defective > 0
    assert x.shape[1:] == (3, RES, RES) and m.shape == (x.shape[0], 1, RES, RES)
    assert x.min() >= -1 and x.max() <= 1
    assert set(torch.unique(m).tolist()) <= {0.0, 1.0}
    assert bool((m.flatten(1).sum(1) > 0).all())
    x2, m2 = ddpm.crops_from_manifest_rows(table.to_pylist(), RES, np.random.default_rng(0))
    assert torch.equal(x, x2) and torch.equal(m, m2)
    normal = [r for r in table.to_pylist() if r["label"] == 0]
    with pytest.raises(DataError, match="mask"):
        ddpm.crops_from_manifest_rows(normal, RES, np.random.default_rng(0))


def test_train_on_rows_records_how_to_frame_requests(tmp_path):
    table = ingest("procedural", None, options={"count": 6, "size": 64, "defect_fraction": 1.0})
    params = ddpm.InpaintDDPMParams(**TINY)
    model, training = ddpm.train_on_rows(table, params, steps=2, batch_size=4, context=0.25, min_side=8,
                                         progress=False)
    assert training["crop"] == {"context": 0.25, "min_side": 8, "jitter": 0.1} and training["num_crops"] >= 6
    uri = ddpm.save(model, params, str(tmp_path / "m"), training=training)
    gen = create_generator("ddpm", {"model": uri, "steps": 2, "device": "cpu"})
    assert (gen.context, gen.min_window) == (0.25, 8)
    assert create_generator("ddpm", {"model": uri, "context": 1.0}).context == 1.0


def test_windows_are_square_contain_the_defect_and_stay_in_the_image():
    top, left, side = ddpm.square_window((2, 84, 10, 95), (96, 96), 0.5, 16)
    assert side == 22 and 0 <= top <= 2 and left + side == 96 and top + side >= 10
    top, left, side = ddpm.square_window((0, 0, 40, 10), (40, 200), 0.5, 16)  # taller than the image
    assert side == 80 and top == -20 and left == 0
    crop = ddpm.crop_square(np.ones((40, 200, 3), np.float32), top, left, side)
    assert crop.shape == (80, 80, 3) and crop.min() == 1  # edge-padded
    mask = np.ones((40, 200), np.uint8)
    assert ddpm.crop_square(mask, top, left, side)[:20].max() == 0  # masks pad with zeros
    line = np.zeros((128, 128), np.uint8)
    line[60, :] = 1
    assert ddpm.mask_to_size(line, 32).sum() > 0  # a 1-px scratch survives downscaling
    assert ddpm.defect_boxes(line) == [(60, 0, 61, 128)]
