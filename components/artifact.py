"""The one artifact format: ``model.safetensors`` + ``detector.json`` (+ ``metrics.json``) in a folder or prefix.

detector.json::

    {"format": "defectflow-detector", "format_version": 1,
     "family": "gmbinet", "config": {"params": ..., "preprocessing": ..., "postprocessing": ...},
     "input_size": [H, W], "normalization": {...},
     "threshold": 0.5,          # image decision: is_defect = score >= threshold (chosen on validation)
     "pixel_threshold": 0.5,    # predicted mask = map >= pixel_threshold
     "threshold_info": {...},   # how the decision threshold was chosen
     "metrics": {...}, "lineage": {"manifest_digest": ..., "run": ..., "trial_id": ..., "code_version": ...},
     "created": "2026-11-22T01:00:00Z"}

Weights are safetensors only: loading never unpickles anything.
"""

from __future__ import annotations

import datetime as _dt
import logging
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import components
from components import catalog, storage
from components.errors import StorageError, WeightsError
from components.models import registry
from components.models.base import Detector

log = logging.getLogger(__name__)

FORMAT = "defectflow-detector"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "detector.json"
METRICS = "metrics.json"


def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    version = components.__version__
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5, check=False).stdout.strip()
        if sha:
            version += f"+g{sha}"
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def state_dict_bytes(module: torch.nn.Module) -> bytes:
    sd = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return st_save(sd)


def read_state_dict(uri: str, hint: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file at ``uri`` (never a pickle); WeightsError with ``hint`` when the file
    is missing or not valid safetensors."""
    try:
        raw = storage.read_bytes(uri)
    except StorageError as e:
        raise WeightsError(f"{uri} is missing or unreadable: {e.message}", hint) from e
    try:
        return st_load(raw)
    except Exception as e:  # safetensors raises SafetensorError (not an OSError)
        raise WeightsError(f"{uri} is not a valid safetensors file: {e}", hint) from e


def save(detector: Detector, uri: str, *, threshold: float = 0.5, metrics: dict[str, Any] | None = None,
         lineage: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
         pixel_threshold: float | None = None) -> str:
    """Write an artifact folder. Weights first, detector.json last: a folder with detector.json is complete."""
    uri = storage.normalize(uri)
    cfg = detector.config()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": detector.family,
        "config": cfg,
        "input_size": list(detector.preprocessing.input_size),
        "normalization": {"mean": list(detector.preprocessing.mean), "std": list(detector.preprocessing.std),
                          "scale_by_max": detector.preprocessing.scale_by_max},
        "threshold": float(threshold),
        "pixel_threshold": float(threshold if pixel_threshold is None else pixel_threshold),
        "metrics": metrics or {},
        "lineage": {"code_version": code_version(), **(lineage or {})},
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if extra:
        meta.update(extra)
    storage.write_bytes(storage.join(uri, WEIGHTS), state_dict_bytes(detector))
    if metrics:
        storage.write_json(storage.join(uri, METRICS), metrics)
    storage.write_json(storage.join(uri, META), meta)
    log.debug("artifact written to %s", uri)
    return uri


def read_meta(uri: str) -> dict[str, Any]:
    uri = catalog.resolve_model(uri)
    meta = storage.read_json(storage.join(uri, META))
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{uri}/{META} is not a defectflow detector description",
                           "pass a folder written by `defectflow train` or `defectflow import-weights`")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise WeightsError(f"{uri} was written by a newer defectflow (format {meta['format_version']})",
                           "upgrade defectflow")
    return meta


def load(uri: str, device: str | torch.device = "cpu") -> tuple[Detector, dict[str, Any]]:
    """Rebuild a detector from an artifact (eval mode) and return it with its detector.json."""
    resolved = catalog.resolve_model(uri)
    meta = read_meta(resolved)
    family = registry.get(meta["family"])
    detector = family.detector_cls.from_config(meta["config"])
    state = read_state_dict(storage.join(resolved, WEIGHTS), "the artifact is incomplete or damaged; re-export it")
    try:
        missing, unexpected = detector.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise WeightsError(f"{resolved}: weights do not match the {meta['family']} architecture in detector.json: "
                           f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}",
                           "the artifact and detector.json disagree; re-export it") from e
    if missing or unexpected:
        raise WeightsError(f"{resolved}: weights do not match the {meta['family']} architecture "
                           f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})",
                           "the artifact and detector.json disagree; re-export it")
    meta["uri"] = resolved
    return detector.to(device).eval(), meta


def update_meta(uri: str, *, metrics: dict[str, Any] | None = None, threshold: float | None = None,
                lineage: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge evaluation results into an artifact's detector.json (and metrics.json) without touching weights."""
    uri = catalog.resolve_model(uri)
    meta = read_meta(uri)
    meta.pop("uri", None)
    if metrics:
        meta["metrics"] = {**meta.get("metrics", {}), **metrics}
        storage.write_json(storage.join(uri, METRICS), meta["metrics"])
    if threshold is not None:
        meta["threshold"] = float(threshold)
    if lineage:
        meta["lineage"] = {**meta.get("lineage", {}), **lineage}
    if extra:
        meta.update(extra)
    storage.write_json(storage.join(uri, META), meta)
    return meta


def publish(staging_uri: str, uri: str) -> str:
    """Copy a finished artifact from its staging folder to ``uri``, detector.json last, then drop the staging copy.

    Workflows build an artifact in a staging folder while it is calibrated and evaluated, so the folder users see
    (one holding detector.json is complete) only ever appears whole, with its metrics.
    """
    src = storage.normalize(staging_uri)
    dst = storage.normalize(uri)
    for fname in (META, METRICS):  # an artifact published before (a resumed run): unpublish it first, so no
        storage.delete(storage.join(dst, fname))  # reader ever pairs the new weights with the old detector.json
    _copy_payload(src, dst)
    storage.write_bytes(storage.join(dst, META), storage.read_bytes(storage.join(src, META)))
    storage.delete(src, recursive=True)
    return dst


def _copy_payload(src: str, dst: str) -> None:
    """Everything of an artifact but detector.json (which marks it complete and is always written last)."""
    for fname in (WEIGHTS, METRICS):
        if storage.exists(storage.join(src, fname)):
            storage.write_bytes(storage.join(dst, fname), storage.read_bytes(storage.join(src, fname)))


def register(detector_or_uri: Detector | str, layout: catalog.Layout, name: str, **save_kwargs: Any) -> str:
    """Save (or copy) an artifact as a new version of ``models/<name>`` and return its URI.

    The version is claimed create-only first, so concurrent registrations never share one; detector.json is
    written last, so a half-copied version is never listed.
    """
    version = layout.claim_version(name)
    dst = layout.model(name, version)
    if isinstance(detector_or_uri, str):
        src = catalog.resolve_model(detector_or_uri)
        _copy_payload(src, dst)
        meta = storage.read_json(storage.join(src, META))
        meta.setdefault("lineage", {}).update(save_kwargs.get("lineage") or {})
        meta["registry"] = {"name": name, "version": version}
        storage.write_json(storage.join(dst, META), meta)
    else:
        extra = dict(save_kwargs.pop("extra", None) or {})
        extra["registry"] = {"name": name, "version": version}
        save(detector_or_uri, dst, extra=extra, **save_kwargs)
    log.info("registered %s version %s at %s", name, version, dst)
    return dst
