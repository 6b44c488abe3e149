"""sweep: hyper-parameter search over a train config with Ray Tune (Train V2 pattern) and ASHA.

    defectflow sweep --config workflows/configs/sweep_gmbinet_procedural.yaml

Every trial is a Tune function that builds and fits a TorchTrainer (the Train V2 way; ``Tuner(trainer)`` is the
deprecated V1 API), reporting each epoch's metrics to Tune through ``TuneReportCallback`` so ASHA can stop weak
trials early. Every reported epoch carries its Train checkpoint; the best checkpoint of the best trial (by
``metric``/``mode``) becomes an artifact, is evaluated on the test split and is copied into the registry. The report
(``<storage.root>/reports/<name>/``) holds ``trials.csv``, ``trials.md`` and ``curves.png``. Re-running a sweep with
the same name resumes it.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from components import artifact, report, storage
from components import config as cfgmod
from components.config import SweepConfig, TrainConfig
from components.errors import ConfigError, DefectflowError
from workflows import console, features, release, train, train_data, trainer
from workflows.command import Command, add_config_options, main
from workflows.runtime import check_train_resources, cluster_resources, init_ray, resolve_use_gpu

log = logging.getLogger("defectflow.sweep")

TRIAL_DRIVER_CPU = 0.01  # what each Tune trial (the Train driver) holds; Tune rejects 0


def param_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        kind, vals = next(iter(spec.items()))
        if kind == "grid":
            out[key] = tune.grid_search(list(vals))
        elif kind == "choice":
            out[key] = tune.choice(list(vals))
        elif kind == "uniform":
            out[key] = tune.uniform(float(vals[0]), float(vals[1]))
        elif kind == "loguniform":
            out[key] = tune.loguniform(float(vals[0]), float(vals[1]))
        else:
            out[key] = tune.randint(int(vals[0]), int(vals[1]))
    return out


def trial_config(base: dict[str, Any], params: dict[str, Any], name: str) -> TrainConfig:
    data = copy.deepcopy(base)
    for key, value in params.items():
        cfgmod.set_dotted(data, key, value)
    data["name"] = name
    return cfgmod.validate(TrainConfig, data, f"trial config {name}")


def _trial(config: dict[str, Any], *, base: dict[str, Any], sweep_name: str, trials_uri: str, use_gpu: bool,
           select: tuple[str | None, str], sink: Any, datasets: dict[str, Any] | None = None) -> None:
    """One Tune trial: the driver of one Train run.

    Nothing may follow ``fit()`` here: ASHA stops a trial by killing this function. Every epoch's checkpoint path
    reaches Tune through TuneReportCallback, and the sweep driver builds artifacts from those checkpoints.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    name = f"{sweep_name}-{trial_id}"
    cfg = trial_config(base, config, name)
    cfg.storage.apply()
    if datasets is None:
        datasets = train_data.build(train.rows_for(cfg)[1], cfg, features.for_training(cfg))
    callbacks = [TuneReportCallback(), trainer.epoch_callback(sink, f"trial {trial_id}", cfg.optim.epochs)]
    fit = trainer.build_trainer(trainer.train_loop_per_worker, trainer.loop_config(cfg, select), datasets,
                                scaling=cfg.scaling, use_gpu=use_gpu, run_name=name, storage_uri=trials_uri,
                                select=select, num_to_keep=cfg.checkpoint.num_to_keep, callbacks=callbacks)
    trainer.fit(fit)


@dataclass
class SweepResult:
    name: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    registered_uri: str | None
    report_uri: str
    test_metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def concurrency(cfg: SweepConfig, base: TrainConfig, use_gpu: bool) -> int:
    if cfg.max_concurrent_trials != "auto":
        return int(cfg.max_concurrent_trials)
    res = cluster_resources()
    per_cpu = base.scaling.num_workers * base.scaling.cpus_per_worker + TRIAL_DRIVER_CPU
    n = math.floor(res.get("CPU", 1.0) / per_cpu + 1e-9)
    if use_gpu:
        n = min(n, math.floor(res.get("GPU", 0.0) / (base.scaling.num_workers * base.scaling.gpus_per_worker) + 1e-9))
    return max(1, n)


def check_space(cfg: SweepConfig, base: TrainConfig) -> None:
    for key in cfg.space:
        try:
            trial_config(base.model_dump(mode="json"), {key: _example(cfg.space[key])}, "check")
        except ConfigError as e:
            raise ConfigError(f"sweep space key {key!r} does not fit the train config: {e.message}",
                              "space keys are dotted train-config keys, e.g. model.params.n or loss.dice_weight"
                              ) from e


def make_tuner(cfg: SweepConfig, base: TrainConfig, trainable: Any, sweep_uri: str, n_conc: int) -> Any:
    """A new Tune experiment, or the one of an interrupted run of the same sweep (it resumes)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    fs, _ = storage.arrow_fs(sweep_uri)
    experiment = storage.strip_scheme(storage.join(sweep_uri, "tune"))
    if tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        log.info("resuming sweep %s from %s", cfg.name, experiment)
        return tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True,
                                  param_space=param_space(cfg.space), storage_filesystem=fs)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=base.optim.epochs + 1,
                               grace_period=min(cfg.scheduler.grace_period, base.optim.epochs),
                               reduction_factor=cfg.scheduler.reduction_factor)
                 if cfg.scheduler.type == "asha" else FIFOScheduler())
    return tune.Tuner(
        trainable, param_space=param_space(cfg.space),
        tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, scheduler=scheduler,
                                    num_samples=cfg.num_samples, max_concurrent_trials=n_conc,
                                    search_alg=BasicVariantGenerator(random_state=cfg.seed)),
        run_config=tune.RunConfig(name="tune", storage_path=storage.strip_scheme(sweep_uri), storage_filesystem=fs,
                                  verbose=0))


def run(cfg: SweepConfig) -> SweepResult:
    from ray import tune

    t0 = time.time()
    base = cfgmod.validate(TrainConfig, {"name": cfg.name, **cfg.train}, "sweep.train")
    check_space(cfg, base)
    layout = base.storage.apply()
    sweep_uri = layout.run(cfg.name)
    console.keep_log_in(sweep_uri)
    full, table = train.rows_for(base)
    if trainer.selection_metric(table, base)[0] is None:
        raise ConfigError("the manifest has no validation split; a sweep needs one to compare trials",
                          "re-ingest with a val fraction > 0 (split.val)")
    init_ray(base.ray, base.storage)
    use_gpu = resolve_use_gpu(base.scaling)
    check_train_resources(base.scaling, use_gpu, extra_cpus=TRIAL_DRIVER_CPU)
    n_conc = concurrency(cfg, base, use_gpu)
    # trials share one dataset unless the space changes what it holds: the rows (data.*) or, when training from
    # cached features, the model that computes them (model.*)
    per_trial = ("data.", "model.") if base.data.features else ("data.",)
    shared = None if any(k.startswith(per_trial) for k in cfg.space) else train_data.build(
        table, base, features.for_training(base))
    train_data.quiet_progress()

    trials_uri = storage.join(sweep_uri, "trials")
    base_json = base.model_dump(mode="json")
    sink = trainer.progress_sink()
    trainable = tune.with_resources(tune.with_parameters(
        _trial, base=base_json, sweep_name=cfg.name, trials_uri=trials_uri, use_gpu=use_gpu,
        select=(cfg.metric, cfg.mode), sink=sink, datasets=shared), {"cpu": TRIAL_DRIVER_CPU})
    log.info("sweep %s: %d parameter(s), up to %d concurrent trial(s), scheduler %s", cfg.name, len(cfg.space),
             n_conc, cfg.scheduler.type)
    with trainer.printing(sink):
        grid = make_tuner(cfg, base, trainable, sweep_uri, n_conc).fit()

    trials, curves = _collect(grid, cfg, base.optim.epochs)
    report_uri = layout.reports(cfg.name)
    _write_report(cfg, trials, curves, report_uri)
    best = best_trial(cfg, trials, sweep_uri)
    released = _release_best(cfg, best, base_json, full, layout, trials_uri, report_uri, use_gpu)
    best["artifact"], test_metrics = released.artifact_uri, released.metrics
    registered = artifact.register(best["artifact"], layout, base.output.model_name or base.model.family,
                                   lineage={"sweep": cfg.name, "trial_id": best["trial_id"]}
                                   ) if base.output.register_model else None
    _write_report(cfg, trials, curves, report_uri, best=best, test_metrics=test_metrics, registered=registered)
    return SweepResult(name=cfg.name, trials=trials, best=best, registered_uri=registered, report_uri=report_uri,
                       test_metrics=test_metrics, seconds=round(time.time() - t0, 1))


def best_trial(cfg: SweepConfig, trials: list[dict[str, Any]], sweep_uri: str) -> dict[str, Any]:
    done = [t for t in trials if t["checkpoint"] and t.get("best") is not None]
    if not done:
        errors = [t.get("error") for t in trials if t.get("error")]
        raise DefectflowError(f"no trial of sweep {cfg.name} reported a checkpoint",
                              f"first error: {errors[0]}" if errors else "see the trial logs in " + sweep_uri)
    best = (max if cfg.mode == "max" else min)(done, key=lambda t: t["best"])
    log.info("best trial %s: %s=%.4f with %s", best["trial_id"], cfg.metric, best["best"], best["params"])
    return best


def _release_best(cfg: SweepConfig, best: dict[str, Any], base: dict[str, Any], full: Any, layout: Any,
                  trials_uri: str, report_uri: str, use_gpu: bool) -> Any:
    """The best trial's best checkpoint released as any run's is (:func:`workflows.release.release`: staged,
    calibrated, evaluated on test, reported under ``<report>/best``, published), into its trial's run folder."""
    from ray.train import Checkpoint

    name = f"{cfg.name}-{best['trial_id']}"
    fs, _ = storage.arrow_fs(trials_uri)
    checkpoint = Checkpoint(path=best["checkpoint"], filesystem=fs)
    return release.release(trial_config(base, best["params"], name), full, checkpoint, layout=layout,
                           run_uri=storage.join(trials_uri, name), history=trainer.checkpoint_state(checkpoint)
                           ["history"], use_gpu=use_gpu, register=False, report_uri=storage.join(report_uri, "best"),
                           lineage={"sweep": cfg.name, "sweep_report": report_uri, "trial_id": best["trial_id"],
                                    "trial_params": best["params"]})


def _example(spec: dict[str, Any]) -> Any:
    return next(iter(spec.values()))[0]


def _collect(grid: Any, cfg: SweepConfig, epochs_planned: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per trial: parameters, metric curve, best value and the Train checkpoint that reached it."""
    trials, curves = [], {}
    for res in grid:
        trial_id = _trial_id(res)
        params = dict(res.config or {})
        df = res.metrics_dataframe
        values: list[float] = []
        epochs: list[float] = []
        best, best_ckpt = None, None
        if df is not None and cfg.metric in df.columns:
            sub = df[df[cfg.metric].notna()]
            values = [float(v) for v in sub[cfg.metric]]
            epochs = [float(v) for v in sub["epoch"]] if "epoch" in sub else list(range(1, len(values) + 1))
            if values:
                idx = sub[cfg.metric].idxmax() if cfg.mode == "max" else sub[cfg.metric].idxmin()
                best = float(sub.loc[idx, cfg.metric])
                if "checkpoint_path" in sub and isinstance(sub.loc[idx, "checkpoint_path"], str):
                    best_ckpt = sub.loc[idx, "checkpoint_path"]
        stopped = bool(values) and len(values) < epochs_planned
        trials.append({"trial_id": trial_id, "params": params, "epochs": len(values), "best": best,
                       "last": values[-1] if values else None, "checkpoint": best_ckpt, "artifact": None,
                       "status": "error" if res.error else ("stopped early" if stopped else "completed"),
                       "error": str(res.error)[:500] if res.error else None})
        label = trial_id + " " + ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in params.items())
        curves[label] = (epochs, values)
    trials.sort(key=lambda t: t["trial_id"])
    return trials, curves


def _trial_id(res: Any) -> str:
    """Tune puts ``trial_id`` into every reported result; a trial that never reported falls back to its folder."""
    tid = (res.metrics or {}).get("trial_id")
    return str(tid) if tid else storage.basename(str(res.path or "unknown"))


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _write_report(cfg: SweepConfig, trials: list[dict[str, Any]], curves: dict[str, Any], report_uri: str,
                  best: dict[str, Any] | None = None, test_metrics: dict[str, Any] | None = None,
                  registered: str | None = None) -> None:
    keys = list(cfg.space)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["trial_id", *keys, "epochs", f"best_{cfg.metric}", f"last_{cfg.metric}", "status", "checkpoint"])
    for t in trials:
        w.writerow([t["trial_id"], *[t["params"].get(k) for k in keys], t["epochs"], t["best"], t["last"],
                    t["status"], t["checkpoint"] or ""])
    storage.write_text(storage.join(report_uri, "trials.csv"), buf.getvalue())
    rows = [{"trial": t["trial_id"], **{k: t["params"].get(k) for k in keys}, "epochs": t["epochs"],
             f"best {cfg.metric}": t["best"], "status": t["status"]} for t in trials]
    md = [f"# Sweep {cfg.name}\n", f"Metric: `{cfg.metric}` ({cfg.mode}), scheduler: {cfg.scheduler.type}.\n",
          report.markdown_table(rows), "\n![curves](curves.png)\n"]
    if best is not None:
        md.append(f"\n## Best trial: {best['trial_id']}\n\nParameters: `{best['params']}`\n")
        if registered:
            md.append(f"\nRegistered as `{registered}`.\n")
        if test_metrics:
            md.append("\n" + report.markdown_table([{"metric": k, "value": v} for k, v in test_metrics.items()]))
    storage.write_text(storage.join(report_uri, "trials.md"), "\n".join(md))
    storage.write_bytes(storage.join(report_uri, "curves.png"),
                        report.line_plot(curves, "epoch", cfg.metric, f"sweep {cfg.name}"))


# ---------------------------------------------------------------------------------------------- CLI


def _report(res: SweepResult) -> str:
    best = res.best or {}
    return (f"sweep {res.name}: {len(res.trials)} trial(s); best {best.get('trial_id')} {best.get('params', '')}\n"
            f"registered: {res.registered_uri}\nreport: {res.report_uri}/trials.md")


COMMAND = Command("sweep", "hyper-parameter sweep with Ray Tune + ASHA", lambda p: add_config_options(p, "sweep"),
                  lambda args: run(cfgmod.load(SweepConfig, args.config, args.set)), _report)

if __name__ == "__main__":
    raise SystemExit(main(COMMAND))
