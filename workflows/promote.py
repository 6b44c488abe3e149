"""promote: point a catalog alias (e.g. ``production``) at a registered model version.

    defectflow promote --root ./defectflow-data --name gmbinet-sd900 --version latest --alias production
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from components import catalog, storage
from workflows.command import Command, main


@dataclass
class PromoteResult:
    name: str
    alias: str
    version: str
    uri: str


def run(root: str, name: str, version: str, alias: str = "production") -> PromoteResult:
    layout = catalog.Layout(root)
    versions = layout.versions(name)
    if version == "latest" and versions:
        version = versions[-1]
    layout.set_alias(name, alias, version)
    return PromoteResult(name=name, alias=alias, version=version, uri=layout.model(name, version))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default="./defectflow-data", help="storage root holding models/")
    p.add_argument("--name", required=True, help="model name in the catalog")
    p.add_argument("--version", required=True, help="version number (or 'latest')")
    p.add_argument("--alias", default="production")
    p.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")


def run_cli(args: argparse.Namespace) -> PromoteResult:
    storage.configure(endpoint_url=args.s3_endpoint_url)
    return run(args.root, args.name, args.version, args.alias)


COMMAND = Command("promote", "point a catalog alias (e.g. production) at a model version", add_arguments, run_cli,
                  lambda r: f"{r.name}@{r.alias} -> version {r.version} ({r.uri})")

if __name__ == "__main__":
    raise SystemExit(main(COMMAND))
