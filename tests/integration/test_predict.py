"""Batch prediction: maps at the input size + scores.csv, in-process and on Ray Data, local and S3."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

from components import artifact, storage
from tests.helpers import random_artifact
from workflows import predict

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def _write_images(base: str, n: int) -> None:
    rng = np.random.default_rng(1)
    for i in range(n):
        arr = (rng.random((40 + i, 50, 3)) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        storage.write_bytes(storage.join(base, f"img{i}.png"), buf.getvalue())
    storage.write_bytes(storage.join(base, "sub/img0.jpg"), buf.getvalue())  # stem collision with img0.png
    storage.write_bytes(storage.join(base, "broken.png"), b"\x89PNG\r\n\x1a\nnot really")


def _check(res, out, n):
    rows = list(csv.DictReader(io.StringIO(storage.read_text(res.scores_uri))))
    assert len(rows) == n + 2 and res.failed == 1
    broken = next(r for r in rows if r["stem"] == "broken")
    assert broken["score"] == "" and broken["error"]
    stems = {r["stem"] for r in rows}
    assert {"img0", "sub__img0"} <= stems
    m = Image.open(io.BytesIO(storage.read_bytes(storage.join(out, "img2.png"))))
    assert m.size == (50, 42) and m.mode == "L"
    ok = [r for r in rows if not r["error"]]
    assert all(0.0 <= float(r["score"]) <= 1.0 and r["is_defect"] in ("0", "1") for r in ok)
    # the mask is the map at the artifact's pixel threshold (0.3 here; the 8-bit map has one grey level of slack)
    mask = np.asarray(Image.open(io.BytesIO(storage.read_bytes(storage.join(out, "masks", "img2.png"))))) > 0
    grey = np.asarray(m).astype(int)
    row = next(r for r in rows if r["stem"] == "img2")
    assert mask.shape == (42, 50) and int(row["defect_pixels"]) == int(mask.sum())
    assert (grey[mask] >= round(0.3 * 255) - 1).all() and (grey[~mask] <= round(0.3 * 255) + 1).all()


def _artifact(uri: str) -> str:
    art = random_artifact(uri)
    artifact.update_meta(art, extra={"pixel_threshold": 0.3})  # as calibration would store it
    return art


def test_predict_in_process_local(tmp_path):
    art = _artifact(str(tmp_path / "art"))
    _write_images(str(tmp_path / "in"), 3)
    res = predict.run(art, str(tmp_path / "in"), str(tmp_path / "out"))
    assert not res.used_ray
    _check(res, str(tmp_path / "out"), 3)


@pytest.mark.s3
def test_predict_on_ray_data_s3(ray_session, s3_bucket):
    art = _artifact(f"{s3_bucket}/art")
    _write_images(f"{s3_bucket}/in", 4)
    res = predict.run(art, f"{s3_bucket}/in", f"{s3_bucket}/out", ray_threshold=0, num_actors=1)
    assert res.used_ray
    _check(res, f"{s3_bucket}/out", 4)
