"""`defectflow bench synth`: every generator runs on real requests and is reported (no speed is asserted)."""

from __future__ import annotations

import pytest

from components.errors import ConfigError
from workflows import bench


def test_bench_synth_reports_every_generator(tmp_path):
    res = bench.bench_synth(size=64, count=2, steps=2)
    rows = {r["generator"]: r for r in res["results"]}
    assert list(rows) == list(bench.SYNTH_GENERATORS)
    for name, r in rows.items():
        assert r["images"] == 2 and r["images_per_s"] > 0 and r["ms_per_image"] > 0, name
        assert r["changed"] == 2, f"{name} left an image unchanged"
    assert rows["ddpm"]["steps"] == 2 and rows["procedural"]["steps"] is None
    md = bench.to_markdown(res)
    assert "| cutpaste |" in md and "untrained weights" in md


def test_bench_synth_rejects_unknown_generators():
    with pytest.raises(ConfigError, match="unknown generator"):
        bench.bench_synth(size=32, count=1, generators=["gan"])
