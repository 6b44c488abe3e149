"""End to end: `defectflow demo` (small) and a training run killed mid-way that resumes when re-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_demo_small(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "workflows.cli", "--json", "demo", "--out", str(out), "--images", "48",
                        "--size", "64", "--epochs", "2", "--sweep-epochs", "1", "--num-cpus", "2", "--port", "0"],
                       capture_output=True, text=True, cwd=REPO, timeout=1100)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "defectflow demo finished" in r.stdout
    res = json.loads(r.stdout[r.stdout.index("{\n"):])
    assert [s["step"] for s in res["steps"]] == ["ray", "ingest", "train", "sweep", "winner", "serve", "http"]
    assert 0.0 <= res["http"]["score"] <= 1.0
    # the served model is the best candidate on validation, whichever step made it, and it is `production`
    winner = res["winner"]
    assert winner["val"] == max(c["val"] for c in winner["candidates"] if c["val"] is not None)
    aliases = json.loads((out / "models" / "gmbinet" / "aliases.json").read_text())
    assert winner["uri"].endswith(f"/models/gmbinet/{aliases['production']}")
    # the console is for people: a line per step (and per epoch), Ray's own output in the demo's log file
    assert len(r.stderr.splitlines()) < 60, r.stderr
    for noise in ("Token authentication", "core_worker.cc", "RayDeprecationWarning", "split(", "Reporting training"):
        assert noise not in r.stderr + r.stdout, noise
    logs = list((out / "logs").glob("demo-*.log"))
    assert len(logs) == 1 and "Started a local Ray instance" in logs[0].read_text()
    assert (out / "reports" / "http_defect_map.png").exists()
    assert (out / "reports" / "gmbinet-procedural" / "sheet.png").exists()
    assert (out / "reports" / "sweep-demo" / "trials.md").exists()


def test_killed_training_resumes(tmp_path):
    from tests.helpers import procedural_manifest

    man = procedural_manifest(str(tmp_path / "m.parquet"), count=48, size=64)
    root = tmp_path / "store"
    args = [sys.executable, "-m", "workflows.cli", "train", "--config", "workflows/configs/gmbinet_procedural.yaml",
            "--set", f"storage.root={root}", "--set", f"data.manifest={man}", "--set", "data.image_size=[64,64]",
            "--set", "name=killme", "--set", "optim.epochs=12", "--set", "ray.num_cpus=2",
            "--set", "ray.progress_bars=false"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         start_new_session=True)
    run_dir = root / "runs" / "killme"
    deadline = time.time() + 600
    try:
        while time.time() < deadline and p.poll() is None:
            if len(list(run_dir.glob("checkpoint_*/model.safetensors"))) >= 2:
                break
            time.sleep(0.5)
        assert p.poll() is None, "training ended before it could be killed: " + (p.stdout.read() or "")[-3000:]
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "resuming run killme at epoch" in log, log[-3000:]
    history = json.loads((root / "reports" / "killme" / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 13))
