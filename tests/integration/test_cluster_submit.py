"""The README's cluster path, run as a user runs it: `cluster/local-head.sh` starts a real Ray head (free ports, its
own temp dir), `cluster/submit.sh` submits `ingest` and `train` through the Jobs API from another directory with a
relative storage root, and `cluster/local-head.sh stop` ends that head and nothing else.

The test's own Ray instance (``ray_session``) is the "other Ray on the host": it must survive the stop, and its
presence is what made Train V2's PlacementGroupCleaner fail with "Found multiple active Ray instances".
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from components.data import manifest

REPO = Path(__file__).resolve().parents[2]
LOCAL_HEAD = str(REPO / "cluster" / "local-head.sh")
SUBMIT = str(REPO / "cluster" / "submit.sh")
RAY_DASHBOARD = False  # the test's own instance only has to exist; the head serves the Jobs API
pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]

# every port the head opens is a free one: the suite's own Ray sessions and other people's may hold the defaults
AUTO_PORTS = [flag for name in ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                "runtime-env-agent-port", "ray-client-server-port", "metrics-export-port")
              for flag in (f"--{name}", "auto")]


def clean_env(**changes: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DEFECTFLOW_WORKDIR")}
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def _run(cmd: list[str], cwd: Path | str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _read_state(temp_dir: str) -> dict[str, str]:
    out = {}
    for line in (Path(temp_dir) / "defectflow-head.env").read_text().splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k] = v.strip("'")
    return out


def _session_pids(sid: int) -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                pids.append(p.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return pids


@contextmanager
def local_head(env: dict[str, str]) -> Iterator[tuple[str, dict[str, str]]]:
    """A head started by cluster/local-head.sh in a short temp dir (Ray's socket paths must stay under 107 bytes);
    stopped by the test itself, or here if the test failed first."""
    temp_dir = tempfile.mkdtemp(prefix="dfh-", dir="/tmp")
    try:
        start = _run([LOCAL_HEAD, "start", "--temp-dir", temp_dir, "--num-cpus", "2",
                      "--object-store-memory", str(200 * 1024**2), *AUTO_PORTS], REPO, env, timeout=180)
        assert start.returncode == 0, start.stdout + start.stderr
        assert "Jobs API and dashboard: http://127.0.0.1:" in start.stdout, start.stdout
        yield temp_dir, _read_state(temp_dir)
    finally:
        if (Path(temp_dir) / "defectflow-head.env").exists():
            _run([LOCAL_HEAD, "stop", "--temp-dir", temp_dir], REPO, env, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_submit_train_to_a_local_head_with_a_relative_storage_root(ray_session, tmp_path):
    import ray

    user_dir = tmp_path / "user"  # the submitter's working directory, not the repository
    user_dir.mkdir()
    env = clean_env(RAY_AUTH_MODE="disabled")
    with local_head(env) as (temp_dir, state):
        assert state["RAY_AUTH_MODE"] == "disabled"
        submit_env = {**env, "DEFECTFLOW_HEAD_DIR": temp_dir}  # submit.sh finds the head from its state file

        ingest = _run([SUBMIT, "ingest", "--dataset", "procedural", "--option", "count=24", "--option", "size=64",
                       "--set", "storage.root=store"], user_dir, submit_env, timeout=180)
        assert ingest.returncode == 0, ingest.stdout + ingest.stderr
        assert f"submitting to {state['RAY_ADDRESS']}" in ingest.stderr
        manifest_path = user_dir / "store" / "datasets" / "procedural" / "manifest.parquet"
        assert manifest.read(str(manifest_path)).num_rows == 24

        train = _run([SUBMIT, "train", "-v", "--config", "workflows/configs/gmbinet_procedural.yaml",
                      "--set", "storage.root=store",
                      "--set", "data.manifest=store/datasets/procedural/manifest.parquet",
                      "--set", "optim.epochs=1", "--set", "data.image_size=[64,64]", "--set", "name=cluster-tiny",
                      "--set", "eval.sheet_images=2"], user_dir, submit_env, timeout=300)
        logs = train.stdout + train.stderr
        assert train.returncode == 0, logs
        # Ray code in workers was given the cluster's address, so it did not guess among the instances on the host
        assert "Found multiple active Ray instances" not in logs
        assert "Failed to merge" not in logs

        store = user_dir / "store"
        assert (store / "runs" / "cluster-tiny").is_dir()
        detector = json.loads((store / "models" / "gmbinet" / "1" / "detector.json").read_text())
        assert detector["family"] == "gmbinet"
        assert "test_image_auroc" in detector["metrics"]
        # nothing was written into Ray's per-session copy of the working dir
        assert not list(Path(temp_dir).glob("session_*/runtime_resources/**/store"))

        gcs_pid, sid = int(state["GCS_PID"]), int(state["SESSION_ID"])
        assert _session_pids(sid)
        stop = _run([LOCAL_HEAD, "stop", "--temp-dir", temp_dir], REPO, env, timeout=120)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert not _session_pids(sid)
        with pytest.raises(ProcessLookupError):
            os.kill(gcs_pid, 0)
        assert not (Path(temp_dir) / "defectflow-head.env").exists()

    # the other Ray instance on the host (this test's own) is untouched
    assert ray.is_initialized()
    assert ray.get(ray.put("still here")) == "still here"


def test_submit_uses_token_auth_when_a_token_exists(ray_session, tmp_path):
    """A head with token authentication: submit.sh switches its client to token mode by itself when a token exists
    (here RAY_AUTH_TOKEN, so that no ~/.ray/auth_token is written), and the same submit without a token is refused."""
    token = secrets.token_hex(32)
    head_env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    with local_head(head_env) as (_temp_dir, state):
        assert state["RAY_AUTH_MODE"] == "token"
        cmd = [SUBMIT, "ingest", "--dataset", "procedural", "--option", "count=4", "--option", "size=64",
               "--out", "m.parquet"]
        ok = _run(cmd, tmp_path, clean_env(RAY_ADDRESS=state["RAY_ADDRESS"], RAY_AUTH_MODE=None, RAY_AUTH_TOKEN=token),
                  timeout=180)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "(auth: token;" in ok.stderr
        assert manifest.read(str(tmp_path / "m.parquet")).num_rows == 4

        refused = _run(cmd, tmp_path, clean_env(RAY_ADDRESS=state["RAY_ADDRESS"], RAY_AUTH_MODE="disabled",
                                           RAY_AUTH_TOKEN=None), timeout=120)
        assert refused.returncode != 0
        assert "authentication token" in (refused.stdout + refused.stderr)
