"""predict: batch prediction of a folder (or S3 prefix) of images with a model artifact.

    defectflow predict --model ./defectflow-data/models/gmbinet --input ./images --out ./predictions

Writes one ``<stem>.png`` defect map per image (8-bit, map x 255, at the input image's size), its defect mask
``masks/<stem>.png`` (255 where map >= the artifact's calibrated ``pixel_threshold``) and ``scores.csv`` (stem, score,
is_defect at the artifact's decision ``threshold``, defect_pixels of the mask, error). Small inputs run in-process;
large ones (more than ``--ray-threshold`` images) run on a Ray Data actor pool, each actor loading the artifact once
and writing its maps directly to the output.
An unreadable image does not stop the batch: its row in scores.csv carries the error and the command exits non-zero.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from components import artifact, catalog, storage
from components import config as cfgmod
from components.config import RayConfig, StorageConfig
from components.data.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, decode_image, encode_png
from components.errors import DataError, DefectflowError
from components.inference import infer, map_to_png_array, pick_device
from components.progress import bar
from workflows import console
from workflows.command import Command, main

log = logging.getLogger("defectflow.predict")

MASKS = "masks"  # sub-folder of the output with the binary defect masks


def list_inputs(input_uri: str) -> list[tuple[str, str]]:
    """(image URI, output stem) pairs; stems that collide across sub-folders get their relative path."""
    input_uri = storage.normalize(input_uri)
    if storage.exists(input_uri) and not storage.isdir(input_uri):
        files = [input_uri]
        base = storage.parent(input_uri)
    else:
        files = storage.walk_files(input_uri, IMAGE_SUFFIXES)
        base = input_uri
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found at {input_uri}",
                        "pass a folder or s3:// prefix holding images, or one image file")
    stems: dict[str, int] = {}
    rels = []
    for f in files:
        rel = f[len(base):].lstrip("/") if f.startswith(base) else storage.basename(f)
        stem = os.path.splitext(storage.basename(f))[0]
        rels.append((f, rel, stem))
        stems[stem] = stems.get(stem, 0) + 1
    out = []
    for f, rel, stem in rels:
        if stems[stem] > 1:
            stem = os.path.splitext(rel)[0].replace("/", "__")
        out.append((f, stem))
    return out


class MapWriter:
    """Loads the artifact once; predicts images and writes their maps. A Ray Data actor or a plain object."""

    def __init__(self, model_uri: str, out_uri: str, threshold: float | None = None,
                 storage_settings: dict[str, Any] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 use_gpu: bool = False, pixel_threshold: float | None = None):
        storage.configure(**(storage_settings or {}))
        self.device = pick_device(use_gpu)
        self.detector, meta = artifact.load(model_uri, device=self.device)
        self.threshold = float(threshold if threshold is not None else meta.get("threshold", 0.5))
        self.pixel_threshold = float(pixel_threshold if pixel_threshold is not None
                                     else meta.get("pixel_threshold", 0.5))
        self.out_uri = out_uri
        self.max_pixels = max_pixels

    def predict_one(self, uri: str, stem: str) -> dict[str, Any]:
        try:
            img = decode_image(storage.read_bytes(uri), name=uri, max_pixels=self.max_pixels)
            score, prob = infer(self.detector, img, self.device)
            mask = prob >= self.pixel_threshold
            storage.write_bytes(storage.join(self.out_uri, f"{stem}.png"), encode_png(map_to_png_array(prob)))
            storage.write_bytes(storage.join(self.out_uri, MASKS, f"{stem}.png"),
                                encode_png(mask.astype(np.uint8) * 255))
            return {"stem": stem, "score": score, "is_defect": bool(score >= self.threshold),
                    "defect_pixels": int(mask.sum()), "error": ""}
        except DefectflowError as e:
            log.warning("skipping %s: %s", uri, e.message)
            return {"stem": stem, "score": None, "is_defect": None, "defect_pixels": None, "error": e.message}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = [self.predict_one(u, s) for u, s in zip(batch["uri"], batch["stem"], strict=True)]
        return {"stem": [r["stem"] for r in rows],
                "score": [float("nan") if r["score"] is None else r["score"] for r in rows],
                "is_defect": [r["is_defect"] is True for r in rows],
                "defect_pixels": [-1 if r["defect_pixels"] is None else r["defect_pixels"] for r in rows],
                "error": [r["error"] for r in rows]}


@dataclass
class PredictResult:
    out_uri: str
    count: int
    failed: int
    defective: int
    scores_uri: str
    used_ray: bool


def run(model: str, input_uri: str, out_uri: str, *, threshold: float | None = None,
        pixel_threshold: float | None = None, ray_threshold: int = 64,
        num_actors: int = 1, batch_size: int = 8, use_gpu: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS, ray_cfg: RayConfig | None = None,
        storage_cfg: StorageConfig | None = None) -> PredictResult:
    if storage_cfg is not None:
        storage_cfg.apply()
    model_uri = catalog.resolve_model(model)
    out_uri = storage.normalize(out_uri)
    items = list_inputs(input_uri)
    log.info("predicting %d image(s) with %s -> %s", len(items), model_uri, out_uri)
    storage.makedirs(out_uri)
    console.keep_log_in(out_uri)
    env = storage.worker_settings()
    use_ray = len(items) > ray_threshold
    if use_ray:
        import ray.data

        from workflows.runtime import actor_pool_gpu, init_ray

        init_ray(ray_cfg, storage_cfg)
        use_gpu = use_gpu or actor_pool_gpu("predict", "auto", 1.0)
        ds = ray.data.from_items([{"uri": u, "stem": st} for u, st in items])
        ds = ds.map_batches(MapWriter, fn_constructor_kwargs={
            "model_uri": model_uri, "out_uri": out_uri, "threshold": threshold, "storage_settings": env,
            "pixel_threshold": pixel_threshold,
            "max_pixels": max_pixels, "use_gpu": use_gpu},
            batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_cpus=1, num_gpus=1 if use_gpu else 0)
        rows = []
        for r in ds.take_all():
            score = None if r["score"] != r["score"] else float(r["score"])
            rows.append({"stem": r["stem"], "score": score, "is_defect": r["is_defect"] if score is not None else None,
                         "defect_pixels": int(r["defect_pixels"]) if score is not None else None,
                         "error": r["error"]})
    else:
        writer = MapWriter(model_uri, out_uri, threshold, env, max_pixels, use_gpu, pixel_threshold)
        rows = [writer.predict_one(u, st) for u, st in bar(items, total=len(items), desc="predict", unit="img",
                                                           min_total=8)]
    rows.sort(key=lambda r: r["stem"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["stem", "score", "is_defect", "defect_pixels", "error"])
    for r in rows:
        w.writerow([r["stem"], "" if r["score"] is None else f"{r['score']:.6f}",
                    "" if r["is_defect"] is None else int(bool(r["is_defect"])),
                    "" if r["defect_pixels"] is None else r["defect_pixels"], r["error"]])
    scores_uri = storage.join(out_uri, "scores.csv")
    storage.write_text(scores_uri, buf.getvalue())
    failed = sum(1 for r in rows if r["error"])
    defective = sum(1 for r in rows if r["is_defect"])
    log.info("%d image(s): %d defective, %d failed; scores in %s", len(rows), defective, failed, scores_uri)
    return PredictResult(out_uri=out_uri, count=len(rows), failed=failed, defective=defective,
                         scores_uri=scores_uri, used_ray=use_ray)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="artifact URI or <root>/models/<name>[@alias]")
    p.add_argument("--input", required=True, help="image file, folder or s3:// prefix")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--threshold", type=float, help="decision threshold on the score (default: the artifact's)")
    p.add_argument("--pixel-threshold", type=float,
                   help="threshold of the defect masks on the map (default: the artifact's calibrated one)")
    p.add_argument("--ray-threshold", type=int, default=64,
                   help="use Ray Data when there are more images than this (default 64)")
    p.add_argument("--num-actors", type=int, default=1, help="Ray Data actor pool size")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="storage.* or ray.* keys")


class PredictOptions(cfgmod.Strict):
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


def run_cli(args: argparse.Namespace) -> PredictResult:
    opts = cfgmod.load(PredictOptions, overrides=args.set, what="predict options")
    return run(args.model, args.input, args.out, threshold=args.threshold, pixel_threshold=args.pixel_threshold,
               ray_threshold=args.ray_threshold,
               num_actors=args.num_actors, batch_size=args.batch_size, ray_cfg=opts.ray, storage_cfg=opts.storage)


def _report(res: PredictResult) -> str:
    return (f"{res.count} image(s), {res.defective} defective, {res.failed} failed -> {res.out_uri} "
            f"(scores: {res.scores_uri})")


COMMAND = Command("predict", "defect maps + scores.csv for a folder of images (exit code 1 when some images "
                  "could not be read; the others are written)", add_arguments, run_cli, _report,
                  exit_code=lambda res: 1 if res.failed else 0)

if __name__ == "__main__":
    raise SystemExit(main(COMMAND))
