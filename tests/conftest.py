"""Shared fixtures: the shared datasets folder, a moto S3 server on 127.0.0.1, and module-scoped Ray sessions.

Environment for every test process (and the Ray workers it starts, which inherit it): fake AWS credentials for the
moto server, no usage stats, Train V2, and Ray token auth off so the Jobs REST client in tests needs no token.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_TRAIN_V2_ENABLED"] = "1"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def shared_root() -> Path:
    env = os.environ.get("DEFECTFLOW_SHARED")
    return Path(env) if env else REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    d = shared_root() / "datasets"
    if not d.is_dir():
        pytest.skip(f"shared datasets not found at {d} (set DEFECTFLOW_SHARED)")
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP API (moto's server) on 127.0.0.1, for the whole test session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket; the process's storage is pointed at the moto endpoint while the test runs."""
    import boto3

    from components import storage

    name = f"df-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    storage.configure(endpoint_url=s3_endpoint)
    yield f"s3://{name}"
    storage.configure()


@pytest.fixture(scope="module")
def ray_session(request):
    """One local Ray instance per test module (2 CPUs, small object store)."""
    import ray

    from components.config import RayConfig
    from workflows.runtime import configure_data

    # The dashboard also serves the state API that Train V2's PlacementGroupCleaner needs to free the resources of
    # a trial that Tune stopped; without it they leak and later trials wait forever.
    dashboard = bool(getattr(request.module, "RAY_DASHBOARD", True))
    if ray.is_initialized():
        ray.shutdown()
    ctx = ray.init(num_cpus=2, include_dashboard=dashboard, object_store_memory=400 * 1024**2,
                   log_to_driver=True, runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "1"}})
    configure_data(RayConfig(progress_bars=False))
    yield ctx
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
