"""The feature-cache format: a model's frozen features, computed once, as Parquet shards that training reads.

A folder holds ``_signature.json`` (everything the features depend on: backbone, resolved layers, weights, input
size, normalisation, feature shape, this format's version), shards ``part-NNNNN-<hash>.parquet`` of ``shard_size``
samples each (sorted by sample id; the name depends on the ids only, so re-runs skip shards already written), and
``_index.json``, written last, listing the shards of the latest complete run: readers use those and nothing else.

Shard schema: ``sample_id`` (string), ``features`` (Arrow's canonical ``fixed_shape_tensor`` of float16 or float32,
shape (C, h, w)). Ray Data reads the tensor column as a tensor column, so nothing is pickled on the way to training.

:class:`ShardWriter` computes and writes shards (plain torch; the ``features`` workflow runs it in Ray Data actors).
A sample whose image cannot be decoded is left out of its shard and listed in the shard's result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from components import storage
from components.data import manifest
from components.data.images import DEFAULT_MAX_PIXELS, resize_image
from components.errors import DataError

log = logging.getLogger(__name__)

FORMAT = 2  # 1: features as raw bytes + shape + dtype columns; 2: an Arrow tensor column
SIGNATURE = "_signature.json"
INDEX = "_index.json"


def signature(detector: Any) -> dict[str, Any]:
    """The signature of the features ``detector.extract`` computes (a cache is reused only when it is identical)."""
    return {**detector.feature_signature(), "cache_format": FORMAT}


def signature_digest(sig: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:12]


def shard_plan(ids: list[str], shard_size: int) -> list[tuple[str, list[str]]]:
    """(shard file name, sample ids) for ids sorted; the name depends on the ids only."""
    ids = sorted(ids)
    plan = []
    for k in range(0, len(ids), shard_size):
        chunk = ids[k:k + shard_size]
        h = hashlib.sha256("\n".join(chunk).encode()).hexdigest()[:10]
        plan.append((f"part-{k // shard_size:05d}-{h}.parquet", chunk))
    return plan


def encode(ids: list[str], features: np.ndarray) -> pa.Table:
    """(N, C, h, w) features of ``ids`` -> a shard table (N may be 0)."""
    features = np.ascontiguousarray(features)
    if len(features):
        column = pa.FixedShapeTensorArray.from_numpy_ndarray(features)
    else:
        kind = pa.fixed_shape_tensor(pa.from_numpy_dtype(features.dtype), list(features.shape[1:]))
        column = pa.ExtensionArray.from_storage(kind, pa.array([], kind.storage_type))
    return pa.table({"sample_id": pa.array(ids, pa.string()), "features": column})


def decode(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A shard's ``features`` column -> float32 (N, C, h, w)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.to_numpy_ndarray().astype(np.float32)


def read_signature(uri: str) -> dict[str, Any]:
    sig_uri = storage.join(uri, SIGNATURE)
    if not storage.exists(sig_uri):
        raise DataError(f"{uri} is not a features folder (no {SIGNATURE})",
                        "run `defectflow features` first, or set data.features: auto")
    return storage.read_json(sig_uri)


def shard_files(uri: str) -> list[str]:
    """URIs of the shards of the latest complete run in a folder."""
    index_uri = storage.join(uri, INDEX)
    if not storage.exists(index_uri):
        raise DataError(f"{uri} holds no complete feature set (no {INDEX})",
                        "run `defectflow features` to completion, or set data.features: auto")
    return [storage.join(uri, n) for n in storage.read_json(index_uri)["shards"]]


def write_index(uri: str, shards: list[str], rows: int, manifest_uri: str) -> None:
    """Mark a run complete (written last: a reader never sees a plan whose shards are not all there)."""
    storage.write_json(storage.join(uri, INDEX), {"shards": shards, "rows": rows, "manifest": manifest_uri})


class ShardWriter:
    """Holds the detector (its frozen extractor) and the manifest rows; writes whole shards."""

    def __init__(self, detector: Any, rows: dict[str, dict[str, Any]], out_uri: str, image_size: tuple[int, int],
                 batch_size: int = 8, dtype: str = "float16", max_pixels: int = DEFAULT_MAX_PIXELS,
                 device: Any = "cpu"):
        import torch

        self.torch = torch
        self.detector = detector.to(device).eval()
        self.rows = rows
        self.out = out_uri
        self.size = tuple(image_size)
        self.batch_size = batch_size
        self.dtype = np.float16 if dtype == "float16" else np.float32
        self.max_pixels = max_pixels
        self.device = device

    def _features(self, images: list[np.ndarray]) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy()).to(self.device)
        with torch.inference_mode():
            f = self.detector.extract(self.detector.preprocess(x))
        return f.float().cpu().numpy().astype(self.dtype)

    def _image(self, sample_id: str, skipped: list[dict[str, str]]) -> np.ndarray | None:
        try:
            return resize_image(manifest.load_image(self.rows[sample_id], max_pixels=self.max_pixels), self.size)
        except DataError as e:
            log.warning("features: skipping %s: %s", sample_id, e.message)
            skipped.append({"sample_id": sample_id, "reason": e.message})
            return None

    def write(self, name: str, ids: list[str]) -> dict[str, Any]:
        """Compute and write one shard; returns {shard, rows, skipped: [{sample_id, reason}], seconds}."""
        t0 = time.time()
        kept: list[str] = []
        feats: list[np.ndarray] = []
        skipped: list[dict[str, str]] = []
        for k in range(0, len(ids), self.batch_size):
            pairs = [(i, self._image(i, skipped)) for i in ids[k:k + self.batch_size]]
            pairs = [(i, img) for i, img in pairs if img is not None]
            if pairs:
                kept += [i for i, _ in pairs]
                feats.extend(self._features([img for _, img in pairs]))
        if not kept:  # every image unreadable: an empty shard of the same schema keeps the plan complete
            feats = [np.zeros((0, *self.detector.feature_shape(self.size)), self.dtype)]
        storage.write_parquet(encode(kept, np.stack(feats) if kept else feats[0]), storage.join(self.out, name))
        return {"shard": name, "rows": len(kept), "skipped": skipped, "seconds": round(time.time() - t0, 2)}
