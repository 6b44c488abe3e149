"""Ray Train: training, evaluation, registry, checkpoint/resume, DDP and resource checks (local and S3)."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components import artifact, catalog, storage
from components.config import deep_merge
from components.data import manifest
from components.errors import ResourceError, WeightsError
from tests.helpers import procedural_manifest, random_artifact, train_config
from workflows import train
from workflows.evaluate import evaluate

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def local_manifest(tmp_path_factory):
    return procedural_manifest(str(tmp_path_factory.mktemp("data") / "manifest.parquet"), count=64, size=64)


def test_train_evaluates_registers_and_learns(ray_session, tmp_path, local_manifest):
    cfg = train_config(str(tmp_path / "store"), local_manifest, name="learn",
                       optim={"epochs": 6}, model={"params": {"n": 4}})
    res = train.run(cfg)
    layout = catalog.Layout(cfg.storage.root)
    # artifact in the run folder and a registered copy
    assert storage.exists(storage.join(res.artifact_uri, "model.safetensors"))
    assert res.registered_uri == layout.model("gmbinet", "1")
    _det, meta = artifact.load(res.registered_uri)
    assert meta["family"] == "gmbinet" and meta["lineage"]["manifest_digest"].startswith("sha256:")
    assert meta["metrics"]["test_iou"] == res.metrics["test_iou"]
    # report: metrics.json, per-image CSV, sheet PNG, per-epoch history
    assert storage.read_json(storage.join(res.report_uri, "metrics.json"))["split"] == "test"
    assert storage.read_bytes(res.sheet_uri)[:8] == b"\x89PNG\r\n\x1a\n"
    history = storage.read_json(storage.join(res.report_uri, "history.json"))
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert storage.read_bytes(res.curves_uri)[:8] == b"\x89PNG\r\n\x1a\n"  # the training curves
    # it learned: an untrained GMBINet's map is flat (pixel AUROC ~0.5); six epochs separate defect pixels from
    # the background on held-out images, and the training loss falls
    assert res.metrics["test_pixel_auroc"] > 0.75, res.metrics
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    untrained = evaluate(random_artifact(str(tmp_path / "untrained"), size=64, n=4), manifest.read(local_manifest),
                         split="test", sheet_images=0)
    assert untrained.metrics["pixel_auroc"] < res.metrics["test_pixel_auroc"] - 0.1


def test_rerun_resumes_from_last_checkpoint(ray_session, tmp_path, local_manifest):
    # with the weight average, a one-cycle schedule and every augmentation: the resumed state holds all of them
    root = str(tmp_path / "store")
    recipe = {"optim": {"ema_decay": 0.9, "lr_schedule": "onecycle"},
              "data": {"augment": {"rot90": True, "brightness": 0.1, "contrast": 0.1, "scale_jitter": 0.2}}}
    train.run(train_config(root, local_manifest, name="resume", **deep_merge(recipe, {"optim": {"epochs": 1}})))
    res = train.run(train_config(root, local_manifest, name="resume", **deep_merge(recipe, {"optim": {"epochs": 3}})))
    history = storage.read_json(storage.join(res.report_uri, "history.json"))
    assert [h["epoch"] for h in history] == [1, 2, 3]
    last = max(p for p in glob.glob(str(tmp_path / "store" / "runs" / "resume" / "checkpoint_*")) if os.path.isdir(p))
    averaged, raw = (load_file(os.path.join(last, f)) for f in ("model.safetensors", "train.safetensors"))
    assert averaged.keys() == raw.keys() and any(not torch.equal(averaged[k], raw[k]) for k in raw)
    assert json.loads(Path(last, "state.json").read_text())["ema_updates"] > 0
    # the first run's epoch-1 checkpoint was reused, not retrained: three epochs in all, two registered versions
    assert catalog.Layout(root).versions("gmbinet") == ["1", "2"]


def test_resume_with_another_model_is_refused(ray_session, tmp_path, local_manifest):
    root = str(tmp_path / "store")
    train.run(train_config(root, local_manifest, name="fp", optim={"epochs": 1}))
    with pytest.raises(WeightsError, match="different model"):
        train.run(train_config(root, local_manifest, name="fp", optim={"epochs": 2}, model={"params": {"n": 4}}))


def test_two_workers_ddp(ray_session, tmp_path, local_manifest):
    cfg = train_config(str(tmp_path / "store"), local_manifest, name="ddp", optim={"epochs": 1},
                       scaling={"num_workers": 2, "cpus_per_worker": 1})
    res = train.run(cfg)
    assert storage.exists(storage.join(res.run_uri, "artifact", "detector.json"))
    # validation during training scored every validation image once, as evaluation does on the same split
    table = manifest.read(local_manifest)
    # at the pixel threshold validation used while training (0.5 until the artifact's is calibrated)
    val = evaluate(res.artifact_uri, table, split="val", sheet_images=0, threshold=cfg.eval.provisional_threshold())
    assert res.val_metrics["val_images"] == val.metrics["n_images"] == manifest.summary(table)["val"]["rows"]
    assert res.val_metrics["val_iou_pooled"] == pytest.approx(val.metrics["iou_pooled"], abs=0.02)


def test_unsatisfiable_resources_fail_fast(ray_session, tmp_path, local_manifest):
    with pytest.raises(ResourceError, match="cluster has 2"):
        train.run(train_config(str(tmp_path), local_manifest, name="big", scaling={"num_workers": 4}))
    with pytest.raises(ResourceError, match="GPUs"):
        train.run(train_config(str(tmp_path), local_manifest, name="gpu", scaling={"use_gpu": True}))


@pytest.mark.s3
def test_train_on_s3_with_checkpoints_and_resume(ray_session, s3_bucket):
    root = f"{s3_bucket}/defectflow"
    man = procedural_manifest(f"{root}/datasets/procedural/manifest.parquet", count=40, size=64, seed=3)
    train.run(train_config(root, man, name="s3run", optim={"epochs": 1}))
    res = train.run(train_config(root, man, name="s3run", optim={"epochs": 2}))
    assert res.run_uri.startswith("s3://")
    files = storage.walk_files(res.run_uri)
    assert any("checkpoint_" in f and f.endswith("model.safetensors") for f in files), files
    history = storage.read_json(storage.join(res.report_uri, "history.json"))
    assert [h["epoch"] for h in history] == [1, 2]
    _det, meta = artifact.load(f"{root}/models/gmbinet")
    assert meta["uri"].startswith("s3://") and meta["registry"]["version"] == "2"


def test_tiled_layout_trains_evaluates_and_predicts_on_tiles(ray_session, tmp_path, local_manifest):
    from components.inference import infer_batch
    from workflows import train_data

    cfg = train_config(str(tmp_path / "store"), local_manifest, name="tiles", optim={"epochs": 2},
                       data={"image_size": [32, 32]},
                       model={"family": "gmbinet", "params": {"n": 2},
                              "preprocessing": {"layout": "tile", "tile_overlap": 0.25}})
    table = manifest.read(local_manifest)
    n_train = sum(1 for s in table["split"].to_pylist() if s == "train")
    assert train_data.build(table, cfg)["train"].count() == 9 * n_train  # 64x64 images: 3x3 tiles of 32x32
    res = train.run(cfg)
    det, meta = artifact.load(res.artifact_uri)
    assert det.preprocessing.layout == "tile" and meta["config"]["preprocessing"]["layout"] == "tile"
    assert res.metrics["test_pixel_auroc"] is not None
    img = manifest.load_image(table.slice(0, 1).to_pylist()[0])
    scores, maps = infer_batch(det, [img, img[:, :48]])  # any size, stitched back at the image's own size
    assert maps[0].shape == img.shape[:2] and maps[1].shape == (64, 48) and 0.0 <= min(scores) <= max(scores) <= 1
