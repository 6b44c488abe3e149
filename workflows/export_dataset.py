"""export-dataset: YOLO / COCO / mask-PNG folders from any manifests (real, synthetic or both).

    defectflow export-dataset --manifest ./defectflow-data/datasets/procedural/manifest.parquet \
        --manifest ./defectflow-data/synthetic/procedural-ddpm --format yolo --out ./yolo-dataset

So the detectors SynSur evaluated (YOLO, YOLOX, LW-DETR) can be trained elsewhere. ``defectflow export`` exports a
*model* (ONNX).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from components import storage
from components.data import manifest
from components.synthesis import export
from workflows.command import Command, main


def run(manifests: list[str], fmt: str, out: str, *, min_area: int = 1, include_unlabeled: bool = False
        ) -> dict[str, Any]:
    import pyarrow as pa

    table = pa.concat_tables([manifest.read(m) for m in manifests])
    if fmt == "masks":
        return export.export_masks(table, out, include_unlabeled=include_unlabeled)
    fn = export.export_yolo if fmt == "yolo" else export.export_coco
    return fn(table, out, min_area=min_area, include_unlabeled=include_unlabeled)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", action="append", required=True, help="manifest URI (repeat to combine)")
    p.add_argument("--format", choices=["yolo", "coco", "masks"], required=True)
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--min-area", type=int, default=1, help="components below this many pixels get no box")
    p.add_argument("--include-unlabeled", action="store_true",
                   help="also export images with only an image-level label (without boxes)")
    p.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    storage.configure(endpoint_url=args.s3_endpoint_url)
    res = run(args.manifest, args.format, args.out, min_area=args.min_area,
              include_unlabeled=args.include_unlabeled)
    res["format"], res["out"] = args.format, args.out
    return res


def _report(res: dict[str, Any]) -> str:
    counts = {k: v for k, v in res.items() if k not in ("format", "out")}
    return f"{res['format']} export written to {res['out']}: {json.dumps(counts)[:400]}"


COMMAND = Command("export-dataset", "YOLO / COCO / mask-PNG folders from any manifest(s)", add_arguments, run_cli,
                  _report)

if __name__ == "__main__":
    raise SystemExit(main(COMMAND))
