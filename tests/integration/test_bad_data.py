"""One bad image never costs a run: a folder dataset with a truncated JPEG and a text file named .png ingests, trains
and evaluates, and every stage reports what it left out — through the CLI a user runs, and through a manifest
whose broken image got past ingest (headers only)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.data import adapters, manifest
from components.data.images import encode_mask_png, encode_png
from tests.helpers import train_config
from workflows import train
from workflows.evaluate import evaluate

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def _truncated_jpeg(path: Path) -> None:
    noise = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG", quality=95)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])  # the header survives, the pixels do not


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    """A `folder` dataset (train/val/test) of procedural surfaces, plus a truncated JPEG in test/ and train/, and a
    text file named .png."""
    root = tmp_path_factory.mktemp("bad") / "parts"
    table = adapters.ingest("procedural", None, options={"count": 40, "size": 64, "seed": 3})
    for i, r in enumerate(table.to_pylist()):
        split = ("train", "val", "test")[0 if i % 5 < 3 else (1 if i % 5 == 3 else 2)]
        cls = "good" if r["label"] == 0 else "scratch"
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        (root / split / cls / f"p{i:03d}.png").write_bytes(encode_png(manifest.load_image(r)))
        if r["label"] == 1:
            (root / split / "masks" / cls).mkdir(parents=True, exist_ok=True)
            (root / split / "masks" / cls / f"p{i:03d}.png").write_bytes(encode_mask_png(manifest.load_mask(r)))
    _truncated_jpeg(root / "test" / "good" / "cut.jpg")
    _truncated_jpeg(root / "train" / "good" / "cut2.jpg")
    (root / "test" / "good" / "notes.png").write_text("a text file with an image's name\n")
    return root


def test_ingest_reports_and_skips_through_the_cli(parts, tmp_path):
    out = tmp_path / "m.parquet"
    r = subprocess.run([sys.executable, "-m", "workflows.cli", "ingest", "--dataset", "folder", "--root", str(parts),
                        "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "3 unreadable file(s) left out" in r.stdout
    rejected = json.loads((tmp_path / "rejected.json").read_text())
    assert sorted(Path(x["uri"]).name for x in rejected) == ["cut.jpg", "cut2.jpg", "notes.png"]
    ids = set(manifest.read(str(out))["sample_id"].to_pylist())
    assert not any(i.endswith(("cut", "cut2", "notes")) for i in ids) and len(ids) == 40


def test_a_broken_image_in_the_manifest_is_skipped_by_training_and_evaluation(ray_session, parts, tmp_path, caplog):
    scan = adapters.scan_dataset("folder", str(parts), verify=False)  # headers only: the cut JPEGs get in
    assert [Path(x["uri"]).name for x in scan.rejected] == ["notes.png"]
    man = str(tmp_path / "m.parquet")
    manifest.write(scan.table, man)
    with caplog.at_level("WARNING", logger="defectflow.train"):
        res = train.run(train_config(str(tmp_path / "store"), man, name="bad", optim={"epochs": 1}))
    assert "1 train sample(s) could not be decoded" in caplog.text and "cut2" in caplog.text
    assert res.metrics["test_n_skipped"] == 1  # the cut JPEG of test/ was not scored, the rest was
    assert res.metrics["test_n_images"] == 8
    skipped = json.loads((Path(res.report_uri) / "skipped.json").read_text())
    assert [s["sample_id"].rsplit("/", 1)[-1] for s in skipped] == ["cut"]
    every = evaluate(res.artifact_uri, manifest.read(man), split="all", sheet_images=0)
    assert every.metrics["n_skipped"] == 2 and every.metrics["n_images"] == 40
