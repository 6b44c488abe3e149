"""ingest: a dataset folder (or S3 prefix) in any supported layout -> a manifest (Parquet).

    defectflow ingest --dataset magnetic_tile --root ../shared/datasets/magnetic_tile --out ./data/mt.parquet
    python -m workflows.ingest --config ingest.yaml

Ingest runs on the driver: it only lists files and reads image headers, which is I/O-light.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from components import config as cfgmod
from components import storage
from components.config import IngestConfig
from components.data import adapters, manifest
from components.errors import ConfigError
from workflows import console
from workflows.command import Command, main

log = logging.getLogger("defectflow.ingest")


@dataclass
class IngestResult:
    manifest_uri: str
    summary: dict[str, Any]
    digest: str
    rejected: list[dict[str, str]] = field(default_factory=list)
    rejected_uri: str | None = None


def run(cfg: IngestConfig) -> IngestResult:
    layout = cfg.storage.apply()
    if cfg.dataset not in adapters.ADAPTERS:
        raise ConfigError(f"unknown dataset layout {cfg.dataset!r}", f"choose one of {sorted(adapters.ADAPTERS)}")
    name = cfg.name or cfg.dataset
    out = cfg.out or layout.manifest(name)
    if out.endswith("/") or not out.endswith(".parquet"):
        out = storage.join(out, "manifest.parquet")
    embed = cfg.embed
    if embed == "auto":
        embed = storage.is_s3(out) and cfg.root is not None and not storage.is_s3(cfg.root)
    log.info("ingesting %s from %s (embed images: %s)", cfg.dataset, cfg.root or "<generated>", embed)
    scan = adapters.scan_dataset(cfg.dataset, cfg.root, dataset_name=name, options=cfg.options, embed=bool(embed),
                                 split_fractions=cfg.split.model_dump(), seed=cfg.seed,
                                 max_pixels=cfg.max_image_pixels, verify=cfg.verify)
    console.keep_log_in(storage.parent(out))
    manifest.write(scan.table, out)
    rejected_uri = storage.join(storage.parent(out), "rejected.json")
    if scan.rejected:
        storage.write_json(rejected_uri, scan.rejected)
    elif storage.exists(rejected_uri):  # a re-ingest after the files were fixed
        storage.delete(rejected_uri)
    summ = {**manifest.summary(scan.table), "rejected": len(scan.rejected)}
    log.info("manifest with %d rows written to %s", scan.table.num_rows, out)
    return IngestResult(manifest_uri=out, summary=summ, digest=manifest.digest(scan.table), rejected=scan.rejected,
                        rejected_uri=rejected_uri if scan.rejected else None)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--list", action="store_true", help="print every dataset layout with its options and exit")
    p.add_argument("--config", help="YAML ingest config (keys as in the README)")
    p.add_argument("--dataset", help=f"layout: {', '.join(sorted(adapters.ADAPTERS))}")
    p.add_argument("--root", help="dataset folder or s3:// prefix")
    p.add_argument("--out", help="manifest URI (default <storage.root>/datasets/<name>/manifest.parquet)")
    p.add_argument("--name", help="dataset name (default: the layout name)")
    p.add_argument("--embed", choices=["auto", "true", "false"], help="copy image bytes into the manifest")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="adapter option, e.g. --option count=200 (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")


def describe_layouts() -> str:
    """Every layout's documented folder structure and options (``defectflow ingest --list``)."""
    import textwrap

    out = []
    for name, ad in sorted(adapters.ADAPTERS.items()):
        opts = ", ".join(f"{k}={f.default!r}" for k, f in ad.Options.model_fields.items()) or "none"
        out.append(f"{name}\n" + textwrap.fill(ad.description, 100, initial_indent="  ", subsequent_indent="  ")
                   + f"\n  options: {opts}\n")
    return "\n".join(out)


def config_from_args(args: argparse.Namespace) -> IngestConfig:
    base: dict[str, Any] = {}
    for key in ("dataset", "root", "out", "name"):
        if getattr(args, key, None) is not None:
            base[key] = getattr(args, key)
    if getattr(args, "embed", None):
        base["embed"] = {"auto": "auto", "true": True, "false": False}[args.embed]
    if args.option:
        base["options"] = cfgmod.parse_overrides(args.option)
    data = cfgmod.read_yaml(args.config) if args.config else {}
    data = cfgmod.deep_merge(data, base)
    data = cfgmod.deep_merge(data, cfgmod.parse_overrides(args.set))
    return cfgmod.validate(IngestConfig, data, "ingest config")


def _run_cli(args: argparse.Namespace) -> IngestResult | str:
    return describe_layouts() if args.list else run(config_from_args(args))


def _report(res: IngestResult | str) -> str:
    if isinstance(res, str):
        return res
    text = f"manifest: {res.manifest_uri}\nrows: {json.dumps(res.summary)}"
    if res.rejected:
        text += (f"\n{len(res.rejected)} unreadable file(s) left out (reasons in {res.rejected_uri}), e.g. "
                 f"{res.rejected[0]['uri'] or res.rejected[0]['sample_id']}: {res.rejected[0]['reason']}")
    return text


COMMAND = Command("ingest", "dataset folder/S3 prefix -> manifest (Parquet)", add_arguments, _run_cli, _report)

if __name__ == "__main__":
    raise SystemExit(main(COMMAND))
