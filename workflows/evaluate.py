"""evaluate: score a model artifact on a manifest split with Ray Data, write metrics.json and a prediction sheet.

    defectflow evaluate --model ./defectflow-data/models/gmbinet --manifest ./data/sd900.parquet --split test

Each actor of the pool loads the artifact once, runs the Detector on every image at its native size and returns
small per-image statistics (confusion counts, IoU, MAE, histograms); the driver aggregates them, so evaluation scales
with the pool and never gathers full-size maps.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from components import artifact, catalog, report, storage
from components import config as cfgmod
from components.config import EvalSettings, RayConfig, StorageConfig
from components.data import manifest
from components.data.images import DEFAULT_MAX_PIXELS, resize_image, resize_mask
from components.errors import DataError
from components.inference import infer, pick_device
from components.metrics.aggregate import image_stats, summarize, threshold_warnings
from workflows import console
from workflows.command import Command, main

log = logging.getLogger("defectflow.evaluate")

THUMB = 192


def _thumb(arr: np.ndarray, is_mask: bool = False) -> np.ndarray:
    h, w = arr.shape[:2]
    s = min(1.0, THUMB / max(h, w))
    size = (max(1, round(h * s)), max(1, round(w * s)))
    if is_mask:
        return resize_mask(arr.astype(np.uint8), size)
    if arr.ndim == 2:
        return resize_image(arr[:, :, None].repeat(3, axis=2), size)[:, :, 0]
    return resize_image(arr, size)


class Scorer:
    """Ray Data actor: artifact loaded once; per-image stats out. Also usable without Ray (call it on a batch).
    An image (or mask) that cannot be decoded gets a row with its ``error`` and no stats: reported, not fatal."""

    def __init__(self, model_uri: str, threshold: float | None = None,
                 storage_settings: dict[str, Any] | None = None, sheet_ids: list[str] | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, use_gpu: bool = False):
        storage.configure(**(storage_settings or {}))
        self.device = pick_device(use_gpu)
        self.detector, meta = artifact.load(model_uri, device=self.device)
        self.threshold = float(threshold if threshold is not None else pixel_threshold(meta))
        self.sheet_ids = set(sheet_ids or [])
        self.max_pixels = max_pixels

    def score(self, rec: dict[str, Any]) -> dict[str, Any]:
        try:
            img = manifest.load_image(rec, max_pixels=self.max_pixels)
            mask = manifest.load_mask(rec, shape=img.shape[:2], max_pixels=self.max_pixels)
        except DataError as e:
            log.warning("skipping %s: %s", rec["sample_id"], e.message)
            return {"score": None, "stats": None, "thumb": None, "error": e.message}
        score, prob = infer(self.detector, img, self.device)
        thumb = None
        if rec["sample_id"] in self.sheet_ids:
            buf = io.BytesIO()
            np.savez_compressed(buf, image=_thumb(img), prob=_thumb(prob),
                                mask=_thumb(mask, True) if mask is not None else np.zeros((0, 0), np.uint8))
            thumb = buf.getvalue()
        return {"score": score, "stats": json.dumps(image_stats(prob, mask, threshold=self.threshold)),
                "thumb": thumb, "error": None}

    def __call__(self, batch: pa.Table) -> pa.Table:
        recs = batch.to_pylist()
        out = [self.score(r) for r in recs]
        return pa.table({"sample_id": pa.array([r["sample_id"] for r in recs], pa.string()),
                         "label": pa.array([r.get("label") for r in recs], pa.int8()),
                         "score": pa.array([o["score"] for o in out], pa.float64()),
                         "stats": pa.array([o["stats"] for o in out], pa.string()),
                         "thumb": pa.array([o["thumb"] for o in out], pa.binary()),
                         "error": pa.array([o["error"] for o in out], pa.string())})


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    per_image: list[dict[str, Any]] = field(default_factory=list)
    sheet_png: bytes | None = None
    report_uri: str | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)  # images that could not be decoded, with why
    warnings: list[str] = field(default_factory=list)  # for a person: metrics that say nothing, and why


def pick_sheet_ids(table: pa.Table, n: int) -> list[str]:
    """Half defective, half defect-free (when both exist), in a seeded-hash order of ids: stable between runs and
    spread over classes (sorted ids would show one class only)."""
    if n <= 0 or table.num_rows == 0:
        return []
    ids = table["sample_id"].to_pylist()
    labels = table["label"].to_pylist()
    pos = sorted((i for i, lab in zip(ids, labels, strict=True) if lab == 1), key=lambda i: manifest.unit_hash(i, 0))
    neg = sorted((i for i, lab in zip(ids, labels, strict=True) if lab != 1), key=lambda i: manifest.unit_hash(i, 0))
    n_pos = min(len(pos), max(n - len(neg), (n + 1) // 2))
    return pos[:n_pos] + neg[: n - n_pos]


def evaluate(model_uri: str, table: pa.Table, *, split: str = "test", threshold: float | None = None,
             seg_iou_threshold: float = 0.5, batch_size: int = 8, num_actors: int = 1, use_gpu: bool = False,
             sheet_images: int = 8, max_pixels: int = DEFAULT_MAX_PIXELS, warn: bool = True) -> EvalResult:
    """Evaluate an artifact on ``split`` of a manifest table (Ray must be initialised). ``warn``: log the
    result's warnings (calibration, which is about to move the threshold, does not)."""
    import ray.data

    model_uri = catalog.resolve_model(model_uri)
    meta = artifact.read_meta(model_uri)
    thr = float(threshold if threshold is not None else pixel_threshold(meta))
    sub = table.filter(pc.equal(table["split"], split)) if split != "all" else table
    if sub.num_rows == 0:
        raise DataError(f"the manifest has no rows in split {split!r}", f"splits present: "
                        f"{sorted(set(table['split'].to_pylist()))}")
    sheet_ids = pick_sheet_ids(sub, sheet_images)
    log.info("evaluating on %d %s image(s) with %d actor(s)", sub.num_rows, split, num_actors)
    log.debug("model %s", model_uri)
    ds = ray.data.from_arrow(sub)
    ds = ds.map_batches(
        Scorer,
        fn_constructor_kwargs={"model_uri": model_uri, "threshold": thr, "storage_settings": storage.worker_settings(),
                               "sheet_ids": sheet_ids, "max_pixels": max_pixels, "use_gpu": use_gpu},
        batch_size=batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=1, num_gpus=1 if use_gpu else 0,
    )
    rows = ds.take_all()
    calibrated = threshold is None and (meta.get("pixel_threshold_info") or {}).get("rule") == "pixel_f1_max"
    result = _aggregate(rows, thr, seg_iou_threshold, model_uri, split, decision_threshold=meta.get("threshold"),
                        calibrated=calibrated)
    for w in result.warnings if warn else []:
        log.warning("%s split: %s", split, w)
    return result


def pixel_threshold(meta: dict[str, Any]) -> float:
    return float(meta.get("pixel_threshold", meta.get("threshold", 0.5)))


def decision_metrics(labels: list[int | None], scores: list[float], threshold: float) -> dict[str, Any]:
    """Image decisions at the artifact's threshold: accuracy, precision, recall, F1 (labelled images only)."""
    pairs = [(lab, s) for lab, s in zip(labels, scores, strict=True) if lab is not None]
    if not pairs:
        return {}
    tp = sum(1 for lab, s in pairs if lab == 1 and s >= threshold)
    fp = sum(1 for lab, s in pairs if lab == 0 and s >= threshold)
    fn = sum(1 for lab, s in pairs if lab == 1 and s < threshold)
    tn = len(pairs) - tp - fp - fn
    prec = tp / (tp + fp) if tp + fp else None
    rec = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"decision_threshold": threshold, "decision_accuracy": (tp + tn) / len(pairs),
            "decision_precision": prec, "decision_recall": rec, "decision_f1": f1}


def _aggregate(rows: list[dict[str, Any]], thr: float, seg_iou_threshold: float, model_uri: str,
               split: str, decision_threshold: float | None = None, calibrated: bool = False) -> EvalResult:
    rows = sorted(rows, key=lambda r: r["sample_id"])
    skipped = [{"sample_id": r["sample_id"], "reason": r["error"]} for r in rows if r.get("error")]
    rows = [r for r in rows if not r.get("error")]
    if not rows:
        raise DataError(f"no image of split {split!r} could be decoded ({len(skipped)} tried), e.g. "
                        f"{skipped[0]['sample_id']}: {skipped[0]['reason']}" if skipped else
                        f"split {split!r} is empty", "check the manifest's files (defectflow ingest verifies them)")
    if skipped:
        log.warning("%d %s image(s) could not be decoded and are not scored, e.g. %s: %s", len(skipped), split,
                    skipped[0]["sample_id"], skipped[0]["reason"])
    stats = [json.loads(r["stats"]) for r in rows]
    labels = [None if r["label"] is None else int(r["label"]) for r in rows]
    scores = [float(r["score"]) for r in rows]
    metrics = summarize(stats, labels, scores, seg_iou_threshold=seg_iou_threshold)
    metrics.update({"split": split, "pixel_threshold": thr, "seg_iou_threshold": seg_iou_threshold,
                    "n_skipped": len(skipped)})
    if decision_threshold is not None:
        metrics.update(decision_metrics(labels, scores, decision_threshold))
    warnings = threshold_warnings(metrics, thr, calibrated)
    sheet_rows = []
    for r in rows:
        if r.get("thumb"):
            z = np.load(io.BytesIO(r["thumb"]))
            mask = z["mask"] if z["mask"].size else None
            sheet_rows.append({"name": r["sample_id"], "image": z["image"], "mask": mask, "prob": z["prob"],
                               "score": r["score"], "label": r["label"]})
    sheet = report.prediction_sheet(sheet_rows, title=f"{model_uri} · {split}") if sheet_rows else None
    per_image = [{"sample_id": r["sample_id"], "label": lab, "score": s, "iou": st.get("iou")}
                 for r, lab, s, st in zip(rows, labels, scores, stats, strict=True)]
    return EvalResult(metrics=metrics, per_image=per_image, sheet_png=sheet, skipped=skipped, warnings=warnings)


def calibrate(model_uri: str, table: pa.Table, setting: float | str = "auto", *,
              pixel_setting: float | str = "auto", margin: float = 0.0, split: str = "val", batch_size: int = 8,
              num_actors: int = 1, use_gpu: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """Choose an artifact's image decision threshold and pixel threshold on ``split`` (one pass over it) and store
    them, with how they were chosen, in detector.json (``threshold`` + ``threshold_info``, ``pixel_threshold`` +
    ``pixel_threshold_info``). Returns ``threshold_info`` (with ``pixel`` = ``pixel_threshold_info``).

    Image, ``setting`` ``auto``: the F1-max threshold of the image scores on ``split``; without defective images
    there, the highest normal score raised by ``margin`` (anomalib's fallback; logged as a warning); without
    labelled images, the pixel threshold (for map-max scores that is "any pixel above the mask threshold").
    Pixel, ``pixel_setting`` ``auto``: the pooled pixel F1-max threshold over the masks of ``split``
    (:func:`components.metrics.anomaly.pixel_f1_max`); without a defective mask there, the artifact's current
    pixel threshold stays (with a warning). A number is stored as is.
    """
    from components.metrics.anomaly import choose_threshold

    meta = artifact.read_meta(model_uri)
    pixel_thr = float(pixel_setting) if pixel_setting != "auto" else pixel_threshold(meta)
    pixel_info: dict[str, Any] = {"rule": "fixed", "warning": None}
    sub = table.filter(pc.equal(table["split"], split))
    labelled = [v for v in sub["label"].to_pylist() if v is not None] if sub.num_rows else []
    res = None
    if (setting == "auto" and labelled) or (pixel_setting == "auto" and sub.num_rows):
        res = evaluate(model_uri, table, split=split, threshold=pixel_thr, batch_size=batch_size,
                       num_actors=num_actors, use_gpu=use_gpu, sheet_images=0, max_pixels=max_pixels, warn=False)
    if pixel_setting == "auto":
        m = res.metrics if res is not None else {}
        if m.get("pixel_f1_max_threshold") is not None:
            pixel_thr = float(m["pixel_f1_max_threshold"])
            pixel_info = {"rule": "pixel_f1_max", "f1": m["pixel_f1_max"], "split": split,
                          "n_defective_masks": m["n_defective_masks"], "warning": None}
            log.info("pixel threshold %.4f (pooled pixel F1 %.3f on %d defective %s mask(s))", pixel_thr,
                     m["pixel_f1_max"], m["n_defective_masks"], split)
        else:
            pixel_info = {"rule": "kept", "split": split, "warning": f"no defective {split} mask: the pixel "
                          f"threshold stays {pixel_thr:.4g}"}
            log.warning("pixel threshold: %s", pixel_info["warning"])
    if setting != "auto":
        thr, info = float(setting), {"rule": "fixed", "warning": None}
    elif not labelled:
        thr = pixel_thr
        info = {"rule": "pixel_threshold", "warning": f"no labelled {split} images: the decision threshold is the "
                                                      "pixel threshold"}
        log.warning(info["warning"])
    else:
        thr, info = choose_threshold([r["label"] for r in res.per_image], [r["score"] for r in res.per_image],
                                     margin=margin)
        if info.get("warning"):
            log.warning("decision threshold: %s", info["warning"])
        info["split"] = split
        log.info("decision threshold %.4f (%s on %d %s images)", thr, info["rule"], len(labelled), split)
    artifact.update_meta(model_uri, threshold=thr, extra={"threshold_info": info, "pixel_threshold": pixel_thr,
                                                          "pixel_threshold_info": pixel_info})
    return {**info, "pixel": pixel_info}


def write_report(result: EvalResult, out_uri: str, title: str = "Evaluation") -> str:
    """metrics.json, per_image.csv, sheet.png and a short Markdown summary below ``out_uri``."""
    storage.write_json(storage.join(out_uri, "metrics.json"),
                       {**result.metrics, "warnings": result.warnings} if result.warnings else result.metrics)
    lines = ["sample_id,label,score,iou"]
    for r in result.per_image:
        iou = "" if r["iou"] is None else f"{r['iou']:.6f}"
        lab = "" if r["label"] is None else str(r["label"])
        lines.append(f"{r['sample_id']},{lab},{r['score']:.6f},{iou}")
    storage.write_text(storage.join(out_uri, "per_image.csv"), "\n".join(lines) + "\n")
    if result.sheet_png:
        storage.write_bytes(storage.join(out_uri, "sheet.png"), result.sheet_png)
    if result.skipped:
        storage.write_json(storage.join(out_uri, "skipped.json"), result.skipped)
    md = [f"# {title}\n", report.markdown_table([{"metric": k, "value": v} for k, v in result.metrics.items()])]
    if result.warnings:
        md.append("\n## Warnings\n\n" + "\n".join(f"- {w}" for w in result.warnings) + "\n")
    if result.sheet_png:
        md.append("\n![predictions](sheet.png)\n")
    if result.skipped:
        md.append(f"\n{len(result.skipped)} image(s) could not be decoded and were not scored (skipped.json).\n")
    storage.write_text(storage.join(out_uri, "report.md"), "\n".join(md))
    result.report_uri = out_uri
    return out_uri


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="artifact URI or <root>/models/<name>[@alias]")
    p.add_argument("--manifest", required=True, help="manifest URI")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--out", help="report folder (default <storage.root>/reports/eval-<model name>-<split>)")
    p.add_argument("--threshold", type=float, help="pixel threshold of predicted masks (default: the artifact's)")
    p.add_argument("--calibrate", action="store_true",
                   help="first choose the decision threshold (image F1-max, documented fallback) and the pixel "
                        "threshold (pooled pixel F1-max; eval.threshold=<number> fixes it) on the manifest's val "
                        "split and store them in the artifact")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="eval.*, storage.* or ray.* keys, e.g. --set eval.num_actors=2")


class EvaluateConfig(cfgmod.Strict):
    eval: EvalSettings = Field(default_factory=EvalSettings)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


def run_cli(args: argparse.Namespace) -> EvalResult:
    from workflows.runtime import actor_pool_gpu, init_ray

    cfg = cfgmod.load(EvaluateConfig, overrides=args.set, what="evaluate options")
    layout = cfg.storage.apply()
    init_ray(cfg.ray, cfg.storage)
    use_gpu = actor_pool_gpu("evaluate", "auto", 1.0)
    table = manifest.read(args.manifest)
    model_uri = catalog.resolve_model(args.model)
    if args.calibrate:
        calibrate(model_uri, table, "auto", pixel_setting=cfg.eval.threshold, margin=cfg.eval.threshold_margin,
                  batch_size=cfg.eval.batch_size, num_actors=cfg.eval.num_actors, use_gpu=use_gpu)
    result = evaluate(model_uri, table, split=args.split, threshold=args.threshold,
                      seg_iou_threshold=cfg.eval.seg_iou_threshold, batch_size=cfg.eval.batch_size,
                      num_actors=cfg.eval.num_actors, sheet_images=cfg.eval.sheet_images, use_gpu=use_gpu)
    name = "-".join(model_uri.rstrip("/").split("/")[-2:])
    out = args.out or layout.reports(f"eval-{name}-{args.split}")
    console.keep_log_in(out)
    write_report(result, out, title=f"Evaluation of {model_uri} on {args.split}")
    return result


def _report(res: EvalResult) -> str:
    return "\n".join([f"{k:>22}: {v}" for k, v in res.metrics.items()] + [f"report: {res.report_uri}"])


COMMAND = Command("evaluate", "metrics of a model on a manifest split (Ray Data)", add_arguments, run_cli, _report)

if __name__ == "__main__":
    raise SystemExit(main(COMMAND))
