"""From a chosen Train checkpoint to a registered artifact: save, calibrate the decision threshold on validation,
evaluate on test, write the report (metrics, prediction sheet, training curves), publish, register.

The artifact is built in a staging folder and published (detector.json last) only when it is complete, metrics
included: a folder holding detector.json is always a finished artifact, even when a step in between fails.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from components import artifact, catalog, report, storage
from components.config import TrainConfig
from components.data import manifest
from workflows import evaluate as ev
from workflows.trainer import checkpoint_to_detector

log = logging.getLogger("defectflow.train")

STAGING = ".staging-artifact"


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
    curves_uri: str | None = None
    seconds: float = 0.0


def calibrate(art_uri: str, full: pa.Table, cfg: TrainConfig, use_gpu: bool) -> dict[str, Any]:
    """Choose the image decision threshold (``eval.decision_threshold``) and the pixel threshold
    (``eval.threshold``) and store them in the artifact."""
    return ev.calibrate(art_uri, full, cfg.eval.decision_threshold, pixel_setting=cfg.eval.threshold,
                        margin=cfg.eval.threshold_margin, batch_size=cfg.eval.batch_size,
                        num_actors=cfg.eval.num_actors, use_gpu=use_gpu, max_pixels=cfg.data.max_image_pixels)


def evaluate_split(art_uri: str, full: pa.Table, cfg: TrainConfig, use_gpu: bool
                   ) -> tuple[ev.EvalResult, dict[str, Any]]:
    """The artifact on ``eval.split``, and its metrics named after the split (``test_iou``, ...)."""
    split = cfg.eval.split
    result = ev.evaluate(art_uri, full, split=split, threshold=None,  # the artifact's (calibrated) pixel threshold
                         seg_iou_threshold=cfg.eval.seg_iou_threshold, batch_size=cfg.eval.batch_size,
                         num_actors=cfg.eval.num_actors, use_gpu=use_gpu, sheet_images=cfg.eval.sheet_images,
                         max_pixels=cfg.data.max_image_pixels)
    return result, {k if k == "split" else f"{split}_{k}": v for k, v in result.metrics.items()}


def release(cfg: TrainConfig, full: pa.Table, checkpoint: Any, *, layout: catalog.Layout, run_uri: str,
            history: list[dict[str, Any]], use_gpu: bool, lineage: dict[str, Any] | None = None,
            report_uri: str | None = None, register: bool | None = None) -> TrainResult:
    """Checkpoint -> staged artifact -> calibration -> evaluation -> report -> published artifact -> catalog.

    ``history`` is the per-epoch metrics of the whole run; the chosen checkpoint may be an earlier, better epoch.
    """
    detector, state = checkpoint_to_detector(checkpoint, cfg)
    chosen = int(state["epoch"]) + 1
    final_uri = storage.join(run_uri, "artifact")
    staging = storage.join(run_uri, STAGING)
    storage.delete(staging, recursive=True)  # leftovers of an interrupted release
    lineage = {"manifest": cfg.data.manifest, "manifest_digest": manifest.digest(full), "run": run_uri,
               "regime": cfg.data.regime, "epochs_trained": len(history), "chosen_epoch": chosen,
               "train_config": cfg.model_dump(mode="json"), **(lineage or {})}
    provisional = cfg.eval.provisional_threshold()  # until calibration replaces it
    artifact.save(detector, staging, threshold=provisional, pixel_threshold=provisional, lineage=lineage)
    calibrate(staging, full, cfg, use_gpu)
    result, split_metrics = evaluate_split(staging, full, cfg, use_gpu)
    at_chosen = next((h for h in history if int(h.get("epoch", 0)) == chosen), {})
    val_metrics = {k: v for k, v in at_chosen.items() if k.startswith("val_")}
    metrics = {**split_metrics, **val_metrics}
    if state.get("select"):
        metrics[f"best_{state['select']}"] = state.get("best")
    metrics = {k: v for k, v in metrics.items() if v is not None}
    artifact.update_meta(staging, metrics=metrics)

    report_uri = report_uri or layout.reports(cfg.name)
    ev.write_report(result, report_uri, title=f"{cfg.name}: {cfg.model.family} on {cfg.eval.split}")
    storage.write_json(storage.join(report_uri, "history.json"), history)
    curves_uri = storage.join(report_uri, "curves.png")
    storage.write_bytes(curves_uri, report.training_curves(history, chosen, title=f"{cfg.name} ({cfg.model.family})"))
    artifact.publish(staging, final_uri)
    registered = None
    if cfg.output.register_model if register is None else register:
        registered = artifact.register(final_uri, layout, cfg.output.model_name or cfg.model.family)
    return TrainResult(run_name=cfg.name, run_uri=run_uri, artifact_uri=final_uri, registered_uri=registered,
                       metrics=metrics, val_metrics=val_metrics, report_uri=report_uri,
                       sheet_uri=storage.join(report_uri, "sheet.png") if result.sheet_png else None,
                       curves_uri=curves_uri)
