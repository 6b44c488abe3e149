"""The ``defectflow`` command.

    defectflow ingest | synthesize | train-synth | export | features | train | evaluate | predict | sweep
               | serve | promote | import-weights | bench | demo

User errors (bad config, unreadable data, missing weights, unsatisfiable resources) print one clear message and
exit with status 2; ``-v`` shows debug logs, ``DEFECTFLOW_TRACEBACK=1`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from components.errors import DefectflowError


def build_parser() -> argparse.ArgumentParser:
    from workflows import evaluate, features, ingest, predict, serve, sweep, synthesize, train, train_synth

    p = argparse.ArgumentParser(prog="defectflow", description="Turn product-surface images into deployed defect "
                                "detectors on Ray.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--json", action="store_true", help="print the command's result as JSON on stdout")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")

    ingest.add_arguments(sub.add_parser("ingest", help="dataset folder/S3 prefix -> manifest (Parquet)"))
    features.add_arguments(sub.add_parser("features", help="cache a model's frozen backbone features (Ray Data)"))
    synthesize.add_arguments(sub.add_parser("synthesize", help="synthetic labelled defects on normal images "
                                                               "(Ray Data; procedural, cutpaste, diffusion, ddpm)"))
    train_synth.add_arguments(sub.add_parser("train-synth", help="train the own DDPM inpainter or LoRA adapters "
                                                                 "on defect crops (Ray Train)"))
    ex = sub.add_parser("export", help="YOLO / COCO / mask-PNG folders from any manifest(s)")
    ex.add_argument("--manifest", action="append", required=True, help="manifest URI (repeat to combine)")
    ex.add_argument("--format", choices=["yolo", "coco", "masks"], required=True)
    ex.add_argument("--out", required=True, help="output folder or s3:// prefix")
    ex.add_argument("--min-area", type=int, default=1, help="components below this many pixels get no box")
    ex.add_argument("--include-unlabeled", action="store_true",
                    help="also export images with only an image-level label (without boxes)")
    ex.add_argument("--s3-endpoint-url", default=None)
    train.add_arguments(sub.add_parser("train", help="train a detector on Ray Train, evaluate, register"))
    evaluate.add_arguments(sub.add_parser("evaluate", help="metrics of a model on a manifest split (Ray Data)"))
    predict.add_arguments(sub.add_parser("predict", help="defect maps + scores.csv for a folder of images"))
    sweep.add_arguments(sub.add_parser("sweep", help="hyper-parameter sweep with Ray Tune + ASHA"))
    serve.add_arguments(sub.add_parser("serve", help="HTTP endpoint for a model with Ray Serve"))

    pr = sub.add_parser("promote", help="point a registry alias (e.g. production) at a model version")
    pr.add_argument("--root", default="./defectflow-data", help="storage root holding models/")
    pr.add_argument("--name", required=True, help="model name in the registry")
    pr.add_argument("--version", required=True, help="version number (or 'latest')")
    pr.add_argument("--alias", default="production")
    pr.add_argument("--s3-endpoint-url", default=None)

    iw = sub.add_parser("import-weights", help="convert published weights into a defectflow artifact")
    iw.add_argument("family", choices=["gmbinet"], help="model family of the checkpoint")
    iw.add_argument("checkpoint", help="the authors' checkpoint file (.pt/.pth), local or s3://")
    iw.add_argument("out", help="artifact folder URI to write")
    iw.add_argument("--s3-endpoint-url", default=None)

    b = sub.add_parser("bench", help="measure a model's size and speed; writes JSON + Markdown")
    b.add_argument("target", choices=["gmbinet", "supersimplenet", "synth"], help="what to benchmark")
    b.add_argument("--out", default="./defectflow-data/reports/bench", help="output folder or URI")
    b.add_argument("--size", type=int, default=None,
                   help="input side length (default: the paper's, 512 for GMBINet, 256 for SuperSimpleNet "
                        "and synth)")
    b.add_argument("--iters", type=int, default=30, help="timed iterations per measurement")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    b.add_argument("--n", type=int, action="append", help="GMBINet scale dimension(s) to measure (default 4)")
    b.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime measurement")
    b.add_argument("--generator", action="append", choices=["procedural", "cutpaste", "ddpm", "diffusion"],
                   help="synth: generator(s) to measure (default: all four)")
    b.add_argument("--count", type=int, default=16, help="synth: images per generator")
    b.add_argument("--steps", type=int, default=25, help="synth: denoising steps of ddpm/diffusion")
    b.add_argument("--ddpm-model", default=None, help="synth: a trained ddpm model URI (default: untrained weights)")
    b.add_argument("--diffusion-model", default=None,
                   help="synth: a diffusers inpainting pipeline folder/URI (default: a tiny random one)")

    d = sub.add_parser("demo", help="the whole flow on procedural data on a local Ray instance")
    d.add_argument("--out", default="./defectflow-demo", help="demo output folder (re-created each run)")
    d.add_argument("--images", type=int, default=160, help="procedural images to generate")
    d.add_argument("--size", type=int, default=128, help="image side length")
    d.add_argument("--epochs", type=int, default=40, help="training epochs")
    d.add_argument("--sweep-epochs", type=int, default=6, help="epochs per sweep trial")
    d.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    d.add_argument("--port", type=int, default=8000, help="HTTP port of the demo endpoint")
    return p


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items() if not isinstance(v, bytes)}
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if not isinstance(v, bytes)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def dispatch(args: argparse.Namespace) -> tuple[Any, int]:
    """Run one command; return (result, exit code)."""
    cmd = args.command
    if cmd == "ingest":
        from workflows import ingest

        if args.list:
            print(ingest.describe_layouts())
            return None, 0
        res = ingest.run(ingest.config_from_args(args))
        print(f"manifest: {res.manifest_uri}\nrows: {json.dumps(res.summary)}")
        return res, 0
    if cmd == "features":
        from workflows import features

        res = features.run(features.config_from_args(args))
        print(f"features: {res.uri}\n{res.shards} shard(s), {res.written} computed now, {res.skipped} reused; "
              f"{res.rows} image(s) of shape {res.feature_shape} in {res.seconds:.0f} s")
        return res, 0
    if cmd == "synthesize":
        from workflows import synthesize

        res = synthesize.run(synthesize.config_from_args(args))
        print(f"synthetic set: {res.uri}\n{res.accepted} accepted of {res.requested} requested; rejections: "
              f"{res.rejections or 'none'}\ncontact sheet: {res.contact_sheet}")
        return res, 0
    if cmd == "train-synth":
        from workflows import train_synth

        res = train_synth.run(train_synth.config_from_args(args))
        print(f"{res.kind} synthesizer trained on {res.crops} crops for {res.epochs} epoch(s) "
              f"(final loss {res.final_loss}) -> {res.out}")
        return res, 0
    if cmd == "export":
        import pyarrow as pa

        from components import storage
        from components.data import manifest
        from components.synthesis import export

        storage.configure(endpoint_url=args.s3_endpoint_url)
        table = pa.concat_tables([manifest.read(m) for m in args.manifest])
        if args.format == "masks":
            res = export.export_masks(table, args.out, include_unlabeled=args.include_unlabeled)
        else:
            fn = export.export_yolo if args.format == "yolo" else export.export_coco
            res = fn(table, args.out, min_area=args.min_area, include_unlabeled=args.include_unlabeled)
        print(f"{args.format} export written to {args.out}: {json.dumps(res)[:400]}")
        return res, 0
    if cmd == "train":
        from workflows import train

        res = train.run(train.config_from_args(args))
        print(_train_summary(res))
        return res, 0
    if cmd == "evaluate":
        from workflows import evaluate

        res = evaluate.run_cli(args)
        for k, v in res.metrics.items():
            print(f"{k:>22}: {v}")
        print(f"report: {res.report_uri}")
        return res, 0
    if cmd == "predict":
        from workflows import predict

        res = predict.run_cli(args)
        print(f"{res.count} image(s), {res.defective} defective, {res.failed} failed -> {res.out_uri} "
              f"(scores: {res.scores_uri})")
        return res, (1 if res.failed else 0)
    if cmd == "sweep":
        from workflows import sweep

        res = sweep.run(sweep.config_from_args(args))
        print(f"sweep {res.name}: {len(res.trials)} trial(s); best {res.best['trial_id'] if res.best else None} "
              f"{res.best['params'] if res.best else ''}\nregistered: {res.registered_uri}\nreport: "
              f"{res.report_uri}/trials.md")
        return res, 0
    if cmd == "serve":
        from workflows import serve

        return serve.run_cli(args), 0
    if cmd == "promote":
        from components import storage

        storage.configure(endpoint_url=args.s3_endpoint_url)
        layout = storage.Layout(args.root)
        versions = layout.versions(args.name)
        version = versions[-1] if args.version == "latest" and versions else args.version
        layout.set_alias(args.name, args.alias, version)
        print(f"{args.name}@{args.alias} -> version {version} ({layout.model(args.name, version)})")
        return {"name": args.name, "alias": args.alias, "version": version}, 0
    if cmd == "import-weights":
        from components import storage
        from components.models.gmbinet.convert import import_authors_checkpoint

        storage.configure(endpoint_url=args.s3_endpoint_url)
        uri = import_authors_checkpoint(args.checkpoint, args.out)
        print(f"artifact written: {uri}")
        return {"artifact": uri}, 0
    if cmd == "bench":
        from workflows import bench

        res = bench.run_cli(args)
        return res, 0
    if cmd == "demo":
        from workflows import demo

        return demo.run_cli(args), 0
    raise DefectflowError(f"unknown command {cmd}")  # pragma: no cover - argparse rejects it first


def _train_summary(res: Any) -> str:
    lines = [f"run: {res.run_name} ({res.seconds:.0f} s)", f"artifact: {res.artifact_uri}"]
    if res.registered_uri:
        lines.append(f"registered: {res.registered_uri}")
    for k, v in res.metrics.items():
        if isinstance(v, float):
            lines.append(f"  {k}: {v:.4f}")
    if res.report_uri:
        lines.append(f"report: {res.report_uri}/report.md")
    if res.sheet_uri:
        lines.append(f"prediction sheet: {res.sheet_uri}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from workflows.runtime import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        result, code = dispatch(args)
    except DefectflowError as e:
        if os.environ.get("DEFECTFLOW_TRACEBACK"):
            raise
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  hint: {e.hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and friends
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if args.json:
        print(json.dumps(_jsonable(result), default=str, indent=2))
    return code


def run_command(command: str, argv: list[str] | None = None) -> int:
    """Entry for ``python -m workflows.<step>``: the same as ``defectflow <step> ...``."""
    argv = sys.argv[1:] if argv is None else argv
    return main([command, *argv])


if __name__ == "__main__":
    raise SystemExit(main())
