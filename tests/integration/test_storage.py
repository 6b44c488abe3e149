"""Every storage behaviour on a local path and on S3 (moto's server on 127.0.0.1)."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from components import artifact, catalog, storage
from components.errors import StorageError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "store")
    else:
        bucket = request.getfixturevalue("s3_bucket")
        yield f"{bucket}/prefix"


def test_bytes_json_text_roundtrip(root):
    storage.write_bytes(storage.join(root, "a/b.bin"), b"\x00\x01payload")
    assert storage.read_bytes(storage.join(root, "a/b.bin")) == b"\x00\x01payload"
    storage.write_json(storage.join(root, "meta.json"), {"x": 1, "y": [1.5, None]})
    assert storage.read_json(storage.join(root, "meta.json")) == {"x": 1, "y": [1.5, None]}
    storage.write_text(storage.join(root, "t.txt"), "héllo\n")
    assert storage.read_text(storage.join(root, "t.txt")) == "héllo\n"
    assert storage.exists(storage.join(root, "a/b.bin"))
    assert not storage.exists(storage.join(root, "a/missing.bin"))
    assert storage.size(storage.join(root, "a/b.bin")) == 9


def test_overwrite_is_atomic_and_leaves_no_temp_files(root):
    uri = storage.join(root, "obj.json")
    storage.write_json(uri, {"v": 1})
    storage.write_json(uri, {"v": 2})
    assert storage.read_json(uri) == {"v": 2}
    names = [storage.basename(u) for u in storage.walk_files(root)]
    assert not [n for n in names if n.startswith(".tmp-")]


def test_local_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through a private temp file; the result must be as readable as any other new file."""
    uri = str(tmp_path / "shared.json")
    storage.write_json(uri, {"v": 1})
    mask = os.umask(0o022)
    os.umask(mask)
    assert os.stat(uri).st_mode & 0o777 == 0o666 & ~mask


def test_failed_local_write_keeps_old_content(tmp_path):
    uri = str(tmp_path / "keep.txt")
    storage.write_text(uri, "old")

    with pytest.raises(TypeError):
        storage.write_bytes(uri, object())  # type: ignore[arg-type]
    assert storage.read_text(uri) == "old"
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]


def test_listing(root):
    for name in ("x/1.png", "x/2.PNG", "x/sub/3.png", "x/readme.txt"):
        storage.write_bytes(storage.join(root, name), b"1")
    pngs = storage.walk_files(storage.join(root, "x"), (".png",))
    assert [storage.basename(p) for p in pngs] == ["1.png", "2.PNG", "3.png"]
    children = [storage.basename(c) for c in storage.listdir(storage.join(root, "x"))]
    assert children == ["1.png", "2.PNG", "readme.txt", "sub"]
    assert storage.listdir(storage.join(root, "nothing-here")) == []
    assert storage.isdir(storage.join(root, "x/sub"))


def test_parquet_roundtrip_file_and_folder(root):
    t1 = pa.table({"a": [1, 2], "b": ["x", "y"]})
    t2 = pa.table({"a": [3], "b": ["z"]})
    storage.write_parquet(t1, storage.join(root, "pq/part-0.parquet"))
    storage.write_parquet(t2, storage.join(root, "pq/part-1.parquet"))
    assert storage.read_parquet(storage.join(root, "pq/part-0.parquet")).equals(t1)
    both = storage.read_parquet(storage.join(root, "pq"))
    assert sorted(both["a"].to_pylist()) == [1, 2, 3]
    assert storage.read_parquet(storage.join(root, "pq/part-1.parquet"), columns=["b"]).column_names == ["b"]


def test_arrow_fs_reads_what_fsspec_wrote(root):
    import pyarrow.parquet as pq

    storage.write_parquet(pa.table({"a": [7]}), storage.join(root, "one.parquet"))
    fs, path = storage.arrow_fs(storage.join(root, "one.parquet"))
    assert "://" not in path
    assert pq.read_table(path, filesystem=fs)["a"].to_pylist() == [7]


def test_local_path_and_copy_tree(root, tmp_path):
    storage.write_bytes(storage.join(root, "tree/a.txt"), b"A")
    storage.write_bytes(storage.join(root, "tree/d/b.txt"), b"B")
    with storage.local_path(storage.join(root, "tree/a.txt")) as p, open(p, "rb") as f:
        assert f.read() == b"A"
    dst = str(tmp_path / "copy")
    storage.copy_tree(storage.join(root, "tree"), dst)
    with open(os.path.join(dst, "d/b.txt"), "rb") as f:
        assert f.read() == b"B"
    storage.copy_tree(dst, storage.join(root, "tree2"))
    assert storage.read_bytes(storage.join(root, "tree2/d/b.txt")) == b"B"
    storage.delete(storage.join(root, "tree2"), recursive=True)
    assert not storage.exists(storage.join(root, "tree2/d/b.txt"))


def test_upload_dir(root, tmp_path):
    src = tmp_path / "up"
    (src / "k").mkdir(parents=True)
    (src / "k" / "f.bin").write_bytes(b"F")
    storage.upload_dir(str(src), storage.join(root, "up"))
    assert storage.read_bytes(storage.join(root, "up/k/f.bin")) == b"F"


def test_missing_object_is_a_storage_error(root):
    with pytest.raises(StorageError, match="does not exist"):
        storage.read_bytes(storage.join(root, "nope.bin"))


def test_layout_and_registry(root):
    layout = catalog.Layout(root)
    assert layout.manifest("mt").endswith("datasets/mt/manifest.parquet")
    assert layout.features("efficientnet_lite0", "mt").endswith("features/efficientnet_lite0/mt")
    assert layout.model("gmbinet", "3").endswith("models/gmbinet/3")
    assert layout.claim_version("gmbinet") == "1"
    assert layout.versions("gmbinet") == []  # claimed, not complete: never listed
    storage.write_json(storage.join(layout.model("gmbinet", "1"), "detector.json"), {"v": "1"})
    assert layout.claim_version("gmbinet") == "2"
    storage.write_json(storage.join(layout.model("gmbinet", "2"), "detector.json"), {"v": "2"})
    assert layout.versions("gmbinet") == ["1", "2"]
    assert layout.claim_version("gmbinet") == "3"
    assert catalog.resolve_model(layout.models("gmbinet")) == layout.model("gmbinet", "2")
    layout.set_alias("gmbinet", "production", "1")
    assert catalog.resolve_model(layout.models("gmbinet")) == layout.model("gmbinet", "1")
    assert catalog.resolve_model(layout.models("gmbinet") + "@latest") == layout.model("gmbinet", "2")
    assert catalog.resolve_model(layout.models("gmbinet") + "@2") == layout.model("gmbinet", "2")
    assert catalog.resolve_model(layout.model("gmbinet", "2")) == layout.model("gmbinet", "2")
    with pytest.raises(StorageError, match="no version 9"):
        layout.set_alias("gmbinet", "production", "9")
    with pytest.raises(StorageError, match="no model artifact"):
        catalog.resolve_model(layout.models("other"))


def test_create_only_claims_once(root):
    uri = storage.join(root, "claims/one.json")
    assert storage.create_only(uri, b"first")
    assert not storage.create_only(uri, b"second")
    assert storage.read_bytes(uri) == b"first"


def test_concurrent_registrations_never_share_a_version(root):
    """8 threads register the same model at once: 8 distinct versions, none overwritten (the race the catalog had
    when it listed versions and then wrote)."""
    import threading

    from tests.helpers import random_artifact

    src = random_artifact(storage.join(root, "src"), size=32)
    layout = catalog.Layout(root)
    barrier = threading.Barrier(8)
    got: list[str] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            got.append(artifact.register(src, layout, "race", lineage={"writer": i}))
        except BaseException as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(storage.basename(u) for u in got) == [str(v) for v in range(1, 9)]
    assert layout.versions("race") == [str(v) for v in range(1, 9)]
    writers = {artifact.read_meta(u)["lineage"]["writer"] for u in got}
    assert writers == set(range(8))  # every registration kept its own detector.json


@pytest.mark.parametrize("bad", ["../../escaped", "a/b", ".hidden", "", "x" * 300])
def test_names_that_become_paths_are_validated(tmp_path, bad):
    from components.errors import ConfigError

    layout = catalog.Layout(str(tmp_path))
    with pytest.raises(ConfigError, match="invalid"):
        layout.models(bad)
    with pytest.raises(ConfigError, match="invalid"):
        layout.run(bad)


def test_uri_normalisation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("rel/x") == str(tmp_path / "rel/x")
    assert storage.normalize("file://" + str(tmp_path)) == str(tmp_path)
    assert storage.normalize("s3a://b/k/") == "s3://b/k"
    assert storage.join("s3://b", "a", "/c/") == "s3://b/a/c"
    assert storage.parent("s3://b/a/c") == "s3://b/a"
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.normalize("gs://bucket/x")
    with pytest.raises(StorageError, match="names no bucket"):
        storage.normalize("s3://")
