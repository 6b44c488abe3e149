"""The KolektorSDD, KolektorSDD2, MVTec AD, BSData and NEU-DET adapters: fixtures in each exact layout, an S3
copy, and the real BSData in the shared datasets folder."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from components import storage
from components.data import adapters, manifest
from components.data.images import decode_mask
from components.errors import ConfigError, DataError
from tests.fixtures import datasets as fx

NEW = ("kolektorsdd", "kolektorsdd2", "mvtec_ad", "bsdata", "neu_det")


def _rows(table) -> dict[str, dict]:
    return {r["sample_id"]: r for r in table.to_pylist()}


def _prov(rec: dict) -> dict:
    return json.loads(rec["provenance"])


def _split_of(rows: dict[str, dict]) -> dict[str, str]:
    return {sid: r["split"] for sid, r in rows.items()}


@pytest.mark.parametrize("name", NEW)
def test_registered_described_and_empty_roots_fail(name, tmp_path):
    ad = adapters.ADAPTERS[name]
    assert ad.name == name and len(ad.description) > 200
    assert ad.Options.model_config.get("extra") == "forbid"
    (tmp_path / "notes.txt").write_text("nothing in the layout")
    fx.write_image(tmp_path / "loose.png")
    with pytest.raises(DataError) as e:
        adapters.ingest(name, str(tmp_path))
    assert "expected layout" in str(e.value)


# ------------------------------------------------------------------------------------------- kolektorsdd


def test_kolektorsdd_labels_from_bitmaps(tmp_path):
    root = fx.build_kolektorsdd(tmp_path / "ksdd")
    table = adapters.ingest("kolektorsdd", str(root))
    rows = _rows(table)
    assert table.num_rows == 2 * fx.KSDD_PARTS  # the stray root image is ignored
    defective = {tuple(sid.split("/")[1:]) for sid, r in rows.items() if r["label"] == 1}
    assert defective == fx.KSDD_DEFECTIVE
    d = rows["ksdd/kos03/Part0"]
    assert d["defect_class"] == "defect" and d["supervision"] == "pixel"
    assert d["mask_uri"] == str(root / "kos03" / "Part0_label.bmp") and (d["width"], d["height"]) == (12, 30)
    mask = manifest.load_mask(d, (30, 12))
    assert mask.sum() == 12 and mask[5:9, 2:5].all()
    ok = rows["ksdd/kos01/Part0"]
    assert ok["label"] == 0 and ok["supervision"] == "pixel" and manifest.load_mask(ok).sum() == 0
    unknown = rows["ksdd/kos06/Part1"]
    assert unknown["label"] is None and unknown["supervision"] == "none"
    # no fold: no authors' split, ingest derives one from the ids
    assert set(table["split"].to_pylist()) <= set(manifest.SPLITS)
    assert _prov(ok) == {"adapter": "kolektorsdd", "part": "kos01", "fold": 0, "folds": 3}


def test_kolektorsdd_fold_is_the_test_split_and_val_comes_from_the_other_parts(tmp_path):
    root = fx.build_kolektorsdd(tmp_path / "ksdd")
    opts = {"fold": 1, "val_fraction": 0.3}
    rows = _rows(adapters.ingest("kolektorsdd", str(root), options=opts))
    # parts sorted and dealt round-robin: fold 1 = kos02, kos05
    assert {sid for sid, r in rows.items() if r["split"] == "test"} == {
        f"ksdd/{p}/Part{k}" for p in ("kos02", "kos05") for k in range(2)}
    rest = Counter(r["split"] for r in rows.values() if r["split"] != "test")
    assert rest["val"] >= 1 and rest["train"] > rest["val"] and sum(rest.values()) == 8
    assert rows["ksdd/kos06/Part1"]["split"] == "train"  # unknown label: nothing to validate against
    assert _prov(rows["ksdd/kos05/Part0"])["split_from"] == "fold"
    # deterministic, and the ingest split fractions do not touch the kept split
    again = adapters.ingest("kolektorsdd", str(root), options=opts,
                            split_fractions={"train": 0.5, "val": 0.0, "test": 0.5})
    assert _split_of(_rows(again)) == _split_of(rows)
    folds = [Counter(r["split"] for r in _rows(adapters.ingest("kolektorsdd", str(root),
                                                                 options={"fold": f})).values())["test"]
             for f in range(3)]
    assert folds == [4, 4, 4]
    with pytest.raises(ConfigError, match="out of range"):
        adapters.ingest("kolektorsdd", str(root), options={"fold": 3})


def test_kolektorsdd_mask_size_mismatch(tmp_path):
    root = fx.build_kolektorsdd(tmp_path / "ksdd")
    fx.write_mask(root / "kos02" / "Part0_label.bmp", size=(10, 10))
    scan = adapters.scan_dataset("kolektorsdd", str(root))  # reported and left out, the rest ingested
    bad = [r for r in scan.rejected if r["sample_id"].endswith("kos02/Part0")]
    assert len(bad) == 1 and "Part0_label.bmp is 10x10" in bad[0]["reason"]
    assert not any(s.endswith("kos02/Part0") for s in scan.table["sample_id"].to_pylist())
    assert scan.table.num_rows > 0


# ------------------------------------------------------------------------------------------ kolektorsdd2


def test_kolektorsdd2_authors_split_val_carving_and_copy_files(tmp_path, caplog):
    root = fx.build_kolektorsdd2(tmp_path / "KSDD2")
    with caplog.at_level("WARNING"):
        table = adapters.ingest("kolektorsdd2", str(root), options={"val_fraction": 0.3})
    assert "(copy)" in caplog.text
    rows = _rows(table)
    assert table.num_rows == len(fx.KSDD2_TRAIN) + len(fx.KSDD2_TEST)
    assert not any("copy" in sid for sid in rows)
    for split, items in (("train", fx.KSDD2_TRAIN), ("test", fx.KSDD2_TEST)):
        for stem, defective in items.items():
            r = rows[f"KSDD2/{split}/{stem}"]
            assert r["label"] == int(defective) and r["supervision"] == "pixel"
            assert r["mask_uri"].endswith(f"{split}/{stem}_GT.png")
            assert r["defect_class"] == ("defect" if defective else None)
    m = manifest.load_mask(rows["KSDD2/train/10000"], (30, 14))
    assert m.sum() == 12 and m[2:5, 1:5].all()
    # the authors' test set is exactly test/; val is carved from train/ only, stratified by label
    splits = _split_of(rows)
    assert {s for s, v in splits.items() if v == "test"} == {f"KSDD2/test/{s}" for s in fx.KSDD2_TEST}
    from_train = Counter(v for s, v in splits.items() if s.startswith("KSDD2/train/"))
    assert set(from_train) == {"train", "val"} and from_train["val"] >= 2
    assert {rows[s]["label"] for s, v in splits.items() if v == "val"} == {0, 1}
    assert _prov(rows["KSDD2/test/20000"])["split_from"] == "authors"
    assert adapters.ingest("kolektorsdd2", str(root), options={"val_fraction": 0.3}).equals(table)
    # default val share (0.1) of 9 train images: the largest-remainder dealing gives val none yet
    none = _rows(adapters.ingest("kolektorsdd2", str(root), options={"val_fraction": 0}))
    assert Counter(r["split"] for r in none.values()) == {"train": 9, "test": 3}


# ---------------------------------------------------------------------------------------------- mvtec_ad


def test_mvtec_ad_two_categories(tmp_path):
    root = fx.build_mvtec(tmp_path / "mvtec")
    table = adapters.ingest("mvtec_ad", str(root), options={"val_fraction": 0.34})
    rows = _rows(table)
    assert table.num_rows == (4 + 1 + 2) + (3 + 1 + 2)  # licence, readme and the stray thumbnail ignored
    good = rows["mvtec/bottle/test/good/000"]
    assert good["label"] == 0 and good["supervision"] == "pixel" and good["mask_uri"] is None
    assert good["defect_class"] is None and manifest.load_mask(good).shape == (16, 16)
    assert manifest.load_mask(good).sum() == 0
    broken = rows["mvtec/bottle/test/broken_large/001"]
    assert broken["label"] == 1 and broken["defect_class"] == "broken_large" and broken["supervision"] == "pixel"
    assert broken["mask_uri"].endswith("bottle/ground_truth/broken_large/001_mask.png")
    assert manifest.load_mask(broken, (16, 16)).sum() == 9
    screw = rows["mvtec/screw/test/scratch_neck/000"]
    assert manifest.load_mask(screw, (20, 20))[5:10, 5:7].all()
    no_mask = rows["mvtec/screw/test/scratch_neck/001"]
    assert no_mask["supervision"] == "image" and no_mask["mask_uri"] is None
    assert _prov(no_mask) == {"adapter": "mvtec_ad", "category": "screw", "split_from": "authors"}
    # authors' split: test/ is test; val only from train/good, in every category
    for sid, r in rows.items():
        assert (r["split"] == "test") == ("/test/" in sid)
    val = [sid for sid, r in rows.items() if r["split"] == "val"]
    assert {sid.split("/")[1] for sid in val} == {"bottle", "screw"} and all("/train/good/" in s for s in val)
    assert len(val) == 2


def test_mvtec_ad_categories_option(tmp_path):
    root = fx.build_mvtec(tmp_path / "mvtec")
    only = adapters.ingest("mvtec_ad", str(root), options={"categories": "screw"})
    assert only.num_rows == 6 and all(s.startswith("mvtec/screw/") for s in only["sample_id"].to_pylist())
    both = adapters.ingest("mvtec_ad", str(root), options={"categories": ["bottle", "screw"]})
    assert both.num_rows == 13
    with pytest.raises(ConfigError, match="carpet"):
        adapters.ingest("mvtec_ad", str(root), options={"categories": ["carpet"]})


# ------------------------------------------------------------------------------------------------ bsdata


def test_bsdata_fixture(tmp_path):
    root = fx.build_bsdata(tmp_path / "bsd")
    table = adapters.ingest("bsdata", str(root), options={"val_fraction": 0.5})
    rows = _rows(table)
    assert set(rows) == {f"bsd/data/{n}" for n in "abcde"}  # label/zzz.json has no image
    a, b, c, d, e = (rows[f"bsd/data/{n}"] for n in "abcde")
    for r in (a, b, e):
        assert r["label"] == 1 and r["defect_class"] == "pitting" and r["supervision"] == "pixel"
        assert r["mask_uri"] is None and r["mask_bytes"] is not None
        assert _prov(r)["mask_kind"] == "polygons"
    ma = decode_mask(a["mask_bytes"])
    assert ma.shape == (20, 32) and ma[2:7, 2:9].all() and ma.sum() == 35  # the square, edges included
    assert _prov(a)["boxes"] == [[2, 2, 9, 7]]
    mb = decode_mask(b["mask_bytes"])
    assert mb[3:10, 4:11].all() and mb.sum() == 49 and _prov(b)["boxes"] == [[4, 3, 11, 10]]
    me = decode_mask(e["mask_bytes"])
    x0, y0, x1, y1 = _prov(e)["boxes"][0]
    assert me.sum() > 20 and me[y0:y1, x0:x1].sum() == me.sum() and me[14, 22]
    assert 19 <= x0 <= 21 and 9 <= y0 <= 11 and 28 <= x1 <= 30 and 17 <= y1 <= 19  # vertices 20.4..28.2, 10.6..17.9
    assert me[y0].any() and me[y1 - 1].any() and me[:, x0].any() and me[:, x1 - 1].any()  # the box is tight
    assert d["label"] == 0 and d["supervision"] == "pixel" and d["mask_bytes"] is None
    assert manifest.load_mask(d).sum() == 0
    assert c["label"] is None and c["supervision"] == "none" and c["split"] == "train"
    # authors' split kept; val carved from their train set (the labelled rows a and e)
    assert b["split"] == "test" and {a["split"], e["split"]} == {"train", "val"} and d["split"] == "train"
    assert _prov(a)["split_from"] == "authors" and _prov(a)["type"] == 2
    assert adapters.ingest("bsdata", str(root), options={"val_fraction": 0.5}).equals(table)
    labelled = adapters.ingest("bsdata", str(root), options={"include_unlabeled": False})
    assert labelled.num_rows == 4 and "bsd/data/c" not in labelled["sample_id"].to_pylist()


def test_bsdata_without_image_data_derives_the_split(tmp_path):
    root = fx.build_bsdata(tmp_path / "bsd")
    (root / "image_data.json").unlink()
    rows = _rows(adapters.ingest("bsdata", str(root)))
    assert len(rows) == 5 and all("split_from" not in _prov(r) for r in rows.values())
    (root / "image_data.json").write_text('{"images": [{"filename": "a.jpg", "train_test_split": "dev"}]}')
    with pytest.raises(DataError, match="train_test_split"):
        adapters.ingest("bsdata", str(root))


# ----------------------------------------------------------------------------------------------- neu_det


def test_neu_det_box_masks(tmp_path):
    root = fx.build_neu_det(tmp_path / "NEU-DET")
    table = adapters.ingest("neu_det", str(root))
    rows = _rows(table)
    assert table.num_rows == 3 and set(table["label"].to_pylist()) == {1}
    cr = rows["NEU-DET/IMAGES/crazing_1"]
    assert cr["defect_class"] == "crazing" and cr["supervision"] == "pixel"
    m = decode_mask(cr["mask_bytes"])
    assert m.shape == (20, 20) and m[0:4, 0:5].all() and m.sum() == 20
    p = _prov(cr)
    assert p["mask_kind"] == "boxes" and p["boxes"] == [[0, 0, 5, 4]] and p["box_classes"] == ["crazing"]
    pa_ = rows["NEU-DET/IMAGES/patches_2"]
    assert pa_["defect_class"] == "patches"  # two patches boxes against one inclusion box
    mp = manifest.load_mask(pa_, (20, 20))
    assert mp.sum() == 16 + 33 + 12 and mp[9:20, 9:12].all() and mp[0:3, 14:18].all()
    assert _prov(pa_)["boxes"] == [[2, 2, 6, 6], [14, 0, 18, 3], [9, 9, 12, 20]]
    sc = rows["NEU-DET/IMAGES/scratches_3"]
    assert sc["supervision"] == "image" and sc["defect_class"] == "scratches" and sc["mask_bytes"] is None
    assert set(table["split"].to_pylist()) <= set(manifest.SPLITS)
    (root / "ANNOTATIONS" / "crazing_1.xml").write_text("<annotation><object>")
    with pytest.raises(DataError, match=r"crazing_1\.xml"):
        adapters.ingest("neu_det", str(root))


# ------------------------------------------------------------------------------------------------------ S3


@pytest.mark.s3
def test_s3_roots_read_like_local(tmp_path, s3_bucket):
    for name, build in (("bsdata", fx.build_bsdata), ("kolektorsdd2", fx.build_kolektorsdd2)):
        local_root = build(tmp_path / name)
        storage.upload_dir(str(local_root), f"{s3_bucket}/{name}")
        local = adapters.ingest(name, str(local_root), dataset_name=name)
        remote = adapters.ingest(name, f"{s3_bucket}/{name}", dataset_name=name)
        assert remote["sample_id"].to_pylist() == local["sample_id"].to_pylist()
        for col in ("split", "label", "width", "height", "supervision", "mask_bytes"):
            assert remote[col].to_pylist() == local[col].to_pylist(), (name, col)
    rec = _rows(remote)["kolektorsdd2/train/10000"]
    assert rec["mask_uri"] == f"{s3_bucket}/kolektorsdd2/train/10000_GT.png"
    assert manifest.load_mask(rec, (30, 14)).sum() == 12


# ------------------------------------------------------------------------------------------ real BSData


@pytest.fixture(scope="module")
def real_bsdata(shared_datasets: Path):
    root = shared_datasets / "bsdata"
    if not (root / "image_data.json").is_file():
        pytest.skip(f"{root} is absent")
    return root, adapters.ingest("bsdata", str(root))


def test_real_bsdata(real_bsdata):
    root, t = real_bsdata
    assert t.num_rows == 394
    info = json.loads((root / "image_data.json").read_text())["images"]
    authors = {Path(e["filename"]).stem: e["train_test_split"] for e in info}
    assert Counter(authors.values()) == {"train": 324, "test": 70}  # the "80/20" split
    splits = {sid.split("/")[-1]: s for sid, s in zip(t["sample_id"].to_pylist(), t["split"].to_pylist(),
                                                       strict=True)}
    assert {s for s, v in splits.items() if v == "test"} == {s for s, v in authors.items() if v == "test"}
    counts = Counter(splits.values())
    assert counts["test"] == 70 and counts["train"] + counts["val"] == 324 and 25 <= counts["val"] <= 40
    # every annotated image has at least one polygon: all defective, all with an embedded mask
    assert set(t["label"].to_pylist()) == {1} and set(t["supervision"].to_pylist()) == {"pixel"}
    assert pc.all(pc.is_valid(t["mask_bytes"])).as_py() and set(t["defect_class"].to_pylist()) == {"pitting"}
    provs = [json.loads(p) for p in t["provenance"].to_pylist()]
    assert sum(len(p["boxes"]) for p in provs) == 485
    recs = t.to_pylist()
    for i in (0, len(recs) // 2, len(recs) - 1):
        rec = recs[i]
        img = manifest.load_image(rec)
        mask = manifest.load_mask(rec, img.shape[:2])
        assert mask.sum() > 0
        boxed = np.zeros_like(mask)
        for x0, y0, x1, y1 in provs[i]["boxes"]:
            boxed[y0:y1, x0:x1] = 1
        assert (mask <= boxed).all()  # every mask pixel lies in a polygon's box
