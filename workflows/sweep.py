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

import argparse
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
from components.models import registry

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
           select: tuple[str | None, str], datasets: dict[str, Any] | None = None) -> None:
    """One Tune trial: the driver of one Train run.

    Nothing may follow ``fit()`` here: ASHA stops a trial by killing this function. Every epoch's checkpoint path
    reaches Tune through TuneReportCallback, and the sweep driver builds artifacts from those checkpoints.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from workflows import train as tr

    name = f"{sweep_name}-{tune.get_context().get_trial_id()}"
    cfg = trial_config(base, config, name)
    cfg.storage.apply()
    if datasets is None:
        _full, table = tr.training_table(cfg)
        datasets = tr.build_datasets(table, cfg)
    trainer = tr.build_trainer(cfg, datasets, tr.loop_config(cfg, select), run_name=name, storage_uri=trials_uri,
                               use_gpu=use_gpu, callbacks=[TuneReportCallback()])
    tr._fit(trainer)


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
    from workflows.runtime import cluster_resources

    if cfg.max_concurrent_trials != "auto":
        return int(cfg.max_concurrent_trials)
    res = cluster_resources()
    per_cpu = base.scaling.num_workers * base.scaling.cpus_per_worker + TRIAL_DRIVER_CPU
    n = math.floor(res.get("CPU", 1.0) / per_cpu + 1e-9)
    if use_gpu:
        n = min(n, math.floor(res.get("GPU", 0.0) / (base.scaling.num_workers * base.scaling.gpus_per_worker) + 1e-9))
    return max(1, n)


def run(cfg: SweepConfig) -> SweepResult:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from workflows import evaluate as ev
    from workflows import train as tr
    from workflows.runtime import check_train_resources, init_ray, resolve_use_gpu

    t0 = time.time()
    base_dict = dict(cfg.train)
    base_dict.setdefault("name", cfg.name)
    base = cfgmod.validate(TrainConfig, base_dict, "sweep.train")
    for key in cfg.space:
        try:
            trial_config(base.model_dump(mode="json"), {key: _example(cfg.space[key])}, "check")
        except ConfigError as e:
            raise ConfigError(f"sweep space key {key!r} does not fit the train config: {e.message}",
                              "space keys are dotted train-config keys, e.g. model.params.n or loss.dice_weight"
                              ) from e
    registry.get(base.model.family)
    layout = base.storage.apply()
    full, table = tr.training_table(base)
    if tr.selection_metric(table, base)[0] is None:
        raise ConfigError("the manifest has no validation split; a sweep needs one to compare trials",
                          "re-ingest with a val fraction > 0 (split.val)")
    select = (cfg.metric, cfg.mode)
    init_ray(base.ray, base.storage)
    use_gpu = resolve_use_gpu(base.scaling)
    check_train_resources(base.scaling, use_gpu)
    n_conc = concurrency(cfg, base, use_gpu)
    data_keys = [k for k in cfg.space if k.startswith("data.")]
    shared = None if data_keys else tr.build_datasets(table, base)
    tr.quiet_data_progress()

    sweep_uri = layout.run(cfg.name)
    trials_uri = storage.join(sweep_uri, "trials")
    base_json = base.model_dump(mode="json")
    trainable = tune.with_parameters(_trial, base=base_json, sweep_name=cfg.name, trials_uri=trials_uri,
                                     use_gpu=use_gpu, select=select, datasets=shared)
    trainable = tune.with_resources(trainable, {"cpu": TRIAL_DRIVER_CPU})
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=base.optim.epochs + 1,
                               grace_period=min(cfg.scheduler.grace_period, base.optim.epochs),
                               reduction_factor=cfg.scheduler.reduction_factor)
                 if cfg.scheduler.type == "asha" else FIFOScheduler())
    fs, tune_path = storage.arrow_fs(sweep_uri)
    run_config = tune.RunConfig(name="tune", storage_path=tune_path, storage_filesystem=fs)
    experiment = storage.join(sweep_uri, "tune")
    log.info("sweep %s: %d parameter(s), up to %d concurrent trial(s), scheduler %s", cfg.name, len(cfg.space),
             n_conc, cfg.scheduler.type)
    experiment_path = storage.strip_scheme(experiment)
    if tune.Tuner.can_restore(experiment_path, storage_filesystem=fs):
        log.info("resuming sweep %s from %s", cfg.name, experiment)
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True,
                                   param_space=param_space(cfg.space), storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space(cfg.space),
            tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, scheduler=scheduler,
                                        num_samples=cfg.num_samples, max_concurrent_trials=n_conc,
                                        search_alg=BasicVariantGenerator(random_state=cfg.seed)),
            run_config=run_config)
    grid = tuner.fit()

    trials, curves = _collect(grid, cfg, base.optim.epochs)
    report_uri = layout.reports(cfg.name)
    _write_report(cfg, trials, curves, report_uri)
    done = [t for t in trials if t["checkpoint"] and t.get("best") is not None]
    if not done:
        errors = [t.get("error") for t in trials if t.get("error")]
        raise DefectflowError(f"no trial of sweep {cfg.name} reported a checkpoint",
                              f"first error: {errors[0]}" if errors else "see the trial logs in " + sweep_uri)
    pick = max if cfg.mode == "max" else min
    best = pick(done, key=lambda t: t["best"])
    log.info("best trial %s: %s=%.4f with %s", best["trial_id"], cfg.metric, best["best"], best["params"])
    best["artifact"] = _trial_artifact(best, base_json, cfg, trials_uri, select)
    tr.calibrate(best["artifact"], full, trial_config(base_json, best["params"], "calibrate"), use_gpu)
    result = ev.evaluate(best["artifact"], full, split=base.eval.split, threshold=base.eval.threshold,
                         seg_iou_threshold=base.eval.seg_iou_threshold, batch_size=base.eval.batch_size,
                         num_actors=base.eval.num_actors, use_gpu=use_gpu, sheet_images=base.eval.sheet_images,
                         max_pixels=base.data.max_image_pixels)
    test_metrics = {f"{base.eval.split}_{k}" if k != "split" else k: v for k, v in result.metrics.items()}
    artifact.update_meta(best["artifact"], metrics={k: v for k, v in test_metrics.items() if v is not None},
                         lineage={"sweep_report": report_uri})
    ev.write_report(result, storage.join(report_uri, "best"), title=f"Sweep {cfg.name}: best trial on test")
    registered = artifact.register(best["artifact"], layout, base.output.model_name or base.model.family,
                                   lineage={"sweep": cfg.name, "trial_id": best["trial_id"]})
    _write_report(cfg, trials, curves, report_uri, best=best, test_metrics=test_metrics, registered=registered)
    return SweepResult(name=cfg.name, trials=trials, best=best, registered_uri=registered, report_uri=report_uri,
                       test_metrics=test_metrics, seconds=round(time.time() - t0, 1))


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


def _trial_artifact(trial: dict[str, Any], base: dict[str, Any], cfg: SweepConfig, trials_uri: str,
                    select: tuple[str | None, str]) -> str:
    """Build the artifact of a trial from its best Train checkpoint (in the trials storage)."""
    from ray.train import Checkpoint

    from workflows import train as tr

    name = f"{cfg.name}-{trial['trial_id']}"
    tcfg = trial_config(base, trial["params"], name)
    fs, _ = storage.arrow_fs(trials_uri)
    detector, state = tr.checkpoint_to_detector(Checkpoint(path=trial["checkpoint"], filesystem=fs), tcfg)
    uri = storage.join(trials_uri, name, "artifact")
    artifact.save(detector, uri, threshold=tcfg.eval.threshold,
                  metrics={f"best_{select[0]}": trial["best"]},
                  lineage={"sweep": cfg.name, "trial_id": trial["trial_id"], "trial_params": trial["params"],
                           "chosen_epoch": int(state["epoch"]) + 1, "manifest": tcfg.data.manifest,
                           "regime": tcfg.data.regime, "train_config": tcfg.model_dump(mode="json")})
    return uri


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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML sweep config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a sweep key, e.g. --set train.optim.epochs=2 --set num_samples=2")


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    return cfgmod.load(SweepConfig, args.config, args.set)


def main(argv: list[str] | None = None) -> int:
    from workflows.cli import run_command

    return run_command("sweep", argv)


if __name__ == "__main__":
    raise SystemExit(main())
