"""features: compute a model family's frozen features once, on a Ray Data actor pool, as Parquet shards.

    defectflow features --config workflows/configs/ssn_full.yaml          # a train config, or a features config
    python -m workflows.features --config ...

A frozen backbone dominates SuperSimpleNet's cost on a CPU; computing its (upscaled, pooled) feature maps once lets
the heads train for many epochs from the cache (``data.features`` in a train config). The format (signature, shards
named after their ids, index written last) is :mod:`components.data.feature_cache`: re-running skips every shard
already written, so a killed job loses at most the shards in flight.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from components import catalog, storage
from components import config as cfgmod
from components.config import FeaturesConfig, TrainConfig
from components.data import feature_cache, manifest
from components.errors import ConfigError, DataError
from components.models import registry
from workflows import console
from workflows.command import Command, add_config_options, main

log = logging.getLogger("defectflow.features")


def build_detector(cfg: FeaturesConfig) -> Any:
    pre = {**cfg.model.preprocessing, "input_size": list(cfg.image_size)}
    det = registry.create_detector(cfg.model.family, cfg.model.params, pre, cfg.model.postprocessing)
    if not det.supports_feature_cache:
        raise ConfigError(f"model family {cfg.model.family!r} has no frozen feature extractor to cache",
                          "train it from pixels (data.features: null)")
    return det.eval()


def default_out(cfg: FeaturesConfig, sig: dict[str, Any], layout: catalog.Layout, dataset: str) -> str:
    backbone = str(sig.get("extractor", {}).get("name", cfg.model.family)).replace("/", "_")
    return storage.join(layout.features(backbone, dataset), feature_cache.signature_digest(sig))


class FeatureWriter:
    """Ray Data actor around :class:`feature_cache.ShardWriter`: the extractor and the manifest load once."""

    def __init__(self, cfg: dict[str, Any], out_uri: str, storage_settings: dict[str, Any], use_gpu: bool):
        from components.inference import pick_device

        storage.configure(**storage_settings)
        c = FeaturesConfig.model_validate(cfg)
        rows = {r["sample_id"]: r for r in manifest.read(c.manifest).to_pylist()}
        self.writer = feature_cache.ShardWriter(build_detector(c), rows, out_uri, c.image_size,
                                                batch_size=c.features.batch_size, dtype=c.features.dtype,
                                                max_pixels=c.max_image_pixels, device=pick_device(use_gpu))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        done = [self.writer.write(str(n), json.loads(i)) for n, i in zip(batch["shard"], batch["ids"], strict=True)]
        return {"shard": [d["shard"] for d in done], "rows": [d["rows"] for d in done],
                "skipped": [json.dumps(d["skipped"]) for d in done], "seconds": [d["seconds"] for d in done]}


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
    unreadable: list[dict[str, str]] = field(default_factory=list)


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
    sig = feature_cache.signature(build_detector(cfg))
    out = cfg.out or default_out(cfg, sig, layout, str(table["dataset"][0].as_py()))
    sig_uri = storage.join(out, feature_cache.SIGNATURE)
    if storage.exists(sig_uri):
        old = storage.read_json(sig_uri)
        if old != sig:
            raise ConfigError(f"{out} holds features computed with other settings "
                              f"({feature_cache.signature_digest(old)} vs {feature_cache.signature_digest(sig)})",
                              "use another features.out or delete that folder")
    else:
        storage.write_json(sig_uri, sig)
    console.keep_log_in(out)
    plan = feature_cache.shard_plan(table["sample_id"].to_pylist(), cfg.features.shard_size)
    existing = {storage.basename(u) for u in storage.listdir(out)}
    todo = [(n, ids) for n, ids in plan if n not in existing]
    log.info("features (%s): %d shard(s) of up to %d image(s), %d already written -> %s",
             sig["extractor"].get("name"), len(plan), cfg.features.shard_size, len(plan) - len(todo), out)
    unreadable: list[dict[str, str]] = []
    if todo:
        init_ray(cfg.ray, cfg.storage)
        use_gpu = actor_pool_gpu("features", cfg.features.use_gpu, cfg.features.cpus_per_actor)
        ds = ray.data.from_items([{"shard": n, "ids": json.dumps(ids)} for n, ids in todo])
        ds = ds.map_batches(
            FeatureWriter, batch_size=1,
            fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "out_uri": out, "use_gpu": use_gpu,
                                   "storage_settings": storage.worker_settings()},
            compute=ray.data.ActorPoolStrategy(size=cfg.features.num_actors),
            num_cpus=cfg.features.cpus_per_actor, num_gpus=1 if use_gpu else 0)
        for n_done, row in enumerate(ds.iter_rows(), start=1):
            unreadable += json.loads(row["skipped"])
            log.info("features: shard %d/%d, %d image(s) in %.1f s", n_done, len(todo), row["rows"], row["seconds"])
    if unreadable:
        log.warning("features: %d unreadable image(s) left out, e.g. %s: %s", len(unreadable),
                    unreadable[0]["sample_id"], unreadable[0]["reason"])
    feature_cache.write_index(out, [n for n, _ in plan], table.num_rows, cfg.manifest)
    return FeaturesResult(uri=out, shards=len(plan), written=len(todo), skipped=len(plan) - len(todo),
                          rows=table.num_rows, feature_shape=list(sig["feature_shape"]), signature=sig,
                          seconds=round(time.time() - t0, 1), unreadable=unreadable)


def from_train_config(cfg: TrainConfig) -> FeaturesConfig:
    """The features a train config needs (``data.features: auto``): every split of its manifest."""
    out = None if cfg.data.features in (None, "auto") else cfg.data.features
    return FeaturesConfig(manifest=cfg.data.manifest, model=cfg.model, image_size=cfg.data.image_size,
                          max_image_pixels=cfg.data.max_image_pixels, out=out, features=cfg.features,
                          storage=cfg.storage, ray=cfg.ray)


def for_training(cfg: TrainConfig) -> list[str] | None:
    """The features folders a train config reads: the manifest's (computed now for ``auto``, checked against the
    model for a URI) and, when synthetic samples are mixed in, the synthetic set's (always computed/cached by
    ``auto`` rules in its own folder: the synthetic rows are not in the manifest's cache)."""
    if cfg.data.features is None:
        return None
    fcfg = from_train_config(cfg)
    if cfg.data.features == "auto":
        uris = [run(fcfg).uri]
    else:
        if feature_cache.read_signature(cfg.data.features) != feature_cache.signature(build_detector(fcfg)):
            raise ConfigError(f"{cfg.data.features} holds features for other settings than this model/image size",
                              "use data.features: auto, or the folder `defectflow features` wrote for this config")
        uris = [cfg.data.features]
    if cfg.data.synthetic is not None and cfg.data.synthetic.count > 0:
        scfg = fcfg.model_copy(update={"manifest": storage.normalize(cfg.data.synthetic.source), "out": None,
                                       "splits": ["train"]})
        uris.append(run(scfg).uri)
    return uris


def config_from_args(args: argparse.Namespace) -> FeaturesConfig:
    data = cfgmod.read_yaml(args.config)
    data = cfgmod.deep_merge(data, cfgmod.parse_overrides(args.set))
    if "data" in data and "name" in data:  # a train config
        return from_train_config(cfgmod.validate(TrainConfig, data, f"train config {args.config}"))
    return cfgmod.validate(FeaturesConfig, data, f"features config {args.config}")


def _report(res: FeaturesResult) -> str:
    text = (f"features: {res.uri}\n{res.shards} shard(s), {res.written} computed now, {res.skipped} reused; "
            f"{res.rows} image(s) of shape {res.feature_shape} in {res.seconds:.0f} s")
    if res.unreadable:
        text += f"\n{len(res.unreadable)} unreadable image(s) left out"
    return text


COMMAND = Command("features", "cache a model's frozen backbone features (Ray Data)",
                  lambda p: add_config_options(p, "features (or train: its data/model/features sections are used)"),
                  lambda args: run(config_from_args(args)), _report)

if __name__ == "__main__":
    raise SystemExit(main(COMMAND))
