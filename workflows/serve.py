"""serve: host a model artifact as an HTTP endpoint with Ray Serve.

    defectflow serve --model ./defectflow-data/models/gmbinet            # blocks; Ctrl-C stops it
    defectflow serve --model s3://bucket/defectflow/models/gmbinet@production --detach   # leave it on the cluster

Binds to 127.0.0.1:8000 unless ``--host``/``--port`` say otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from components import catalog
from components import config as cfgmod
from components.config import ServeConfig
from components.errors import ConfigError
from workflows import console
from workflows.command import Command, main

log = logging.getLogger("defectflow.serve")

APP_NAME = "detector"


@dataclass
class ServeHandle:
    url: str
    app_name: str
    model_uri: str


def start(cfg: ServeConfig) -> ServeHandle:
    """Deploy the detector app and return its base URL (Ray is started or joined here)."""
    from ray import serve

    from serve_apps.detector import build
    from workflows.runtime import init_ray

    cfg.storage.apply()
    model_uri = catalog.resolve_model(cfg.model)
    init_ray(cfg.ray, cfg.storage)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    app = build(model_uri, threshold=cfg.threshold, num_replicas=cfg.num_replicas, num_cpus=cfg.num_cpus,
                num_gpus=cfg.num_gpus, max_upload_bytes=cfg.max_upload_bytes, max_image_pixels=cfg.max_image_pixels)
    serve.run(app, name=APP_NAME, route_prefix=cfg.route_prefix)
    prefix = cfg.route_prefix.rstrip("/")
    url = f"http://{cfg.host}:{cfg.port}{prefix}"
    log.info("detector for %s is up: POST %s/v1/detect, GET %s/healthz", model_uri, url, url)
    return ServeHandle(url=url, app_name=APP_NAME, model_uri=model_uri)


def stop() -> None:
    from ray import serve

    serve.shutdown()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="artifact URI or <root>/models/<name>[@alias]")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    p.add_argument("--num-replicas", type=int, default=None)
    p.add_argument("--threshold", type=float, default=None, help="override the artifact's decision threshold")
    p.add_argument("--detach", action="store_true", help="return once the app is up and leave it running")
    p.add_argument("--config", help="YAML with ServeConfig keys (host, port, num_cpus, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a serve config key")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    base: dict[str, Any] = {"model": args.model}
    for key, attr in (("host", "host"), ("port", "port"), ("num_replicas", "num_replicas"),
                      ("threshold", "threshold")):
        if getattr(args, attr) is not None:
            base[key] = getattr(args, attr)
    data = cfgmod.read_yaml(args.config) if args.config else {}
    data = cfgmod.deep_merge(data, base)
    data = cfgmod.deep_merge(data, cfgmod.parse_overrides(args.set))
    return cfgmod.validate(ServeConfig, data, "serve config")


def run_cli(args: argparse.Namespace) -> ServeHandle:
    cfg = config_from_args(args)
    if args.detach and not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        raise ConfigError("--detach leaves the endpoint on a running cluster, but none is given: a Ray instance this "
                          "command starts ends with it", "start one (cluster/local-head.sh) and pass its address "
                          "(--set ray.address=<host:port>, or RAY_ADDRESS), or serve without --detach")
    handle = start(cfg)
    console.out(f"serving {handle.model_uri}\n  POST {handle.url}/v1/detect  (multipart field 'image')\n"
                f"  GET  {handle.url}/healthz")
    if args.detach:
        return handle
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.out("stopping")
        stop()
    return handle


COMMAND = Command("serve", "HTTP endpoint for a model with Ray Serve", add_arguments, run_cli)

if __name__ == "__main__":
    raise SystemExit(main(COMMAND))
