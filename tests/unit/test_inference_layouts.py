"""Inference layouts: squash, letterbox and tiling of large, elongated images (one code path for evaluate, predict
and the endpoint). A probe detector whose map is the image's red channel shows exactly what each layout keeps."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from components.inference import infer, tile_starts
from components.models.base import Detector, Postprocessing, Preprocessing


class RedChannel(Detector):
    """The map is the input's red channel, un-normalised: a perfect 'detector' of whatever is drawn in red."""

    family = "probe"

    def raw_map(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :1] * self._std[:, :1] + self._mean[:, :1]).clamp(0, 1)


def probe(**pre) -> RedChannel:
    return RedChannel(Preprocessing(input_size=(64, 64), **pre), Postprocessing()).eval()


def crack(h=200, w=500) -> np.ndarray:
    """An elongated image with a hair-thin (1 px) diagonal crack."""
    img = np.zeros((h, w, 3), np.float32)
    for x in range(w):
        img[int(x * (h - 1) / (w - 1)), x, 0] = 1.0
    return img


@pytest.mark.parametrize(("length", "tile", "overlap"), [(500, 64, 0.25), (1250, 256, 0.5), (64, 64, 0.25),
                                                         (65, 64, 0.0)])
def test_tiles_cover_the_image_with_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] == length - tile
    assert all(0 < b - a <= tile * (1 - overlap) for a, b in itertools.pairwise(starts))


def test_tiling_keeps_a_thin_crack_that_squashing_erases():
    img = crack()
    gt = img[:, :, 0] > 0.5
    score_t, tiled = infer(probe(layout="tile"), img)
    assert tiled.shape == gt.shape and np.allclose(tiled, img[:, :, 0], atol=1e-5)  # native resolution: exact
    assert score_t == pytest.approx(1.0)
    _, squashed = infer(probe(), img)
    assert squashed.shape == gt.shape and squashed[gt].mean() < 0.5 < tiled[gt].mean()  # 500x200 -> 64x64 -> back


def test_letterbox_keeps_the_aspect_ratio_and_the_image_size():
    img = np.zeros((60, 240, 3), np.float32)
    img[20:40, 100:140, 0] = 1.0  # a square defect stays a square
    _, m = infer(probe(layout="letterbox"), img)
    assert m.shape == (60, 240)
    inside, outside = m[24:36, 104:136], np.concatenate([m[:, :90].ravel(), m[:, 150:].ravel()])
    assert inside.min() > 0.9 and outside.max() < 0.1


def test_tile_options_scale_and_score():
    img = crack(100, 300)
    _, half = infer(probe(layout="tile", tile_scale=0.5), img)
    assert half.shape == (100, 300) and half.max() > 0.3  # tiles at half resolution, map back at full size
    small = np.zeros((20, 30, 3), np.float32)
    small[5, 5, 0] = 1.0
    s, m = infer(probe(layout="tile"), small)  # smaller than a tile: reflected padding, cropped away again
    assert m.shape == (20, 30) and m[5, 5] == pytest.approx(1.0) and s == pytest.approx(1.0)
    s_tiles, _ = infer(probe(layout="tile", tile_score="tiles"), img)
    assert s_tiles == pytest.approx(1.0)


def test_training_rows_follow_the_layout(tmp_path):
    """Training sees what inference will: the same tile grid (labels from each tile's own mask, a tile of a
    defective image without a mask is unknown-not-normal) or the same letterbox."""
    from components.data import manifest
    from components.data.loading import UNKNOWN_NOT_NORMAL, prepare_rows_checked
    from tests.helpers import procedural_manifest

    rows = manifest.read(procedural_manifest(str(tmp_path / "m.parquet"), count=8, size=96, seed=3,
                                             defect_fraction=0.5)).to_pylist()
    defective = next(r for r in rows if r["label"] == 1 and r["supervision"] == "pixel")
    tiles = prepare_rows_checked([defective], (64, 64), layout="tile", tile_overlap=0.5)
    assert tiles["image"].shape == (4, 3, 64, 64) and tiles["ok"].all()  # 96 px, tile 64, overlap 0.5: 2 x 2
    assert list(tiles["sample_id"]) == [f"{defective['sample_id']}#{y},{x}" for y in (0, 32) for x in (0, 32)]
    assert (tiles["label"] == tiles["mask"].reshape(4, -1).max(axis=1)).all() and tiles["has_mask"].all()
    weak = {**defective, "supervision": "image"}
    assert (prepare_rows_checked([weak], (64, 64), layout="tile")["label"] == UNKNOWN_NOT_NORMAL).all()
    boxed = prepare_rows_checked([defective], (64, 64), layout="letterbox")
    assert boxed["image"].shape == (1, 3, 64, 64) and boxed["mask"].shape == (1, 1, 64, 64)
