"""train: a manifest -> a trained model artifact, on Ray Train (Train V2 TorchTrainer).

    defectflow train --config workflows/configs/gmbinet_procedural.yaml --set optim.epochs=3
    python -m workflows.train --config workflows/configs/gmbinet_sd900.yaml

Flow: read the manifest, apply the supervision regime (a filter over rows), decode and resize images with Ray Data
(materialised once in the object store when it fits), train with ``num_workers`` DDP workers that each read their
shard, checkpoint every epoch to ``<storage.root>/runs/<name>``, then evaluate the chosen checkpoint on the test split
and register the artifact under ``<storage.root>/models/<model_name>/<version>``.

Re-running with the same ``name`` and storage resumes from the last checkpoint (Train V2 semantics): a killed run
loses at most one epoch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components import artifact, storage
from components import config as cfgmod
from components.config import TrainConfig
from components.data import manifest, regimes
from components.data.loading import prepare_rows
from components.errors import ConfigError, DataError, DefectflowError, WeightsError
from components.models import registry

log = logging.getLogger("defectflow.train")

CKPT_WEIGHTS = "model.safetensors"
CKPT_OPTIM = "optimizer.pt"
CKPT_STATE = "state.json"


# ------------------------------------------------------------------------------------------ data


def training_table(cfg: TrainConfig) -> tuple[pa.Table, pa.Table]:
    """(full manifest, manifest after the regime + synthetic mix + family filters)."""
    full = manifest.read(cfg.data.manifest)
    table = regimes.apply(full, cfg.data.regime, mixed_masks=cfg.data.mixed_masks, seed=cfg.seed)
    if cfg.data.synthetic is not None and cfg.data.synthetic.count > 0:
        table = _mix_synthetic(table, cfg)
    fam = registry.get(cfg.model.family)
    train = table.filter(pc.equal(table["split"], "train"))
    if fam.needs_masks:
        usable = pc.equal(train["supervision"], "pixel")
        dropped = train.num_rows - int(pc.sum(usable).as_py() or 0)
        if dropped:
            log.info("%s trains on pixel-supervised rows only: %d of %d train rows have no usable mask",
                     fam.name, dropped, train.num_rows)
        train = train.filter(usable)
    if cfg.data.max_train_samples and train.num_rows > cfg.data.max_train_samples:
        order = sorted(range(train.num_rows), key=lambda i: manifest.unit_hash(train["sample_id"][i].as_py(),
                                                                                 cfg.seed))
        train = train.take(pa.array(sorted(order[: cfg.data.max_train_samples])))
    if train.num_rows == 0:
        raise DataError(f"no training rows left after regime {cfg.data.regime!r}"
                        + (" and the mask filter" if fam.needs_masks else ""),
                        f"{fam.name} needs pixel masks in the train split; check the manifest and data.regime")
    rest = table.filter(pc.not_equal(table["split"], "train"))
    return full, pa.concat_tables([train, rest])


def _mix_synthetic(table: pa.Table, cfg: TrainConfig) -> pa.Table:
    syn = manifest.read(cfg.data.synthetic.source)
    syn = syn.filter(pc.equal(syn["source"], "synthetic"))
    n = cfg.data.synthetic.count
    if syn.num_rows < n:
        raise DataError(f"{cfg.data.synthetic.source} holds {syn.num_rows} synthetic rows, {n} requested",
                        "lower data.synthetic.count or synthesize more")
    order = sorted(range(syn.num_rows), key=lambda i: manifest.unit_hash(syn["sample_id"][i].as_py(), cfg.seed))
    syn = syn.take(pa.array(sorted(order[:n])))
    syn = manifest.validate(syn.set_column(syn.schema.get_field_index("split"), "split",
                                           pa.array(["train"] * syn.num_rows)))
    log.info("adding %d synthetic training samples from %s", n, cfg.data.synthetic.source)
    return pa.concat_tables([table, syn])


def _prepare_batch(batch: pa.Table, image_size: tuple[int, int], max_pixels: int,
                   storage_env: dict[str, Any]) -> dict[str, np.ndarray]:
    storage.configure(**storage_env)
    out = prepare_rows(batch.to_pylist(), image_size, max_pixels)
    out.pop("sample_id")
    return out


def build_datasets(table: pa.Table, cfg: TrainConfig, features_uri: str | list[str] | None = None) -> dict[str, Any]:
    """Ray Datasets for the train and val splits: decoded, resized uint8 images, or cached features."""
    import ray.data

    if features_uri is not None:
        return build_feature_datasets(table, cfg, features_uri)
    env = _storage_env()
    out = {}
    for split in ("train", "val"):
        sub = table.filter(pc.equal(table["split"], split))
        if sub.num_rows == 0:
            continue
        ds = ray.data.from_arrow(sub).map_batches(
            _prepare_batch, fn_kwargs={"image_size": tuple(cfg.data.image_size),
                                       "max_pixels": cfg.data.max_image_pixels, "storage_env": env},
            batch_size=16, batch_format="pyarrow")
        h, w = cfg.data.image_size
        est_bytes = sub.num_rows * (4 * h * w + 64)
        if est_bytes < 2 * 1024**3:
            ds = ds.materialize()
        out[split] = ds
    return out


def quiet_data_progress() -> None:
    """Per-epoch shard iteration would draw a Ray Data progress bar every epoch; the epoch lines say enough."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


def _targets(batch: pa.Table, lookup_ref: Any, image_size: tuple[int, int], max_pixels: int,
             storage_env: dict[str, Any]) -> dict[str, np.ndarray]:
    """Feature-shard rows -> features + the targets the regime lets the trainer see; rows of other splits drop."""
    import ray

    from components.data.loading import prepare_target
    from workflows.features import decode

    storage.configure(**storage_env)
    lookup = ray.get(lookup_ref)
    feats, masks, labels, has = [], [], [], []
    for row in batch.to_pylist():
        rec = lookup.get(row["sample_id"])
        if rec is None:
            continue
        target = prepare_target(rec, image_size, max_pixels=max_pixels)
        feats.append(decode(row))  # float32: Ray's tensor columns have no float16 (it would pickle them)
        masks.append(target["mask"])
        labels.append(target["label"])
        has.append(target["has_mask"])
    if not feats:
        return {"features": np.zeros((0, 1, 1, 1), np.float32), "mask": np.zeros((0, 1, *image_size), np.uint8),
                "label": np.zeros(0, np.float32), "has_mask": np.zeros(0, bool)}
    return {"features": np.stack(feats), "mask": np.stack(masks), "label": np.array(labels, np.float32),
            "has_mask": np.array(has, bool)}


def build_feature_datasets(table: pa.Table, cfg: TrainConfig, features_uri: str | list[str]) -> dict[str, Any]:
    """Cached-feature shards joined with the regime's targets, per split (the join happens in the map tasks).
    Several folders (the manifest's and the synthetic set's) are read as one; rows the table does not hold drop."""
    import ray
    import ray.data

    from workflows.features import read_signature, shard_files

    uris = [features_uri] if isinstance(features_uri, str) else list(features_uri)
    sig = read_signature(uris[0])
    for other in uris[1:]:
        if read_signature(other)["feature_shape"] != sig["feature_shape"]:
            raise ConfigError(f"{other} and {uris[0]} hold features of different shapes",
                              "compute both with the same model and image size")
    fs, _ = storage.arrow_fs(uris[0])
    files = [storage.strip_scheme(f) for u in uris for f in shard_files(u)]
    c, h, w = sig["feature_shape"]
    out = {}
    for split in ("train", "val"):
        sub = table.filter(pc.equal(table["split"], split))
        if sub.num_rows == 0:
            continue
        cols = ["sample_id", "label", "supervision", "mask_uri", "mask_bytes", "height", "width"]
        lookup = {r["sample_id"]: r for r in sub.select(cols).to_pylist()}
        ds = ray.data.read_parquet(files, filesystem=fs).map_batches(
            _targets, fn_kwargs={"lookup_ref": ray.put(lookup), "image_size": tuple(cfg.data.image_size),
                                 "max_pixels": cfg.data.max_image_pixels, "storage_env": _storage_env()},
            batch_size=16, batch_format="pyarrow")
        if sub.num_rows * (4 * c * h * w + cfg.data.image_size[0] * cfg.data.image_size[1]) < 2 * 1024**3:
            ds = ds.materialize()
        out[split] = ds
    return out


def resolve_features(cfg: TrainConfig, layout: storage.Layout) -> list[str] | None:
    """The features folders to train from: the manifest's (computed now for ``auto``, checked against the model for
    a URI) and, when synthetic samples are mixed in, the synthetic set's (always computed/cached by ``auto`` rules
    in its own folder: the synthetic rows are not in the manifest's cache)."""
    if cfg.data.features is None:
        return None
    from workflows import features as feat

    fcfg = feat.from_train_config(cfg)
    if cfg.data.features == "auto":
        res = feat.run(fcfg)
        log.info("features: %d shard(s) (%d computed now) in %s", res.shards, res.written, res.uri)
        uris = [res.uri]
    else:
        want = feat.build_detector(fcfg).feature_signature()
        have = feat.read_signature(cfg.data.features)
        if have != want:
            raise ConfigError(f"{cfg.data.features} holds features for other settings than this model/image size",
                              "use data.features: auto, or the folder `defectflow features` wrote for this config")
        uris = [cfg.data.features]
    if cfg.data.synthetic is not None and cfg.data.synthetic.count > 0:
        scfg = fcfg.model_copy(update={"manifest": storage.normalize(cfg.data.synthetic.source), "out": None,
                                       "splits": ["train"]})
        res = feat.run(scfg)
        log.info("features of the synthetic set: %d shard(s) (%d computed now) in %s", res.shards, res.written,
                 res.uri)
        uris.append(res.uri)
    return uris


def _storage_env() -> dict[str, Any]:
    s = storage.settings()
    return {"endpoint_url": s.endpoint_url, "region": s.region}


# ------------------------------------------------------------------------------------- worker loop


def _train_step_module(detector: Any, objective: Any) -> Any:
    import torch

    class TrainStep(torch.nn.Module):
        """Detector + objective in one module so DDP sees every parameter through one forward."""

        def __init__(self) -> None:
            super().__init__()
            self.detector = detector
            self.objective = objective

        def forward(self, images, masks, labels, has_mask, features=None):  # type: ignore[no-untyped-def]
            from components.models.base import Batch

            return self.objective(self.detector, Batch(images, masks, labels, has_mask, features))

    return TrainStep()


def _make_optimizer(params: list[dict[str, Any]], optim: dict[str, Any]) -> Any:
    import torch

    kind = optim["optimizer"]
    if kind == "adam":
        return torch.optim.Adam(params, lr=optim["lr"], weight_decay=optim["weight_decay"])
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=optim["lr"], weight_decay=optim["weight_decay"])
    return torch.optim.SGD(params, lr=optim["lr"], momentum=0.9, weight_decay=optim["weight_decay"])


def model_fingerprint(c: dict[str, Any]) -> str:
    """What must not change between a run and its resumption (architecture + preprocessing)."""
    key = json.dumps({"family": c["model"]["family"], "params": c["model"]["params"],
                      "pre": c["model"]["preprocessing"], "size": c["data"]["image_size"]}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def train_loop_per_worker(c: dict[str, Any]) -> dict[str, Any]:
    """Runs on every Ray Train worker. ``c`` is the TrainConfig as a dict (plus ``_storage_env``)."""
    import ray.train
    import torch
    from ray.train import Checkpoint
    from ray.train.torch import get_device, prepare_model
    from safetensors.torch import load_file, save_file

    from components.data.loading import to_batch

    storage.configure(**c["_storage_env"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(c["seed"] + 1000 * rank)
    gen = torch.Generator().manual_seed(c["seed"] + 7 + rank)
    m = c["model"]
    detector = registry.create_detector(m["family"], m["params"], _pre(c), m["postprocessing"])
    objective = registry.create_objective(m["family"], c["loss"])
    fingerprint = model_fingerprint(c)

    start_epoch, best, history = 0, None, []
    optim_state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = _read_json(os.path.join(d, CKPT_STATE))
            if state.get("fingerprint") != fingerprint:
                raise WeightsError(f"run {c['name']!r} has checkpoints of a different model/preprocessing",
                                   "choose a new run name (name: ...) or restore the original model settings")
            detector.load_state_dict(load_file(os.path.join(d, CKPT_WEIGHTS)))
            optim_state = torch.load(os.path.join(d, CKPT_OPTIM), map_location="cpu", weights_only=True)
            start_epoch = int(state["epoch"]) + 1
            best = state.get("best")
            history = state.get("history", [])
        if rank == 0:
            _worker_log().info("[defectflow] resuming run %s at epoch %d", c["name"], start_epoch + 1)

    step = prepare_model(_train_step_module(detector, objective))
    device = get_device()
    o = c["optim"]
    opt = _make_optimizer(objective.param_groups(detector, o["lr"], o["weight_decay"]), o)
    sched = _make_scheduler(opt, o)
    if optim_state is not None:
        opt.load_state_dict(optim_state["optimizer"])
        if sched is not None and optim_state.get("scheduler"):
            sched.load_state_dict(optim_state["scheduler"])

    train_shard = ray.train.get_dataset_shard("train")
    try:
        val_shard = ray.train.get_dataset_shard("val")
    except (KeyError, ValueError):
        val_shard = None
    thr = float(c["eval"]["threshold"])
    aug = c["data"]["augment"]

    for epoch in range(start_epoch, o["epochs"]):
        t0 = time.time()
        step.train()
        sums = {"loss": 0.0}
        n_batches = 0
        for arrays in train_shard.iter_batches(batch_size=o["batch_size"], batch_format="numpy",
                                               local_shuffle_buffer_size=max(4 * o["batch_size"], 32),
                                               local_shuffle_seed=c["seed"] + epoch * 131 + rank):
            b = to_batch(arrays, device, gen, hflip=aug["hflip"], vflip=aug["vflip"])
            loss, logs = step(b.images, b.masks, b.labels, b.has_mask, b.features)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if o["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(step.parameters(), o["grad_clip"])
            opt.step()
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n_batches += 1
        if sched is not None:
            sched.step()
        metrics: dict[str, Any] = {f"train_{k}": v / max(n_batches, 1) for k, v in sums.items()}
        metrics.update(_validate(step, detector, val_shard, device, thr, o["batch_size"], world))
        metrics.update({"epoch": epoch + 1, "epoch_time_s": round(time.time() - t0, 3),
                        "lr": opt.param_groups[0]["lr"]})
        sel = c["_select_metric"]
        if sel and metrics.get(sel) is not None:
            better = best is None or (metrics[sel] > best if c["_select_mode"] == "max" else metrics[sel] < best)
            if better:
                best = metrics[sel]
        history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                inner = step.module if hasattr(step, "module") else step
                save_file({k: v.detach().cpu().contiguous() for k, v in inner.detector.state_dict().items()},
                          os.path.join(d, CKPT_WEIGHTS))
                torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched else None},
                           os.path.join(d, CKPT_OPTIM))
                with open(os.path.join(d, CKPT_STATE), "w") as f:
                    json.dump({"epoch": epoch, "best": best, "select": c["_select_metric"], "fingerprint": fingerprint,
                               "history": history}, f)
                checkpoint = Checkpoint.from_directory(d)
                _worker_log().info("[defectflow] epoch %d/%d %s", epoch + 1, o["epochs"], " ".join(
                    f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
            ray.train.report(metrics, checkpoint=checkpoint)
    return {"epochs": o["epochs"], "best": best}


def _worker_log() -> logging.Logger:
    """Progress lines of a Train worker: Ray Train routes the worker's root logger to the driver's console once
    (a plain ``print`` is tee'd and would appear twice)."""
    wlog = logging.getLogger("defectflow.train.worker")
    wlog.setLevel(logging.INFO)
    return wlog


def _make_scheduler(opt: Any, o: dict[str, Any]) -> Any:
    import torch

    if o["lr_schedule"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=o["epochs"])
    if o["lr_schedule"] == "multistep":
        marks = sorted({max(1, round(m * o["epochs"])) for m in o["milestones"]})
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=marks, gamma=o["gamma"])
    return None


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _pre(c: dict[str, Any]) -> dict[str, Any]:
    """The model sees images at data.image_size unless the config's preprocessing says otherwise."""
    pre = dict(c["model"]["preprocessing"])
    pre.setdefault("input_size", list(c["data"]["image_size"]))
    return pre


def _validate(step: Any, detector: Any, shard: Any, device: Any, thr: float, batch_size: int,
              world: int) -> dict[str, Any]:
    """Validation loss, IoU (mean per image as the GMBINet authors, and pooled over pixels) and MAE of the images
    with masks, reduced over all workers. Pooled IoU also counts false alarms on defect-free images, which the
    per-image mean rewards (an empty prediction scores 1 there): it is the default selection metric."""
    import torch
    import torch.distributed as dist

    from components.data.loading import to_batch

    if shard is None:
        return {}
    step.eval()
    inner = step.module if hasattr(step, "module") else step
    acc = torch.zeros(8, dtype=torch.float64)  # loss_sum, n_batches, iou_sum, mae_sum, n_masked, tp, fp, fn
    scored: list[tuple[float, float]] = []  # (label, score) of labelled validation images
    with torch.no_grad():
        for arrays in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            b = to_batch(arrays, device)
            loss, _ = inner.objective(detector, b)
            out = (detector(b.images) if b.features is None
                   else detector.forward_features(b.features, tuple(b.masks.shape[-2:])))
            scored.extend((float(lab), float(sc)) for lab, sc in zip(b.labels.tolist(), out.score.tolist(),
                                                                     strict=True) if lab >= 0)
            acc[0] += float(loss)
            acc[1] += 1
            sel = b.has_mask
            if sel.any():
                pred = out.anomaly_map[sel]
                gt = b.masks[sel]
                binp = (pred >= thr).float()
                inter = (binp * gt).flatten(1).sum(1)
                union = ((binp + gt) > 0).float().flatten(1).sum(1)
                acc[2] += float(((inter + 1e-7) / (union + 1e-7)).sum())
                acc[3] += float((pred - gt).abs().flatten(1).mean(1).sum())
                acc[4] += float(sel.sum())
                acc[5] += float(inter.sum())
                acc[6] += float((binp * (1 - gt)).sum())
                acc[7] += float(((1 - binp) * gt).sum())
    if world > 1 and dist.is_available() and dist.is_initialized():
        acc_dev = acc.to(device)
        dist.all_reduce(acc_dev)
        acc = acc_dev.cpu()
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, scored)
        scored = [p for part in gathered for p in part]
    out: dict[str, Any] = {}
    labels = [lab for lab, _ in scored]
    if 0.0 in labels and 1.0 in labels:
        from components.metrics.image import roc_auc

        out["val_image_auroc"] = float(roc_auc(labels, [sc for _, sc in scored]))
    if acc[1] > 0:
        out["val_loss"] = float(acc[0] / acc[1])
    if acc[4] > 0:
        out["val_iou"] = float(acc[2] / acc[4])
        out["val_mae"] = float(acc[3] / acc[4])
        denom = float(acc[5] + acc[6] + acc[7])
        out["val_iou_pooled"] = float(acc[5]) / denom if denom > 0 else 1.0
    return out


# ------------------------------------------------------------------------------------------ driver


def selection_metric(table: pa.Table, cfg: TrainConfig) -> tuple[str | None, str]:
    """``checkpoint.metric`` when set; else, for segmenters, val_iou_pooled when validation has masks; for
    detectors with an image score, val_image_auroc when validation has both labels; else val_loss; with no
    validation split, none (keep the last checkpoint)."""
    val = table.filter(pc.equal(table["split"], "val"))
    if val.num_rows == 0:
        return None, "max"
    if cfg.checkpoint.metric != "auto":
        return cfg.checkpoint.metric, cfg.checkpoint.mode
    labels = set(val["label"].to_pylist())
    has_masks = int(pc.sum(pc.equal(val["supervision"], "pixel")).as_py() or 0) > 0
    if registry.get(cfg.model.family).needs_masks:
        if has_masks:
            return "val_iou_pooled", "max"
    elif {0, 1} <= labels:
        return "val_image_auroc", "max"
    return "val_loss", "min"


def loop_config(cfg: TrainConfig, select: tuple[str | None, str]) -> dict[str, Any]:
    c = cfg.model_dump(mode="json")
    c["_storage_env"] = _storage_env()
    c["_select_metric"], c["_select_mode"] = select
    return c


def build_trainer(cfg: TrainConfig, datasets: dict[str, Any], loop_cfg: dict[str, Any], *, run_name: str,
                  storage_uri: str, use_gpu: bool, callbacks: list[Any] | None = None) -> Any:
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    fs, path = storage.arrow_fs(storage_uri)
    sel, mode = loop_cfg["_select_metric"], loop_cfg["_select_mode"]
    ckpt_cfg = CheckpointConfig(num_to_keep=max(cfg.checkpoint.num_to_keep, 1),
                                checkpoint_score_attribute=sel, checkpoint_score_order=mode) if sel else (
        CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep))
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=path, storage_filesystem=fs,
                             checkpoint_config=ckpt_cfg, failure_config=FailureConfig(max_failures=1),
                             callbacks=callbacks or [], logging_config=LoggingConfig(log_level="WARNING")),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split="all"),
    )


def checkpoint_to_detector(checkpoint: Any, cfg: TrainConfig) -> tuple[Any, dict[str, Any]]:
    """Rebuild the detector (CPU, eval mode) from a Train checkpoint; returns it with the checkpoint's state.json."""
    from safetensors.torch import load_file

    c = cfg.model_dump(mode="json")
    detector = registry.create_detector(cfg.model.family, cfg.model.params, _pre(c), cfg.model.postprocessing)
    with checkpoint.as_directory() as d:
        detector.load_state_dict(load_file(os.path.join(d, CKPT_WEIGHTS)))
        state = _read_json(os.path.join(d, CKPT_STATE))
    return detector.eval(), state


def checkpoint_state(checkpoint: Any) -> dict[str, Any]:
    with checkpoint.as_directory() as d:
        return _read_json(os.path.join(d, CKPT_STATE))


def pick_checkpoint(result: Any, cfg: TrainConfig, select: tuple[str | None, str]) -> Any:
    sel, mode = select
    if cfg.checkpoint.select == "best" and sel and result.best_checkpoints:
        scored = [(ck, mets) for ck, mets in result.best_checkpoints if mets.get(sel) is not None]
        if scored:
            pick = max if mode == "max" else min
            return pick(scored, key=lambda cm: cm[1][sel])[0]
    if result.checkpoint is None:
        raise DefectflowError("training produced no checkpoint", "check the run's logs (optim.epochs >= 1?)")
    return result.checkpoint


@dataclass
class TrainResult:
    run_name: str
    run_uri: str
    artifact_uri: str
    registered_uri: str | None
    metrics: dict[str, Any]
    val_metrics: dict[str, Any] = field(default_factory=dict)
    report_uri: str | None = None
    sheet_uri: str | None = None
    seconds: float = 0.0


def calibrate(art_uri: str, full: pa.Table, cfg: TrainConfig, use_gpu: bool) -> dict[str, Any]:
    """Choose the image decision threshold (``eval.decision_threshold``) and store it in the artifact."""
    from workflows import evaluate as ev

    return ev.calibrate(art_uri, full, cfg.eval.decision_threshold, pixel_threshold=cfg.eval.threshold,
                        margin=cfg.eval.threshold_margin, batch_size=cfg.eval.batch_size,
                        num_actors=cfg.eval.num_actors, use_gpu=use_gpu, max_pixels=cfg.data.max_image_pixels)


def finalize(cfg: TrainConfig, full: pa.Table, checkpoint: Any, *, layout: storage.Layout, run_uri: str,
             lineage: dict[str, Any], use_gpu: bool, history: list[dict[str, Any]] | None = None,
             evaluate_split: str | None = None, report_name: str | None = None,
             register: bool | None = None) -> TrainResult:
    """Checkpoint -> artifact in the run folder -> evaluation -> report -> registry.

    ``history`` is the per-epoch metrics of the whole run (from the latest checkpoint); the chosen checkpoint may be
    an earlier, better epoch.
    """
    from workflows import evaluate as ev

    detector, state = checkpoint_to_detector(checkpoint, cfg)
    art_uri = storage.join(run_uri, "artifact")
    chosen = state.get("history", [])
    history = history if history is not None else chosen
    lineage = {"manifest": cfg.data.manifest, "manifest_digest": manifest.digest(full), "run": run_uri,
               "regime": cfg.data.regime, "epochs_trained": len(history), "chosen_epoch": int(state["epoch"]) + 1,
               "train_config": cfg.model_dump(mode="json"), **lineage}
    artifact.save(detector, art_uri, threshold=cfg.eval.threshold, pixel_threshold=cfg.eval.threshold,
                  lineage=lineage)
    calibrate(art_uri, full, cfg, use_gpu)
    split = evaluate_split or cfg.eval.split
    result = ev.evaluate(art_uri, full, split=split, threshold=cfg.eval.threshold,
                         seg_iou_threshold=cfg.eval.seg_iou_threshold, batch_size=cfg.eval.batch_size,
                         num_actors=cfg.eval.num_actors, use_gpu=use_gpu, sheet_images=cfg.eval.sheet_images,
                         max_pixels=cfg.data.max_image_pixels)
    metrics = {f"{split}_{k}" if k not in ("split",) else k: v for k, v in result.metrics.items()}
    last = chosen[-1] if chosen else {}
    val_metrics = {k: v for k, v in last.items() if k.startswith("val_")}
    all_metrics = {**metrics, **val_metrics, "best_" + (state.get("select") or "val"): state.get("best")}
    all_metrics = {k: v for k, v in all_metrics.items() if v is not None}
    artifact.update_meta(art_uri, metrics=all_metrics)
    report_uri = layout.reports(report_name or cfg.name)
    ev.write_report(result, report_uri, title=f"{cfg.name}: {cfg.model.family} on {split}")
    storage.write_json(storage.join(report_uri, "history.json"), history)
    registered = None
    if cfg.output.register_model if register is None else register:
        registered = artifact.register(art_uri, layout, cfg.output.model_name or cfg.model.family)
    return TrainResult(run_name=cfg.name, run_uri=run_uri, artifact_uri=art_uri, registered_uri=registered,
                       metrics=all_metrics, val_metrics=val_metrics, report_uri=report_uri,
                       sheet_uri=storage.join(report_uri, "sheet.png") if result.sheet_png else None)


def run(cfg: TrainConfig) -> TrainResult:
    """Train, evaluate and register. Ray is started (or joined) here."""
    from workflows.runtime import check_train_resources, init_ray, resolve_use_gpu

    t0 = time.time()
    layout = cfg.storage.apply()
    registry.get(cfg.model.family)  # unknown family -> ConfigError before Ray starts
    registry.params(cfg.model.family, cfg.model.params)
    registry.loss_params(cfg.model.family, cfg.loss)
    full, table = training_table(cfg)  # bad manifests fail before Ray starts
    select = selection_metric(table, cfg)
    init_ray(cfg.ray, cfg.storage)
    use_gpu = resolve_use_gpu(cfg.scaling)
    check_train_resources(cfg.scaling, use_gpu)

    counts = manifest.summary(table)
    log.info("run %s: %s on %s (regime %s): %s", cfg.name, cfg.model.family, cfg.data.manifest, cfg.data.regime,
             {k: v for k, v in counts.items() if k != "rows"})
    features_uris = resolve_features(cfg, layout)
    datasets = build_datasets(table, cfg, features_uris)
    quiet_data_progress()
    run_uri = layout.run(cfg.name)
    trainer = build_trainer(cfg, datasets, loop_config(cfg, select), run_name=cfg.name, storage_uri=layout.runs(),
                            use_gpu=use_gpu)
    log.info("training %d epoch(s) with %d worker(s) (GPU: %s); checkpoints in %s", cfg.optim.epochs,
             cfg.scaling.num_workers, use_gpu, run_uri)
    result = _fit(trainer)
    ckpt = pick_checkpoint(result, cfg, select)
    history = checkpoint_state(result.checkpoint).get("history") if result.checkpoint is not None else None
    out = finalize(cfg, full, ckpt, layout=layout, run_uri=run_uri, lineage={"run_name": cfg.name},
                   use_gpu=use_gpu, history=history)
    out.seconds = round(time.time() - t0, 1)
    log.info("done in %.0f s: %s", out.seconds, {k: v for k, v in out.metrics.items() if isinstance(v, float)})
    return out


def _fit(trainer: Any) -> Any:
    from ray.train import TrainingFailedError

    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        cause = _user_error(e)
        if cause is not None:
            raise cause from e
        raise
    if result.error is not None:
        cause = _user_error(result.error)
        if cause is not None:
            raise cause
        raise result.error
    return result


def _user_error(e: BaseException) -> DefectflowError | None:
    """Find a DefectflowError raised inside a worker (it arrives wrapped in Ray's errors)."""
    seen = set()
    stack = [e]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, DefectflowError):
            return cur
        for attr in ("cause", "__cause__", "__context__"):
            stack.append(getattr(cur, attr, None))
        for attr in ("worker_failures", "errors"):
            val = getattr(cur, attr, None)
            if isinstance(val, dict):
                stack.extend(val.values())
            elif isinstance(val, (list, tuple)):
                stack.extend(val)
    text = str(e)
    for cls in (WeightsError, DataError, ConfigError):
        marker = f"{cls.__name__}: "
        if marker in text:
            msg = text.split(marker, 1)[1].strip().splitlines()[0]
            return cls(msg)
    return None


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML train config (ready ones in workflows/configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.epochs=3 --set model.params.n=8")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return cfgmod.load(TrainConfig, args.config, args.set)


def main(argv: list[str] | None = None) -> int:
    from workflows.cli import run_command

    return run_command("train", argv)


if __name__ == "__main__":
    raise SystemExit(main())

