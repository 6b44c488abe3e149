"""demo: the whole flow on the embedded procedural data, on one local Ray instance.

    make demo        # or: defectflow demo [--out ./defectflow-demo] [--images 160] [--epochs 8]

procedural data -> ingest -> train GMBINet (Ray Train) -> evaluate (Ray Data) -> 2-trial sweep (Ray Tune + ASHA)
-> serve the best model (Ray Serve) -> one image over HTTP -> a summary table with where the reports are.
"""

from __future__ import annotations

import argparse
import base64
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

log = logging.getLogger("defectflow.demo")

CONFIGS = Path(__file__).resolve().parent / "configs"
MARKER = ".defectflow-demo"


@dataclass
class DemoResult:
    out: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    http: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


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
    print(f"[demo] {name:<9} {secs:6.1f} s  {what}", flush=True)


def run(out: str = "./defectflow-demo", images: int = 160, size: int = 128, epochs: int = 40,
        sweep_epochs: int = 6, num_cpus: int | None = None, port: int = 8000) -> DemoResult:
    import requests

    from workflows import ingest, serve, sweep, train
    from workflows.runtime import init_ray

    t_start = time.time()
    root = _fresh_dir(out)
    result = DemoResult(out=root)
    store = {"root": root}
    ray_cfg = RayConfig(num_cpus=num_cpus)
    print(f"[demo] output folder: {root}", flush=True)

    t0 = time.time()
    init_ray(ray_cfg, cfgmod.StorageConfig(root=root))
    _step(result, "ray", t0, "local Ray instance started")

    t0 = time.time()
    ing = ingest.run(IngestConfig(dataset="procedural", name="procedural", storage=store,
                                  options={"count": images, "size": size, "seed": 0}))
    s = ing.summary
    _step(result, "ingest", t0, f"{s['rows']} procedural images -> {ing.manifest_uri} "
                                f"(train {s.get('train', {}).get('rows', 0)}, val {s.get('val', {}).get('rows', 0)}, "
                                f"test {s.get('test', {}).get('rows', 0)})")

    t0 = time.time()
    train_cfg = cfgmod.load(TrainConfig, str(CONFIGS / "gmbinet_procedural.yaml"), base=None, overrides=[
        f"storage.root={root}", f"data.manifest={ing.manifest_uri}", f"optim.epochs={epochs}",
        f"data.image_size=[{size}, {size}]"])
    tr = train.run(train_cfg)
    m = tr.metrics
    _step(result, "train", t0, f"GMBINet {epochs} epochs: test pooled IoU {_f(m.get('test_iou_pooled'))}, "
                               f"Sample_mIoU {_f(m.get('test_sample_miou'))}, MAE {_f(m.get('test_mae'), 4)}, "
                               f"image AUROC {_f(m.get('test_image_auroc'))} -> {tr.registered_uri}")

    t0 = time.time()
    sweep_data = cfgmod.read_yaml(CONFIGS / "sweep_gmbinet_procedural.yaml")
    sweep_cfg = cfgmod.validate(SweepConfig, cfgmod.deep_merge(sweep_data, {
        "name": "sweep-demo",
        "train": {"storage": store, "data": {"manifest": ing.manifest_uri, "image_size": [size, size]},
                  "optim": {"epochs": sweep_epochs}}}), "demo sweep")
    sw = sweep.run(sweep_cfg)
    best = sw.best or {}
    _step(result, "sweep", t0, f"{len(sw.trials)} trials over n; best {best.get('params')} val pooled IoU "
                               f"{_f(best.get('best'))}; test pooled IoU {_f(sw.test_metrics.get('test_iou_pooled'))}"
                               f" -> {sw.registered_uri}")

    t0 = time.time()
    port = free_port(port)
    handle = serve.start(ServeConfig(model=sw.registered_uri or tr.registered_uri or tr.artifact_uri, port=port,
                                     num_cpus=0.25, storage=store, ray=ray_cfg))
    _step(result, "serve", t0, f"endpoint up at {handle.url}")

    t0 = time.time()
    png = _demo_image(ing.manifest_uri)
    resp = requests.post(f"{handle.url}/v1/detect", files={"image": ("sample.png", png, "image/png")}, timeout=60)
    if resp.status_code != 200:
        raise DefectflowError(f"the endpoint answered {resp.status_code}: {resp.text[:300]}")
    body = resp.json()
    map_png = base64.b64decode(body["defect_map_png"])
    Path(root, "reports", "http_defect_map.png").write_bytes(map_png)
    result.http = {k: body[k] for k in ("score", "is_defect", "threshold", "latency_ms")}
    _step(result, "http", t0, f"POST /v1/detect -> score {body['score']:.3f}, is_defect {body['is_defect']}, "
                              f"{body['latency_ms']:.1f} ms in the replica")
    serve.stop()

    result.seconds = round(time.time() - t_start, 1)
    print(_summary(result, tr, sw), flush=True)
    return result


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
             f"  best model          {sw.registered_uri}",
             f"  HTTP defect map     {res.out}/reports/http_defect_map.png",
             "=" * 80]
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> DemoResult:
    res = run(out=args.out, images=args.images, size=args.size, epochs=args.epochs, sweep_epochs=args.sweep_epochs,
              num_cpus=args.num_cpus, port=args.port)
    return res


def main(argv: list[str] | None = None) -> int:
    from workflows.cli import run_command

    return run_command("demo", argv)


if __name__ == "__main__":
    raise SystemExit(main())

