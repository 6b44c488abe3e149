"""Importing the GMBINet authors' checkpoints: layout, numerical equivalence, artifact output, error messages.

The real checkpoints are not redistributable, so the tests use a random state_dict in the authors' layout. A small
independent re-implementation of the authors' architecture under *their* module names (written from the
description in the methods notes) proves the mapping is right numerically, not just by shape: several of their
tensors share a shape (the four GMBI branches, the two 16-channel side heads), so a shape check alone would not
catch a swapped pair.
"""

from __future__ import annotations

import ast
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from components import artifact
from components.errors import WeightsError
from components.models.gmbinet import GMBINet, GMBINetDetector, GMBINetParams
from components.models.gmbinet.convert import (
    authors_layout_random_state_dict,
    convert_authors_state_dict,
    import_authors_checkpoint,
)
from components.models.gmbinet.detector import authors_preprocessing

KEYS_FILE = "/work/shared/notes/gmbinet_authors_checkpoint_keys.txt"


# ------------------------------------------------------------------ the authors' layout, re-implemented for testing


def _cbr(cin: int, cout: int, k: int = 1, stride: int = 1, dil: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, dil * (k - 1) // 2, dil, groups), nn.BatchNorm2d(cout), nn.ReLU()]


class _Seq(nn.Module):
    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return self.conv(x)


class _Gmbi(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        for i in range(4):
            setattr(self, f"conv{i}", nn.Sequential(*_cbr(c // 4, c // 4, 3, dil=i + 1, groups=c // 4)))
        self.fusion = nn.Sequential(*_cbr(c, c))

    def forward(self, x):
        x0, x1, x2, x3 = torch.split(x, x.shape[1] // 4, dim=1)
        y0 = self.conv0(x0)
        y1 = self.conv1(torch.sigmoid(y0) * x1 + x1)
        y2 = self.conv2(torch.sigmoid(y1) * x2 + x2)
        y3 = self.conv3(torch.sigmoid(y2) * x3 + x3)
        e = [torch.sigmoid(y1) * y0 + y0, torch.sigmoid(y2) * y1 + y1, torch.sigmoid(y3) * y2 + y2, y3]
        return self.fusion(torch.cat(e, 1)) + x


class _AuthorsLayoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        ch = (16, 32, 64, 96, 128)
        self.encoder1 = nn.Sequential(*_cbr(3, 16, 3, stride=2))
        for k, nb in zip(range(2, 6), (3, 4, 6, 3), strict=True):
            cin, cout = ch[k - 2], ch[k - 1]
            down = _Seq(*_cbr(cin, cin, 3, stride=2, groups=cin), *_cbr(cin, cout))
            setattr(self, f"encoder{k}", nn.Sequential(down, *(_Gmbi(cout) for _ in range(nb))))
        self.decoder5 = _Seq(*_cbr(128, 96))
        for level, (cin, cout) in zip((4, 3, 2, 1), ((96, 64), (64, 32), (32, 16), (16, 16)), strict=True):
            setattr(self, f"decoder{level}", _Seq(*_cbr(cin, cout)))  # declared but unused, as in theirs
        for level, (cin, cout) in zip((4, 3, 2, 1), ((96, 64), (64, 32), (32, 16), (16, 16)), strict=True):
            setattr(self, f"DF{level}", _Seq(*_cbr(cin, cin, 3, groups=cin), *_cbr(cin, cout)))
        for k, c in enumerate((16, 16, 32, 64, 96), start=1):
            setattr(self, f"conv_out{k}", nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(c, 1, 1)))
        self.conv_final = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(5, 1, 3, padding=1))  # unused

    def forward(self, x):
        e1 = self.encoder1(x)
        e2 = self.encoder2(e1)
        e3 = self.encoder3(e2)
        e4 = self.encoder4(e3)
        e5 = self.encoder5(e4)
        d5 = self.decoder5(e5)
        d4 = self.DF4(e4 + F.interpolate(d5, size=e4.shape[2:]))
        d3 = self.DF3(e3 + F.interpolate(d4, size=e3.shape[2:]))
        d2 = self.DF2(e2 + F.interpolate(d3, size=e2.shape[2:]))
        d1 = self.DF1(e1 + F.interpolate(d2, size=e1.shape[2:]))
        heads = (self.conv_out1, self.conv_out2, self.conv_out3, self.conv_out4, self.conv_out5)
        return [F.interpolate(h(d), size=x.shape[2:]) for h, d in zip(heads, (d1, d2, d3, d4, d5), strict=True)]


def _notes_layout() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    with open(KEYS_FILE) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                key, shape = line.rstrip("\n").split("\t")
                rows.append((key, tuple(ast.literal_eval(shape))))
    return rows


# ------------------------------------------------------------------------------------------------------ tests


def test_random_state_dict_has_the_authors_layout():
    sd = authors_layout_random_state_dict(0)
    assert len(sd) == 726
    assert list(sd) == list(_AuthorsLayoutNet().state_dict())
    if not os.path.exists(KEYS_FILE):
        pytest.skip(f"{KEYS_FILE} is not available")
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == _notes_layout()


def test_conversion_is_numerically_exact():
    sd = authors_layout_random_state_dict(1)
    theirs = _AuthorsLayoutNet()
    theirs.load_state_dict(sd, strict=True)
    ours = GMBINet()
    ours.load_state_dict(convert_authors_state_dict(sd), strict=True)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected, got = theirs.eval()(x), ours.eval()(x)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_import_writes_a_loadable_artifact(tmp_path):
    sd = authors_layout_random_state_dict(2)
    ckpt = tmp_path / "GMBINet-SDSaliency900.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, ckpt)  # wrapped, DataParallel-style
    uri = import_authors_checkpoint(str(ckpt), str(tmp_path / "artifact"))
    loaded, meta = artifact.load(uri)
    assert meta["family"] == "gmbinet" and meta["threshold"] == 0.5
    assert meta["lineage"]["imported_from"] == str(ckpt) and meta["lineage"]["source"] == "authors' release"
    assert meta["input_size"] == [512, 512] and meta["normalization"]["scale_by_max"] is True
    assert loaded.params.side_output == 0

    direct = GMBINetDetector(GMBINetParams(), authors_preprocessing())
    direct.net.load_state_dict(convert_authors_state_dict(sd), strict=True)
    direct.eval()
    x = torch.rand(1, 3, 48, 40)
    with torch.no_grad():
        a, b = loaded(x), direct(x)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map, rtol=0, atol=0)
    torch.testing.assert_close(a.score, b.score, rtol=0, atol=0)


def test_unused_modules_are_optional():
    sd = {k: v for k, v in authors_layout_random_state_dict(3).items()
          if not k.startswith(("decoder1", "decoder2", "decoder3", "decoder4", "conv_final"))}
    assert len(convert_authors_state_dict(sd)) == len(GMBINet().state_dict())


def test_missing_and_unexpected_keys_are_reported():
    sd = authors_layout_random_state_dict(4)
    del sd["encoder3.2.conv1.0.weight"]
    sd["classifier.weight"] = torch.zeros(3)
    with pytest.raises(WeightsError, match=r"1 tensors missing.*encoder3\.2\.conv1\.0\.weight.*classifier\.weight"):
        convert_authors_state_dict(sd)


def test_wrong_shapes_are_reported():
    sd = authors_layout_random_state_dict(5)
    sd["DF2.conv.3.weight"] = torch.zeros(8, 32, 1, 1)
    with pytest.raises(WeightsError, match=r"DF2\.conv\.3\.weight"):
        convert_authors_state_dict(sd)


def test_unreadable_checkpoints_are_user_errors(tmp_path):
    bad = tmp_path / "not-a-checkpoint.pt"
    bad.write_bytes(b"definitely not a zip file")
    with pytest.raises(WeightsError, match="cannot read"):
        import_authors_checkpoint(str(bad), str(tmp_path / "out"))
    whole_model = tmp_path / "pickled-module.pt"
    torch.save(nn.Linear(2, 2), whole_model)  # a pickled module: refused by weights_only=True
    with pytest.raises(WeightsError, match="cannot read"):
        import_authors_checkpoint(str(whole_model), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- opt-in: a real authors' checkpoint

REAL_CHECKPOINT = os.environ.get("DEFECTFLOW_GMBINET_CHECKPOINT")


@pytest.mark.skipif(not REAL_CHECKPOINT, reason="set DEFECTFLOW_GMBINET_CHECKPOINT=<path to the authors' .pt> "
                                               "(e.g. GMBINet-SDSaliency900.pt) to run it")
def test_a_real_authors_checkpoint_imports_and_segments_sd900(tmp_path, shared_datasets):
    """The converter against the authors' own file, not only our re-implementation of their layout: every tensor
    maps, and the imported model segments SD-saliency-900 as the paper says it does (mean IoU about 0.87-0.89)."""
    import numpy as np

    from components.data import adapters, manifest
    from components.inference import infer
    from components.metrics.sample import confusion, iou_from_counts

    uri = import_authors_checkpoint(REAL_CHECKPOINT, str(tmp_path / "authors"))
    det, meta = artifact.load(uri)
    assert meta["lineage"]["imported_from"].endswith(os.path.basename(REAL_CHECKPOINT))
    rows = adapters.ingest("sd_saliency_900", str(shared_datasets / "sd_saliency_900")).to_pylist()[::10]
    ious = []
    for r in rows:
        _, prob = infer(det, manifest.load_image(r))
        tp, fp, fn, _ = confusion(prob >= meta["pixel_threshold"], manifest.load_mask(r))
        ious.append(iou_from_counts(tp, fp, fn))
    assert float(np.mean(ious)) > 0.8, f"mean IoU {np.mean(ious):.3f} on {len(ious)} SD-900 images"
