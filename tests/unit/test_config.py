"""Config loading: YAML + --set overrides, unknown keys, clear messages, path normalisation."""

from __future__ import annotations

import os

import pytest

from components import config as cfgmod
from components.config import IngestConfig, SweepConfig, TrainConfig
from components.errors import ConfigError


def test_overrides_are_typed_and_nested():
    o = cfgmod.parse_overrides(["optim.epochs=3", "model.params.n=8", "data.image_size=[64, 96]", "x.flag=true",
                                "x.none=null", "name=run-1"])
    assert o == {"optim": {"epochs": 3}, "model": {"params": {"n": 8}}, "data": {"image_size": [64, 96]},
                 "x": {"flag": True, "none": None}, "name": "run-1"}
    with pytest.raises(ConfigError, match="key=value"):
        cfgmod.parse_overrides(["optim.epochs"])
    with pytest.raises(ConfigError, match="empty key"):
        cfgmod.parse_overrides(["a..b=1"])


def test_load_merges_file_and_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("name: r\ndata: {manifest: rel/m.parquet}\noptim: {epochs: 5}\n")
    cfg = cfgmod.load(TrainConfig, str(tmp_path / "c.yaml"), ["optim.epochs=2", "scaling.use_gpu=false"])
    assert cfg.optim.epochs == 2 and cfg.scaling.use_gpu is False
    assert cfg.data.manifest == os.path.join(str(tmp_path), "rel/m.parquet")  # made absolute for Ray workers
    assert cfg.storage.root == os.path.join(str(tmp_path), "defectflow-data")
    assert cfg.data.image_size == (256, 256) and cfg.model.family == "gmbinet"


def test_errors_name_every_bad_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        cfgmod.validate(TrainConfig, {"name": "bad name!", "data": {"manifest": "m", "colour": 1},
                                      "optim": {"epochs": 0}}, "cfg")
    msg = e.value.message
    assert "name:" in msg and "data.colour: unknown key" in msg and "optim.epochs" in msg
    with pytest.raises(ConfigError, match="data: required key is missing"):
        cfgmod.validate(TrainConfig, {"name": "x"}, "cfg")


def test_regime_mixed_needs_a_mask_count():
    with pytest.raises(ConfigError, match="mixed_masks"):
        cfgmod.validate(TrainConfig, {"name": "x", "data": {"manifest": "m", "regime": "mixed"}})
    cfg = cfgmod.validate(TrainConfig, {"name": "x", "data": {"manifest": "m", "regime": "mixed", "mixed_masks": 5}})
    assert cfg.data.mixed_masks == 5


def test_yaml_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        cfgmod.read_yaml(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        cfgmod.read_yaml(tmp_path / "b.yaml")
    assert cfgmod.read_yaml(_empty(tmp_path)) == {}


def _empty(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text("")
    return p


def test_split_fractions_and_sweep_space():
    with pytest.raises(ConfigError, match="sum to 1"):
        cfgmod.validate(IngestConfig, {"dataset": "folder", "split": {"train": 0.5, "val": 0.1, "test": 0.1}})
    with pytest.raises(ConfigError, match="exactly one of"):
        cfgmod.validate(SweepConfig, {"name": "s", "train": {}, "space": {"a": {"grid": [1], "choice": [2]}}})
    with pytest.raises(ConfigError, match=r"\[low, high\]"):
        cfgmod.validate(SweepConfig, {"name": "s", "train": {}, "space": {"a": {"uniform": [1, 2, 3]}}})


def test_ready_configs_validate():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[2] / "workflows" / "configs"
    assert cfgmod.load(TrainConfig, str(configs / "gmbinet_procedural.yaml")).model.family == "gmbinet"
    assert cfgmod.load(TrainConfig, str(configs / "gmbinet_sd900.yaml")).optim.lr_schedule == "cosine"
    tiles = cfgmod.load(TrainConfig, str(configs / "gmbinet_crackforest_tile.yaml"))
    assert tiles.model.preprocessing == {"layout": "tile", "tile_overlap": 0.25, "tile_scale": 1.0}
    paper = cfgmod.load(TrainConfig, str(configs / "gmbinet_sd900_paper.yaml"))  # the authors' released recipe
    assert (paper.data.image_size, paper.optim.batch_size, paper.optim.epochs, paper.optim.lr_schedule,
            paper.data.augment.hflip) == ((512, 512), 32, 800, "none", False)
    assert cfgmod.load(IngestConfig, str(configs / "ingest_sd900.yaml")).dataset == "sd_saliency_900"
    assert cfgmod.load(SweepConfig, str(configs / "sweep_gmbinet_procedural.yaml")).metric == "val_iou_pooled"


def test_pixel_threshold_and_checkpoint_smoothing_keys():
    base = {"name": "r", "data": {"manifest": "m"}}
    cfg = cfgmod.validate(TrainConfig, base, "cfg")
    assert cfg.eval.threshold == "auto" and cfg.eval.provisional_threshold() == 0.5
    assert cfg.checkpoint.smoothing == "auto" and cfg.optim.grad_clip_per_group is True
    fixed = cfgmod.validate(TrainConfig, {**base, "eval": {"threshold": 0.3}}, "cfg")
    assert fixed.eval.provisional_threshold() == 0.3
    with pytest.raises(ConfigError) as e:
        cfgmod.validate(TrainConfig, {**base, "eval": {"threshold": 1.5}, "checkpoint": {"smoothing": 0}}, "cfg")
    assert "eval.threshold" in e.value.message and "checkpoint.smoothing" in e.value.message
