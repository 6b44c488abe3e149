"""The torch side of training (components/training.py): resuming the optimizer from a checkpoint that is no
pickle continues exactly where it stopped, and validation metrics are the evaluation definitions."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from components.metrics.image import roc_auc
from components.metrics.sample import confusion, iou_from_counts, pooled_iou
from components.models.base import Batch
from components.training import (
    OneCycle,
    ValidationMeter,
    WeightAverage,
    make_optimizer,
    make_scheduler,
    optimizer_state,
    restore_optimizer_state,
)


@pytest.mark.parametrize(("kind", "schedule"), [("adam", "cosine"), ("adamw", "multistep"), ("sgd", "none"),
                                                ("adam", "onecycle"), ("adam", "cosine_restarts")])
def test_a_resumed_optimizer_continues_exactly(tmp_path, kind, schedule):
    optim = {"optimizer": kind, "lr": 0.1, "weight_decay": 0.01, "lr_schedule": schedule, "epochs": 10,
             "milestones": [0.5, 0.8], "gamma": 0.4, "warmup_fraction": 0.2, "restart_epochs": 2,
             "restart_mult": 2}

    def build(model):
        opt = make_optimizer([{"params": list(model.parameters()), "lr": 0.1, "weight_decay": 0.01}], optim)
        return opt, make_scheduler(opt, optim)

    def steps(model, opt, sched, n, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(n):
            model(torch.rand(8, 4, generator=gen)).square().sum().backward()
            opt.step()
            opt.zero_grad()
            if sched is not None:
                sched.step()

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt, sched = build(model)
    steps(model, opt, sched, 3, seed=1)
    tensors, meta = optimizer_state(opt, sched)
    save_file(tensors, str(tmp_path / "opt.safetensors"))  # what a checkpoint holds: safetensors + JSON
    (tmp_path / "opt.json").write_text(json.dumps(meta))
    resumed = torch.nn.Linear(4, 2)
    resumed.load_state_dict(model.state_dict())
    opt2, sched2 = build(resumed)
    restore_optimizer_state(opt2, sched2, load_file(str(tmp_path / "opt.safetensors")),
                            json.loads((tmp_path / "opt.json").read_text()))
    steps(model, opt, sched, 4, seed=2)
    steps(resumed, opt2, sched2, 4, seed=2)
    assert torch.equal(model.weight, resumed.weight) and torch.equal(model.bias, resumed.bias)
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


def test_validation_meter_uses_the_evaluation_definitions():
    rng = np.random.default_rng(0)
    maps = torch.from_numpy(rng.random((5, 1, 8, 8)).astype(np.float32))
    masks = torch.zeros(5, 1, 8, 8)
    masks[0, 0, 2:5, 2:5] = 1
    masks[1, 0, 0:2, :] = 1
    has = torch.tensor([True, True, True, False, True])
    labels = torch.tensor([1.0, 1.0, 0.0, 1.0, -1.0])
    scores = torch.tensor([0.9, 0.4, 0.3, 0.8, 0.5])
    meter = ValidationMeter(threshold=0.5)
    meter.add(torch.tensor(2.0), scores[:3], maps[:3], Batch(torch.zeros(3, 3, 8, 8), masks[:3], labels[:3], has[:3]))
    meter.add(torch.tensor(4.0), scores[3:], maps[3:], Batch(torch.zeros(2, 3, 8, 8), masks[3:], labels[3:], has[3:]))
    m = meter.metrics()
    counts = [confusion(maps[i, 0].numpy() >= 0.5, masks[i, 0].numpy())[:3] for i in (0, 1, 2, 4)]
    assert m["val_images"] == 5 and m["val_loss"] == 3.0
    assert m["val_iou"] == pytest.approx(np.mean([iou_from_counts(*c) for c in counts]))
    assert m["val_iou_pooled"] == pytest.approx(pooled_iou(counts))
    assert m["val_mae"] == pytest.approx(np.mean([float((maps[i] - masks[i]).abs().mean()) for i in (0, 1, 2, 4)]))
    assert m["val_image_auroc"] == pytest.approx(roc_auc([1, 1, 0, 1], [0.9, 0.4, 0.3, 0.8]))  # -1: unknown


def _val_table(n_def: int, n_norm: int = 20):
    import pyarrow as pa

    n = n_def + n_norm + 4
    return pa.table({"split": ["val"] * (n_def + n_norm) + ["train"] * 4,
                     "label": [1] * n_def + [0] * n_norm + [0, 1, 0, 1],
                     "supervision": ["pixel"] * n})


@pytest.mark.parametrize(("family", "base"), [("gmbinet", "val_iou_pooled"), ("supersimplenet", "val_image_auroc")])
def test_few_defective_validation_images_warn_and_smooth_the_choice(caplog, tmp_path, family, base):
    from tests.helpers import train_config
    from workflows.trainer import selection_metric, smoothing_window

    model = {"family": family, "params": {} if family == "gmbinet" else {"backbone": {"weights": "random"}}}
    cfg = train_config(str(tmp_path), "m.parquet", model=model)
    with caplog.at_level("WARNING", logger="defectflow.train"):
        assert selection_metric(_val_table(12), cfg) == (base, "max")
    assert not caplog.records
    with caplog.at_level("WARNING", logger="defectflow.train"):
        select, mode = selection_metric(_val_table(3), cfg)
    assert (select, mode) == (f"{base}_mean3", "max") and smoothing_window(select) == (base, 3)
    assert "only 3 defective" in caplog.text and "val_fraction" in caplog.text
    fixed = train_config(str(tmp_path), "m.parquet", model=model, checkpoint={"smoothing": 1})
    assert selection_metric(_val_table(3), fixed)[0] == base  # the user's choice wins (still warned)
    assert selection_metric(_val_table(12), train_config(str(tmp_path), "m.parquet", model=model,
                                                         checkpoint={"smoothing": 4}))[0] == f"{base}_mean4"
    assert smoothing_window("val_loss") is None and smoothing_window(None) is None


def test_per_group_clipping_keeps_a_small_head_step_that_a_global_clip_shrinks():
    from components.training import clip_gradients

    big, small = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    model = torch.nn.ModuleList([big, small])

    def grads(per_group):
        opt = torch.optim.SGD([{"params": big.parameters()}, {"params": small.parameters()}], lr=0.1)
        opt.zero_grad()
        x = torch.ones(2, 4)
        (100.0 * big(x).sum() + 0.01 * small(x).sum()).backward()  # one loss dominates the norm
        norms = clip_gradients(opt, model, 1.0, per_group)
        return norms, torch.cat([p.grad.flatten() for p in small.parameters()]).norm().item()

    (big_norm, small_norm), small_kept = grads(True)
    assert big_norm > 100 and small_kept == pytest.approx(small_norm)  # the small head's step is untouched
    (total,), small_global = grads(False)
    assert total > 100 and small_global < small_norm / 100  # a global clip scales it down with the big one



def test_one_cycle_warms_up_then_anneals_to_almost_nothing():
    f = OneCycle(epochs=20, warmup_fraction=0.1)
    lrs = [f(e) for e in range(20)]
    assert lrs[0] == pytest.approx(1 / 25) and lrs[2] == pytest.approx(1.0)  # two warm-up epochs, then the peak
    assert lrs[0] < lrs[1] < lrs[2]
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:]))
    assert lrs[-1] == pytest.approx(1e-4)
    assert OneCycle(epochs=1)(0) == pytest.approx(1.0)  # a one-epoch run trains at the peak, never at zero


def test_weight_average_follows_the_weights_and_gives_them_back():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    ema = WeightAverage(model, decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model.train()
    model(torch.randn(8, 3))  # moves the BatchNorm statistics and its integer counter
    ema.update(model)
    d = ema.current_decay()
    assert d == pytest.approx(2 / 11)  # warm-up: (1 + t) / (10 + t) after one update, below the 0.9 asked for
    expected = start["0.weight"] * (2 / 11) + model[0].weight.detach() * (9 / 11)
    assert torch.allclose(ema.shadow["0.weight"], expected, atol=1e-6)
    assert int(ema.shadow["1.num_batches_tracked"]) == 1
    raw = model[0].weight.detach().clone()
    with ema.applied(model):
        assert torch.allclose(model[0].weight, ema.shadow["0.weight"])
    assert torch.equal(model[0].weight, raw)  # the raw weights keep training
    for _ in range(200):
        ema.update(model)
    assert ema.current_decay() == pytest.approx(0.9)
    assert torch.allclose(ema.shadow["0.weight"], raw, atol=1e-5)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model, decay=1.0)


def _marked_batch(b: int, h: int, w: int):
    """Images whose first channel is the mask (an asymmetric L-shape), features = the mask pooled 4x: any
    augmentation that moves one without the others shows."""
    masks = torch.zeros(b, 1, h, w)
    masks[:, :, 4:12, 4:8] = 1.0
    masks[:, :, 8:12, 4:16] = 1.0
    images = torch.cat([masks, torch.rand(b, 2, h, w)], dim=1)
    features = torch.nn.functional.avg_pool2d(masks, 4)
    return images, masks, features


def test_geometric_augmentation_moves_image_mask_and_features_together():
    from components.data.loading import augment_batch

    images, masks, features = _marked_batch(64, 32, 32)
    gen = torch.Generator().manual_seed(0)
    out_i, out_m, out_f = augment_batch(images, masks, features, {"hflip": True, "vflip": True, "rot90": True}, gen)
    assert torch.equal(out_i[:, :1], out_m)
    assert torch.allclose(torch.nn.functional.avg_pool2d(out_m, 4), out_f)
    assert len({tuple(m.flatten().nonzero().flatten().tolist()) for m in out_m}) == 8  # the 8 symmetries of a square
    assert torch.equal(masks, _marked_batch(1, 32, 32)[1].expand(64, -1, -1, -1))  # inputs untouched
    again = augment_batch(images, masks, features, {"hflip": True, "vflip": True, "rot90": True},
                          torch.Generator().manual_seed(0))
    assert torch.equal(again[1], out_m)  # seeded: a resumed or repeated run sees the same batches

    images, masks, features = _marked_batch(32, 32, 48)  # not square: only 0 or 180 degrees keep the shape
    out_i, out_m, _ = augment_batch(images, masks, None, {"rot90": True}, torch.Generator().manual_seed(1))
    assert out_m.shape == masks.shape and torch.equal(out_i[:, :1], out_m)
    assert len({tuple(m.flatten().nonzero().flatten().tolist()) for m in out_m}) == 2


def test_photometric_and_scale_augmentation_keep_masks_aligned_and_pixels_in_range():
    from components.data.loading import augment_batch

    images, masks, _ = _marked_batch(32, 32, 32)
    out_i, out_m, _ = augment_batch(images, masks, None, {"scale_jitter": 0.5}, torch.Generator().manual_seed(2))
    assert set(out_m.unique().tolist()) <= {0.0, 1.0}
    agree = ((out_i[:, :1] > 0.5) == (out_m > 0.5)).float().mean()
    assert agree > 0.97  # bilinear image vs nearest mask differ only on the borders of the zoomed shape
    assert out_m.sum() > masks.sum()  # zooming in enlarges the marked shape where it stays in view

    flat = torch.full((16, 3, 8, 8), 0.5)
    out_i, out_m, _ = augment_batch(flat, torch.zeros(16, 1, 8, 8), None, {"brightness": 0.2, "contrast": 0.3},
                                    torch.Generator().manual_seed(3))
    shifts = out_i.mean(dim=(1, 2, 3)) - 0.5
    assert shifts.abs().max() <= 0.2 + 1e-6 and shifts.std() > 0.01
    assert out_i.min() >= 0.0 and out_i.max() <= 1.0 and not out_m.any()


def test_pixel_augmentations_are_refused_for_cached_features():
    from pydantic import ValidationError

    from components.config import DataSettings

    DataSettings(manifest="m.parquet", features="auto", augment={"rot90": True})
    with pytest.raises(ValidationError, match=r"data\.features: null"):
        DataSettings(manifest="m.parquet", features="auto", augment={"brightness": 0.1})
def test_training_rows_are_mixed_not_read_folder_by_folder():
    import pyarrow as pa

    from workflows.train_data import permuted

    labels = [1] * 200 + [0] * 660 + [1] * 80  # Magnetic Tile's training split, as its manifest lists it
    table = pa.table({"sample_id": [f"s{i}" for i in range(len(labels))], "label": labels})
    mixed = permuted(table, seed=0)
    assert sorted(mixed["sample_id"].to_pylist()) == sorted(table["sample_id"].to_pylist())
    assert mixed.equals(permuted(table, seed=0)) and not mixed.equals(permuted(table, seed=1))
    first = mixed["label"].to_pylist()
    # every window of 8 batches of 8 now holds both classes in about their overall share (30 % defective)
    shares = [sum(first[i:i + 64]) / 64 for i in range(0, len(first) - 64, 64)]
    assert all(0.1 < s < 0.5 for s in shares), shares
