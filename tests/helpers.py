"""Builders shared by integration tests: procedural manifests, train configs, quick artifacts."""

from __future__ import annotations

from typing import Any

from components import artifact, storage
from components.config import TrainConfig, deep_merge, validate
from components.data import adapters, manifest
from components.models import registry


def procedural_manifest(uri: str, count: int = 48, size: int = 64, seed: int = 0,
                        defect_fraction: float = 0.6) -> str:
    table = adapters.ingest("procedural", None, dataset_name="procedural",
                            options={"count": count, "size": size, "seed": seed, "defect_fraction": defect_fraction},
                            split_fractions={"train": 0.6, "val": 0.15, "test": 0.25}, seed=seed)
    manifest.write(table, uri)
    return uri


def train_config(root: str, manifest_uri: str, name: str = "t", **overrides: Any) -> TrainConfig:
    base = {
        "name": name,
        "storage": {"root": root, "s3_endpoint_url": storage.settings().endpoint_url},
        "data": {"manifest": manifest_uri, "image_size": [64, 64]},
        "model": {"family": "gmbinet", "params": {"n": 2}},
        "optim": {"epochs": 2, "batch_size": 8, "lr": 0.004},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1, "use_gpu": "auto"},
        "eval": {"sheet_images": 4, "batch_size": 8},
        "ray": {"progress_bars": False},
    }
    if "model" in overrides:  # another family: its params replace GMBINet's
        base.pop("model")
    return validate(TrainConfig, deep_merge(base, overrides), "test train config")


def random_artifact(uri: str, size: int = 64, n: int = 2, threshold: float = 0.5) -> str:
    det = registry.create_detector("gmbinet", {"n": n}, {"input_size": (size, size)})
    artifact.save(det.eval(), uri, threshold=threshold, lineage={"test": True})
    return uri
