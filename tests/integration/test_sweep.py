"""Ray Tune sweep (Train V2 pattern + ASHA): report files, best trial registered; local and S3 storage."""

from __future__ import annotations

import csv
import io

import pytest

from components import artifact, storage
from components.config import SweepConfig, validate
from components.errors import ConfigError
from tests.helpers import procedural_manifest
from workflows import sweep

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def sweep_config(root: str, manifest_uri: str, name: str, **over) -> SweepConfig:
    data = {
        "name": name,
        "metric": "val_iou_pooled",
        "mode": "max",
        "space": {"model.params.n": {"grid": [2, 4]}},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "train": {
            "storage": {"root": root, "s3_endpoint_url": storage.settings().endpoint_url},
            "data": {"manifest": manifest_uri, "image_size": [64, 64]},
            "model": {"family": "gmbinet"},
            "optim": {"epochs": 2, "batch_size": 8},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1},
            "eval": {"sheet_images": 2},
            "ray": {"progress_bars": False},
        },
        **over,
    }
    return validate(SweepConfig, data, "test sweep")


def _check(res, root):
    assert len(res.trials) == 2
    assert sorted(t["params"]["model.params.n"] for t in res.trials) == [2, 4]
    rows = list(csv.DictReader(io.StringIO(storage.read_text(storage.join(res.report_uri, "trials.csv")))))
    assert len(rows) == 2 and "best_val_iou_pooled" in rows[0]
    assert "| trial |" in storage.read_text(storage.join(res.report_uri, "trials.md"))
    assert storage.read_bytes(storage.join(res.report_uri, "curves.png"))[:4] == b"\x89PNG"
    det, meta = artifact.load(res.registered_uri)
    assert meta["lineage"]["sweep"] == res.name
    assert meta["lineage"]["trial_params"]["model.params.n"] == res.best["params"]["model.params.n"]
    assert det.net is not None and 0.0 <= meta["metrics"]["test_iou"] <= 1.0
    # released like any run: calibrated, with its lineage, and the best trial's test report beside the sweep's
    assert meta["lineage"]["manifest_digest"].startswith("sha256:") and meta["threshold_info"]["rule"]
    assert storage.read_json(storage.join(res.report_uri, "best", "metrics.json"))["split"] == "test"
    assert res.registered_uri.startswith(storage.join(root, "models", "gmbinet"))


def test_sweep_local(ray_session, tmp_path):
    root = str(tmp_path / "store")
    man = procedural_manifest(str(tmp_path / "m.parquet"), count=48, size=64)
    _check(sweep.run(sweep_config(root, man, "sw-local")), root)


@pytest.mark.s3
def test_sweep_s3(ray_session, s3_bucket):
    root = f"{s3_bucket}/df"
    man = procedural_manifest(f"{root}/datasets/p/manifest.parquet", count=40, size=64, seed=5)
    res = sweep.run(sweep_config(root, man, "sw-s3", space={"loss.dice_weight": {"grid": [0.5, 1.0]}},
                                 scheduler={"type": "fifo"}))
    assert len(res.trials) == 2 and res.registered_uri.startswith("s3://")
    assert storage.exists(storage.join(res.report_uri, "trials.csv"))


def test_bad_space_key_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not fit the train config"):
        sweep.run(sweep_config(str(tmp_path), str(tmp_path / "m.parquet"), "bad",
                               space={"model.paramz.n": {"grid": [1, 2]}}))
