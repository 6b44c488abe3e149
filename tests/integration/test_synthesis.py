"""Defect synthesis on Ray: tiny offline SD and SDXL inpainting pipelines through the real `diffusion` generator
on Ray Data (shards on S3), LoRA adapters trained on Ray Train and used by the generator, the own DDPM trained and
sampled, resumable jobs, rejection reports, label export, and synthetic samples mixed into training."""

from __future__ import annotations

import json

import numpy as np
import pytest

from components import artifact, storage
from components.config import SynthesizeConfig, SynthTrainConfig, validate
from components.data import manifest
from components.synthesis.labels import boxes_from_mask
from components.synthesis.tiny_pipelines import build_tiny_sd_inpaint, build_tiny_sdxl_inpaint
from tests.helpers import procedural_manifest, train_config
from workflows import features, synthesize, train, train_data, train_synth

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    return str(root), procedural_manifest(str(root / "m.parquet"), count=40, size=64, seed=4)


def synth_cfg(root: str, man: str, name: str, **over):
    data = {"name": name, "manifest": man, "count": 6, "shard_size": 3, "seed": 1,
            "storage": {"root": root, "s3_endpoint_url": storage.settings().endpoint_url},
            "ray": {"progress_bars": False}, **over}
    return validate(SynthesizeConfig, data, "test synth config")


def check_shards(res, generator: str):
    table = manifest.read(res.uri)
    assert table.num_rows == res.accepted >= 6
    for rec in table.to_pylist():
        assert rec["source"] == "synthetic" and rec["label"] == 1 and rec["supervision"] == "pixel"
        img, mask = manifest.load_image(rec), manifest.load_mask(rec)
        assert mask is not None and mask.shape == img.shape[:2] and mask.any()
        prov = json.loads(rec["provenance"])
        assert prov["generator"] == generator and prov["source_id"] and "seed" in prov
        assert prov["boxes"] == [list(b) for b in boxes_from_mask(mask, 16)]
        assert set(prov["filters"]) == {"visible_change", "background_preserved"}
    report = storage.read_json(storage.join(res.uri, "_report.json"))
    assert report["accepted"] == res.accepted and report["requested"] >= 6
    assert storage.read_bytes(res.contact_sheet)[:4] == b"\x89PNG"
    return table


@pytest.mark.s3
def test_tiny_sd_and_sdxl_through_ray_data_to_s3(ray_session, source, s3_bucket, tmp_path):
    _, man = source
    for name, build in (("sd", build_tiny_sd_inpaint), ("sdxl", build_tiny_sdxl_inpaint)):
        local = build(tmp_path / name)
        storage.upload_dir(local, f"{s3_bucket}/pipelines/{name}")  # the generator reads the pipeline from S3 too
        res = synthesize.run(synth_cfg(f"{s3_bucket}/df", man, f"diff-{name}", generator={
            "name": "diffusion", "options": {"model": f"{s3_bucket}/pipelines/{name}", "num_inference_steps": 2,
                                             "guidance_scale": 1.0, "surface": "brushed metal"}},
            masks={"default": {"kind": "blob", "area_range": [0.02, 0.08]}}, classes=["scratch"],
            prompts={"scratch": "a deep scratch"}))
        assert res.uri.startswith("s3://")
        table = check_shards(res, "diffusion")
        prov = json.loads(table["provenance"][0].as_py())
        assert prov["prompt"] == "a deep scratch" and prov["steps"] == 2 and prov["model"]["uri"].startswith("s3://")


def test_lora_trained_on_ray_train_is_used_by_the_generator(ray_session, source, tmp_path):
    root, man = source
    pipe = build_tiny_sd_inpaint(tmp_path / "sd")
    cfg = validate(SynthTrainConfig, {
        "name": "lora-test", "kind": "lora", "manifest": man, "resolution": 64, "epochs": 1, "batch_size": 4,
        "max_crops": 8, "lora": {"model": pipe, "rank": 4, "alpha": 4},
        "storage": {"root": root}, "ray": {"progress_bars": False}}, "lora config")
    res = train_synth.run(cfg)
    assert storage.exists(storage.join(res.out, "pytorch_lora_weights.safetensors"))
    syn = synthesize.run(synth_cfg(root, man, "diff-lora", generator={
        "name": "diffusion", "options": {"model": pipe, "num_inference_steps": 2, "guidance_scale": 1.0,
                                         "lora": [{"uri": res.out, "weight": 1.0}]}}))
    table = check_shards(syn, "diffusion")
    assert json.loads(table["provenance"][0].as_py())["lora"]


def test_own_ddpm_trains_and_generates_and_jobs_resume(ray_session, source):
    root, man = source
    cfg = validate(SynthTrainConfig, {
        "name": "ddpm-test", "kind": "ddpm", "manifest": man, "resolution": 32, "epochs": 2, "batch_size": 8,
        "ddpm": {"block_out_channels": [16, 32], "prediction_type": "v_prediction"},
        "storage": {"root": root}, "ray": {"progress_bars": False}}, "ddpm config")
    res = train_synth.run(cfg)
    assert res.final_loss is not None and np.isfinite(res.final_loss)
    # the same name with more epochs resumes from the last checkpoint (weights, optimizer, epoch)
    more = train_synth.run(cfg.model_copy(update={"epochs": 3}))
    from components.synthesis import ddpm

    assert more.out == res.out and ddpm.load(more.out)[1]["training"]["epochs"] == 3
    scfg = synth_cfg(root, man, "ddpm-set", generator={"name": "ddpm", "options": {"model": res.out, "steps": 4}})
    first = synthesize.run(scfg)
    check_shards(first, "ddpm")
    shards = storage.walk_files(first.uri, (".parquet",))
    storage.delete(shards[0])  # lost to a killed job
    storage.delete(storage.join(first.uri, "_shards", storage.basename(shards[0])[:-8] + ".json"))
    again = synthesize.run(scfg)
    assert again.accepted == first.accepted and storage.exists(shards[0])


def test_rejections_are_counted_and_other_settings_refused(ray_session, source):
    root, man = source
    res = synthesize.run(synth_cfg(root, man, "strict", count=4, max_waves=1, filters=[
        {"name": "visible_change", "threshold": 0.99}]))  # no defect changes a patch that much
    assert res.accepted == 0 and res.rejected >= 4 and res.rejections.get("visible_change", 0) >= 4
    from components.errors import ConfigError

    with pytest.raises(ConfigError, match="other settings"):
        synthesize.run(synth_cfg(root, man, "strict", count=4, seed=99))
    import ray

    from components.errors import ResourceError

    if not ray.cluster_resources().get("GPU"):
        with pytest.raises(ResourceError, match="no GPU"):  # fails at once instead of waiting for a GPU forever
            synthesize.run(synth_cfg(root, man, "gpu", use_gpu=True))
    with pytest.raises(ResourceError, match="CPUs"):
        synthesize.run(synth_cfg(root, man, "big", cpus_per_actor=512))


def test_export_and_mixing_into_training(ray_session, source, tmp_path):
    import pyarrow as pa

    from components.synthesis import export

    root, man = source
    syn = synthesize.run(synth_cfg(root, man, "mix", count=8, generator={"name": "procedural"}))
    out = export.export_yolo(pa.concat_tables([manifest.read(man), manifest.read(syn.uri)]), str(tmp_path / "yolo"))
    assert out and (tmp_path / "yolo" / "data.yaml").exists()
    res = train.run(train_config(root, man, name="with-synth", optim={"epochs": 1},
                                 data={"synthetic": {"source": syn.uri, "count": 8}}))
    lineage = artifact.read_meta(res.artifact_uri)["lineage"]
    assert lineage["train_config"]["data"]["synthetic"] == {"source": syn.uri, "count": 8}
    real, mixed = train.rows_for(train_config(root, man, name="x")), train.rows_for(train_config(
        root, man, name="x", data={"synthetic": {"source": syn.uri, "count": 8}}))
    assert mixed[1].num_rows == real[1].num_rows + 8  # the run saw the 8 synthetic samples
    # the cached-feature path reads the synthetic set's own feature shards too (they are not in the manifest's)
    import pyarrow.compute as pc

    ssn = train_config(root, man, name="with-synth-features",
                       model={"family": "supersimplenet", "params": {
                           "backbone": {"name": "efficientnet_lite0", "weights": "random"},
                           "seg_hidden": 16, "cls_hidden": 8}},
                       data={"features": "auto", "synthetic": {"source": syn.uri, "count": 8}})
    ssn.storage.apply()
    _, table = train.rows_for(ssn)
    uris = features.for_training(ssn)
    assert len(uris) == 2 and uris[0] != uris[1]
    train_rows = table.filter(pc.equal(table["split"], "train"))
    assert int(pc.sum(pc.equal(train_rows["source"], "synthetic")).as_py()) == 8
    built = train_data.build(table, ssn, uris)["train"]
    assert built.count() == train_rows.num_rows
    # training rows come globally mixed (the manifest lists them folder by folder, the synthetic ones last), in
    # the same order for the same seed, by the cached-feature path and the pixel path alike
    listed = train_rows["sample_id"].to_pylist()
    order = built.select_columns(["sample_id"]).to_pandas()["sample_id"].tolist()
    assert sorted(order) == sorted(listed) and order != listed
    assert order == train_data.build(table, ssn, uris)["train"].select_columns(["sample_id"]).to_pandas()[
        "sample_id"].tolist()
    pixels = train_data.build(table, train_config(root, man, name="x"))["train"]
    pixel_order = pixels.select_columns(["sample_id"]).to_pandas()["sample_id"].tolist()
    assert sorted(pixel_order) == sorted(listed) and pixel_order != listed
