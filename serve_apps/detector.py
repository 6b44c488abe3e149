"""The detector endpoint: a Ray Serve deployment with a FastAPI ingress that loads one artifact by URI.

    POST /v1/detect   multipart upload (field "image" or "file") or a raw image body
                      -> {score, is_defect, threshold, defect_map_png (base64 PNG, map x 255 at the input size),
                          pixel_threshold, defect_pixels, defect_mask_png (base64 PNG, 255 where map >=
                          pixel_threshold, the artifact's calibrated one), model, latency_ms}
    GET  /healthz     -> {status, model, family}

Errors: 415 when the upload is not an image, 400 when it is damaged/empty, 413 when it exceeds the byte or pixel
limit. Run locally with ``defectflow serve --model <uri>``, or on a cluster with ``serve deploy
serve_apps/detector.yaml``: ``build_app`` takes the ``defectflow serve`` config keys as ``args`` (validated, unknown
keys rejected), and a change of only ``user_config: {model_uri, threshold}`` hot-swaps the model in the running
replicas through ``reconfigure`` (the new model must pass a tiny inference before it replaces the old one).
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
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.exceptions import RayServeException

from components import artifact, catalog, storage
from components import config as cfgmod
from components.config import ServeConfig
from components.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageTooLargeError,
    UnsupportedImageError,
    decode_image,
    encode_png,
)
from components.errors import ConfigError, DataError, DefectflowError
from components.inference import infer, map_to_png_array, pick_device

log = logging.getLogger("defectflow.serve")

app = FastAPI(title="defectflow detector", version="1",
              description="Defect score, decision and defect map for one product-surface image.")

IMAGE_FIELDS = ("image", "file")


class UserConfig(BaseModel):
    """The ``user_config`` of the Detector deployment: what ``reconfigure`` may swap without a restart."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_uri: str | None = Field(None, description="artifact URI or <root>/models/<name>[@alias]; null: the args'")
    threshold: float | None = Field(None, gt=0, lt=1, description="null: the args' threshold, else the artifact's")


def smoke_test(detector: Any, device: Any) -> None:
    """One tiny real inference; raises unless it yields a finite score and map (a NaN model is a broken model)."""
    score, prob = infer(detector, np.zeros((32, 32, 3), np.float32), device)
    if not (np.isfinite(score) and np.isfinite(prob).all()):
        raise RuntimeError(f"detector smoke test failed: non-finite output (score {score})")


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
        self._base_uri = model_uri  # what the app was built with; a user_config model_uri overrides it
        self._threshold_override = threshold
        if model_uri:
            # No smoke test here: Serve's initial health check runs the same inference before traffic arrives.
            self._load(model_uri, threshold, verify=False)

    def _load(self, model_uri: str, threshold: float | None, verify: bool = True) -> None:
        detector, meta = artifact.load(model_uri, device=self.device)
        if verify:
            smoke_test(detector, self.device)
        thr = float(threshold if threshold is not None else meta.get("threshold", 0.5))
        with self._lock:
            self._model = (detector, meta, thr)
        log.info("serving %s (%s), threshold %.3f", meta["uri"], meta["family"], thr)

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Hot-swap to the user_config's ``model_uri``/``threshold`` (unset keys fall back to the app's args).

        A new model is loaded and smoke-tested before it replaces the current one, so a broken artifact fails the
        update (Serve reports it) instead of answering requests. Unknown keys are rejected.
        """
        cfg = cfgmod.validate(UserConfig, dict(user_config or {}), "user_config of the Detector deployment")
        uri = cfg.model_uri or self._base_uri
        thr = cfg.threshold if cfg.threshold is not None else self._threshold_override
        loaded = self._model[1]["uri"] if self._model is not None else None
        if uri and catalog.resolve_model(uri) != loaded:  # an alias may point elsewhere than when it was loaded
            self._load(uri, thr)
        elif self._model is not None:
            det, meta, _ = self._model
            with self._lock:
                self._model = (det, meta, float(thr if thr is not None else meta.get("threshold", 0.5)))

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
        """A real tiny inference: the default check cannot see a stuck or broken model (ray-project/ray#61263)."""
        det, _, _ = self._current()
        smoke_test(det, self.device)

    def detect_bytes(self, data: bytes) -> dict[str, Any]:
        t0 = time.perf_counter()
        det, meta, thr = self._current()
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
        pixel_thr = float(meta.get("pixel_threshold", 0.5))  # calibrated on validation when the model was trained
        mask = prob >= pixel_thr
        return {"score": score, "is_defect": bool(score >= thr), "threshold": thr,
                "defect_map_png": base64.b64encode(png).decode("ascii"),
                "pixel_threshold": pixel_thr, "defect_pixels": int(mask.sum()),
                "defect_mask_png": base64.b64encode(encode_png(mask.astype(np.uint8) * 255)).decode("ascii"),
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
    return DetectorDeployment.options(
        num_replicas=num_replicas, ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
    ).bind(model_uri=catalog.resolve_model(model_uri), threshold=threshold,
           storage_env=storage.worker_settings(), max_upload_bytes=max_upload_bytes,
           max_image_pixels=max_image_pixels, use_gpu=num_gpus > 0)


# ServeConfig keys that are not the app's to take: where they go instead.
_NOT_APP_ARGS = {
    "host": "the serve config's http_options.host",
    "port": "the serve config's http_options.port",
    "route_prefix": "the application's route_prefix in the serve config",
    "ray": "nothing: a deployed app runs on the cluster it is deployed to",
}


def app_config(args: dict[str, Any]) -> ServeConfig:
    """The ``args`` of a serve config (or ``serve run ... key=value``) -> a validated :class:`ServeConfig`.

    Keys are those of ``defectflow serve --config`` (``model_uri`` is accepted for ``model``; dotted keys such as
    ``storage.s3_endpoint_url`` nest); unknown keys and keys that belong elsewhere in the serve config fail.
    """
    data: dict[str, Any] = {}
    for key, value in dict(args or {}).items():
        entry: dict[str, Any] = {}
        cfgmod.set_dotted(entry, str(key), value)
        data = cfgmod.deep_merge(data, entry)
    misplaced = [f"{k} (set it in {_NOT_APP_ARGS[k]})" for k in data if k in _NOT_APP_ARGS]
    if misplaced:
        raise ConfigError(f"serve_apps.detector args: {', '.join(misplaced)} is not an app argument",
                          "remove it from args")
    if "model_uri" in data:
        if "model" in data:
            raise ConfigError("serve_apps.detector args: both model and model_uri are set", "keep model_uri")
        data["model"] = data.pop("model_uri")
    if not data.get("model"):
        raise ConfigError("serve_apps.detector needs the argument model_uri=<artifact URI>",
                          "add model_uri to the application's args")
    return cfgmod.validate(ServeConfig, data, "serve_apps.detector args")


def build_app(args: dict[str, Any]) -> Any:
    """Application builder for serve configs (``import_path: serve_apps.detector:build_app``) and
    ``serve run serve_apps.detector:build_app model_uri=...``; see :func:`app_config` for the args."""
    try:
        cfg = app_config(args)
        cfg.storage.apply()  # the model reference is resolved here, in the build task; replicas inherit the settings
        return build(cfg.model, threshold=cfg.threshold, num_replicas=cfg.num_replicas, num_cpus=cfg.num_cpus,
                     num_gpus=cfg.num_gpus, max_upload_bytes=cfg.max_upload_bytes,
                     max_image_pixels=cfg.max_image_pixels)
    except DefectflowError as e:
        # A bad config or model reference fails the same way every time: a RayServeException makes Serve report it
        # at once, where any other exception has the build task retried three times (about 20 s) first.
        raise RayServeException(str(e)) from e
