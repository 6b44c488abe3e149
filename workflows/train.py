"""train: a manifest -> a trained, evaluated, registered detector, on Ray Train (Train V2 TorchTrainer).

    defectflow train --config workflows/configs/gmbinet_procedural.yaml --set optim.epochs=3
    python -m workflows.train --config workflows/configs/gmbinet_sd900.yaml

Re-running with the same ``name`` and storage resumes from the last checkpoint: a killed run loses at most one
epoch. The pieces: :mod:`components.data.training_set` (which rows), :mod:`workflows.train_data` (Ray Datasets),
:mod:`workflows.trainer` (the worker loop, checkpoints, the TorchTrainer), :mod:`workflows.release` (artifact,
calibration, evaluation, report, catalog).
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa

from components import config as cfgmod
from components.config import TrainConfig
from components.data import manifest
from components.data.training_set import training_table
from components.models import registry
from workflows import console, features, train_data, trainer
from workflows.command import Command, add_config_options, main
from workflows.release import TrainResult, release
from workflows.runtime import check_train_resources, init_ray, resolve_use_gpu

log = logging.getLogger("defectflow.train")


def rows_for(cfg: TrainConfig) -> tuple[pa.Table, pa.Table]:
    """(full manifest, what the trainer sees); every config and data error surfaces here, before Ray starts."""
    family = registry.get(cfg.model.family)
    registry.params(cfg.model.family, cfg.model.params)
    registry.loss_params(cfg.model.family, cfg.loss)
    full = manifest.read(cfg.data.manifest)
    syn = cfg.data.synthetic
    table = training_table(full, regime=cfg.data.regime, mixed_masks=cfg.data.mixed_masks, seed=cfg.seed,
                           synthetic_source=syn.source if syn else None, synthetic_count=syn.count if syn else 0,
                           needs_masks=family.needs_masks, max_train_samples=cfg.data.max_train_samples,
                           family=family.name)
    return full, table


def run(cfg: TrainConfig) -> TrainResult:
    t0 = time.time()
    layout = cfg.storage.apply()
    run_uri = layout.run(cfg.name)
    console.keep_log_in(run_uri)
    full, table = rows_for(cfg)
    select = trainer.selection_metric(table, cfg)
    init_ray(cfg.ray, cfg.storage)
    use_gpu = resolve_use_gpu(cfg.scaling)
    check_train_resources(cfg.scaling, use_gpu)
    log.info("run %s: %s on %s (regime %s), %s", cfg.name, cfg.model.family, cfg.data.manifest, cfg.data.regime,
             {k: v.get("rows") for k, v in manifest.summary(table).items() if isinstance(v, dict)})

    datasets = train_data.build(table, cfg, features.for_training(cfg))
    train_data.quiet_progress()
    sink = trainer.progress_sink()
    fit = trainer.build_trainer(
        trainer.train_loop_per_worker, trainer.loop_config(cfg, select), datasets, scaling=cfg.scaling,
        use_gpu=use_gpu, run_name=cfg.name, storage_uri=layout.runs(), select=select,
        num_to_keep=cfg.checkpoint.num_to_keep, callbacks=[trainer.epoch_callback(sink, cfg.name, cfg.optim.epochs)])
    resume = trainer.resume_epoch(run_uri)
    if resume is not None:
        log.info("resuming run %s at epoch %d (checkpoints in %s)", cfg.name, resume, run_uri)
    log.info("training %d epoch(s) with %d worker(s) (GPU: %s); checkpoints in %s", cfg.optim.epochs,
             cfg.scaling.num_workers, use_gpu, run_uri)
    result = trainer.fit(fit, sink)

    chosen = trainer.pick_checkpoint(result, cfg, select)
    history = trainer.checkpoint_state(result.checkpoint)["history"]
    out = release(cfg, full, chosen, layout=layout, run_uri=run_uri, history=history, use_gpu=use_gpu,
                  lineage={"run_name": cfg.name})
    out.seconds = round(time.time() - t0, 1)
    return out


def report(res: TrainResult) -> str:
    lines = [f"run: {res.run_name} ({res.seconds:.0f} s)", f"artifact: {res.artifact_uri}"]
    if res.registered_uri:
        lines.append(f"registered: {res.registered_uri}")
    lines += [f"  {k}: {v:.4f}" for k, v in res.metrics.items() if isinstance(v, float)]
    lines += [f"report: {res.report_uri}/report.md (training curves: curves.png)"] if res.report_uri else []
    lines += [f"prediction sheet: {res.sheet_uri}"] if res.sheet_uri else []
    return "\n".join(lines)


COMMAND = Command("train", "train a detector on Ray Train, evaluate, register",
                  lambda p: add_config_options(p, "train"),
                  lambda args: run(cfgmod.load(TrainConfig, args.config, args.set)), report)

if __name__ == "__main__":
    raise SystemExit(main(COMMAND))
