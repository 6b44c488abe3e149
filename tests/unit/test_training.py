"""The torch side of training (components/training.py): resuming the optimizer from a checkpoint that is no
pickle continues exactly where it stopped, and validation metrics are the evaluation definitions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from components.metrics.image import roc_auc
from components.metrics.sample import confusion, iou_from_counts, pooled_iou
from components.models.base import Batch
from components.training import (
    ValidationMeter,
    make_optimizer,
    make_scheduler,
    optimizer_state,
    restore_optimizer_state,
)


@pytest.mark.parametrize(("kind", "schedule"), [("adam", "cosine"), ("adamw", "multistep"), ("sgd", "none")])
def test_a_resumed_optimizer_continues_exactly(tmp_path, kind, schedule):
    optim = {"optimizer": kind, "lr": 0.1, "weight_decay": 0.01, "lr_schedule": schedule, "epochs": 10,
             "milestones": [0.5, 0.8], "gamma": 0.4}

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
