"""The artifact format and the Detector contract's shared pieces (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from components import artifact, catalog
from components.errors import WeightsError
from components.inference import infer, infer_batch
from components.models import registry
from components.models.base import gaussian_blur


def _det(**pre):
    return registry.create_detector("gmbinet", {"n": 2}, {"input_size": (64, 64), **pre}).eval()


def test_save_load_roundtrip_and_registry(tmp_path):
    det = _det()
    uri = artifact.save(det, str(tmp_path / "a"), threshold=0.3, metrics={"test_iou": 0.5},
                        lineage={"manifest_digest": "sha256:x"})
    meta = json.loads((tmp_path / "a" / "detector.json").read_text())
    assert meta["family"] == "gmbinet" and meta["threshold"] == 0.3 and meta["input_size"] == [64, 64]
    assert meta["lineage"]["code_version"] and meta["lineage"]["manifest_digest"] == "sha256:x"
    loaded, _meta = artifact.load(uri)
    x = torch.rand(2, 3, 50, 70)
    a, b = det(x), loaded(x)
    assert torch.allclose(a.anomaly_map, b.anomaly_map) and torch.allclose(a.score, b.score)
    layout = catalog.Layout(str(tmp_path / "root"))
    v1 = artifact.register(uri, layout, "m")
    v2 = artifact.register(det, layout, "m", threshold=0.4)
    assert v1.endswith("/m/1") and v2.endswith("/m/2")
    assert artifact.read_meta(str(tmp_path / "root/models/m"))["registry"]["version"] == "2"
    artifact.update_meta(v1, metrics={"x": 1.0}, threshold=0.7)
    assert artifact.read_meta(v1)["threshold"] == 0.7 and artifact.read_meta(v1)["metrics"]["x"] == 1.0


def test_damaged_artifacts_raise_weights_errors(tmp_path):
    uri = artifact.save(_det(), str(tmp_path / "a"))
    (tmp_path / "a" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(WeightsError, match="not a valid safetensors"):
        artifact.load(uri)
    artifact.save(_det(), uri)
    meta = json.loads((tmp_path / "a" / "detector.json").read_text())
    meta["config"]["params"]["n"] = 4  # weights no longer match the described architecture
    (tmp_path / "a" / "detector.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError):
        artifact.load(uri)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "detector.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(WeightsError, match="not a defectflow detector"):
        artifact.read_meta(str(tmp_path / "b"))


def test_detector_contract_any_size_in_unit_range():
    det = _det(scale_by_max=True)
    with torch.no_grad():
        out = det(torch.rand(3, 3, 37, 91))
    assert out.score.shape == (3,) and out.anomaly_map.shape == (3, 1, 37, 91)
    assert float(out.anomaly_map.min()) >= 0 and float(out.anomaly_map.max()) <= 1
    assert torch.allclose(out.score, out.anomaly_map.flatten(1).amax(1))


def test_infer_batch_groups_sizes():
    det = _det()
    imgs = [np.random.rand(40, 50, 3).astype(np.float32), np.random.rand(30, 30, 3).astype(np.float32),
            np.random.rand(40, 50, 3).astype(np.float32)]
    scores, maps = infer_batch(det, imgs)
    assert [m.shape for m in maps] == [(40, 50), (30, 30), (40, 50)]
    s0, m0 = infer(det, imgs[2])
    assert abs(s0 - scores[2]) < 1e-5 and np.allclose(m0, maps[2], atol=1e-5)


def test_gaussian_blur_preserves_mass_and_shape():
    x = torch.zeros(1, 1, 33, 33)
    x[0, 0, 16, 16] = 1.0
    y = gaussian_blur(x, 2.0)
    assert y.shape == x.shape and abs(float(y.sum()) - 1.0) < 1e-4 and float(y.max()) < 0.1


def test_publish_replaces_an_artifact_whole(tmp_path):
    """A resumed run publishes over its earlier artifact: the old detector.json goes first (no reader ever pairs
    new weights with it), and nothing of the old artifact (a metrics.json) survives."""
    first = artifact.save(_det(), str(tmp_path / "stage1"), threshold=0.3, metrics={"test_iou": 0.1})
    dst = artifact.publish(first, str(tmp_path / "artifact"))
    assert not (tmp_path / "stage1").exists() and artifact.read_meta(dst)["threshold"] == 0.3
    second = artifact.save(_det(), str(tmp_path / "stage2"), threshold=0.7)
    artifact.publish(second, dst)
    assert artifact.read_meta(dst)["threshold"] == 0.7 and not (tmp_path / "artifact" / "metrics.json").exists()
