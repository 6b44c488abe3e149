"""What every dataset layout shares: the Adapter base and its registry, file listing, header probing, and the
helpers of layouts that carry an authors' split.

Adapters only list files and read image headers; :func:`components.data.adapters.ingest.ingest` does the shared
work (verifying every image it admits, embedding bytes, deterministic splits, validation), so every layout gets
the same guarantees. A file whose header cannot be read becomes an :class:`Unreadable` entry the adapter passes on
(:func:`unreadable_row`) instead of failing the whole scan; ingest reports and skips it.

Rows without an authors' split carry ``split == ""`` out of ``scan``; ingest fills those from the sample ids
(:func:`components.data.manifest.assign_splits` with ``keep_existing=True``), so an authors' split is kept
wherever a layout has one. This module imports none of the layouts: each layout module registers itself.
"""


from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, NamedTuple, TypeVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, ValidationError

from components import storage
from components.data import manifest
from components.data.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, decode_mask, image_size
from components.errors import ConfigError, DataError, StorageError
from components.progress import bar

log = logging.getLogger(__name__)

HEADER_BYTES = 64 * 1024
IO_THREADS = 16

T = TypeVar("T")


class AdapterOptions(BaseModel):
    """Base of every adapter's options: unknown keys are errors, so a typo never silently does nothing."""

    model_config = ConfigDict(extra="forbid")


class Adapter:
    """A dataset layout. Subclasses set ``name``, ``description``, ``Options`` and implement :meth:`scan`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[AdapterOptions]] = AdapterOptions
    needs_root: ClassVar[bool] = True

    def options(self, options: AdapterOptions | Mapping[str, Any] | None) -> AdapterOptions:
        """Validate user options (a dict from YAML/--option, or an Options instance)."""
        if isinstance(options, self.Options):
            return options
        try:
            return self.Options.model_validate(dict(options or {}))
        except ValidationError as e:
            fields = ", ".join(sorted(self.Options.model_fields)) or "none"
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'options'}: {err['msg']}"
                                 for err in e.errors())
            raise ConfigError(f"invalid options for the {self.name!r} layout: {problems}",
                              f"options of {self.name}: {fields}") from e

    def scan(self, root_uri: str | None, dataset_name: str, options: AdapterOptions, *,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict[str, Any]]:
        raise NotImplementedError

    def empty_error(self, root_uri: str | None, detail: str = "") -> DataError:
        """The error for a root holding nothing in this layout, quoting the layout it expected."""
        msg = f"no images in the {self.name!r} layout under {root_uri}"
        if detail:
            msg += f" ({detail})"
        return DataError(msg, f"expected layout: {self.description}")


ADAPTERS: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    if not adapter.name or adapter.name in ADAPTERS:
        raise ValueError(f"adapter name {adapter.name!r} is empty or already registered")
    ADAPTERS[adapter.name] = adapter
    return adapter


def get(name: str | Adapter) -> Adapter:
    if isinstance(name, Adapter):
        return name
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset layout {name!r}", f"choose one of {sorted(ADAPTERS)}") from None


# ------------------------------------------------------------------------------------- helpers for adapters


def parallel_map(fn: Callable[[Any], T], items: Sequence[Any], desc: str) -> list[T]:
    """Order-preserving threaded map with a progress bar for large inputs (I/O bound: S3 GETs, file reads)."""
    if len(items) < 32:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        it = pool.map(fn, items)
        return list(bar(it, total=len(items), desc=desc, unit="file"))


class Unreadable(NamedTuple):
    """An image file whose header could not be read: what a size probe returns instead of (width, height)."""

    uri: str
    reason: str


def probe_size(uri: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the first bytes of an image file; a full read only when the header lies further in."""
    head = read_head(uri, HEADER_BYTES)
    try:
        return image_size(head, name=uri, max_pixels=max_pixels)
    except DataError:
        if len(head) < HEADER_BYTES:  # that was the whole file: it really is unreadable (or too large)
            raise
    return image_size(storage.read_bytes(uri), name=uri, max_pixels=max_pixels)


def probe_sizes(uris: Sequence[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[tuple[int, int] | Unreadable]:
    """The size of every image, or an :class:`Unreadable` for a file that is not a readable image (text named
    .png, empty, too large): one bad file must not fail a scan of thousands. Storage errors (no access, missing
    bucket) still raise: they are not a property of one file."""

    def one(uri: str) -> tuple[int, int] | Unreadable:
        try:
            return probe_size(uri, max_pixels)
        except StorageError:
            raise
        except DataError as e:
            return Unreadable(uri, e.message)

    return parallel_map(one, uris, desc="reading image headers")


def unreadable_row(dataset: str, rel: str, bad: Unreadable) -> dict[str, Any]:
    """The placeholder an adapter emits for an unreadable image; ingest reports it and leaves it out."""
    return {"sample_id": sample_id(dataset, rel), "unreadable": bad.reason, "image_uri": bad.uri, "split": "",
            "label": None}


def read_head(uri: str, n: int) -> bytes:
    """The first ``n`` bytes of a file (one ranged GET on S3)."""
    fs, path = storage.fsspec_fs(uri)
    try:
        return fs.cat_file(path, start=0, end=n)
    except Exception:
        # let storage produce the user-facing error (missing file, permissions, credentials, endpoint)
        return storage.read_bytes(uri)[:n]


def relative(root: str, uri: str) -> str:
    """``uri`` relative to ``root`` with '/' separators (the same for local paths and S3 keys)."""
    root = storage.normalize(root).rstrip("/")
    rel = uri[len(root):].lstrip("/") if uri.startswith(root) else storage.basename(uri)
    return rel.replace(os.sep, "/")


def stem_of(rel: str) -> str:
    """A relative path without its last suffix (sample ids and mask matching use it)."""
    head, _, tail = rel.rpartition("/")
    base = tail.rsplit(".", 1)[0] if "." in tail else tail
    return f"{head}/{base}" if head else base


def is_image(uri: str) -> bool:
    base = storage.basename(uri)
    return not base.startswith(".") and base.lower().endswith(IMAGE_SUFFIXES)


def sample_id(dataset: str, rel: str) -> str:
    return f"{dataset}/{stem_of(rel)}"


def list_files(root: str) -> list[str]:
    """Every file below ``root`` (sorted URIs), skipping hidden files and folders (.DS_Store, .ipynb_checkpoints)."""
    out = []
    for f in storage.walk_files(root):
        rel = relative(root, f)
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        out.append(f)
    return out


def count_by(values: Iterable[Any]) -> dict[Any, int]:
    out: dict[Any, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


# ------------------------------------------------------------------ helpers shared by the authors'-split layouts

DEFECT = "defect"  # the class of layouts whose masks carry no class



def read_masks(uris: Sequence[str], max_pixels: int = DEFAULT_MAX_PIXELS
               ) -> list[tuple[bool, tuple[int, int]] | Unreadable]:
    """(has a defect pixel, (width, height)) of each mask file, decoded in threads; Unreadable for a bad file."""

    def one(uri: str) -> tuple[bool, tuple[int, int]] | Unreadable:
        try:
            m = decode_mask(storage.read_bytes(uri), name=uri, max_pixels=max_pixels)
        except StorageError:
            raise
        except DataError as e:
            return Unreadable(uri, e.message)
        return bool(m.any()), (int(m.shape[1]), int(m.shape[0]))

    return parallel_map(one, list(uris), desc="reading masks")


def mask_row(dataset_name: str, rel: str, uri: str, size: tuple[int, int], split: str, mask_uri: str | None,
             decoded: tuple[bool, tuple[int, int]] | Unreadable | None, prov: dict[str, Any]) -> dict[str, Any]:
    """A manifest row whose label comes from its decoded mask (KolektorSDD layouts); no mask -> label null; an
    unreadable mask or one of another size than its image -> an unreadable row (reported and left out)."""
    w, h = size
    if isinstance(decoded, Unreadable):
        return unreadable_row(dataset_name, rel, Unreadable(uri, f"its mask {decoded.uri}: {decoded.reason}"))
    if mask_uri is None or decoded is None:
        return manifest.row(sample_id(dataset_name, rel), dataset_name, width=w, height=h, split=split,
                            image_uri=uri, label=None, provenance=prov)
    defective, shape = decoded
    if tuple(shape) != (w, h):
        return unreadable_row(dataset_name, rel, Unreadable(uri, f"its mask {mask_uri} is {shape[0]}x{shape[1]} "
                                                                 f"but the image is {w}x{h}"))
    return manifest.row(sample_id(dataset_name, rel), dataset_name, width=w, height=h, split=split, image_uri=uri,
                        label=int(defective), mask_uri=mask_uri, defect_class=DEFECT if defective else None,
                        provenance=prov)


def carve_val(rows: list[dict[str, Any]], fraction: float, seed: int = 0,
              group: Callable[[dict[str, Any]], str | None] | None = None) -> list[dict[str, Any]]:
    """Turn ``fraction`` of the rows in the authors' train split into val, in place.

    ``ingest`` keeps every non-empty split and deals only empty ones over train/val/test with the full fractions,
    so an adapter that keeps the authors' test split must carve val itself, or leave train rows empty and lose a
    test share of them. The carving is :func:`manifest.assign_splits` over those rows alone: deterministic from the
    sample ids, stratified by label and spread over defect classes (or over ``group(row)``, e.g. a category).
    Rows of unknown label stay in train: there is nothing to validate against.
    """
    group = group or (lambda r: r["defect_class"])
    idx = [i for i, r in enumerate(rows) if r["split"] == "train" and r["label"] is not None
           and not r.get("unreadable")]
    if not idx or fraction <= 0:
        return rows
    sub = pa.table({
        "sample_id": pa.array([rows[i]["sample_id"] for i in idx], pa.string()),
        "label": pa.array([rows[i]["label"] for i in idx], pa.int8()),
        "defect_class": pa.array([group(rows[i]) for i in idx], pa.string()),
        "split": pa.array(["" for _ in idx], pa.string()),
    })
    carved = manifest.assign_splits(sub, {"train": 1.0 - fraction, "val": fraction}, seed=seed)
    for i, s in zip(idx, carved["split"].to_pylist(), strict=True):
        rows[i]["split"] = s
    return rows
