"""export: a trained detector as an ONNX graph (pre- and post-processing inside), checked against PyTorch.

    defectflow export --model ./defectflow-data/models/gmbinet-sd900@production --out ./gmbinet-sd900.onnx
    defectflow export --model ./runs/t/artifact --size 1024 1024 --dynamic-batch --out s3://bucket/onnx/

Writes ``<out>.onnx`` and a sidecar ``<out>.onnx.json`` (exporter, opset, input/output names and shapes, the
ONNX-vs-eager parity figures, and the artifact's ``threshold``/``pixel_threshold`` so a consumer applies the same
decision as ``defectflow predict``). ``--out`` defaults to ``./<model name>.onnx`` in the working directory: an
artifact (above all a registered one) never changes after it is written, so nothing is added to its folder.

The exporter is torch's ``torch.onnx.export(dynamo=True)``; the deprecated TorchScript exporter is a recorded
fallback for graphs torch.export cannot capture (see :mod:`components.export`). A failed parity check is an error
(nothing written) unless ``--allow-mismatch``.

Dataset export (YOLO / COCO / mask PNGs) is ``defectflow export-dataset``; the old ``defectflow export --manifest
... --format yolo`` still runs it, with a deprecation warning.
"""

from __future__ import annotations

import argparse
from typing import Any

from components import artifact, storage
from components import export as model_export
from components.errors import ConfigError
from workflows import console, export_dataset
from workflows.command import Command, main

MODEL_FORMATS = ("onnx",)
DATASET_FORMATS = ("yolo", "coco", "masks")  # the pre-0.x `defectflow export`, now export-dataset
GENERIC_NAMES = {"artifact", "model", "best", "final", "staging", "detector"}


def default_name(meta: dict[str, Any]) -> str:
    """``<registry name>-v<version>`` for a registered model, else ``<family>-<artifact folder name>``."""
    reg = meta.get("registry") or {}
    if reg.get("name"):
        return f"{reg['name']}-v{reg['version']}" if reg.get("version") else str(reg["name"])
    base = storage.basename(meta["uri"])
    family = str(meta.get("family", "model"))
    return base if base.startswith(family) and base not in GENERIC_NAMES else f"{family}-{base}"


def output_uri(out: str | None, meta: dict[str, Any]) -> str:
    """The .onnx URI: ``out`` itself when it ends in .onnx, else ``<out or .>/<default name>.onnx``."""
    if out and str(out).lower().endswith(".onnx"):
        target = storage.normalize(out)
    else:
        target = storage.join(storage.normalize(out or "."), default_name(meta) + ".onnx")
    src = storage.normalize(meta["uri"])
    if target == src or target.startswith(src.rstrip("/") + "/"):
        raise ConfigError(f"refusing to write {target} inside the artifact {src}",
                          "an artifact never changes after it is written (registered versions are immutable); "
                          "pass --out outside it, e.g. --out ./model.onnx")
    return target


def run(model: str, out: str | None = None, *, fmt: str = "onnx", size: list[int] | None = None,
        dynamic_batch: bool = False, dynamic_size: bool = False, opset: int = model_export.DEFAULT_OPSET,
        atol: float = model_export.DEFAULT_ATOL, exporter: str = "auto", allow_mismatch: bool = False
        ) -> dict[str, Any]:
    if fmt not in MODEL_FORMATS:
        raise ConfigError(f"unknown model export format {fmt!r}", f"choose one of {list(MODEL_FORMATS)}")
    detector, meta = artifact.load(model)
    target = output_uri(out, meta)
    if size is not None and len(size) == 1:
        size = [size[0], size[0]]
    threshold = meta.get("threshold")
    pixel_threshold = meta.get("pixel_threshold", threshold)
    result = model_export.export_onnx(
        detector, target, size, opset=opset, dynamic_batch=dynamic_batch, dynamic_size=dynamic_size,
        exporter=exporter, atol=atol, allow_mismatch=allow_mismatch,
        metadata={"defectflow.artifact": meta["uri"], "defectflow.threshold": str(threshold),
                  "defectflow.pixel_threshold": str(pixel_threshold)})
    side_uri = model_export.sidecar_uri(target)
    storage.write_json(side_uri, model_export.sidecar(result, meta))
    p = result.parity
    return {"onnx": target, "sidecar": side_uri, "artifact": meta["uri"], "family": result.family,
            "exporter": result.exporter, "fallback_reason": result.fallback_reason, "opset": result.opset,
            "inputs": result.inputs, "outputs": result.outputs, "dynamic_batch": result.dynamic_batch,
            "dynamic_size": result.dynamic_size,
            "parity": {k: p[k] for k in ("ok", "atol", "score_max_abs_diff", "anomaly_map_max_abs_diff")},
            "threshold": threshold, "pixel_threshold": pixel_threshold, "notes": result.notes,
            "seconds": result.seconds}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="artifact folder/URI, or <root>/models/<name>[@alias|@version]")
    p.add_argument("--format", default="onnx", metavar="onnx", help="export format (onnx)")
    p.add_argument("--out", default=None,
                   help="the .onnx file, or a folder/s3:// prefix for <model name>.onnx (default: "
                        "./<model name>.onnx; never inside the artifact)")
    p.add_argument("--size", "--input-size", dest="size", type=int, nargs="+", metavar="H W", default=None,
                   help="image size the graph takes (default: the model's input size; a larger one puts the "
                        "resize into the graph)")
    p.add_argument("--dynamic-batch", action="store_true", help="symbolic batch axis")
    p.add_argument("--dynamic-size", action="store_true",
                   help="symbolic height/width when the graph allows it (the sidecar says if it did not)")
    p.add_argument("--opset", type=int, default=model_export.DEFAULT_OPSET, help="ONNX opset (default %(default)s)")
    p.add_argument("--atol", type=float, default=model_export.DEFAULT_ATOL,
                   help="max |ONNX - eager| of score and anomaly_map accepted (default %(default)s)")
    p.add_argument("--exporter", choices=model_export.EXPORTERS, default="auto",
                   help="auto: torch.export-based, TorchScript only as a fallback (default)")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="write the file even when the parity check fails (recorded in the sidecar)")
    p.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    # the old dataset export: still accepted, forwarded to export-dataset with a deprecation warning
    p.add_argument("--manifest", action="append", default=None, help=argparse.SUPPRESS)
    p.add_argument("--min-area", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--include-unlabeled", action="store_true", help=argparse.SUPPRESS)


def _legacy_dataset_export(args: argparse.Namespace) -> dict[str, Any]:
    if args.model:
        raise ConfigError("--model (model export) and --manifest (dataset export) cannot be combined",
                          "models: defectflow export --model ...; datasets: defectflow export-dataset --manifest ...")
    if not args.manifest or args.format not in DATASET_FORMATS or not args.out:
        raise ConfigError("dataset export moved to `defectflow export-dataset`",
                          "defectflow export-dataset --manifest <uri> --format yolo|coco|masks --out <folder>")
    console.err("warning: `defectflow export --manifest ... --format ...` is deprecated and will be removed: dataset "
                "export is now `defectflow export-dataset` (same options), `defectflow export` exports a model "
                "(--model ... --out model.onnx). Running export-dataset.")
    res = export_dataset.run_cli(args)
    res["deprecated"] = "defectflow export --manifest: use defectflow export-dataset"
    return res


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    storage.configure(endpoint_url=args.s3_endpoint_url)
    if args.manifest or args.format in DATASET_FORMATS:
        return _legacy_dataset_export(args)
    if not args.model:
        raise ConfigError("defectflow export needs --model", "e.g. defectflow export --model "
                          "./defectflow-data/models/<name>@production --out ./model.onnx (datasets: export-dataset)")
    if args.size is not None and len(args.size) not in (1, 2):
        raise ConfigError(f"--size takes H W (or one side), got {args.size}", "e.g. --size 256 256")
    return run(args.model, args.out, fmt=args.format, size=args.size, dynamic_batch=args.dynamic_batch,
               dynamic_size=args.dynamic_size, opset=args.opset, atol=args.atol, exporter=args.exporter,
               allow_mismatch=args.allow_mismatch)


def _num(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else str(x)


def _fmt_shape(rows: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['name']} {r['shape']}" for r in rows)


def report(res: dict[str, Any]) -> str:
    if "onnx" not in res:  # the forwarded dataset export
        return export_dataset.COMMAND.report(res) or ""
    p = res["parity"]
    exporter = {"dynamo": "torch.export-based (dynamo) exporter", "torchscript": "TorchScript exporter"}
    lines = [f"exported {res['family']} ({res['artifact']}) to {res['onnx']} with the "
             f"{exporter.get(res['exporter'], res['exporter'])}, opset {res['opset']}",
             f"  {_fmt_shape(res['inputs'])} -> {_fmt_shape(res['outputs'])}",
             f"  parity vs eager PyTorch: max |d score| {p['score_max_abs_diff']:.3g}, max |d anomaly_map| "
             f"{p['anomaly_map_max_abs_diff']:.3g} (tolerance {p['atol']:g}): {'ok' if p['ok'] else 'FAILED'}",
             f"  decision: defect if score >= {_num(res['threshold'])}; defect pixels: anomaly_map >= "
             f"{_num(res['pixel_threshold'])}",
             f"  sidecar: {res['sidecar']}"]
    if res.get("fallback_reason"):
        lines.append(f"  fallback: {res['fallback_reason']}")
    lines += [f"  note: {n}" for n in res.get("notes", [])]
    return "\n".join(lines)


COMMAND = Command("export", "export a trained model to ONNX (parity-checked against PyTorch)", add_arguments,
                  run_cli, report)

if __name__ == "__main__":
    raise SystemExit(main(COMMAND))
