"""Ray Train plumbing shared by ``train``, ``sweep`` and ``train-synth``: the per-worker loop, the checkpoint
format, the TorchTrainer, running it with readable progress and errors, and choosing the checkpoint.

Checkpoints (one per epoch, ``<runs>/<name>/checkpoint_*``): ``model.safetensors`` (weights),
``optimizer.safetensors`` + ``optimizer.json`` (optimizer and LR-schedule state: tensors and the JSON-able rest; no
pickle), ``state.json`` (epoch, best value of the selection metric, model fingerprint, per-epoch history).
Re-running with the same name and storage resumes (Train V2).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from components import storage
from components.config import TrainConfig
from components.errors import ConfigError, DataError, DefectflowError, WeightsError
from components.models import registry

log = logging.getLogger("defectflow.train")

CKPT_WEIGHTS = "model.safetensors"  # what the artifact gets: the EMA weights when optim.ema_decay is set
CKPT_TRAIN_WEIGHTS = "train.safetensors"  # with EMA only: the raw weights training resumes from
CKPT_OPTIM = "optimizer.safetensors"
CKPT_OPTIM_META = "optimizer.json"
CKPT_STATE = "state.json"


# ------------------------------------------------------------------------------------- checkpoint format


def read_state(directory: str) -> dict[str, Any]:
    with open(os.path.join(directory, CKPT_STATE), encoding="utf-8") as f:
        return json.load(f)


def write_state(directory: str, state: dict[str, Any]) -> None:
    with open(os.path.join(directory, CKPT_STATE), "w", encoding="utf-8") as f:
        json.dump(state, f)


def save_optimizer(directory: str, opt: Any, sched: Any = None) -> None:
    from safetensors.torch import save_file

    from components.training import optimizer_state

    tensors, meta = optimizer_state(opt, sched)
    save_file(tensors, os.path.join(directory, CKPT_OPTIM))
    with open(os.path.join(directory, CKPT_OPTIM_META), "w", encoding="utf-8") as f:
        json.dump(meta, f)


def read_optimizer(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
    with open(os.path.join(directory, CKPT_OPTIM_META), encoding="utf-8") as f:
        return _tensors(directory, CKPT_OPTIM), json.load(f)


def _save_weights(state: dict[str, Any], directory: str, name: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(directory, name))


def _tensors(directory: str, name: str) -> dict[str, Any]:
    from components.artifact import read_state_dict

    return read_state_dict(os.path.join(directory, name), "the run's checkpoint is damaged: delete that "
                                                          "checkpoint_* folder (the run resumes from the one before)")


def restore_optimizer(state: tuple[dict[str, Any], dict[str, Any]], opt: Any, sched: Any = None) -> None:
    from components.training import restore_optimizer_state

    restore_optimizer_state(opt, sched, *state)


def load_optimizer(directory: str, opt: Any, sched: Any = None) -> None:
    restore_optimizer(read_optimizer(directory), opt, sched)


def pre_config(c: dict[str, Any]) -> dict[str, Any]:
    """The model sees images at data.image_size unless the config's preprocessing says otherwise."""
    return {"input_size": list(c["data"]["image_size"]), **c["model"]["preprocessing"]}


def create_detector(c: dict[str, Any]) -> Any:
    m = c["model"]
    return registry.create_detector(m["family"], m["params"], pre_config(c), m["postprocessing"])


def checkpoint_state(checkpoint: Any) -> dict[str, Any]:
    with checkpoint.as_directory() as d:
        return read_state(d)


def resume_epoch(run_uri: str) -> int | None:
    """The epoch a re-run of ``run_uri`` continues at (1-based), or None for a new run. Train V2 resumes from the
    run's latest checkpoint; their folder names sort by time."""
    ckpts = sorted(u for u in storage.listdir(run_uri) if storage.basename(u).startswith("checkpoint_"))
    for uri in reversed(ckpts):
        state = storage.join(uri, CKPT_STATE)
        if storage.exists(state):
            return int(storage.read_json(state)["epoch"]) + 2
    return None


def checkpoint_to_detector(checkpoint: Any, cfg: TrainConfig) -> tuple[Any, dict[str, Any]]:
    """Rebuild the detector (CPU, eval mode) from a Train checkpoint; returns it with the checkpoint's state."""
    detector = create_detector(cfg.model_dump(mode="json"))
    with checkpoint.as_directory() as d:
        detector.load_state_dict(_tensors(d, CKPT_WEIGHTS))
        state = read_state(d)
    return detector.eval(), state


# --------------------------------------------------------------------------------------------- worker loop


def train_loop_per_worker(c: dict[str, Any]) -> dict[str, Any]:
    """Runs on every Ray Train worker. ``c`` is the TrainConfig as a dict plus ``_storage``, ``_select_metric``
    and ``_select_mode``."""
    import ray.train
    import torch
    from ray.train import Checkpoint
    from ray.train.torch import get_device, prepare_model

    from components.data.loading import to_batch
    from components.training import (
        TrainStep,
        WeightAverage,
        clip_gradients,
        make_optimizer,
        make_scheduler,
        model_fingerprint,
    )

    storage.configure(**c["_storage"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(c["seed"] + 1000 * rank)
    gen = torch.Generator().manual_seed(c["seed"] + 7 + rank)
    detector = create_detector(c)
    objective = registry.create_objective(c["model"]["family"], c["loss"])
    fingerprint = model_fingerprint(c)

    o = c["optim"]
    start_epoch, best, history, optim_state, ema_state, ema_updates = 0, None, [], None, None, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = read_state(d)
            if state.get("fingerprint") != fingerprint:
                raise WeightsError(f"run {c['name']!r} has checkpoints of a different model/preprocessing",
                                   "choose a new run name (name: ...) or restore the original model settings")
            saved = _tensors(d, CKPT_WEIGHTS)
            if os.path.exists(os.path.join(d, CKPT_TRAIN_WEIGHTS)):  # an EMA run: saved holds the average
                detector.load_state_dict(_tensors(d, CKPT_TRAIN_WEIGHTS))
                ema_state, ema_updates = saved, state.get("ema_updates", 0)
            else:
                detector.load_state_dict(saved)
            optim_state = read_optimizer(d)
        start_epoch, best, history = int(state["epoch"]) + 1, state.get("best"), state.get("history", [])
    ema = WeightAverage(detector, o["ema_decay"], updates=ema_updates) if o.get("ema_decay") else None
    if ema is not None and ema_state is not None:
        ema.load(ema_state)

    step = prepare_model(TrainStep(detector, objective))
    device = get_device()
    opt = make_optimizer(objective.param_groups(detector, o["lr"], o["weight_decay"]), o)
    sched = make_scheduler(opt, o)
    if optim_state is not None:
        restore_optimizer(optim_state, opt, sched)

    train_shard = ray.train.get_dataset_shard("train")
    try:
        val_shard = ray.train.get_dataset_shard("val")
    except (KeyError, ValueError):
        val_shard = None
    aug = c["data"]["augment"]
    select, mode = c["_select_metric"], c["_select_mode"]

    norm_names = ([g.get("name", str(i)) for i, g in enumerate(opt.param_groups)]  # of the clipped norms
                  if o["grad_clip_per_group"] else ["all"])
    for epoch in range(start_epoch, o["epochs"]):
        t0 = time.time()
        step.train()
        sums: dict[str, float] = {}
        n_batches = 0
        # rows come permuted once per seed (train_data.permuted) and every epoch reads them in that order, with no
        # local shuffle buffer on top (it would copy 0.6 MB SuperSimpleNet feature rows around for little gain);
        # epochs still differ: flips, synthetic anomalies and dropout draw anew.
        for arrays in train_shard.iter_batches(batch_size=o["batch_size"], batch_format="numpy"):
            loss, logs = step(to_batch(arrays, device, gen, augment=aug))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if o["grad_clip"]:  # the norms before clipping, per epoch: they show which loss drives the steps
                norms = clip_gradients(opt, step, o["grad_clip"], o["grad_clip_per_group"])
                logs = {**logs, **{f"grad_norm_{n}": v for n, v in zip(norm_names, norms, strict=True)}}
            opt.step()
            if ema is not None:
                ema.update(detector)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n_batches += 1
        if sched is not None:
            sched.step()
        metrics: dict[str, Any] = {f"train_{k}": v / max(n_batches, 1) for k, v in sums.items()}
        with ema.applied(detector) if ema is not None else contextlib.nullcontext():
            metrics.update(_validate(objective, detector, val_shard, device, c, rank))
        metrics.update({"epoch": epoch + 1, "epoch_time_s": round(time.time() - t0, 3),
                        "lr": opt.param_groups[0]["lr"]})
        window = smoothing_window(select)
        if window is not None and metrics.get(window[0]) is not None:
            base, k = window
            recent = [h[base] for h in history[-(k - 1):] if h.get(base) is not None] + [metrics[base]]
            metrics[select] = sum(recent) / len(recent)
        if select and metrics.get(select) is not None and (
                best is None or (metrics[select] > best if mode == "max" else metrics[select] < best)):
            best = metrics[select]
        history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                _save_weights(ema.shadow if ema is not None else detector.state_dict(), d, CKPT_WEIGHTS)
                if ema is not None:
                    _save_weights(detector.state_dict(), d, CKPT_TRAIN_WEIGHTS)
                save_optimizer(d, opt, sched)
                write_state(d, {"epoch": epoch, "best": best, "select": select, "fingerprint": fingerprint,
                                "history": history, "ema_updates": ema.updates if ema is not None else 0})
                checkpoint = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)
    return {"epochs": o["epochs"], "best": best}


def _validate(objective: Any, detector: Any, shard: Any, device: Any, c: dict[str, Any], rank: int
              ) -> dict[str, float]:
    """Validation metrics, computed by rank 0 on the whole validation split (the split is not sharded: sharding
    equally would drop images, and only rank 0's metrics are kept by Ray Train anyway)."""
    import torch

    from components.data.loading import to_batch
    from components.training import ValidationMeter

    if shard is None or rank != 0:
        return {}
    detector.eval()
    meter = ValidationMeter(c["_pixel_threshold"])
    with torch.no_grad():
        for arrays in shard.iter_batches(batch_size=c["optim"]["batch_size"], batch_format="numpy"):
            b = to_batch(arrays, device)
            loss, _ = objective(detector, b)
            out = (detector(b.images) if b.features is None
                   else detector.forward_features(b.features, tuple(b.masks.shape[-2:])))
            meter.add(loss, out.score, out.anomaly_map, b)
    return meter.metrics()


# ------------------------------------------------------------------------------------------ driver side


MIN_DEFECTIVE_VAL = 10  # below this, one image moves AUROC/IoU by >= 0.1/n: choices by validation swing


def selection_metric(table: pa.Table, cfg: TrainConfig) -> tuple[str | None, str]:
    """``checkpoint.metric`` when set; else, for segmenters, val_iou_pooled when validation has masks; for
    detectors with an image score, val_image_auroc when validation has both labels; else val_loss; with no
    validation split, none (keep the last checkpoint).

    With ``checkpoint.smoothing`` k > 1 (``auto``: 3 when validation holds fewer than ``MIN_DEFECTIVE_VAL``
    defective images, else 1) the choice is by the trailing mean of the metric over k epochs, reported as
    ``<metric>_mean<k>``: one lucky epoch on a handful of defective images no longer wins. Too few defective
    validation images are also a warning, with what to do about it."""
    val = table.filter(pc.equal(table["split"], "val"))
    if val.num_rows == 0:
        return None, "max"
    labels = set(val["label"].to_pylist())
    has_masks = int(pc.sum(pc.equal(val["supervision"], "pixel")).as_py() or 0) > 0
    if cfg.checkpoint.metric != "auto":
        metric, mode = cfg.checkpoint.metric, cfg.checkpoint.mode
    elif registry.get(cfg.model.family).needs_masks and has_masks:
        metric, mode = "val_iou_pooled", "max"
    elif not registry.get(cfg.model.family).needs_masks and {0, 1} <= labels:
        metric, mode = "val_image_auroc", "max"
    else:
        metric, mode = "val_loss", "min"
    n_defective = int(pc.sum(pc.equal(val["label"], 1)).as_py() or 0)
    few = metric != "val_loss" and n_defective < MIN_DEFECTIVE_VAL
    if few:
        log.warning("validation holds only %d defective image(s): the checkpoint chosen by %s and the calibrated "
                    "thresholds will swing from epoch to epoch; carve a larger validation split (ingest --option "
                    "val_fraction=...) or choose by a smoothed metric (checkpoint.smoothing, %s)", n_defective,
                    metric, "on: 3 epochs" if cfg.checkpoint.smoothing == "auto" else "now "
                    f"{cfg.checkpoint.smoothing}")
    window = cfg.checkpoint.smoothing if cfg.checkpoint.smoothing != "auto" else (3 if few else 1)
    return (f"{metric}_mean{window}" if window > 1 else metric), mode


def smoothing_window(select: str | None) -> tuple[str, int] | None:
    """(base metric, k) of a ``<metric>_mean<k>`` selection metric, else None."""
    if not select:
        return None
    base, sep, k = select.rpartition("_mean")
    return (base, int(k)) if sep and base and k.isdigit() and int(k) > 1 else None


def loop_config(cfg: TrainConfig, select: tuple[str | None, str]) -> dict[str, Any]:
    c = cfg.model_dump(mode="json")
    c["_storage"] = storage.worker_settings()
    c["_select_metric"], c["_select_mode"] = select
    c["_pixel_threshold"] = cfg.eval.provisional_threshold()
    return c


def build_trainer(loop: Any, loop_cfg: dict[str, Any], datasets: dict[str, Any], *, scaling: Any, use_gpu: bool,
                  run_name: str, storage_uri: str, select: tuple[str | None, str] = (None, "max"),
                  num_to_keep: int = 2, callbacks: list[Any] | None = None) -> Any:
    """A TorchTrainer whose run (checkpoints, resume point) lives at ``<storage_uri>/<run_name>``; the train
    dataset is split over the workers, validation is not (rank 0 scores all of it)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    fs, path = storage.arrow_fs(storage_uri)
    sel, mode = select
    ckpt_cfg = CheckpointConfig(num_to_keep=max(num_to_keep, 1), checkpoint_score_attribute=sel,
                                checkpoint_score_order=mode) if sel else CheckpointConfig(num_to_keep=num_to_keep)
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        loop, train_loop_config=loop_cfg, datasets=datasets, dataset_config=DataConfig(datasets_to_split=["train"]),
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=path, storage_filesystem=fs, checkpoint_config=ckpt_cfg,
                             failure_config=FailureConfig(max_failures=1), callbacks=callbacks or [],
                             logging_config=LoggingConfig(log_level="WARNING")))


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


# ------------------------------------------------------------------------------- progress lines and errors


class _Sink:
    """Epoch metrics from Train controllers (in any process of the cluster) for the driver to print."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def put(self, item: dict[str, Any]) -> None:
        self.items.append(item)

    def drain(self) -> list[dict[str, Any]]:
        out, self.items = self.items, []
        return out


def progress_sink() -> Any:
    import ray

    return ray.remote(_Sink).options(num_cpus=0).remote()


def epoch_callback(sink: Any, label: str, epochs: int) -> Any:
    """A Train callback (it runs in the Train controller after every epoch's report) that hands the metrics to
    ``sink``; the driver prints them (:func:`printing`), one line per epoch. Worker logs go to the log file."""
    from ray.train import UserCallback

    class EpochLines(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics:
                sink.put.remote({"label": label, "epochs": epochs, **metrics[0]})

    return EpochLines()


def epoch_line(m: dict[str, Any]) -> str:
    shown = [k for k in ("loss", "train_loss", "val_loss", "val_iou_pooled", "val_iou", "val_image_auroc", "val_mae")
             if isinstance(m.get(k), float)]
    return (f"{m['label']} epoch {m['epoch']}/{m['epochs']} " + " ".join(f"{k}={m[k]:.4f}" for k in shown)
            + f" ({m.get('epoch_time_s', 0):.1f} s)")


def _poll(sink: Any, stop: threading.Event, interval: float = 1.0) -> None:
    import ray

    while True:
        done = stop.wait(interval)
        try:
            for m in ray.get(sink.drain.remote(), timeout=30):
                log.info(epoch_line(m))
        except Exception as e:  # progress lines must never break a run
            log.debug("progress sink: %s", e)
        if done:
            return


@contextlib.contextmanager
def printing(sink: Any) -> Iterator[None]:
    """Print the sink's epoch lines from a driver thread while the body (a fit) runs."""
    stop = threading.Event()
    thread = threading.Thread(target=_poll, args=(sink, stop), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=35)


def fit(trainer: Any, sink: Any = None) -> Any:
    """``trainer.fit()`` (printing ``sink``'s epoch lines) with worker errors the user can fix raised as such."""
    from ray.train import TrainingFailedError

    try:
        with printing(sink) if sink is not None else contextlib.nullcontext():
            result = trainer.fit()
    except TrainingFailedError as e:
        cause = user_error(e)
        if cause is not None:
            raise cause from e
        raise
    if result.error is not None:
        cause = user_error(result.error)
        if cause is not None:
            raise cause
        raise result.error
    return result


def user_error(e: BaseException) -> DefectflowError | None:
    """Find a DefectflowError raised inside a worker (it arrives wrapped in Ray's errors)."""
    seen = set()
    stack: list[Any] = [e]
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
            lines = [line.strip() for line in text.split(marker, 1)[1].strip().splitlines()]
            hint = lines[1].removeprefix("-> ") if len(lines) > 1 and lines[1].startswith("->") else None
            return cls(lines[0], hint)  # DefectflowError's text is "message\n  -> hint"
    return None
