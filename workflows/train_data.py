"""Ray Datasets a training run reads: decoded, resized images, or cached frozen features joined with the targets
the supervision regime lets the trainer see. Both keep ``sample_id`` so the driver can say which samples could not
be decoded (they are skipped, never fatal).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components import storage
from components.config import TrainConfig
from components.data import feature_cache
from components.data.loading import prepare_rows_checked, prepare_target
from components.errors import ConfigError, DataError

log = logging.getLogger("defectflow.train")

MATERIALIZE_BYTES = 2 * 1024**3  # datasets below this stay in the object store for all epochs
TARGET_COLUMNS = ["sample_id", "label", "supervision", "mask_uri", "mask_bytes", "height", "width"]


def _pixels(batch: pa.Table, image_size: tuple[int, int], max_pixels: int,
            storage_settings: dict[str, Any], layout: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    storage.configure(**storage_settings)
    return prepare_rows_checked(batch.to_pylist(), image_size, max_pixels, **(layout or {}))


def _features(batch: pa.Table, lookup_ref: Any, image_size: tuple[int, int], max_pixels: int,
              storage_settings: dict[str, Any]) -> dict[str, np.ndarray]:
    """Feature-shard rows (already filtered to this split) -> features + targets; a row whose mask cannot be read
    is kept with ``ok`` False (filtered out after the map, as in :func:`prepare_rows_checked`)."""
    import ray

    storage.configure(**storage_settings)
    lookup = ray.get(lookup_ref)
    ids = batch.column("sample_id").to_pylist()
    targets, ok = [], []
    for sid in ids:
        try:
            targets.append(prepare_target(lookup[sid], image_size, max_pixels=max_pixels))
            ok.append(True)
        except DataError as e:
            log.warning("skipping %s: %s", sid, e.message)
            targets.append({"mask": np.zeros((1, *image_size), np.uint8), "label": np.float32(-1),
                            "has_mask": False})
            ok.append(False)
    return {"sample_id": np.array(ids, dtype=object), "features": feature_cache.decode(batch.column("features")),
            "mask": np.stack([t["mask"] for t in targets]),
            "label": np.array([t["label"] for t in targets], np.float32),
            "has_mask": np.array([t["has_mask"] for t in targets], bool), "ok": np.array(ok, bool)}


def _split(table: pa.Table, split: str) -> pa.Table:
    return table.filter(pc.equal(table["split"], split))


def permuted(table: pa.Table, seed: int) -> pa.Table:
    """The rows of ``table`` in a seeded random order.

    Manifests list images folder by folder, which is class by class (Magnetic Tile's training split is 202
    defective, 666 defect-free, 72 defective images in that order). Read in that order, with only a local shuffle
    buffer of a few batches, every batch holds one class and every epoch ends on the last folder: the model chases
    whatever it saw last. Training rows are therefore globally permuted once (seeded, so runs repeat) and read in
    that order every epoch (see the training loop for why there is no local shuffle buffer on top)."""
    return table.take(np.random.default_rng(seed).permutation(table.num_rows))


def from_pixels(table: pa.Table, cfg: TrainConfig) -> dict[str, Any]:
    """Train/val datasets of uint8 images (3, H, W) and their targets, decoded by Ray Data tasks."""
    import ray.data
    from ray.data.expressions import col

    out = {}
    h, w = cfg.data.image_size
    layout = layout_options(cfg)
    for split in ("train", "val"):
        sub = _split(table, split)
        if sub.num_rows == 0:
            continue
        if split == "train":
            sub = permuted(sub, cfg.seed)
        ds = ray.data.from_arrow(sub).map_batches(
            _pixels, fn_kwargs={"image_size": (h, w), "max_pixels": cfg.data.max_image_pixels,
                                "storage_settings": storage.worker_settings(), "layout": layout},
            batch_size=16, batch_format="pyarrow").filter(expr=col("ok"))
        rows = sub.num_rows
        if layout["layout"] == "tile":
            rows = tile_count(sub, (h, w), layout["tile_overlap"], layout["tile_scale"])
            if split == "train":  # an image's tiles come out together: mix them with every other image's
                ds = ds.random_shuffle(seed=cfg.seed)
        out[split] = ds.materialize() if rows * (4 * h * w + 64) < MATERIALIZE_BYTES else ds
    return out


def tile_count(table: pa.Table, tile: tuple[int, int], overlap: float, scale: float) -> int:
    """How many training rows the tile layout makes of ``table`` (from the manifest's image sizes)."""
    from components.inference import tile_starts

    n = 0
    for hh, ww in zip(table["height"].to_pylist(), table["width"].to_pylist(), strict=True):
        sh, sw = max(tile[0], round((hh or tile[0]) * scale)), max(tile[1], round((ww or tile[1]) * scale))
        n += len(tile_starts(sh, tile[0], overlap)) * len(tile_starts(sw, tile[1], overlap))
    return n


def layout_options(cfg: TrainConfig) -> dict[str, Any]:
    """How training images meet ``data.image_size``: the model's ``preprocessing.layout`` (squash, letterbox,
    tile with its overlap and scale), so training sees what inference will."""
    pre = cfg.model.preprocessing or {}
    layout = pre.get("layout", "squash")
    if layout == "tile":
        return {"layout": "tile", "tile_overlap": pre.get("tile_overlap", 0.25),
                "tile_scale": pre.get("tile_scale", 1.0)}
    return {"layout": layout}


def from_features(table: pa.Table, cfg: TrainConfig, features_uris: list[str]) -> dict[str, Any]:
    """Train/val datasets of cached features (several folders read as one: the manifest's and a synthetic set's),
    joined with the regime's targets in the map tasks."""
    import ray
    import ray.data
    from ray.data.expressions import col

    sig = feature_cache.read_signature(features_uris[0])
    for other in features_uris[1:]:
        if feature_cache.read_signature(other)["feature_shape"] != sig["feature_shape"]:
            raise ConfigError(f"{other} and {features_uris[0]} hold features of different shapes",
                              "compute both with the same model and image size")
    if len({storage.is_s3(u) for u in features_uris}) > 1:
        raise ConfigError(f"feature caches on different stores cannot be read as one dataset: {features_uris}",
                          "keep data.features and the storage root (where a synthetic set's cache goes) on the same "
                          "store, or use data.features: auto")
    fs, _ = storage.arrow_fs(features_uris[0])
    files = [storage.strip_scheme(f) for u in features_uris for f in feature_cache.shard_files(u)]
    c, fh, fw = sig["feature_shape"]
    h, w = cfg.data.image_size
    out = {}
    for split in ("train", "val"):
        sub = _split(table, split)
        if sub.num_rows == 0:
            continue
        lookup = {r["sample_id"]: r for r in sub.select(TARGET_COLUMNS).to_pylist()}
        ds = (ray.data.read_parquet(files, filesystem=fs)
              .filter(expr=col("sample_id").is_in(list(lookup)))
              .map_batches(_features, fn_kwargs={"lookup_ref": ray.put(lookup), "image_size": (h, w),
                                                 "max_pixels": cfg.data.max_image_pixels,
                                                 "storage_settings": storage.worker_settings()},
                           batch_size=16, batch_format="pyarrow")
              .filter(expr=col("ok")))
        if split == "train":  # the cache's shards follow the manifest's order: mix them (see permuted)
            ds = ds.random_shuffle(seed=cfg.seed)
        out[split] = ds.materialize() if sub.num_rows * (4 * c * fh * fw + h * w) < MATERIALIZE_BYTES else ds
    return out


def build(table: pa.Table, cfg: TrainConfig, features_uris: list[str] | None = None) -> dict[str, Any]:
    """The datasets of a run, and a warning naming the samples that could not be decoded (materialised datasets
    only: counting a streamed one would read it twice)."""
    import ray.data

    # rows keep the (seeded, permuted) table's order, not the order in which map tasks finish, which made two
    # runs of one config and seed differ
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    if features_uris is not None and layout_options(cfg)["layout"] != "squash":
        raise ConfigError(f"the feature cache holds features of squashed images; preprocessing.layout "
                          f"{layout_options(cfg)['layout']!r} needs them of its tiles or letterboxes",
                          "train end to end with data.features: null (the cache per tile is not implemented yet)")
    datasets = from_pixels(table, cfg) if features_uris is None else from_features(table, cfg, features_uris)
    for split, ds in datasets.items():
        if type(ds).__name__ != "MaterializedDataset":
            continue
        expected = set(_split(table, split)["sample_id"].to_pylist())
        if ds.count() == len(expected):  # metadata only: the common case costs nothing
            continue
        missing = sorted(expected - set(ds.unique("sample_id")))
        if missing:
            log.warning("%d %s sample(s) could not be decoded and are skipped, e.g. %s (reasons in the log)",
                        len(missing), split, missing[:3])
    return datasets


def quiet_progress() -> None:
    """Per-epoch shard iteration would draw a Ray Data progress bar every epoch; the epoch lines say enough."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
