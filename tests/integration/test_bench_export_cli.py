"""`defectflow export` (a model to ONNX) and `defectflow bench` as a user runs them: real subprocesses, real
exporters, onnxruntime and JSON/Markdown outputs (the README's claims), small sizes, no speed asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components import artifact
from components.models import registry
from tests.helpers import procedural_manifest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)
SIZE = 64
TINY_GMBINET = "n=1,blocks=[1,1,1,1],init_filters=8"  # keeps the dynamo export to a few seconds


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflows.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=240)


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory) -> str:
    torch.manual_seed(0)
    det = registry.create_detector("gmbinet", {"n": 1, "blocks": [1, 1, 1, 1], "init_filters": 8},
                                   {"input_size": (SIZE, SIZE)}).eval()
    return artifact.save(det, str(tmp_path_factory.mktemp("art") / "gmbinet-small"), threshold=0.37,
                         pixel_threshold=0.42)


def test_export_model_to_onnx(small_artifact, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "x.onnx"
    r = cli("export", "--model", small_artifact, "--out", str(out), "--dynamic-batch")
    assert r.returncode == 0, r.stderr
    assert "parity vs eager PyTorch" in r.stdout and ": ok" in r.stdout and "dynamo" in r.stdout
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["images"]
    score, amap = sess.run(["score", "anomaly_map"], {"images": torch.rand(2, 3, SIZE, SIZE).numpy()})
    assert score.shape == (2,) and amap.shape == (2, 1, SIZE, SIZE)
    side = json.loads(Path(str(out) + ".json").read_text())
    assert side["exporter"] == "dynamo" and side["fallback_reason"] is None and side["opset"] == 18
    assert side["dynamic_batch"] is True and side["inputs"][0]["shape"] == ["batch", 3, SIZE, SIZE]
    assert side["parity"]["ok"] and side["parity"]["anomaly_map_max_abs_diff"] <= side["parity"]["atol"]
    assert side["model"]["artifact"] == small_artifact
    assert side["model"]["threshold"] == 0.37 and side["model"]["pixel_threshold"] == 0.42
    assert not (Path(small_artifact) / "model.onnx").exists()  # the artifact is left as it was


def test_old_dataset_export_usage_is_forwarded_with_a_warning(tmp_path):
    manifest = procedural_manifest(str(tmp_path / "m.parquet"), count=8)
    r = cli("export", "--manifest", manifest, "--format", "yolo", "--out", str(tmp_path / "yolo"))
    assert r.returncode == 0, r.stderr
    assert "deprecated" in r.stderr and "defectflow export-dataset" in r.stderr
    assert (tmp_path / "yolo" / "data.yaml").exists() and "yolo export written" in r.stdout
    r = cli("export", "--manifest", manifest, "--out", str(tmp_path / "y2"))  # no dataset format: not guessed
    assert r.returncode == 2 and "export-dataset" in r.stderr and "Traceback" not in r.stderr
    r = cli("export", "--out", str(tmp_path / "z.onnx"))
    assert r.returncode == 2 and "needs --model" in r.stderr


def _bench_outputs(out: Path, target: str) -> tuple[dict, str]:
    res = json.loads((out / f"{target}.json").read_text())
    md = (out / f"{target}.md").read_text()
    assert res["target"] == target and res["results"] and res["machine"]["cpus"] >= 1 and "seconds" in res
    assert md.startswith(f"# Benchmark: {target}")
    return res, md


def test_bench_gmbinet(tmp_path):
    r = cli("bench", "gmbinet", "--size", str(SIZE), "--iters", "2", "--variant", TINY_GMBINET, "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    res, md = _bench_outputs(tmp_path, "gmbinet")
    assert res["input"] == [1, 3, SIZE, SIZE] and res["paper"]["params_m"] == 0.19
    row = res["results"][0]
    assert row["n"] == 1 and row["variant"].startswith("n=1,blocks=")
    for key in ("params", "params_m", "gflops", "gmacs", "eager_fps", "eager_ms", "onnx_fps", "onnx_ms"):
        assert row[key] > 0, key
    assert row["onnx_exporter"] == "dynamo" and row["onnx_max_abs_diff"] < 1e-4
    assert "Paper (GMBINet, arXiv 2508.16397)" in md and "| onnx_fps |" in md


def test_bench_supersimplenet(tmp_path):
    r = cli("bench", "supersimplenet", "--size", str(SIZE), "--iters", "2", "--no-onnx",
            "--variant", "seg_hidden=64,cls_hidden=16", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    res, md = _bench_outputs(tmp_path, "supersimplenet")
    row = res["results"][0]
    assert row["variant"] == "seg_hidden=64,cls_hidden=16" and row["backbone"] == "efficientnet_lite0"
    for key in ("trainable_params", "backbone_params", "gflops", "eager_fps", "feature_extraction_img_s",
                "epoch_from_features_s", "epoch_from_pixels_s", "epoch_speedup"):
        assert row[key] > 0, key
    assert "onnx_fps" not in row and res["paper"]["gpu_latency_ms"] == 9.3
    assert "Paper (SuperSimpleNet" in md and "no CPU figure is published" in md


def test_bench_synth(tmp_path):
    r = cli("bench", "synth", "--size", str(SIZE), "--count", "2", "--generator", "procedural", "--generator",
            "cutpaste", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    res, md = _bench_outputs(tmp_path, "synth")
    assert [row["generator"] for row in res["results"]] == ["procedural", "cutpaste"]
    assert all(row["images"] == 2 and row["images_per_s"] > 0 for row in res["results"])
    assert "| cutpaste |" in md and "paper" not in res
