"""`ray job submit`: defectflow steps submitted through the Jobs API of a local head, as plain `ray job submit` does
it (cluster/submit.sh is tested end to end in test_cluster_submit.py).

The head is started by cluster/local-head.sh on free ports: a `ray.init(include_dashboard=True)` session takes the
dashboard agent's fixed port 52365, and while any other Ray instance on the host holds it, every submit gets
"500: No available agent".
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from components.data import manifest
from tests.integration.test_cluster_submit import clean_env, local_head

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]
EXCLUDES = [".venv", "defectflow-data", "defectflow-demo"]


@pytest.fixture(scope="module")
def head():
    with local_head(clean_env(RAY_AUTH_MODE="disabled")) as (_temp_dir, state):
        yield state["RAY_ADDRESS"]


def _run_job(address: str, entrypoint: str, env_vars: dict[str, str] | None = None) -> tuple[str, str]:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    runtime_env = {"working_dir": str(REPO), "excludes": EXCLUDES, **({"env_vars": env_vars} if env_vars else {})}
    job = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, entrypoint_num_cpus=0.1)
    deadline = time.time() + 300
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            break
        time.sleep(1)
    return status.value, client.get_job_logs(job)


def test_ingest_as_a_ray_job(head, tmp_path):
    out = tmp_path / "m.parquet"
    status, logs = _run_job(head, f"{sys.executable} -m workflows.cli ingest --dataset procedural "
                                         f"--option count=10 --option size=64 --out {out} "
                                         f"--set storage.root={tmp_path / 'store'}")
    assert status == "SUCCEEDED", logs
    assert manifest.read(str(out)).num_rows == 10


def test_a_plain_job_refuses_relative_paths(head, tmp_path):
    """Without DEFECTFLOW_WORKDIR a relative path would land in Ray's per-session copy of the working dir."""
    status, logs = _run_job(head, f"{sys.executable} -m workflows.cli ingest --dataset procedural "
                                         "--option count=4 --option size=64 --out rel/m.parquet")
    assert status == "FAILED", logs
    assert "error: relative local path" in logs
    assert "DEFECTFLOW_WORKDIR" in logs and "cluster/submit.sh" in logs
    assert "Traceback" not in logs


def test_relative_paths_resolve_against_defectflow_workdir(head, tmp_path):
    status, logs = _run_job(head, f"{sys.executable} -m workflows.cli ingest --dataset procedural "
                                         "--option count=4 --option size=64 --out rel/m.parquet",
                            env_vars={"DEFECTFLOW_WORKDIR": str(tmp_path)})
    assert status == "SUCCEEDED", logs
    assert manifest.read(str(tmp_path / "rel" / "m.parquet")).num_rows == 4


def test_a_driver_joins_when_the_job_sets_the_same_env_vars(head, tmp_path):
    """A job runtime_env naming env vars that init_ray would also set (the cause of "Failed to merge the Job's
    runtime env") still starts its driver; workers get the job's values and the cluster's address."""
    script = tmp_path / "driver.py"
    script.write_text(
        "import json, os\n"
        "import ray\n"
        "from workflows.runtime import init_ray\n"
        "init_ray()\n"
        "probe = ray.remote(lambda: {k: os.environ.get(k) for k in ('RAY_ADDRESS', 'AWS_DEFAULT_REGION')})\n"
        "seen = ray.get(probe.remote())\n"
        "print('WORKER ' + json.dumps({**seen, 'gcs': ray.get_runtime_context().gcs_address}))\n")
    status, logs = _run_job(head, f"{sys.executable} {script}",
                            env_vars={"RAY_TRAIN_V2_ENABLED": "1", "AWS_DEFAULT_REGION": "eu-west-1",
                                      "AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert status == "SUCCEEDED", logs
    seen = json.loads(next(line for line in logs.splitlines() if line.startswith("WORKER "))[len("WORKER "):])
    assert seen["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert seen["RAY_ADDRESS"] == seen["gcs"]


def test_driver_runtime_env_leaves_out_what_the_job_sets():
    from workflows.runtime import driver_runtime_env

    alone = driver_runtime_env(None)
    assert "AWS_DEFAULT_REGION" in alone["env_vars"] and "RAY_TRAIN_V2_ENABLED" not in alone["env_vars"]
    assert callable(alone["worker_process_setup_hook"])
    under_job = driver_runtime_env({"env_vars": {"AWS_DEFAULT_REGION": "eu-west-1", "RAY_TRAIN_V2_ENABLED": "1"},
                                    "worker_process_setup_hook": "my.hook"})
    assert not set(under_job.get("env_vars", {})) & {"AWS_DEFAULT_REGION", "RAY_TRAIN_V2_ENABLED"}
    assert "worker_process_setup_hook" not in under_job
