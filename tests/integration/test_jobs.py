"""`ray job submit`: a defectflow step submitted through the Jobs API of a local cluster."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from components.data import manifest

REPO = Path(__file__).resolve().parents[2]
RAY_DASHBOARD = True  # the Jobs API lives in the dashboard
pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]


def test_ingest_as_a_ray_job(ray_session, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(f"http://{ray_session.dashboard_url}")
    out = tmp_path / "m.parquet"
    job = client.submit_job(
        entrypoint=f"{sys.executable} -m workflows.cli ingest --dataset procedural --option count=10 "
                   f"--option size=64 --out {out}",
        runtime_env={"working_dir": str(REPO), "excludes": [".venv", "defectflow-data", "defectflow-demo"]},
        entrypoint_num_cpus=0.1)
    deadline = time.time() + 300
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            break
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs
    assert manifest.read(str(out)).num_rows == 10
