"""Ray Serve endpoint over real HTTP sockets: detect, health, and clear errors for bad uploads."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import free_port
from tests.helpers import random_artifact

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def _png(w: int, h: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def endpoint(ray_session, tmp_path_factory):
    from components import artifact
    from components.config import ServeConfig
    from workflows import serve

    uri = random_artifact(str(tmp_path_factory.mktemp("art") / "a"), size=64)
    artifact.update_meta(uri, extra={"pixel_threshold": 0.3})  # as calibration would store it
    port = free_port()
    handle = serve.start(ServeConfig(model=uri, port=port, num_cpus=0.25, max_upload_bytes=200_000,
                                     max_image_pixels=1_000_000))
    yield handle
    serve.stop()


def test_detect_returns_score_decision_and_map(endpoint):
    r = requests.post(f"{endpoint.url}/v1/detect", files={"image": ("x.png", _png(90, 70), "image/png")}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert 0.0 <= body["score"] <= 1.0 and isinstance(body["is_defect"], bool)
    assert body["threshold"] == 0.5 and body["model"]["family"] == "gmbinet" and body["latency_ms"] > 0
    m = Image.open(io.BytesIO(base64.b64decode(body["defect_map_png"])))
    assert m.size == (90, 70) and m.mode == "L"
    # the mask is the map at the artifact's pixel threshold (the 8-bit map is rounded: one grey level of slack)
    assert body["pixel_threshold"] == 0.3
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["defect_mask_png"])))) > 0
    grey = np.asarray(m).astype(int)
    assert mask.shape == (70, 90) and body["defect_pixels"] == int(mask.sum())
    assert (grey[mask] >= round(0.3 * 255) - 1).all() and (grey[~mask] <= round(0.3 * 255) + 1).all()


def test_grayscale_rgba_and_16bit_and_raw_body(endpoint):
    for mode in ("L", "RGBA", "I;16"):
        r = requests.post(f"{endpoint.url}/v1/detect", files={"file": ("x.png", _png(40, 30, mode), "image/png")},
                          timeout=60)
        assert r.status_code == 200, (mode, r.text)
    r = requests.post(f"{endpoint.url}/v1/detect", data=_png(32, 32), headers={"content-type": "image/png"},
                      timeout=60)
    assert r.status_code == 200


def test_health(endpoint):
    r = requests.get(f"{endpoint.url}/healthz", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_bad_uploads_get_clear_errors(endpoint):
    url = f"{endpoint.url}/v1/detect"
    r = requests.post(url, files={"image": ("x.txt", b"this is text, not an image", "text/plain")}, timeout=30)
    assert r.status_code == 415 and "not a readable image" in r.json()["detail"]
    r = requests.post(url, files={"image": ("x.png", _png(64, 64)[:200], "image/png")}, timeout=30)
    assert r.status_code == 400 and "truncated" in r.json()["detail"]
    r = requests.post(url, json={"image": "nope"}, timeout=30)
    assert r.status_code == 415
    r = requests.post(url, files={"other": ("x.png", _png(8, 8), "image/png")}, timeout=30)
    assert r.status_code == 400 and "field" in r.json()["detail"]
    big = _png(1200, 1000)  # 1.2 MP > the 1 MP pixel limit; PNG of noise is also > 200 kB
    r = requests.post(url, files={"image": ("big.png", big, "image/png")}, timeout=30)
    assert r.status_code == 413
