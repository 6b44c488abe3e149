"""`workflows/results/reproduce.sh` in smoke mode: the seeded Magnetic Tile experiment runs end to end with tiny
budgets on the real dataset and rebuilds its table from the raw per-run files, without touching the committed
results."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATASET = REPO.parent / "shared" / "datasets" / "magnetic_tile"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _reproduce(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "workflows/results/reproduce.sh", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=1100, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **env})


def test_smoke_mode_needs_its_own_results_folder(tmp_path):
    r = _reproduce(tmp_path, "mt-ssn-seeds", SMOKE="1")
    assert r.returncode == 2 and "RESULTS_DIR" in r.stderr


@pytest.mark.skipif(not DATASET.is_dir(), reason="needs ../shared/datasets/magnetic_tile")
def test_the_seeded_table_reproduces_in_smoke_mode(tmp_path):
    results, store = tmp_path / "results", tmp_path / "store"
    r = _reproduce(tmp_path, "mt-ssn-seeds", SMOKE="1", RESULTS_DIR=str(results), DEFECTFLOW_ROOT=str(store),
                   SEEDS="0", ROWS="full")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exp = results / "mt-ssn-seeds"
    metrics = json.loads((exp / "full-seed0" / "metrics.json").read_text())
    table = json.loads((exp / "table.json").read_text())
    assert table["full"]["seeds"] == [0]
    assert metrics["split"] == "test" and table["full"]["image_auroc"]["values"] == [metrics["image_auroc"]]
    assert "| full | 1 |" in (exp / "table.md").read_text()
    assert "optim.epochs=1" in (exp / "commands.txt").read_text()
    assert (store / "runs" / "mt-ssn-full-seed0").is_dir()  # the run lived in the smoke store, not the default
