"""features: compute a model family's frozen features once, on a Ray Data actor pool, as Parquet shards.

    defectflow features --config workflows/configs/features_ssn_procedural.yaml
    python -m workflows.features --config ...

A frozen backbone dominates SuperSimpleNet's cost on a CPU; computing its (upscaled, pooled) feature maps once lets
the heads train for many epochs from the cache (``data.features`` in a train config). Shards hold ``shard_size``
samples each (sorted by sample id) and are named after their ids, so re-running skips every shard already written
and a killed job loses at most the shards in flight. The folder's ``_signature.json`` records what the features
depend on (backbone, layers, weights, input size, normalisation); a cache with another signature is never reused.

Shard schema: ``sample_id`` (string), ``features`` (binary: C*h*w values of ``dtype``), ``shape`` (list<int32>),
``dtype`` (string).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components import config as cfgmod
from components import storage
from components.config import FeaturesConfig, TrainConfig
from components.data import manifest
from components.data.images import resize_image
from components.errors import ConfigError, DataError
from components.models import registry

log = logging.getLogger("defectflow.features")

SIGNATURE = "_signature.json"
INDEX = "_index.json"  # the shards of the latest complete run: readers use these and nothing else


def build_detector(cfg: FeaturesConfig) -> Any:
    pre = {**cfg.model.preprocessing, "input_size": list(cfg.image_size)}
    det = registry.create_detector(cfg.model.family, cfg.model.params, pre, cfg.model.postprocessing)
    if not det.supports_feature_cache:
        raise ConfigError(f"model family {cfg.model.family!r} has no frozen feature extractor to cache",
                          "train it from pixels (data.features: null)")
    return det.eval()


def signature_digest(sig: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:12]


def default_out(cfg: FeaturesConfig, sig: dict[str, Any], layout: storage.Layout, dataset: str) -> str:
    backbone = str(sig.get("extractor", {}).get("name", cfg.model.family)).replace("/", "_")
    return storage.join(layout.features(backbone, dataset), signature_digest(sig))


def shard_plan(ids: list[str], shard_size: int) -> list[tuple[str, list[str]]]:
    """(shard file name, sample ids) for ids sorted; the name depends on the ids only."""
    ids = sorted(ids)
    plan = []
    for k in range(0, len(ids), shard_size):
        chunk = ids[k:k + shard_size]
        h = hashlib.sha256("\n".join(chunk).encode()).hexdigest()[:10]
        plan.append((f"part-{k // shard_size:05d}-{h}.parquet", chunk))
    return plan


class FeatureWriter:
    """Ray Data actor: loads the extractor and the manifest once; each call computes and writes whole shards."""

    def __init__(self, cfg: dict[str, Any], out_uri: str, storage_env: dict[str, Any], use_gpu: bool):
        import torch

        from components.inference import pick_device

        storage.configure(**storage_env)
        self.cfg = FeaturesConfig.model_validate(cfg)
        self.out = out_uri
        self.device = pick_device(use_gpu)
        self.detector = build_detector(self.cfg).to(self.device)
        table = manifest.read(self.cfg.manifest)
        self.rows = {r["sample_id"]: r for r in table.to_pylist()}
        self.dtype = np.float16 if self.cfg.features.dtype == "float16" else np.float32
        self.torch = torch

    def _features(self, images: list[np.ndarray]) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy()).to(self.device)
        with torch.inference_mode():
            f = self.detector.extract(self.detector.preprocess(x))
        return f.float().cpu().numpy().astype(self.dtype)

    def write_shard(self, name: str, ids: list[str]) -> dict[str, Any]:
        t0 = time.time()
        size = tuple(self.cfg.image_size)
        bs = self.cfg.features.batch_size
        feats: list[np.ndarray] = []
        for k in range(0, len(ids), bs):
            imgs = [resize_image(manifest.load_image(self.rows[i], max_pixels=self.cfg.max_image_pixels), size)
                    for i in ids[k:k + bs]]
            feats.extend(self._features(imgs))
        shape = list(feats[0].shape)
        table = pa.table({
            "sample_id": pa.array(ids, pa.string()),
            "features": pa.array([f.tobytes() for f in feats], pa.binary()),
            "shape": pa.array([shape] * len(ids), pa.list_(pa.int32())),
            "dtype": pa.array([self.cfg.features.dtype] * len(ids), pa.string()),
        })
        storage.write_parquet(table, storage.join(self.out, name))
        return {"shard": name, "rows": len(ids), "seconds": round(time.time() - t0, 2)}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        done = [self.write_shard(str(n), json.loads(i)) for n, i in zip(batch["shard"], batch["ids"], strict=True)]
        return {"shard": [d["shard"] for d in done], "rows": [d["rows"] for d in done],
                "seconds": [d["seconds"] for d in done]}


@dataclass
class FeaturesResult:
    uri: str
    shards: int
    written: int
    skipped: int
    rows: int
    feature_shape: list[int]
    signature: dict[str, Any]
    seconds: float


def run(cfg: FeaturesConfig) -> FeaturesResult:
    """Compute every missing shard (Ray is started or joined here)."""
    import ray.data

    from workflows.runtime import actor_pool_gpu, init_ray

    t0 = time.time()
    layout = cfg.storage.apply()
    table = manifest.read(cfg.manifest)
    table = table.filter(pc.is_in(table["split"], pa.array(list(cfg.splits))))
    if table.num_rows == 0:
        raise DataError(f"{cfg.manifest} has no rows in splits {cfg.splits}", "check features.splits")
    det = build_detector(cfg)
    sig = det.feature_signature()
    dataset = str(table["dataset"][0].as_py())
    out = cfg.out or default_out(cfg, sig, layout, dataset)
    sig_uri = storage.join(out, SIGNATURE)
    if storage.exists(sig_uri):
        old = storage.read_json(sig_uri)
        if old != sig:
            raise ConfigError(f"{out} holds features computed with other settings ({signature_digest(old)} vs "
                              f"{signature_digest(sig)})", "use another features.out or delete that folder")
    else:
        storage.write_json(sig_uri, sig)
    plan = shard_plan(table["sample_id"].to_pylist(), cfg.features.shard_size)
    existing = {storage.basename(u) for u in storage.listdir(out)}
    todo = [(n, ids) for n, ids in plan if n not in existing]
    log.info("features %s: %d shard(s) of %d image(s), %d already written -> %s", sig["extractor"].get("name"),
             len(plan), cfg.features.shard_size, len(plan) - len(todo), out)
    if todo:
        init_ray(cfg.ray, cfg.storage)
        use_gpu = actor_pool_gpu("features", cfg.features.use_gpu, cfg.features.cpus_per_actor)
        s = storage.settings()
        ds = ray.data.from_items([{"shard": n, "ids": json.dumps(ids)} for n, ids in todo])
        ds = ds.map_batches(
            FeatureWriter, batch_size=1,
            fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "out_uri": out, "use_gpu": use_gpu,
                                   "storage_env": {"endpoint_url": s.endpoint_url, "region": s.region}},
            compute=ray.data.ActorPoolStrategy(size=cfg.features.num_actors),
            num_cpus=cfg.features.cpus_per_actor, num_gpus=1 if use_gpu else 0)
        for n_done, row in enumerate(ds.iter_rows(), start=1):
            log.info("shard %s: %d image(s) in %.1f s (%d/%d)", row["shard"], row["rows"], row["seconds"], n_done,
                     len(todo))
    # written last: a reader never sees a plan whose shards are not all there (other shard sizes or manifests may
    # have left other shards in the folder; they are ignored)
    storage.write_json(storage.join(out, INDEX), {"shards": [n for n, _ in plan], "rows": table.num_rows,
                                                  "manifest": cfg.manifest})
    return FeaturesResult(uri=out, shards=len(plan), written=len(todo), skipped=len(plan) - len(todo),
                          rows=table.num_rows, feature_shape=list(sig["feature_shape"]), signature=sig,
                          seconds=round(time.time() - t0, 1))


def from_train_config(cfg: TrainConfig) -> FeaturesConfig:
    """The features a train config needs (``data.features: auto``): every split of its manifest."""
    out = None if cfg.data.features in (None, "auto") else cfg.data.features
    return FeaturesConfig(manifest=cfg.data.manifest, model=cfg.model, image_size=cfg.data.image_size,
                          max_image_pixels=cfg.data.max_image_pixels, out=out, features=cfg.features,
                          storage=cfg.storage, ray=cfg.ray)


def read_signature(uri: str) -> dict[str, Any]:
    sig_uri = storage.join(uri, SIGNATURE)
    if not storage.exists(sig_uri):
        raise DataError(f"{uri} is not a features folder (no {SIGNATURE})",
                        "run `defectflow features` first, or set data.features: auto")
    return storage.read_json(sig_uri)


def shard_files(uri: str) -> list[str]:
    """URIs of the shards of the latest complete ``features`` run in a folder."""
    index_uri = storage.join(uri, INDEX)
    if not storage.exists(index_uri):
        raise DataError(f"{uri} holds no complete feature set (no {INDEX})",
                        "run `defectflow features` to completion, or set data.features: auto")
    return [storage.join(uri, n) for n in storage.read_json(index_uri)["shards"]]


def decode(row: dict[str, Any]) -> np.ndarray:
    """One shard row -> the feature array (float32)."""
    dtype = np.float16 if row["dtype"] == "float16" else np.float32
    return np.frombuffer(row["features"], dtype=dtype).reshape(tuple(row["shape"])).astype(np.float32)


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True,
                   help="YAML features config, or a train config (its data/model/features sections are used)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")


def config_from_args(args: argparse.Namespace) -> FeaturesConfig:
    data = cfgmod.read_yaml(args.config)
    data = cfgmod.deep_merge(data, cfgmod.parse_overrides(args.set))
    if "data" in data and "name" in data:  # a train config
        return from_train_config(cfgmod.validate(TrainConfig, data, f"train config {args.config}"))
    return cfgmod.validate(FeaturesConfig, data, f"features config {args.config}")


def main(argv: list[str] | None = None) -> int:
    from workflows.cli import run_command

    return run_command("features", argv)


if __name__ == "__main__":
    raise SystemExit(main())
