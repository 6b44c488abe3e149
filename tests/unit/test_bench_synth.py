"""`defectflow bench`: every synthesis generator runs on real requests and is reported (no speed is asserted), and
the command's variant options parse as documented."""

from __future__ import annotations

import pytest

from components.errors import ConfigError
from components.synthesis import bench as synth_bench
from workflows import bench


def test_bench_synth_reports_every_generator(tmp_path):
    res = synth_bench.bench_synth(size=64, count=2, steps=2)
    rows = {r["generator"]: r for r in res["results"]}
    assert list(rows) == list(synth_bench.SYNTH_GENERATORS)
    for name, r in rows.items():
        assert r["images"] == 2 and r["images_per_s"] > 0 and r["ms_per_image"] > 0, name
        assert r["changed"] == 2, f"{name} left an image unchanged"
    assert rows["ddpm"]["steps"] == 2 and rows["procedural"]["steps"] is None
    md = bench.to_markdown(res)
    assert "| cutpaste |" in md and "untrained weights" in md


def test_bench_synth_rejects_unknown_generators():
    with pytest.raises(ConfigError, match="unknown generator"):
        synth_bench.bench_synth(size=32, count=1, generators=["gan"])


def test_bench_targets_and_variants():
    targets = bench.targets()  # every family with a bench hook, then synth
    assert {"gmbinet", "supersimplenet"} <= set(targets) and targets[-1] == "synth"
    assert bench.parse_variants(None) is None
    assert bench.parse_variants(None, [1, 2]) == [{"n": 1}, {"n": 2}]  # --n N is --variant n=N
    assert bench.parse_variants(["n=2,blocks=[1, 1, 1, 1]", "backbone.name=resnet18,backbone.weights=random"],
                                [4]) == [{"n": 4}, {"n": 2, "blocks": [1, 1, 1, 1]},
                                         {"backbone": {"name": "resnet18", "weights": "random"}}]
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        bench.parse_variants(["n"])
    with pytest.raises(ConfigError, match="not to synth"):
        bench.run("synth", variants=[{"n": 2}])
    with pytest.raises(ConfigError, match="nothing to benchmark"):
        bench.run("patchcore")
