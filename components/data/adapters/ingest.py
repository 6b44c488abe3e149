"""The work every layout shares once an adapter has listed its files: verify, embed, split, validate.

Ingest admits only what later steps can decode: every image (and its mask, at the image's size) is decoded once
here, in threads. A file that cannot be read (a truncated JPEG, a text file named ``.png``, a mask of the wrong
size) is reported and left out, with the reason, instead of failing the whole dataset or, worse, entering the
manifest and failing a training run hours later.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from components import storage
from components.data import manifest
from components.data.adapters.base import Adapter, AdapterOptions, get, parallel_map
from components.data.images import DEFAULT_MAX_PIXELS, decode_image
from components.errors import ConfigError, DataError, StorageError

log = logging.getLogger(__name__)


@dataclass
class Scan:
    """A validated manifest table and the files that were left out, each with its reason."""

    table: pa.Table
    rejected: list[dict[str, str]] = field(default_factory=list)


def scan_dataset(adapter: str | Adapter, root: str | None, *, dataset_name: str | None = None,
                 options: AdapterOptions | Mapping[str, Any] | None = None, embed: bool = False,
                 split_fractions: Mapping[str, float] | None = None, seed: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS, verify: bool = True) -> Scan:
    """Scan ``root`` in the given layout: a validated manifest table plus the rejected files.

    ``embed`` copies image and mask bytes into the rows (URIs become null, the original URIs go to provenance):
    a manifest written to S3 must not point at files on the machine that ran ingest. ``verify`` decodes every
    image and mask (reading each file once, also when embedding).
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
    found = ad.scan(root, name, opts, max_pixels=max_pixels)
    rejected = [{"sample_id": r["sample_id"], "uri": r.get("image_uri") or "", "reason": r["unreadable"]}
                for r in found if r.get("unreadable")]
    rows = [r for r in found if not r.get("unreadable")]
    _check_unique(rows)
    if verify or embed:
        admitted = parallel_map(lambda r: _admit(r, embed, verify, max_pixels), rows,
                                desc="verifying images" if verify else "embedding images")
        rejected += [a for a in admitted if "reason" in a]
        rows = [a for a in admitted if "reason" not in a]
    for bad in rejected:
        log.warning("left out %s: %s", bad["uri"] or bad["sample_id"], bad["reason"])
    if not rows:
        raise ad.empty_error(root, f"{len(rejected)} unreadable file(s), e.g. {rejected[0]['reason']}"
                             if rejected else "")
    table = pa.Table.from_pylist([{c: r.get(c) for c in manifest.COLUMNS} for r in rows], schema=manifest.SCHEMA)
    table = manifest.assign_splits(table, split_fractions, seed=seed, keep_existing=True)
    table = manifest.validate(table)
    log.info("%s: %d rows%s: %s", name, table.num_rows,
             f" ({len(rejected)} unreadable file(s) left out)" if rejected else "", manifest.summary(table))
    return Scan(table=table, rejected=sorted(rejected, key=lambda b: b["sample_id"]))


def ingest(adapter: str | Adapter, root: str | None, **kwargs: Any) -> pa.Table:
    """:func:`scan_dataset`'s table (rejected files are logged)."""
    return scan_dataset(adapter, root, **kwargs).table


def _admit(row: dict[str, Any], embed: bool, verify: bool, max_pixels: int) -> dict[str, Any]:
    """The row (with bytes embedded when asked), or ``{sample_id, uri, reason}`` when its files are unusable."""
    uri = row.get("image_uri") or row.get("mask_uri") or ""
    try:
        image = row.get("image_bytes")
        if image is None and row.get("image_uri"):
            image = storage.read_bytes(row["image_uri"])
        mask = row.get("mask_bytes")
        if mask is None and row.get("mask_uri"):
            mask = storage.read_bytes(row["mask_uri"])
        if verify:
            img = decode_image(image, name=row.get("image_uri") or row["sample_id"], max_pixels=max_pixels)
            if mask is not None:
                manifest.load_mask({**row, "mask_bytes": mask}, shape=img.shape[:2], max_pixels=max_pixels)
    except StorageError:
        raise
    except DataError as e:
        return {"sample_id": row["sample_id"], "uri": uri, "reason": e.message}
    if not embed:
        return row
    out = dict(row)
    prov = json.loads(out["provenance"]) if out.get("provenance") else {}
    if out.get("image_uri"):
        prov["image_uri"], out["image_bytes"], out["image_uri"] = out["image_uri"], image, None
    if out.get("mask_uri"):
        prov["mask_uri"], out["mask_bytes"], out["mask_uri"] = out["mask_uri"], mask, None
    out["provenance"] = json.dumps(prov, sort_keys=True) if prov else None
    return out


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
