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
SD900 = REPO.parent / "shared" / "datasets" / "sd_saliency_900"
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


@pytest.mark.skipif(not DATASET.is_dir(), reason="needs ../shared/datasets/magnetic_tile")
def test_append_adds_seeds_to_a_committed_experiment(tmp_path):
    results, store = tmp_path / "results", tmp_path / "store"
    env = dict(SMOKE="1", RESULTS_DIR=str(results), DEFECTFLOW_ROOT=str(store), ROWS="weak")
    for extra in ({"SEEDS": "0"}, {"SEEDS": "1", "APPEND": "1"}):
        r = _reproduce(tmp_path, "mt-ssn-seeds", **env, **extra)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exp = results / "mt-ssn-seeds"
    table = json.loads((exp / "table.json").read_text())
    assert table["weak"]["seeds"] == [0, 1] and len(table["weak"]["image_auroc"]["values"]) == 2
    assert "| weak | 2 |" in (exp / "table.md").read_text()
    commands = (exp / "commands.txt").read_text()
    assert "seed=0" in commands and "seed=1" in commands  # the first run's commands were kept
    assert len((exp / "machine.txt").read_text().splitlines()) == 10  # one 5-line block per invocation


@pytest.mark.skipif(not SD900.is_dir(), reason="needs ../shared/datasets/sd_saliency_900")
def test_the_sd900_ablation_is_cumulative_and_keeps_its_row_order(tmp_path):
    results, store = tmp_path / "results", tmp_path / "store"
    r = _reproduce(tmp_path, "sd900-ablation", SMOKE="1", RESULTS_DIR=str(results), DEFECTFLOW_ROOT=str(store),
                   ROWS="onecycle augment")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exp = results / "sd900-ablation"
    assert (exp / "rows.txt").read_text().split() == ["onecycle", "augment"]
    table = (exp / "table.md").read_text()
    assert table.index("| onecycle |") < table.index("| augment |")  # run order, not alphabetical
    assert " MAE " in table.splitlines()[0]
    trains = [line for line in (exp / "commands.txt").read_text().splitlines() if " train " in line]
    assert len(trains) == 2
    # cumulative: the augment row keeps the native size and one-cycle schedule of the rows before it
    assert "optim.lr_schedule=onecycle" in trains[1] and "data.augment.rot90=true" in trains[1]
    assert trains[1].rindex("data.image_size=[200,200]") > trains[1].rindex("data.image_size=[256,256]")
    assert "data.augment.rot90=true" not in trains[0]
    for row in ("onecycle", "augment"):
        metrics = json.loads((exp / f"{row}-seed42" / "metrics.json").read_text())
        assert metrics["split"] == "test" and metrics["iou"] is not None
