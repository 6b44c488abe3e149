"""Model export (components.export): real torch exporters and onnxruntime, no mocks.

The two families are exported small (64x64, a one-block GMBINet, a random resnet18 SuperSimpleNet) and compared
with eager PyTorch; tiny Detector subclasses defined here drive the failure paths: an operator no exporter
translates, a graph whose ONNX output differs from eager (a random op), a data-dependent branch torch.export
cannot capture (the TorchScript fallback), and spatial-axis requests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from components import artifact
from components import export as mx
from components.models import registry
from components.models.base import Detector, Postprocessing, Preprocessing
from workflows import export as export_workflow

SIZE = 64
REPO = Path(__file__).resolve().parents[2]


class _Tiny(Detector):
    family = "tiny"

    def __init__(self) -> None:
        super().__init__(Preprocessing(input_size=(16, 16)), Postprocessing())
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 1, 3, padding=1)

    def raw_map(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(x))


class _Cummax(_Tiny):
    """A running maximum along the width: no ONNX translation in either exporter."""

    family = "tiny-cummax"

    def raw_map(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(torch.cummax(self.conv(x), dim=-1).values)


class _Noisy(_Tiny):
    """Random inside forward: exports fine, but ONNX Runtime draws other numbers than torch."""

    family = "tiny-noisy"

    def raw_map(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(x)) * (0.5 + 0.5 * torch.rand_like(x[:, :1]))


class _Branchy(_Tiny):
    """A Python `if` on a tensor value: torch.export cannot capture it, the TorchScript tracer records the branch."""

    family = "tiny-branchy"

    def raw_map(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.sigmoid(self.conv(x))
        if y.amax() > -1.0:  # always true
            return y
        return 1.0 - y


def _small_gmbinet() -> Detector:
    torch.manual_seed(0)
    det = registry.create_detector("gmbinet", {"n": 1, "blocks": [1, 1, 1, 1], "init_filters": 8},
                                   {"input_size": (SIZE, SIZE)})
    det.train()
    with torch.no_grad():
        det(torch.rand(2, 3, SIZE, SIZE))  # BatchNorm running statistics away from their defaults
    return det.eval()


@pytest.fixture(scope="module")
def gmbinet_export(tmp_path_factory):
    det = _small_gmbinet()
    path = tmp_path_factory.mktemp("gm") / "gmbinet.onnx"
    res = mx.export_onnx(det, str(path), dynamic_batch=True, metadata={"defectflow.threshold": "0.4"})
    return det, res


def test_gmbinet_export_matches_eager_with_dynamic_batch(gmbinet_export):
    det, res = gmbinet_export
    assert res.exporter == "dynamo" and res.fallback_reason is None and res.family == "gmbinet"
    assert res.opset == mx.DEFAULT_OPSET and res.input_size == [SIZE, SIZE] and Path(res.uri).exists()
    assert res.dynamic_batch and not res.dynamic_size
    assert res.inputs == [{"name": "images", "shape": ["batch", 3, SIZE, SIZE], "dtype": "float32"}]
    assert [o["name"] for o in res.outputs] == ["score", "anomaly_map"]
    p = res.parity
    assert p["ok"] and p["score_max_abs_diff"] <= 1e-4 and p["anomaly_map_max_abs_diff"] <= 1e-4
    assert {r["name"] for r in p["probes"]} == {"random", "surface"} and p["probes"][0]["shape"][0] == 2
    # independently of the built-in check: another batch size through onnxruntime
    x = torch.rand(3, 3, SIZE, SIZE)
    score, amap = mx.onnx_run(mx.onnx_session(res.uri, threads=1), x)
    with torch.no_grad():
        ref = det(x)
    torch.testing.assert_close(score, ref.score, rtol=0, atol=1e-4)
    torch.testing.assert_close(amap, ref.anomaly_map, rtol=0, atol=1e-4)
    props = {m.key: m.value for m in onnx.load(res.uri).metadata_props}
    assert props["defectflow.family"] == "gmbinet" and props["defectflow.exporter"] == "dynamo"
    assert props["defectflow.threshold"] == "0.4"


def test_sidecar_carries_the_artifacts_decision(gmbinet_export, tmp_path):
    det, res = gmbinet_export
    uri = artifact.save(det, str(tmp_path / "art"), threshold=0.37, pixel_threshold=0.42)
    _, meta = artifact.load(uri)
    side = mx.sidecar(res, meta)
    assert side["format"] == mx.SIDECAR_FORMAT and side["onnx"] == "gmbinet.onnx"
    assert side["exporter"] == "dynamo" and side["opset"] == res.opset and side["parity"]["ok"]
    assert side["inputs"][0]["name"] == "images" and side["outputs"][1]["shape"] == ["batch", 1, SIZE, SIZE]
    assert side["model"]["threshold"] == 0.37 and side["model"]["pixel_threshold"] == 0.42
    assert side["model"]["artifact"] == uri and side["model"]["family"] == "gmbinet"
    assert mx.sidecar_uri("/x/m.onnx") == "/x/m.onnx.json"
    # the default output is never inside the artifact (which does not change after it is written)
    assert export_workflow.output_uri(str(tmp_path / "o"), meta) == str(tmp_path / "o" / "gmbinet-art.onnx")
    with pytest.raises(mx.ConfigError, match="inside the artifact"):
        export_workflow.output_uri(str(Path(uri) / "model.onnx"), meta)


def test_supersimplenet_export_matches_eager(tmp_path):
    torch.manual_seed(0)
    det = registry.create_detector(
        "supersimplenet", {"backbone": {"name": "resnet18", "layers": ["layer2", "layer3"], "weights": "random"},
                           "seg_hidden": 32, "cls_hidden": 8}, {"input_size": (SIZE, SIZE)}).eval()
    res = mx.export_onnx(det, str(tmp_path / "ssn.onnx"))
    assert res.exporter == "dynamo" and res.family == "supersimplenet" and not res.dynamic_batch
    assert res.inputs[0]["shape"] == [1, 3, SIZE, SIZE] and res.outputs[1]["shape"] == [1, 1, SIZE, SIZE]
    assert res.parity["ok"] and max(res.parity["score_max_abs_diff"], res.parity["anomaly_map_max_abs_diff"]) < 1e-4
    surface = mx.probe_images(1, (SIZE, SIZE))["surface"]
    score, amap = mx.onnx_run(mx.onnx_session(res.uri), surface)
    with torch.no_grad():
        ref = det(surface)
    torch.testing.assert_close(amap, ref.anomaly_map, rtol=0, atol=1e-4)
    torch.testing.assert_close(score, ref.score, rtol=0, atol=1e-4)


def test_unexportable_graph_is_a_clear_error(tmp_path):
    out = tmp_path / "c.onnx"
    with pytest.raises(mx.ExportError) as e:
        mx.export_onnx(_Cummax(), str(out))
    msg = str(e.value)
    assert "tiny-cummax detector cannot be exported" in msg and "aten.cummax" in msg and "aten::cummax" in msg
    assert "torch.export-based exporter" in msg and "TorchScript exporter" in msg
    assert "defectflow serve" in (e.value.hint or "")
    assert not out.exists()


def test_parity_failure_is_an_error_unless_accepted(tmp_path):
    out = tmp_path / "n.onnx"
    with pytest.raises(mx.ExportError, match="does not match eager PyTorch") as e:
        mx.export_onnx(_Noisy(), str(out))
    assert "tiny-noisy" in str(e.value) and "--allow-mismatch" in (e.value.hint or "")
    assert not out.exists()
    res = mx.export_onnx(_Noisy(), str(out), allow_mismatch=True)
    assert out.exists() and not res.parity["ok"] and res.parity["anomaly_map_max_abs_diff"] > res.parity["atol"]
    assert any("parity check FAILED" in n for n in res.notes)


def test_torchscript_fallback_is_recorded(tmp_path):
    res = mx.export_onnx(_Branchy(), str(tmp_path / "b.onnx"), dynamic_batch=True)
    assert res.exporter == "torchscript" and "data-dependent" in res.fallback_reason
    assert res.parity["ok"] and res.dynamic_batch


def test_dynamic_size_when_the_graph_allows_and_a_note_when_not(tmp_path):
    res = mx.export_onnx(_Tiny(), str(tmp_path / "t.onnx"), dynamic_batch=True, dynamic_size=True)
    assert res.dynamic_size and res.inputs[0]["shape"] == ["batch", 3, "height", "width"] and not res.notes
    assert res.parity["ok"] and any("@" in p["name"] for p in res.parity["probes"])  # checked at a second size
    score, amap = mx.onnx_run(mx.onnx_session(res.uri), torch.rand(2, 3, 40, 24))
    assert score.shape == (2,) and amap.shape == (2, 1, 40, 24)
    ts = mx.export_onnx(_Tiny(), str(tmp_path / "ts.onnx"), dynamic_size=True, exporter="torchscript")
    assert ts.exporter == "torchscript" and not ts.dynamic_size and ts.inputs[0]["shape"] == [1, 3, 16, 16]
    assert any("spatial size fixed at 16x16" in n for n in ts.notes)


def test_bad_requests_are_config_errors(tmp_path):
    with pytest.raises(mx.ConfigError, match="unknown exporter"):
        mx.export_onnx(_Tiny(), str(tmp_path / "x.onnx"), exporter="tflite")
    with pytest.raises(mx.ConfigError, match="height, width"):
        mx.export_onnx(_Tiny(), str(tmp_path / "x.onnx"), input_size=(4,))


def test_importing_the_families_does_not_import_onnx():
    code = ("import sys, components.models as m; from components.models import registry; "
            "fams = registry.families(); assert all(f.bench and f.paper for f in fams.values()), fams; "
            "assert not {'onnx', 'onnxruntime', 'onnxscript'} & set(sys.modules), 'onnx imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
