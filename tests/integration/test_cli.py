"""The `defectflow` command as a user runs it: exit codes and messages for bad input (real subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflows.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=240)


def test_help_lists_every_command():
    from workflows.cli import MODULES, build_parser

    r = cli("--help")
    assert r.returncode == 0
    expected = ("ingest", "synthesize", "train-synth", "export-dataset", "features", "train", "evaluate", "predict",
                "sweep", "serve", "promote", "import-weights", "export", "bench", "demo")
    assert len(MODULES) == len(expected)
    parser = build_parser()
    for cmd in expected:  # every command is listed and has its own help
        assert f"\n    {cmd}" in r.stdout, cmd
        with pytest.raises(SystemExit) as done:
            parser.parse_args([cmd, "--help"])
        assert done.value.code == 0
    # `python -m workflows.<step>` is the same command
    r = subprocess.run([sys.executable, "-m", "workflows.import_weights", "--help"], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0 and "gmbinet" in r.stdout


def test_malformed_yaml_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: [unclosed\n")
    r = cli("train", "--config", str(bad))
    assert r.returncode == 2 and "not valid YAML" in r.stderr and "Traceback" not in r.stderr


def test_unknown_and_missing_keys_are_named(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\ndata: {manifest: m.parquet, colour: red}\noptim: {epochs: 0}\n")
    r = cli("train", "--config", str(cfg))
    assert r.returncode == 2
    assert "data.colour: unknown key" in r.stderr and "optim.epochs" in r.stderr
    r = cli("train", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_missing_manifest_fails_before_training(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: x\nstorage: {{root: {tmp_path}}}\ndata: {{manifest: {tmp_path}/none.parquet}}\n")
    r = cli("train", "--config", str(cfg), "--set", "ray.num_cpus=1")
    assert r.returncode == 2 and "none.parquet" in r.stderr


def test_bad_set_override():
    r = cli("train", "--config", "workflows/configs/gmbinet_procedural.yaml", "--set", "optim.epochs")
    assert r.returncode == 2 and "key=value" in r.stderr


def test_ingest_procedural_and_python_m_entry(tmp_path):
    out = tmp_path / "m.parquet"
    r = subprocess.run([sys.executable, "-m", "workflows.ingest", "--dataset", "procedural", "--option", "count=12",
                        "--option", "size=64", "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.exists() and "rows" in r.stdout
    r = cli("ingest", "--dataset", "nosuch", "--out", str(out))
    assert r.returncode == 2 and "unknown dataset layout" in r.stderr


def test_predict_with_missing_model(tmp_path):
    r = cli("predict", "--model", str(tmp_path / "none"), "--input", str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no model artifact" in r.stderr


def test_import_weights_rejects_garbage(tmp_path):
    f = tmp_path / "w.pt"
    f.write_bytes(b"garbage")
    r = cli("import-weights", "gmbinet", str(f), str(tmp_path / "art"))
    assert r.returncode == 2 and "error:" in r.stderr


def test_import_weights_from_an_authors_layout_checkpoint(tmp_path):
    import torch

    from components import artifact
    from components.models.gmbinet.convert import authors_layout_random_state_dict

    ckpt = tmp_path / "GMBINet-SDSaliency900.pt"
    torch.save(authors_layout_random_state_dict(seed=1), ckpt)
    r = cli("import-weights", "gmbinet", str(ckpt), str(tmp_path / "art"))
    assert r.returncode == 0, r.stderr
    det, meta = artifact.load(str(tmp_path / "art"))
    assert meta["input_size"] == [512, 512] and meta["normalization"]["scale_by_max"] is True
    assert meta["threshold"] == 0.5 and meta["lineage"]["imported_from"].endswith("GMBINet-SDSaliency900.pt")
    assert det.params.side_output == 0


def test_promote_points_an_alias_and_refuses_names_that_escape(tmp_path):
    from components import artifact, catalog
    from tests.helpers import random_artifact

    root = tmp_path / "store"
    layout = catalog.Layout(str(root))
    for i in range(2):
        artifact.register(random_artifact(str(tmp_path / f"a{i}"), size=32), layout, "parts")
    r = cli("promote", "--root", str(root), "--name", "parts", "--version", "latest")
    assert r.returncode == 0, r.stderr
    assert "parts@production -> version 2" in r.stdout
    assert json.loads((root / "models" / "parts" / "aliases.json").read_text()) == {"production": "2"}
    r = cli("promote", "--root", str(root), "--name", "parts", "--version", "7")
    assert r.returncode == 2 and "no version 7" in r.stderr
    r = cli("promote", "--root", str(root), "--name", "../../escaped", "--version", "1")
    assert r.returncode == 2 and "invalid model name" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "escaped").exists() and not (root.parent.parent / "escaped").exists()


def test_evaluate_calibrate_stores_the_threshold_and_writes_the_report(tmp_path):
    from components import artifact
    from tests.helpers import procedural_manifest, random_artifact

    man = procedural_manifest(str(tmp_path / "m.parquet"), count=24, size=32)
    art = random_artifact(str(tmp_path / "art"), size=32, threshold=0.5)
    r = cli("evaluate", "--model", art, "--manifest", man, "--split", "test", "--calibrate", "--out",
            str(tmp_path / "report"), "--set", "ray.num_cpus=2")
    assert r.returncode == 0, r.stderr
    info = artifact.read_meta(art)["threshold_info"]
    assert info["rule"] in ("f1_max", "max_normal") and info["split"] == "val"
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["decision_threshold"] == artifact.read_meta(art)["threshold"]
    assert list((tmp_path / "report" / "logs").glob("evaluate-*.log"))  # the full log kept with the report
