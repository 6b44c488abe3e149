"""demo: the whole flow on the embedded procedural data, on one local Ray instance.

    make demo        # or: defectflow demo [--out ./defectflow-demo] [--images 160] [--epochs 40]

procedural data -> ingest -> train GMBINet (Ray Train) -> evaluate (Ray Data) -> 2-trial sweep (Ray Tune + ASHA)
-> the winner on validation (the trained model or the sweep's best trial) becomes `production` -> serve it (Ray
Serve) -> one image over HTTP -> a summary table with where the reports are (and reports/demo.json).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components import config as cfgmod
from components import storage
from components.config import IngestConfig, RayConfig, ServeConfig, SweepConfig, TrainConfig
from components.errors import DefectflowError
from workflows import console
from workflows.command import Command, main

log = logging.getLogger("defectflow.demo")

CONFIGS = Path(__file__).resolve().parent / "configs"
MARKER = ".defectflow-demo"


@dataclass
class DemoResult:
    out: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    winner: dict[str, Any] = field(default_factory=dict)
    http: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    summary: str = ""


def free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise DefectflowError("no free TCP port on 127.0.0.1", "free a port or pass --port")


def _fresh_dir(out: str) -> str:
    path = storage.normalize(out)
    if os.path.exists(path):
        if not os.path.exists(os.path.join(path, MARKER)) and os.listdir(path):
            raise DefectflowError(f"{path} exists and is not a demo folder", "pass another --out or remove it")
        shutil.rmtree(path)
    os.makedirs(path)
    Path(path, MARKER).write_text("written by `defectflow demo`; safe to delete\n")
    return path


def _step(result: DemoResult, name: str, t0: float, what: str) -> None:
    secs = time.time() - t0
    result.steps.append({"step": name, "seconds": round(secs, 1), "result": what})
    log.info("[demo] %-9s %6.1f s  %s", name, secs, what)


def pick_winner(tr: Any, sw: Any, metric: str, mode: str) -> dict[str, Any]:
    """The best candidate on validation, whichever step made it: the trained model or the sweep's best trial
    (both selected their checkpoint by ``metric`` on the same validation split)."""
    candidates = [{"step": "train", "uri": tr.registered_uri, "val": tr.metrics.get(f"best_{metric}"),
                   "test": tr.metrics.get("test_iou_pooled")},
                  {"step": f"sweep trial {sw.best['trial_id']}", "uri": sw.registered_uri, "val": sw.best["best"],
                   "test": sw.test_metrics.get("test_iou_pooled")}]
    scored = [c for c in candidates if c["val"] is not None and c["uri"]]
    pick = max if mode == "max" else min
    return {**pick(scored, key=lambda c: c["val"]), "metric": metric, "candidates": candidates}


def run(out: str = "./defectflow-demo", images: int = 160, size: int = 128, epochs: int = 40,
        sweep_epochs: int = 6, num_cpus: int | None = None, port: int = 8000) -> DemoResult:
    from workflows import ingest, sweep, train
    from workflows.runtime import init_ray

    t_start = time.time()
    root = _fresh_dir(out)
    console.keep_log_in(root)
    result = DemoResult(out=root)
    store = cfgmod.StorageConfig(root=root)
    ray_cfg = RayConfig(num_cpus=num_cpus)
    log.info("[demo] output folder: %s", root)

    t0 = time.time()
    init_ray(ray_cfg, store)
    _step(result, "ray", t0, "local Ray instance started")

    t0 = time.time()
    ing = ingest.run(IngestConfig(dataset="procedural", name="procedural", storage=store,
                                  options={"count": images, "size": size, "seed": 0}))
    s = ing.summary
    _step(result, "ingest", t0, f"{s['rows']} procedural images (train {s.get('train', {}).get('rows', 0)}, "
                                f"val {s.get('val', {}).get('rows', 0)}, test {s.get('test', {}).get('rows', 0)})")

    t0 = time.time()
    tr = train.run(cfgmod.load(TrainConfig, str(CONFIGS / "gmbinet_procedural.yaml"), overrides=[
        f"storage.root={root}", f"data.manifest={ing.manifest_uri}", f"optim.epochs={epochs}",
        f"data.image_size=[{size}, {size}]"]))
    m = tr.metrics
    _step(result, "train", t0, f"GMBINet {epochs} epochs: val pooled IoU {_f(m.get('best_val_iou_pooled'))}; "
                               f"test pooled IoU {_f(m.get('test_iou_pooled'))}, image AUROC "
                               f"{_f(m.get('test_image_auroc'))}")

    t0 = time.time()
    sweep_cfg = cfgmod.validate(SweepConfig, cfgmod.deep_merge(
        cfgmod.read_yaml(CONFIGS / "sweep_gmbinet_procedural.yaml"),
        {"name": "sweep-demo", "train": {"storage": {"root": root}, "optim": {"epochs": sweep_epochs},
                                         "data": {"manifest": ing.manifest_uri, "image_size": [size, size]}}}),
        "demo sweep")
    sw = sweep.run(sweep_cfg)
    _step(result, "sweep", t0, f"{len(sw.trials)} trials over n, {sweep_epochs} epochs each; best {sw.best['params']}"
                               f" val pooled IoU {_f(sw.best['best'])}")

    t0 = time.time()
    result.winner = pick_winner(tr, sw, sweep_cfg.metric, sweep_cfg.mode)
    production = _promote(root, result.winner["uri"])
    _step(result, "winner", t0, f"{result.winner['step']} (val pooled IoU {_f(result.winner['val'])}) -> "
                                f"{production}")
    _serve_one_image(result, production, ing.manifest_uri, port, store, ray_cfg)
    result.seconds = round(time.time() - t_start, 1)
    result.summary = _summary(result, tr, sw)
    storage.write_json(storage.join(root, "reports", "demo.json"),
                       {k: v for k, v in dataclasses.asdict(result).items() if k != "summary"})
    return result


def _promote(root: str, registered_uri: str) -> str:
    """Point ``production`` at a registered version; returns the model reference that serves it."""
    from workflows import promote

    name, version = storage.basename(storage.parent(registered_uri)), storage.basename(registered_uri)
    promote.run(root, name, version, "production")
    return f"{root}/models/{name}@production"


def _serve_one_image(result: DemoResult, model: str, manifest_uri: str, port: int, store: Any, ray_cfg: Any) -> None:
    """Serve ``model``, send it a defective test image over HTTP, keep the defect map, stop serving."""
    import requests

    from workflows import serve

    t0 = time.time()
    handle = serve.start(ServeConfig(model=model, port=free_port(port), num_cpus=0.25, storage=store, ray=ray_cfg))
    _step(result, "serve", t0, f"endpoint up at {handle.url}")
    t0 = time.time()
    resp = requests.post(f"{handle.url}/v1/detect", files={"image": ("sample.png", _demo_image(manifest_uri),
                                                                     "image/png")}, timeout=60)
    if resp.status_code != 200:
        raise DefectflowError(f"the endpoint answered {resp.status_code}: {resp.text[:300]}",
                              f"the replica's log is in the demo's log file ({result.out}/logs)")
    body = resp.json()
    Path(result.out, "reports", "http_defect_map.png").write_bytes(base64.b64decode(body["defect_map_png"]))
    result.http = {k: body[k] for k in ("score", "is_defect", "threshold", "latency_ms")}
    _step(result, "http", t0, f"POST /v1/detect -> score {body['score']:.3f}, is_defect {body['is_defect']}, "
                              f"{body['latency_ms']:.1f} ms in the replica")
    serve.stop()


def _f(v: Any, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _demo_image(manifest_uri: str) -> bytes:
    """A defective test image of the procedural set, as PNG bytes."""
    import pyarrow.compute as pc

    from components.data import manifest
    from components.data.images import encode_png

    table = manifest.read(manifest_uri)
    test = table.filter(pc.and_(pc.equal(table["split"], "test"), pc.equal(table["label"], 1)))
    rec = (test if test.num_rows else table).slice(0, 1).to_pylist()[0]
    return encode_png(manifest.load_image(rec))


def _summary(res: DemoResult, tr: Any, sw: Any) -> str:
    from components.report import markdown_table

    lines = ["", "=" * 80, f"defectflow demo finished in {res.seconds:.0f} s", "",
             markdown_table(res.steps, ["step", "seconds", "result"]),
             "Where to look:",
             f"  training report     {tr.report_uri}/report.md",
             f"  prediction sheet    {tr.sheet_uri}",
             f"  sweep report        {sw.report_uri}/trials.md  (curves.png, trials.csv)",
             f"  served (winner)     {res.winner.get('uri')}  ({res.winner.get('step')})",
             f"  HTTP defect map     {res.out}/reports/http_defect_map.png",
             "=" * 80]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="./defectflow-demo", help="demo output folder (re-created each run)")
    p.add_argument("--images", type=int, default=160, help="procedural images to generate")
    p.add_argument("--size", type=int, default=128, help="image side length")
    p.add_argument("--epochs", type=int, default=40, help="training epochs")
    p.add_argument("--sweep-epochs", type=int, default=6, help="epochs per sweep trial")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the demo endpoint")


def run_cli(args: argparse.Namespace) -> DemoResult:
    return run(out=args.out, images=args.images, size=args.size, epochs=args.epochs, sweep_epochs=args.sweep_epochs,
               num_cpus=args.num_cpus, port=args.port)


COMMAND = Command("demo", "the whole flow on procedural data on a local Ray instance", add_arguments, run_cli,
                  lambda r: r.summary)

if __name__ == "__main__":
    raise SystemExit(main(COMMAND))
