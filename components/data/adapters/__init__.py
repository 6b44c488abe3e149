"""Dataset adapters: one module per folder layout, each turning a root (local folder or ``s3://`` prefix) into
manifest rows.

Adapters only list files and read image headers: ingest must stay cheap on 100k-image prefixes, and every later
step decodes images through the manifest anyway. An adapter says what it found; :func:`ingest` does the shared
work (embedding bytes, deterministic splits, validation) so every layout gets the same guarantees.

Rows without an authors' split carry ``split == ""`` out of ``scan``; :func:`ingest` fills those from the sample
ids (:func:`components.data.manifest.assign_splits` with ``keep_existing=True``), so an authors' split is kept
wherever a layout has one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, TypeVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, ValidationError
from tqdm.auto import tqdm

from components import storage
from components.data import manifest
from components.data.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, image_size
from components.errors import ConfigError, DataError

log = logging.getLogger(__name__)

HEADER_BYTES = 64 * 1024
PROGRESS_MIN = 200  # show a progress bar only for folders at least this large
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


# ----------------------------------------------------------------------------------------------- ingest


def ingest(adapter: str | Adapter, root: str | None, *, dataset_name: str | None = None,
           options: AdapterOptions | Mapping[str, Any] | None = None, embed: bool = False,
           split_fractions: Mapping[str, float] | None = None, seed: int = 0,
           max_pixels: int = DEFAULT_MAX_PIXELS) -> pa.Table:
    """Scan ``root`` in the given layout and return a validated manifest table.

    ``embed`` copies image and mask bytes into the rows (URIs become null, the original URIs go to provenance):
    a manifest written to S3 must not point at files on the machine that ran ingest.
    """
    ad = get(adapter)
    opts = ad.options(options)
    if ad.needs_root:
        if not root:
            raise ConfigError(f"the {ad.name!r} layout needs a root folder or s3:// prefix", "pass --root")
        root = storage.normalize(root)
        if not storage.exists(root):
            raise DataError(f"dataset root {root} does not exist", "check --root (and the S3 endpoint)")
    elif root:
        log.warning("the %s layout reads no root; ignoring %s", ad.name, root)
        root = None
    name = dataset_name or (_default_name(root) if root else ad.name)
    if "/" in name or not name.strip():
        raise ConfigError(f"dataset name {name!r} must be non-empty and contain no '/'", "e.g. --name my_parts")

    log.info("scanning %s with the %s layout", root or "<generated>", ad.name)
    rows = ad.scan(root, name, opts, max_pixels=max_pixels)
    if not rows:
        raise ad.empty_error(root)
    _check_unique(rows)
    if embed:
        rows = embed_rows(rows, max_pixels=max_pixels)
    table = pa.Table.from_pylist([{c: r.get(c) for c in manifest.COLUMNS} for r in rows], schema=manifest.SCHEMA)
    table = manifest.assign_splits(table, split_fractions, seed=seed, keep_existing=True)
    table = manifest.validate(table)
    log.info("%s: %d rows: %s", name, table.num_rows, manifest.summary(table))
    return table


def _check_unique(rows: list[dict[str, Any]]) -> None:
    """Two files differing only in suffix (a.png, a.jpg) would share an id; say which, before validate does."""
    seen: dict[str, dict[str, Any]] = {}
    for r in rows:
        first = seen.setdefault(r["sample_id"], r)
        if first is not r:
            a = first.get("image_uri") or first["sample_id"]
            b = r.get("image_uri") or r["sample_id"]
            raise DataError(f"{a} and {b} map to the same sample id {r['sample_id']!r}",
                            "sample ids are paths without suffix: rename or remove one of the files")


def _default_name(root: str) -> str:
    return storage.basename(root).replace(" ", "_") or "dataset"


def embed_rows(rows: list[dict[str, Any]], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict[str, Any]]:
    """Replace image/mask URIs by their bytes (kept in provenance as ``image_uri``/``mask_uri``)."""

    def one(r: dict[str, Any]) -> dict[str, Any]:
        r = dict(r)
        prov = json.loads(r["provenance"]) if r.get("provenance") else {}
        if r.get("image_bytes") is None and r.get("image_uri"):
            r["image_bytes"] = storage.read_bytes(r["image_uri"])
            prov["image_uri"] = r["image_uri"]
            r["image_uri"] = None
        if r.get("mask_bytes") is None and r.get("mask_uri"):
            r["mask_bytes"] = storage.read_bytes(r["mask_uri"])
            prov["mask_uri"] = r["mask_uri"]
            r["mask_uri"] = None
        r["provenance"] = json.dumps(prov, sort_keys=True) if prov else None
        return r

    return parallel_map(one, rows, desc="embedding images")


# ------------------------------------------------------------------------------------- helpers for adapters


def parallel_map(fn: Callable[[Any], T], items: Sequence[Any], desc: str) -> list[T]:
    """Order-preserving threaded map with a progress bar for large inputs (I/O bound: S3 GETs, file reads)."""
    if len(items) < 32:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        it = pool.map(fn, items)
        return list(progress(it, total=len(items), desc=desc, unit="file"))


def progress(it: Iterable[T], total: int, desc: str, unit: str) -> Iterable[T]:
    """A tqdm bar for long loops only; small ones stay quiet. TQDM_DISABLE=1 still silences every bar (an explicit
    ``disable=False`` would override it, so it is only ever passed as True)."""
    kw: dict[str, Any] = {"disable": True} if total < PROGRESS_MIN else {}
    return tqdm(it, total=total, desc=desc, unit=unit, leave=False, **kw)


def probe_size(uri: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the first bytes of an image file; a full read only when the header lies further in."""
    head = read_head(uri, HEADER_BYTES)
    try:
        return image_size(head, name=uri, max_pixels=max_pixels)
    except DataError:
        if len(head) < HEADER_BYTES:  # that was the whole file: it really is unreadable (or too large)
            raise
    return image_size(storage.read_bytes(uri), name=uri, max_pixels=max_pixels)


def probe_sizes(uris: Sequence[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[tuple[int, int]]:
    return parallel_map(lambda u: probe_size(u, max_pixels), uris, desc="reading image headers")


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


# registration: each layout module registers its adapter on import (they import the helpers above)
from components.data.adapters import (  # noqa: E402
    bsdata,
    crackforest,
    folder,
    kolektorsdd,
    kolektorsdd2,
    magnetic_tile,
    mvtec_ad,
    neu_det,
    procedural,
    sd_saliency_900,
)

__all__ = ["ADAPTERS", "Adapter", "AdapterOptions", "bsdata", "crackforest", "folder", "get", "ingest",
           "kolektorsdd", "kolektorsdd2", "magnetic_tile", "mvtec_ad", "neu_det", "procedural", "register",
           "sd_saliency_900"]
