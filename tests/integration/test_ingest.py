"""`defectflow ingest` as a workflow: real data to an S3 manifest (embedded bytes), read back by Ray Data."""

from __future__ import annotations

import pytest

from components import storage
from components.config import IngestConfig, validate
from components.data import manifest
from workflows import ingest

pytestmark = pytest.mark.timeout(300)


def _cfg(**kw) -> IngestConfig:
    return validate(IngestConfig, {"storage": {"s3_endpoint_url": storage.settings().endpoint_url}, **kw})


@pytest.mark.s3
def test_real_sd900_to_s3_embeds_images(shared_datasets, s3_bucket):
    res = ingest.run(_cfg(dataset="sd_saliency_900", root=str(shared_datasets / "sd_saliency_900"), name="sd900",
                          storage={"root": f"{s3_bucket}/df", "s3_endpoint_url": storage.settings().endpoint_url}))
    assert res.manifest_uri == f"{s3_bucket}/df/datasets/sd900/manifest.parquet"
    table = manifest.read(res.manifest_uri)
    assert table.num_rows == 600 and table["image_uri"].null_count == 600  # auto-embedded: local data, S3 manifest
    assert res.summary["train"]["rows"] + res.summary["val"]["rows"] + res.summary["test"]["rows"] == 600
    rec = table.slice(0, 1).to_pylist()[0]
    img = manifest.load_image(rec)
    assert img.shape == (200, 200, 3) and manifest.load_mask(rec, img.shape[:2]).any()


@pytest.mark.s3
def test_procedural_to_local_then_ray_data_reads_s3(ray_session, s3_bucket, tmp_path):
    import ray.data

    res = ingest.run(_cfg(dataset="procedural", options={"count": 20, "size": 64}, out=f"{s3_bucket}/m/"))
    assert res.manifest_uri.endswith("/m/manifest.parquet")
    fs, path = storage.arrow_fs(res.manifest_uri)
    ds = ray.data.read_parquet(path, filesystem=fs)
    assert ds.count() == 20
    local = ingest.run(_cfg(dataset="procedural", options={"count": 20, "size": 64}, out=str(tmp_path / "m.parquet")))
    assert manifest.digest(manifest.read(local.manifest_uri)) == res.digest  # same seed, same data, same split
