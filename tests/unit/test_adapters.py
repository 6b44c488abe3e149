"""Dataset adapters on fixtures in each exact layout, on an S3 copy, and on the real shared datasets."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from PIL import Image

from components import storage
from components.data import adapters, manifest
from components.data.adapters import crackforest as cf
from components.data.images import decode_mask
from components.errors import ConfigError, DataError
from tests.fixtures import datasets as fx


def _rows(table) -> dict[str, dict]:
    return {r["sample_id"]: r for r in table.to_pylist()}


# -------------------------------------------------------------------------------------------- registry


def test_registry_and_descriptions():
    assert set(adapters.ADAPTERS) == {"folder", "sd_saliency_900", "magnetic_tile", "crackforest", "procedural",
                                      "kolektorsdd", "kolektorsdd2", "mvtec_ad", "bsdata", "neu_det"}
    for name, ad in adapters.ADAPTERS.items():
        assert ad.name == name and len(ad.description) > 80
        assert ad.Options.model_config.get("extra") == "forbid"
    with pytest.raises(ConfigError, match="unknown dataset layout"):
        adapters.ingest("nosuch", "/tmp")


def test_unknown_option_is_rejected(tmp_path):
    fx.build_folder(tmp_path)
    with pytest.raises(ConfigError, match="good_dirz"):
        adapters.ingest("folder", str(tmp_path), options={"good_dirz": ["ok"]})


def test_missing_and_empty_roots(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        adapters.ingest("folder", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError) as e:
        adapters.ingest("folder", str(tmp_path / "empty"))
    assert "expected layout" in str(e.value) and "good/" in str(e.value)
    with pytest.raises(DataError, match="Source Images"):
        adapters.ingest("sd_saliency_900", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="needs a root"):
        adapters.ingest("magnetic_tile", None)


# ---------------------------------------------------------------------------------------------- folder


def test_folder_layout(tmp_path):
    root = fx.build_folder(tmp_path / "parts")
    table = adapters.ingest("folder", str(root))
    rows = _rows(table)
    assert table.num_rows == 8  # 3 good, 2 scratch, 1 dent, 2 unlabeled; stray, hidden and orphan mask ignored
    assert all(r["dataset"] == "parts" for r in rows.values())
    g = rows["parts/good/g0"]
    assert g["label"] == 0 and g["supervision"] == "pixel" and g["defect_class"] is None and g["mask_uri"] is None
    assert (g["width"], g["height"]) == (24, 16)
    s0, s1 = rows["parts/scratch/s0"], rows["parts/scratch/s1"]
    assert s0["label"] == 1 and s0["defect_class"] == "scratch" and s0["supervision"] == "pixel"
    assert s0["mask_uri"] == str(root / "masks" / "scratch" / "s0.png")
    assert s1["supervision"] == "image" and s1["mask_uri"] is None
    d0 = rows["parts/dent/lot1/d0"]
    assert d0["defect_class"] == "dent" and d0["mask_uri"].endswith("masks/dent/lot1/d0.png")
    u = rows["parts/unlabeled/u1"]
    assert u["label"] is None and u["supervision"] == "none"
    assert set(table["split"].to_pylist()) <= set(manifest.SPLITS)
    mask = manifest.load_mask(s0, (s0["height"], s0["width"]))
    assert mask.sum() == 12


def test_folder_keeps_authors_split_and_mask_suffix(tmp_path):
    root = fx.build_folder(tmp_path / "p", splits=True, mask_suffix="_mask")
    table = adapters.ingest("folder", str(root), options={"mask_suffix": "_mask"})
    rows = _rows(table)
    assert table.num_rows == 14
    assert all(sid.split("/")[1] == r["split"] for sid, r in rows.items())
    assert rows["p/test/scratch/s0"]["mask_uri"].endswith("test/masks/scratch/s0_mask.png")
    assert rows["p/train/dent/lot1/d0"]["supervision"] == "pixel"
    # without the suffix option the masks do not match: defective rows fall back to image supervision
    plain = _rows(adapters.ingest("folder", str(root)))
    assert plain["p/test/scratch/s0"]["supervision"] == "image"


def test_folder_custom_good_dirs_from_csv_string(tmp_path):
    for i in range(2):
        fx.write_image(tmp_path / "OK" / f"a{i}.png", seed=i)
    fx.write_image(tmp_path / "NG" / "b.png")
    table = adapters.ingest("folder", str(tmp_path), dataset_name="line3", options={"good_dirs": "OK,normal"})
    rows = _rows(table)
    assert rows["line3/OK/a0"]["label"] == 0 and rows["line3/NG/b"]["defect_class"] == "NG"


def test_splits_are_deterministic_and_seeded(tmp_path):
    for i in range(40):
        fx.write_image(tmp_path / "good" / f"g{i:02d}.png", size=(8, 8), seed=i)
    for i in range(20):
        fx.write_image(tmp_path / "scratch" / f"s{i:02d}.png", size=(8, 8), seed=100 + i)
    a = adapters.ingest("folder", str(tmp_path), dataset_name="d")
    b = adapters.ingest("folder", str(tmp_path), dataset_name="d")
    c = adapters.ingest("folder", str(tmp_path), dataset_name="d", seed=1)
    assert a.equals(b)
    assert a["split"].to_pylist() != c["split"].to_pylist()
    assert Counter(a["split"].to_pylist()) == {"train": 42, "val": 6, "test": 12}  # stratified per class
    halves = adapters.ingest("folder", str(tmp_path), dataset_name="d",
                             split_fractions={"train": 0.5, "val": 0.0, "test": 0.5})
    assert Counter(halves["split"].to_pylist()) == {"train": 30, "test": 30}


def test_duplicate_stems_are_named(tmp_path):
    fx.write_image(tmp_path / "good" / "a.png")
    fx.write_image(tmp_path / "good" / "a.jpg", mode="RGB")
    with pytest.raises(DataError, match="same sample id"):
        adapters.ingest("folder", str(tmp_path))


def test_unreadable_and_oversized_images(tmp_path):
    fx.write_image(tmp_path / "good" / "a.png", size=(100, 100))
    with pytest.raises(DataError, match="above the limit"):  # nothing readable left: the reason is named
        adapters.ingest("folder", str(tmp_path), max_pixels=5000)
    (tmp_path / "good" / "b.png").write_bytes(b"not a png, a text file named .png")
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="JPEG")
    (tmp_path / "good" / "c.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])  # cut: header intact
    scan = adapters.scan_dataset("folder", str(tmp_path))
    assert scan.table["sample_id"].to_pylist() == [f"{tmp_path.name}/good/a"]
    reasons = {r["sample_id"].rsplit("/", 1)[-1]: r["reason"] for r in scan.rejected}
    assert set(reasons) == {"b", "c"}
    assert "not a readable image" in reasons["b"] and "truncated" in reasons["c"].lower()
    unverified = adapters.scan_dataset("folder", str(tmp_path), verify=False)  # headers only: c passes
    assert len(unverified.table) == 2 and len(unverified.rejected) == 1


def test_embed_copies_bytes_and_keeps_provenance(tmp_path):
    root = fx.build_folder(tmp_path / "parts")
    table = adapters.ingest("folder", str(root), embed=True)
    assert pc.all(pc.is_null(table["image_uri"])).as_py() and pc.all(pc.is_null(table["mask_uri"])).as_py()
    rows = _rows(table)
    s0 = rows["parts/scratch/s0"]
    assert s0["image_bytes"] == (root / "scratch" / "s0.png").read_bytes()
    assert s0["mask_bytes"] == (root / "masks" / "scratch" / "s0.png").read_bytes()
    prov = json.loads(s0["provenance"])
    assert prov["image_uri"] == str(root / "scratch" / "s0.png") and prov["adapter"] == "folder"
    assert manifest.load_mask(s0).sum() == 12


@pytest.mark.s3
def test_s3_root_reads_like_local(tmp_path, s3_bucket):
    root = fx.build_folder(tmp_path / "parts")
    storage.upload_dir(str(root), f"{s3_bucket}/raw/parts")
    local = adapters.ingest("folder", str(root))
    remote = adapters.ingest("folder", f"{s3_bucket}/raw/parts")
    assert remote["sample_id"].to_pylist() == local["sample_id"].to_pylist()
    for col in ("split", "label", "width", "height", "defect_class", "supervision"):
        assert remote[col].to_pylist() == local[col].to_pylist(), col
    s0 = _rows(remote)["parts/scratch/s0"]
    assert s0["image_uri"] == f"{s3_bucket}/raw/parts/scratch/s0.png"
    assert manifest.load_mask(s0, (16, 24)).sum() == 12
    embedded = adapters.ingest("crackforest", _upload(fx.build_crackforest(tmp_path / "cf"), f"{s3_bucket}/cf"),
                               embed=True)
    assert embedded.num_rows == 4 and pc.all(pc.is_valid(embedded["image_bytes"])).as_py()
    # enough files for the threaded header reads and embedding
    sd = adapters.ingest("sd_saliency_900", _upload(fx.build_sd900(tmp_path / "sd", per_class=12), f"{s3_bucket}/sd"),
                         embed=True)
    assert sd.num_rows == 36 and set(sd["width"].to_pylist()) == {20}
    assert manifest.load_mask(sd.slice(0, 1).to_pylist()[0], (20, 20)).sum() == 12


def _upload(local: Path, uri: str) -> str:
    storage.upload_dir(str(local), uri)
    return uri


# ------------------------------------------------------------------------------------------ sd-saliency


def test_sd900_fixture(tmp_path):
    root = fx.build_sd900(tmp_path / "sd_saliency_900")
    table = adapters.ingest("sd_saliency_900", str(root))
    assert table.num_rows == 6
    assert Counter(table["defect_class"].to_pylist()) == {"inclusion": 2, "patches": 2, "scratches": 2}
    rows = _rows(table)
    r = rows["sd_saliency_900/Source Images/Pa_2"]
    assert r["label"] == 1 and r["supervision"] == "pixel" and r["mask_uri"].endswith("Ground truth/Pa_2.png")
    assert (r["width"], r["height"]) == (20, 20)


# ----------------------------------------------------------------------------------------- magnetic tile


def test_magnetic_tile_fixture(tmp_path):
    root = fx.build_magnetic_tile(tmp_path / "mt")
    table = adapters.ingest("magnetic_tile", str(root))
    rows = _rows(table)
    assert table.num_rows == sum(fx.MT_CLASSES.values())
    free = [r for r in rows.values() if r["label"] == 0]
    assert len(free) == 3 and all(r["supervision"] == "pixel" and r["mask_uri"] for r in free)
    assert all(r["defect_class"] is None for r in free)
    assert manifest.load_mask(free[0]).sum() == 0
    assert Counter(r["defect_class"] for r in rows.values() if r["label"] == 1) == {"blowhole": 2, "crack": 1}
    crack = next(r for r in rows.values() if r["defect_class"] == "crack")
    assert crack["supervision"] == "image" and crack["mask_uri"] is None
    first = rows["mt/MT_Free/Imgs/exp1_num_1"]
    assert (first["width"], first["height"]) == (30, 20)


# ------------------------------------------------------------------------------------------- crackforest


def test_crackforest_fixture(tmp_path):
    root = fx.build_crackforest(tmp_path / "crackforest")
    table = adapters.ingest("crackforest", str(root))
    rows = _rows(table)
    assert table.num_rows == 4
    r1, r2, r3, r4 = (rows[f"crackforest/image/00{i}"] for i in range(1, 5))
    assert r1["label"] == 1 and r1["defect_class"] == "crack" and r1["supervision"] == "pixel"
    assert r1["mask_uri"] is None and r1["mask_bytes"] is not None
    m1 = decode_mask(r1["mask_bytes"])
    assert m1.shape == (32, 48) and m1.sum() == 38 and m1[10, 2:40].all()
    # label-3 island enclosed by crack stays background, the separate thin label-4 stroke is crack
    m2 = manifest.load_mask(r2, (32, 48))
    assert m2[28, 5:30].all() and not m2[18, 24] and m2.sum() == 38 + 40 + 25
    assert r3["label"] == 0 and r3["supervision"] == "pixel" and manifest.load_mask(r3).sum() == 0
    assert r4["label"] is None and r4["supervision"] == "none" and r4["mask_bytes"] is None
    assert json.loads(r1["provenance"])["mask_uri"].endswith("groundTruth/001.mat")


def test_crackforest_extra_segments_option_and_annotators(tmp_path):
    root = fx.build_crackforest(tmp_path / "cf")
    table = adapters.ingest("crackforest", str(root), options={"extra_segments": "background"})
    assert decode_mask(_rows(table)["cf/image/002"]["mask_bytes"]).sum() == 78
    table = adapters.ingest("crackforest", str(root), options={"extra_segments": "crack"})
    assert decode_mask(_rows(table)["cf/image/002"]["mask_bytes"]).sum() == 78 + 81 + 25
    multi = fx.write_crackforest_mat(tmp_path / "m.mat", fx.crack_segmentation(), annotators=2)
    assert cf.load_mask(str(multi)).sum() == 38 + 9  # union of both annotators


def test_crackforest_bad_mat(tmp_path):
    root = fx.build_crackforest(tmp_path / "cf")
    (root / "groundTruth" / "004.mat").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"004\.mat"):
        adapters.ingest("crackforest", str(root))
    import scipy.io

    scipy.io.savemat(str(root / "groundTruth" / "004.mat"), {"other": np.zeros((2, 2))})
    with pytest.raises(DataError, match="Segmentation"):
        adapters.ingest("crackforest", str(root))


# -------------------------------------------------------------------------------------------- procedural


def test_procedural_adapter():
    table = adapters.ingest("procedural", None, options={"count": 12, "size": 48, "defect_fraction": 0.5,
                                                         "textures": "cast,woven"})
    assert table.num_rows == 12 and Counter(table["label"].to_pylist()) == {0: 6, 1: 6}
    assert pc.all(pc.is_null(table["image_uri"])).as_py()
    rows = table.to_pylist()
    for r in rows:
        img = manifest.load_image(r)
        assert img.shape == (48, 48, 3)
        mask = manifest.load_mask(r, img.shape[:2])
        assert r["supervision"] == "pixel" and (mask.sum() > 0) == (r["label"] == 1)
        assert json.loads(r["provenance"])["texture"] in ("cast", "woven")
    assert rows[0]["sample_id"].startswith("procedural/") and rows[0]["dataset"] == "procedural"
    again = adapters.ingest("procedural", None, options={"count": 12, "size": 48, "textures": ["cast", "woven"]})
    assert manifest.digest(again) == manifest.digest(table)
    with pytest.raises(ConfigError, match="marble"):
        adapters.ingest("procedural", None, options={"textures": ["marble"]})
    with pytest.raises(ConfigError, match="size"):
        adapters.ingest("procedural", None, options={"size": 8})


# ------------------------------------------------------------------------------------- real shared datasets


@pytest.fixture(scope="module")
def real(shared_datasets):
    cache: dict[str, object] = {}

    def get(name: str, **kw):
        key = name + repr(sorted(kw.items()))
        if key not in cache:
            root = shared_datasets / name
            if not root.is_dir():
                pytest.skip(f"{root} is absent")
            cache[key] = adapters.ingest(name, str(root), **kw)
        return cache[key]

    return get


def _check_masks(table, n: int = 3) -> None:
    """A few masks decode with their image's size (full decodes of every image would be slow)."""
    with_mask = table.filter(pc.or_(pc.is_valid(table["mask_uri"]), pc.is_valid(table["mask_bytes"])))
    idx = np.linspace(0, with_mask.num_rows - 1, n).astype(int)
    for rec in with_mask.take(idx).to_pylist():
        img = manifest.load_image(rec)
        assert img.shape[:2] == (rec["height"], rec["width"])
        mask = manifest.load_mask(rec, img.shape[:2])
        assert mask is not None and (mask.sum() > 0) == (rec["label"] == 1)


def test_real_sd_saliency_900(real):
    t = real("sd_saliency_900")
    assert t.num_rows == 600
    assert Counter(t["defect_class"].to_pylist()) == {"inclusion": 200, "patches": 200, "scratches": 200}
    assert set(t["label"].to_pylist()) == {1} and set(t["supervision"].to_pylist()) == {"pixel"}
    assert pc.all(pc.is_valid(t["mask_uri"])).as_py()
    assert set(zip(t["width"].to_pylist(), t["height"].to_pylist(), strict=True)) == {(200, 200)}
    _check_masks(t)


def test_real_magnetic_tile(real):
    t = real("magnetic_tile")
    assert t.num_rows == 1344
    assert Counter(t["label"].to_pylist()) == {0: 952, 1: 392}
    assert Counter(c for c in t["defect_class"].to_pylist() if c) == {
        "blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103}
    assert set(t["supervision"].to_pylist()) == {"pixel"}
    _check_masks(t, 4)


def test_real_crackforest(real):
    t = real("crackforest")
    assert t.num_rows == 155
    assert pc.sum(pc.is_valid(t["mask_bytes"])).as_py() == 118
    assert Counter(t["label"].to_pylist()) == {1: 118, None: 37}
    sizes = Counter(zip(t["width"].to_pylist(), t["height"].to_pylist(), strict=True))
    assert sizes == {(480, 320): 153, (320, 480): 2}  # 328.jpg and 329.jpg (no ground truth) are portrait
    _check_masks(t)


@pytest.mark.parametrize("name", ["sd_saliency_900", "magnetic_tile", "crackforest"])
def test_real_splits_are_deterministic(real, name):
    a, b = real(name), real(name, seed=0)
    assert a["split"].to_pylist() == b["split"].to_pylist()
    c = real(name, seed=7)
    assert a["split"].to_pylist() != c["split"].to_pylist()
    counts = Counter(a["split"].to_pylist())
    assert abs(counts["train"] / a.num_rows - 0.7) < 0.03 and counts["val"] > 0 and counts["test"] > 0
