"""Exports of a mixed real + synthetic manifest to YOLO, COCO and mask folders, read back and checked."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from components import storage
from components.data import manifest
from components.data import procedural as P
from components.data.images import decode_mask, encode_mask_png, encode_png
from components.errors import DataError
from components.synthesis.export import export_coco, export_masks, export_yolo, rle_decode, rle_encode
from components.synthesis.generators.base import SynthesisRequest, create_generator
from components.synthesis.labels import boxes_from_mask

SIZE = 64


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A manifest mixing every kind of row, and the ground-truth masks by sample id."""
    root = tmp_path_factory.mktemp("files")
    rows, masks, images = [], {}, {}

    def add(sid: str, image: np.ndarray, mask: np.ndarray | None, label: int | None, split: str, cls: str | None,
            **kw):
        data = kw.pop("image_bytes", None) or encode_png(image)
        images[sid] = data
        if mask is not None:
            masks[sid] = mask.astype(np.uint8)
        rows.append(manifest.row(sid, "mix", width=SIZE, height=SIZE, split=split, label=label, defect_class=cls,
                                 image_bytes=None if "image_uri" in kw else data,
                                 mask_bytes=None if mask is None or "mask_uri" in kw else encode_mask_png(mask),
                                 **kw))

    pit = P.render(0, seed=1, size=SIZE, texture="cast", defect="pit")
    add("mix/real/pit 0", pit.image, pit.mask, 1, "train", "pit")
    two = np.zeros((SIZE, SIZE), np.uint8)
    two[5:12, 6:20] = 1
    two[40:44, 40:41] = 1
    two[60, 60] = 1  # a one-pixel speck (dropped by min_area > 1)
    add("mix/real/scratch#1", P.render(1, seed=1, size=SIZE, texture="brushed").image, two, 1, "train", "scratch")
    add("mix/real/ok", P.render(2, seed=1, size=SIZE).image, None, 0, "train", None)
    clean = P.render(3, seed=1, size=SIZE, texture="woven").image
    synth_mask = np.zeros((SIZE, SIZE), np.uint8)
    synth_mask[20:30, 25:45] = 1
    res = create_generator("procedural", {}).generate([SynthesisRequest(
        image=clean.astype(np.float32) / 255, mask=synth_mask, defect_class="scratch", seed=0)])[0]
    add("mix/synthetic/0", (res.image * 255 + 0.5).astype(np.uint8), res.mask, 1, "val", "scratch",
        source="synthetic", provenance=res.info)
    add("mix/real/ok2", clean, None, 0, "val", None)
    add("mix/real/tagged", pit.image, None, 1, "val", "pit")  # image-level label only
    add("mix/real/unknown", pit.image, None, None, "test", None)
    crack = P.render(4, seed=1, size=SIZE, texture="turned", defect="crack")
    (root / "crack.jpg").write_bytes(_jpeg(crack.image))
    (root / "crack_mask.png").write_bytes(encode_mask_png(crack.mask))
    add("mix/real/crack", crack.image, crack.mask, 1, "test", "crack", image_uri=str(root / "crack.jpg"),
        mask_uri=str(root / "crack_mask.png"), image_bytes=_jpeg(crack.image))
    images["mix/real/crack"] = (root / "crack.jpg").read_bytes()
    return manifest.make_table(rows), masks, images


def _field(table, sid: str, column: str):
    return table[column].to_pylist()[table["sample_id"].to_pylist().index(sid)]


def _stem(sid: str) -> str:
    return sid.replace("/", "__").replace(" ", "_").replace("#", "_")


def test_rle_round_trip():
    rng = np.random.default_rng(0)
    for m in (rng.random((7, 9)) > 0.5, np.zeros((4, 5)), np.ones((3, 2)), np.eye(6)):
        rle = rle_encode(m)
        assert rle["size"] == list(m.shape) and sum(rle["counts"]) == m.size
        assert np.array_equal(rle_decode(rle), m.astype(np.uint8))
    assert rle_encode(np.ones((2, 2)))["counts"] == [0, 4]  # starts with a (possibly empty) run of zeros


def test_export_yolo_round_trip(tmp_path, dataset):
    table, masks, images = dataset
    out = tmp_path / "yolo"
    summary = export_yolo(table, str(out))
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["names"] == {0: "crack", 1: "pit", 2: "scratch"} and data["nc"] == 3
    assert {k: data[k] for k in ("train", "val", "test")} == {"train": "train.txt", "val": "val.txt",
                                                             "test": "test.txt"}
    assert "path" not in data
    listed = {s: (out / f"{s}.txt").read_text().split() for s in ("train", "val", "test")}
    assert len(listed["train"]) == 3 and len(listed["val"]) == 2 and len(listed["test"]) == 1
    assert summary["counts"]["skipped_image_level"] == 1 and summary["counts"]["skipped_unlabeled"] == 1
    assert json.loads((out / "export.json").read_text())["counts"] == summary["counts"]
    sid_by_stem = {_stem(s): s for s in images}
    for split, entries in listed.items():
        for entry in entries:
            image_path = out / entry
            assert image_path.is_file()
            sid = sid_by_stem[image_path.stem]
            assert image_path.read_bytes() == images[sid]  # copied, not re-encoded
            assert image_path.suffix == (".jpg" if sid == "mix/real/crack" else ".png")
            lines = (out / "labels" / split / f"{image_path.stem}.txt").read_text().split("\n")
            got = []
            for line in filter(None, lines):
                c, cx, cy, w, h = line.split()
                x0, x1 = round((float(cx) - float(w) / 2) * SIZE), round((float(cx) + float(w) / 2) * SIZE)
                y0, y1 = round((float(cy) - float(h) / 2) * SIZE), round((float(cy) + float(h) / 2) * SIZE)
                got.append((int(c), x0, y0, x1, y1))
            expected = [] if sid not in masks else [b[:4] for b in boxes_from_mask(masks[sid])]
            assert [g[1:] for g in got] == expected, sid
            cls = _field(table, sid, "defect_class")
            assert all(data["names"][g[0]] == cls for g in got)
    assert summary["counts"]["boxes"] == sum(len(boxes_from_mask(m)) for m in masks.values())

    wide = export_yolo(table, str(tmp_path / "yolo_all"), include_unlabeled=True, min_area=2)
    assert wide["counts"]["images_image_level"] == 1 and wide["counts"]["images_unlabeled"] == 1
    assert wide["counts"]["dropped_components"] >= 1
    assert (tmp_path / "yolo_all" / "labels" / "val" / "mix__real__tagged.txt").read_text() == ""
    with pytest.raises(DataError, match="not in the export classes"):
        export_yolo(table, str(tmp_path / "bad"), classes=["pit"])


def test_export_coco_ids_and_areas(tmp_path, dataset):
    table, masks, _ = dataset
    out = tmp_path / "coco"
    export_coco(table, str(out), classes=["pit", "scratch", "crack"], min_area=2)
    total_dropped = 0
    for split in ("train", "val", "test"):
        doc = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        assert [c["id"] for c in doc["categories"]] == [1, 2, 3]
        assert [c["name"] for c in doc["categories"]] == ["pit", "scratch", "crack"]
        ids = [im["id"] for im in doc["images"]]
        assert ids == list(range(1, len(ids) + 1))
        assert [a["id"] for a in doc["annotations"]] == list(range(1, len(doc["annotations"]) + 1))
        by_id = {im["id"]: im for im in doc["images"]}
        for im in doc["images"]:
            assert (out / "images" / split / im["file_name"]).is_file()
            assert (im["width"], im["height"]) == (SIZE, SIZE)
        seg_union: dict[int, np.ndarray] = {}
        for a in doc["annotations"]:
            im = by_id[a["image_id"]]
            assert doc["categories"][a["category_id"] - 1]["name"] == im["defect_class"]
            seg = rle_decode(a["segmentation"])
            assert a["iscrowd"] == 0 and a["area"] == int(seg.sum()) >= 2
            x, y, w, h = a["bbox"]
            ys, xs = np.nonzero(seg)
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            seg_union[a["image_id"]] = seg_union.get(a["image_id"], np.zeros_like(seg)) | seg
        for image_id, union in seg_union.items():
            mask = masks[by_id[image_id]["sample_id"]]
            kept = [b for b in boxes_from_mask(mask) if b[4] >= 2]
            assert int(union.sum()) == sum(b[4] for b in kept)
            assert not (union & (1 - mask)).any()
            total_dropped += len(boxes_from_mask(mask)) - len(kept)
    assert total_dropped >= 1  # the speck
    negatives = [im for im in json.loads((out / "annotations" / "instances_train.json").read_text())["images"]
                 if im["sample_id"] == "mix/real/ok"]
    assert negatives and "defectflow_label" not in negatives[0]


def test_export_masks_round_trip(tmp_path, dataset):
    table, masks, images = dataset
    out = tmp_path / "masks"
    summary = export_masks(table, str(out))
    written = sorted(Path(p).relative_to(out).as_posix() for p in storage.walk_files(str(out / "masks")))
    assert len(written) == 6  # 4 defective with masks + 2 negatives; image-level/unlabelled skipped
    for sid in images:
        stem = _stem(sid)
        split = _field(table, sid, "split")
        mask_path = out / "masks" / split / f"{stem}.png"
        if sid in masks:
            assert np.array_equal(decode_mask(mask_path.read_bytes()), masks[sid])
        elif sid in ("mix/real/ok", "mix/real/ok2"):
            assert not decode_mask(mask_path.read_bytes()).any()
        else:
            assert not mask_path.exists()
    assert summary["counts"]["skipped_image_level"] == 1


@pytest.mark.s3
def test_export_yolo_to_s3(s3_bucket, dataset):
    table, _, _ = dataset
    out = f"{s3_bucket}/exports/yolo"
    export_yolo(table, out, splits=["train"])
    data = yaml.safe_load(storage.read_text(f"{out}/data.yaml"))
    assert data["train"] == "train.txt" and "val" not in data
    lines = storage.read_text(f"{out}/labels/train/mix__real__scratch_1.txt").strip().split("\n")
    assert len(lines) == 3
    assert storage.exists(f"{out}/images/train/mix__real__ok.png")
