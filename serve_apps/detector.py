"""The detector endpoint: a Ray Serve deployment with a FastAPI ingress that loads one artifact by URI.

    POST /v1/detect   multipart upload (field "image" or "file") or a raw image body
                      -> {score, is_defect, threshold, defect_map_png (base64 PNG, map x 255 at the input size),
                          model, latency_ms}
    GET  /healthz     -> {status, model, family}

Errors: 415 when the upload is not an image, 400 when it is damaged/empty, 413 when it exceeds the byte or pixel
limit. Run locally with ``defectflow serve --model <uri>``, or on a cluster with ``serve deploy
serve_apps/detector.yaml`` (``user_config`` changes hot-swap the model in place through ``reconfigure``).
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` annotation of the routes that
# Serve's ingress re-binds, or it reads `request` as a required query parameter (422).
import asyncio
import base64
import logging
import threading
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from ray import serve

from components import artifact, storage
from components.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageTooLargeError,
    UnsupportedImageError,
    decode_image,
    encode_png,
)
from components.errors import DataError
from components.inference import infer, map_to_png_array, pick_device

log = logging.getLogger("defectflow.serve")

app = FastAPI(title="defectflow detector", version="1",
              description="Defect score, decision and defect map for one product-surface image.")

IMAGE_FIELDS = ("image", "file")


class DetectorService:
    """Holds one Detector; swapped atomically by ``reconfigure`` (user_config: model_uri, threshold)."""

    def __init__(self, model_uri: str | None = None, threshold: float | None = None,
                 storage_env: dict[str, Any] | None = None, max_upload_bytes: int = 32 * 1024 * 1024,
                 max_image_pixels: int = DEFAULT_MAX_PIXELS, use_gpu: bool | str = "auto"):
        storage.configure(**(storage_env or {}))
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_image_pixels = int(max_image_pixels)
        self.device = pick_device(use_gpu)
        self._lock = threading.Lock()
        self._model: tuple[Any, dict[str, Any], float] | None = None
        self._threshold_override = threshold
        if model_uri:
            self._load(model_uri, threshold)

    def _load(self, model_uri: str, threshold: float | None) -> None:
        detector, meta = artifact.load(model_uri, device=self.device)
        thr = float(threshold if threshold is not None else meta.get("threshold", 0.5))
        with self._lock:
            self._model = (detector, meta, thr)
        log.info("serving %s (%s), threshold %.3f", meta["uri"], meta["family"], thr)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Hot-swap: a new ``model_uri`` and/or ``threshold`` from the Serve config."""
        uri = user_config.get("model_uri")
        thr = user_config.get("threshold", self._threshold_override)
        if uri:
            self._load(uri, thr)
        elif self._model is not None and thr is not None:
            det, meta, _ = self._model
            with self._lock:
                self._model = (det, meta, float(thr))

    def _current(self) -> tuple[Any, dict[str, Any], float]:
        if self._model is None:
            raise HTTPException(503, "no model loaded: set model_uri")
        return self._model

    def model_info(self) -> dict[str, Any]:
        _, meta, thr = self._current()
        reg = meta.get("registry") or {}
        return {"uri": meta["uri"], "family": meta["family"], "name": reg.get("name"), "version": reg.get("version"),
                "threshold": thr}

    def check_health(self) -> None:
        """A real tiny inference: the default check cannot see a stuck model (ray-project/ray#61263)."""
        det, _, _ = self._current()
        infer(det, np.zeros((32, 32, 3), np.float32), self.device)

    def detect_bytes(self, data: bytes) -> dict[str, Any]:
        t0 = time.perf_counter()
        det, _meta, thr = self._current()
        if len(data) > self.max_upload_bytes:
            raise HTTPException(413, f"upload of {len(data):,} bytes exceeds the limit of {self.max_upload_bytes:,}")
        try:
            img = decode_image(data, name="upload", max_pixels=self.max_image_pixels)
        except UnsupportedImageError as e:
            raise HTTPException(415, f"unsupported media: {e.message}") from e
        except ImageTooLargeError as e:
            raise HTTPException(413, e.message) from e
        except DataError as e:
            raise HTTPException(400, f"unreadable image: {e.message}") from e
        score, prob = infer(det, img, self.device)
        png = encode_png(map_to_png_array(prob))
        return {"score": score, "is_defect": bool(score >= thr), "threshold": thr,
                "defect_map_png": base64.b64encode(png).decode("ascii"),
                "width": int(img.shape[1]), "height": int(img.shape[0]),
                "model": self.model_info(), "latency_ms": round((time.perf_counter() - t0) * 1000.0, 2)}


async def read_upload(request: Request, max_bytes: int) -> bytes:
    """The image bytes of a multipart upload (field image/file) or of a raw body."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes + 64 * 1024:
        raise HTTPException(413, f"request of {int(length):,} bytes exceeds the limit of {max_bytes:,}")
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form()
        for name in IMAGE_FIELDS:
            item = form.get(name)
            if item is not None and hasattr(item, "read"):
                return await item.read()
        raise HTTPException(400, f"multipart upload needs a file field named one of {list(IMAGE_FIELDS)}")
    if ctype.startswith(("application/json", "application/x-www-form-urlencoded", "text/")):
        raise HTTPException(415, f"unsupported media type {ctype!r}: send an image file (multipart field 'image') "
                                 "or the raw image bytes")
    body = await request.body()
    if not body:
        raise HTTPException(400, "empty request body: send an image")
    return body


@serve.deployment(name="Detector", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=8,
                  health_check_period_s=10, health_check_timeout_s=30, max_constructor_retry_count=3)
@serve.ingress(app)
class DetectorDeployment(DetectorService):
    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_info()}

    @app.post("/v1/detect")
    async def detect(self, request: Request) -> JSONResponse:
        data = await read_upload(request, self.max_upload_bytes)
        result = await asyncio.to_thread(self.detect_bytes, data)
        return JSONResponse(result)


def build(model_uri: str, *, threshold: float | None = None, num_replicas: int = 1, num_cpus: float = 0.5,
          num_gpus: float = 0.0, max_upload_bytes: int = 32 * 1024 * 1024,
          max_image_pixels: int = DEFAULT_MAX_PIXELS) -> Any:
    """The bound Serve application for one model."""
    s = storage.settings()
    return DetectorDeployment.options(
        num_replicas=num_replicas, ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
    ).bind(model_uri=storage.resolve_model(model_uri), threshold=threshold,
           storage_env={"endpoint_url": s.endpoint_url, "region": s.region}, max_upload_bytes=max_upload_bytes,
           max_image_pixels=max_image_pixels, use_gpu=num_gpus > 0)


def build_app(args: dict[str, Any]) -> Any:
    """Application builder for ``serve run serve_apps.detector:build_app model_uri=...`` and serve configs."""
    uri = args.get("model_uri")
    if not uri:
        raise ValueError("serve_apps.detector needs the argument model_uri=<artifact URI>")
    return build(uri, threshold=float(args["threshold"]) if args.get("threshold") else None,
                 num_replicas=int(args.get("num_replicas", 1)), num_cpus=float(args.get("num_cpus", 0.5)),
                 num_gpus=float(args.get("num_gpus", 0)))
