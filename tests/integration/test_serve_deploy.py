"""`serve deploy` of serve_apps/detector.yaml-shaped configs on a real local Ray (dashboard REST API, real HTTP).

What the README promises about serving: a change of only ``user_config`` hot-swaps model and threshold in the same
replica; Serve's health check runs a real inference; ``build_app`` takes the serve config keys (validated).
Every test deploys its own complete config under its own app name (a declarative deploy replaces every app) and
deletes it afterwards, so no test relies on another's app. All configs name this module's HTTP port.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
import yaml
from PIL import Image

from tests.conftest import free_port
from tests.helpers import random_artifact

REPO = Path(__file__).resolve().parents[2]
DETECTOR_YAML = REPO / "serve_apps" / "detector.yaml"
RAY_DASHBOARD = True  # `serve deploy` goes through the dashboard's REST API
pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


@dataclass
class Cluster:
    dashboard: str  # http://host:port of the dashboard (the `serve deploy -a` address)
    http_options: dict[str, Any]
    base: str  # http://127.0.0.1:<port> of Serve's proxy

    def client(self):
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        return ServeSubmissionClient(self.dashboard)


@pytest.fixture(scope="module")
def cluster(ray_session) -> Cluster:
    port = free_port()
    # Serve starts with the http_options of the first config deployed; every config here carries the same ones.
    return Cluster(dashboard=f"http://{ray_session.dashboard_url}",
                   http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 30},
                   base=f"http://127.0.0.1:{port}")


def nan_artifact(uri: str) -> str:
    """A well-formed artifact whose weights are NaN (a diverged run): it loads, but its output is garbage."""
    from components import artifact
    from components.models import registry

    det = registry.create_detector("gmbinet", {"n": 2}, {"input_size": (64, 64)})
    with torch.no_grad():
        for p in det.parameters():
            p.fill_(float("nan"))
    artifact.save(det.eval(), uri, threshold=0.5, lineage={"test": True})
    return uri


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("serve-deploy-artifacts")
    return {"a": random_artifact(str(root / "a"), size=64, n=2, threshold=0.5),
            "b": random_artifact(str(root / "b"), size=64, n=4, threshold=0.5),
            "nan": nan_artifact(str(root / "nan"))}


@pytest.fixture
def app_name(cluster):
    """A fresh application name; the application is deleted when the test ends."""
    name = f"det-{uuid.uuid4().hex[:8]}"
    yield name
    try:
        from ray import serve

        serve.delete(name, _blocking=False)  # the next test's deploy does not wait for it
    except Exception:  # Serve never started (the test failed before deploying) or the app is already gone
        pass


def detector_config(cluster: Cluster, name: str, args: dict[str, Any],
                    user_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """serve_apps/detector.yaml with this module's HTTP port, one app named ``name`` and small replicas."""
    cfg = yaml.safe_load(DETECTOR_YAML.read_text())
    cfg["http_options"] = dict(cluster.http_options)
    app = cfg["applications"][0]
    app.update(name=name, route_prefix=f"/{name}", args=args)
    dep = app["deployments"][0]
    dep["ray_actor_options"] = {"num_cpus": 0.25}
    if user_config is not None:
        dep["user_config"] = user_config
    return cfg


def serve_deploy_cli(cluster: Cluster, cfg: dict[str, Any], path: Path) -> None:
    """The `serve deploy` command itself, against this cluster's dashboard."""
    path.write_text(yaml.safe_dump(cfg))
    serve_bin = Path(sys.executable).parent / "serve"
    r = subprocess.run([str(serve_bin), "deploy", str(path), "-a", cluster.dashboard], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def app_details(cluster: Cluster, name: str) -> dict[str, Any] | None:
    return cluster.client().get_serve_details().get("applications", {}).get(name)


def wait_for_app(cluster: Cluster, name: str, status: str = "RUNNING", timeout: float = 120,
                 fail_fast: bool = True) -> dict[str, Any]:
    """Poll Serve's REST status until the app is in ``status``; with ``fail_fast``, RUNNING vs DEPLOY_FAILED ends
    the wait at once (off when the app leaves a previous DEPLOY_FAILED)."""
    deadline, app = time.time() + timeout, None
    while time.time() < deadline:
        app = app_details(cluster, name)
        if app and app["status"] == status:
            return app
        if fail_fast and app and {status, app["status"]} == {"RUNNING", "DEPLOY_FAILED"}:
            pytest.fail(f"{name} is {app['status']}, expected {status}: {app['message']}")
        time.sleep(0.5)
    pytest.fail(f"{name} did not reach {status} in {timeout}s: {app}")


def running_replicas(app: dict[str, Any]) -> list[tuple[str, str, int]]:
    return sorted((r["replica_id"], r["actor_id"], r["pid"]) for r in app["deployments"]["Detector"]["replicas"]
                  if r["state"] == "RUNNING")


def png(w: int, h: int, noise: bool = True) -> bytes:
    arr = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8) if noise \
        else np.full((h, w, 3), 128, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def detect(url: str, data: bytes) -> requests.Response:
    return requests.post(f"{url}/v1/detect", files={"image": ("x.png", data, "image/png")}, timeout=60)


def same_path(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve()


# --------------------------------------------------------------------------------------------- the YAML itself


def test_detector_yaml_is_a_valid_loopback_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from serve_apps import detector

    cfg = yaml.safe_load(DETECTOR_YAML.read_text())
    schema = ServeDeploySchema.model_validate(cfg)
    assert schema.http_options.host == "127.0.0.1"
    (app,) = schema.applications
    assert app.import_path == "serve_apps.detector:build_app"
    assert [d.name for d in app.deployments] == ["Detector"]
    parsed = detector.app_config(app.args)  # every key of the shipped args is accepted
    assert parsed.max_upload_bytes == app.args["max_upload_bytes"]
    assert parsed.max_image_pixels == app.args["max_image_pixels"]


def test_build_app_validates_its_args():
    from components.errors import ConfigError
    from serve_apps.detector import app_config

    cfg = app_config({"model_uri": "m", "threshold": "0.3", "max_upload_bytes": "4096", "max_image_pixels": 100,
                      "num_cpus": 0.25, "num_gpus": 0, "num_replicas": 2,
                      "storage.s3_endpoint_url": "http://127.0.0.1:9000", "storage": {"s3_region": "eu-west-1"}})
    assert (cfg.model, cfg.threshold, cfg.max_upload_bytes, cfg.max_image_pixels, cfg.num_replicas) == \
        ("m", 0.3, 4096, 100, 2)
    assert (cfg.storage.s3_endpoint_url, cfg.storage.s3_region) == ("http://127.0.0.1:9000", "eu-west-1")
    assert app_config({"model": "m"}).model == "m"
    for args, message in [({"model_uri": "m", "max_upload_byte": 10}, "max_upload_byte: unknown key"),
                          ({"model_uri": "m", "threshold": 1.5}, "threshold"),
                          ({"model_uri": "m", "port": 9000}, "http_options.port"),
                          ({"model_uri": "m", "route_prefix": "/x"}, "route_prefix"),
                          ({"model": "m", "model_uri": "n"}, "both model and model_uri"),
                          ({"threshold": 0.5}, "needs the argument model_uri")]:
        with pytest.raises(ConfigError, match=message):
            app_config(args)


# --------------------------------------------------------------------------------------------- health check


def test_check_health_runs_the_detector_and_a_broken_swap_is_refused(artifacts):
    """In-process: check_health is a real inference (a forward hook sees it; a NaN model fails it), and
    reconfigure smoke-tests a new model before it replaces the current one."""
    from components.errors import ConfigError
    from serve_apps.detector import DetectorService

    svc = DetectorService(model_uri=artifacts["a"], use_gpu=False)
    det = svc._current()[0]
    seen: list[tuple[int, ...]] = []
    hook = det.register_forward_hook(lambda _m, inputs, _o: seen.append(tuple(inputs[0].shape)))
    try:
        svc.check_health()
    finally:
        hook.remove()
    assert seen == [(1, 3, 32, 32)]

    broken = DetectorService(model_uri=artifacts["nan"], use_gpu=False)  # the constructor leaves it to Serve's check
    with pytest.raises(RuntimeError, match="non-finite output"):
        broken.check_health()

    with pytest.raises(RuntimeError, match="non-finite output"):
        svc.reconfigure({"model_uri": artifacts["nan"]})
    assert same_path(svc.model_info()["uri"], artifacts["a"])  # still serving the good model
    svc.check_health()
    with pytest.raises(ConfigError, match="treshold: unknown key"):
        svc.reconfigure({"treshold": 0.2})
    svc.reconfigure({"threshold": 0.25})
    assert svc.model_info()["threshold"] == 0.25 and same_path(svc.model_info()["uri"], artifacts["a"])
    svc.reconfigure({})  # user_config removed: back to the args (the artifact's threshold)
    assert svc.model_info()["threshold"] == 0.5


def test_serve_health_check_fails_a_replica_whose_model_outputs_nan(cluster, artifacts, app_name):
    """On Serve: the constructor accepts the NaN artifact, so only the initial health check (our inference) can
    stop this replica from going live."""
    cluster.client().deploy_applications(detector_config(cluster, app_name, {"model_uri": artifacts["nan"]}))
    deadline, app = time.time() + 120, None
    while time.time() < deadline:
        app = app_details(cluster, app_name)
        message = app["deployments"].get("Detector", {}).get("message", "") if app else ""
        if "non-finite output" in message:
            break
        assert not (app and app["status"] == "RUNNING"), "a replica with a NaN model passed its health check"
        time.sleep(0.5)
    else:
        pytest.fail(f"no health-check failure reported: {app}")
    assert app["status"] != "RUNNING"
    assert "check_health" in message


# --------------------------------------------------------------------------------------------- deploys


def test_user_config_change_hot_swaps_model_and_threshold_in_the_same_replica(cluster, artifacts, app_name,
                                                                              tmp_path):
    """`serve deploy` twice with only user_config changed: /healthz shows the new model and threshold, served by
    the same replica (id, actor, pid)."""
    url = f"{cluster.base}/{app_name}"
    args = {"model_uri": artifacts["a"]}
    serve_deploy_cli(cluster, detector_config(cluster, app_name, args, {"model_uri": artifacts["a"],
                                                                        "threshold": 0.5}), tmp_path / "v1.yaml")
    before = running_replicas(wait_for_app(cluster, app_name))
    assert len(before) == 1
    model = requests.get(f"{url}/healthz", timeout=30).json()["model"]
    assert same_path(model["uri"], artifacts["a"]) and model["threshold"] == 0.5

    serve_deploy_cli(cluster, detector_config(cluster, app_name, args, {"model_uri": artifacts["b"],
                                                                        "threshold": 0.7}), tmp_path / "v2.yaml")
    deadline = time.time() + 60
    while time.time() < deadline:
        model = requests.get(f"{url}/healthz", timeout=30).json()["model"]
        if same_path(model["uri"], artifacts["b"]):
            break
        time.sleep(0.3)
    assert same_path(model["uri"], artifacts["b"]) and model["threshold"] == 0.7, model
    r = detect(url, png(48, 40))
    assert r.status_code == 200, r.text
    assert same_path(r.json()["model"]["uri"], artifacts["b"]) and r.json()["threshold"] == 0.7
    after = running_replicas(wait_for_app(cluster, app_name))
    assert after == before  # same replica id, actor and pid: reconfigured in place, not replaced

    # only the threshold: still the same replica
    serve_deploy_cli(cluster, detector_config(cluster, app_name, args, {"model_uri": artifacts["b"],
                                                                        "threshold": 0.3}), tmp_path / "v3.yaml")
    deadline = time.time() + 60
    while time.time() < deadline and model["threshold"] != 0.3:
        time.sleep(0.3)
        model = requests.get(f"{url}/healthz", timeout=30).json()["model"]
    assert model["threshold"] == 0.3 and same_path(model["uri"], artifacts["b"])
    assert running_replicas(wait_for_app(cluster, app_name)) == before

    # a model that cannot infer is refused by reconfigure: the update fails and says why (Serve then stops the
    # replica, so the app ends DEPLOY_FAILED until a good user_config is deployed)
    cluster.client().deploy_applications(detector_config(cluster, app_name, args, {"model_uri": artifacts["nan"]}))
    app = wait_for_app(cluster, app_name, status="DEPLOY_FAILED", timeout=120)
    assert "non-finite output" in app["deployments"]["Detector"]["message"]
    cluster.client().deploy_applications(detector_config(cluster, app_name, args, {"model_uri": artifacts["b"]}))
    wait_for_app(cluster, app_name, fail_fast=False)
    model = requests.get(f"{url}/healthz", timeout=30).json()["model"]
    assert same_path(model["uri"], artifacts["b"]) and model["threshold"] == 0.5  # the artifact's threshold


def test_build_app_args_reach_the_replica(cluster, artifacts, app_name):
    """A deploy of the YAML shape with small upload/pixel limits: both are enforced (413) by the replica."""
    url = f"{cluster.base}/{app_name}"
    args = {"model_uri": artifacts["a"], "max_upload_bytes": 4096, "max_image_pixels": 10_000, "threshold": 0.42,
            "storage": {"s3_region": "eu-west-1"}}
    cluster.client().deploy_applications(detector_config(cluster, app_name, args))
    app = wait_for_app(cluster, app_name)
    # the deployments entry of the config wins over args for the same option (as detector.yaml says)
    assert app["deployments"]["Detector"]["deployment_config"]["ray_actor_options"]["num_cpus"] == 0.25

    big = png(64, 64)  # ~12 kB of noise
    assert len(big) > 4096
    r = detect(url, big)
    assert r.status_code == 413 and "limit of 4,096" in r.json()["detail"], r.text
    wide = png(150, 100, noise=False)  # 15,000 pixels in a few hundred bytes
    assert len(wide) < 4096
    r = detect(url, wide)
    assert r.status_code == 413 and "above the limit of 10,000" in r.json()["detail"], r.text
    r = detect(url, png(40, 30))
    assert r.status_code == 200 and r.json()["threshold"] == 0.42, r.text


def test_unknown_build_app_args_fail_the_deploy_with_a_clear_message(cluster, artifacts, app_name):
    args = {"model_uri": artifacts["a"], "max_upload_byte": 4096}  # typo
    cluster.client().deploy_applications(detector_config(cluster, app_name, args))
    app = wait_for_app(cluster, app_name, status="DEPLOY_FAILED", timeout=90)
    assert "invalid serve_apps.detector args" in app["message"]
    assert "max_upload_byte: unknown key" in app["message"]
