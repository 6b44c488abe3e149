"""import-weights: convert a model family's published checkpoint into a defectflow artifact.

    defectflow import-weights gmbinet GMBINet-SDSaliency900.pt ./gmbinet-authors

The conversion is the family's own hook (``Family.import_weights``); checkpoints are read with
``torch.load(weights_only=True)`` or as safetensors, never unpickled.
"""

from __future__ import annotations

import argparse

from components import storage
from components.errors import ConfigError
from components.models import registry
from workflows.command import Command, main


def importable() -> list[str]:
    return sorted(name for name, fam in registry.families().items() if fam.import_weights is not None)


def run(family: str, checkpoint: str, out: str) -> dict[str, str]:
    fam = registry.get(family)
    if fam.import_weights is None:
        raise ConfigError(f"model family {family!r} has no importer of published weights",
                          f"families with one: {importable()}")
    return {"artifact": fam.import_weights(checkpoint, out)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("family", choices=importable(), help="model family of the checkpoint")
    p.add_argument("checkpoint", help="the authors' checkpoint file (.pt/.pth/.safetensors), local or s3://")
    p.add_argument("out", help="artifact folder URI to write")
    p.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")


def run_cli(args: argparse.Namespace) -> dict[str, str]:
    storage.configure(endpoint_url=args.s3_endpoint_url)
    return run(args.family, args.checkpoint, args.out)


COMMAND = Command("import-weights", "convert published weights into a defectflow artifact", add_arguments, run_cli,
                  lambda r: f"artifact written: {r['artifact']}")

if __name__ == "__main__":
    raise SystemExit(main(COMMAND))
