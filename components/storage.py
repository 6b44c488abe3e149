"""URIs to filesystems, atomic writes, and the artifact layout.

Every path in defectflow is a URI: a local path (absolute, relative, or ``file://``) or ``s3://bucket/prefix``.
One helper turns a URI into ``(filesystem, path)`` for fsspec, and one for pyarrow (which Ray Data and Ray Train
take as ``filesystem=`` / ``storage_filesystem=``; with a custom filesystem, Train wants the path without scheme).

S3 endpoint and region come from :func:`configure` (workflows call it from the config's ``storage`` section) or from
the standard environment (``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``). Credentials always
come from the standard AWS chain (environment, profile, instance role): never from configs.

Writes are atomic: local files are written to a temporary sibling and renamed; S3 objects are written with a single
PUT (or a multipart upload, which only becomes visible on completion). Nothing half-written is ever read.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from components.errors import StorageError

log = logging.getLogger(__name__)

_S3_SCHEMES = ("s3://", "s3a://")


@dataclass(frozen=True)
class S3Settings:
    """Where S3 lives. ``endpoint_url`` is for S3-compatible stores (MinIO, moto, Ceph)."""

    endpoint_url: str | None = None
    region: str | None = None

    def resolved(self) -> S3Settings:
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return S3Settings(endpoint_url=endpoint or None, region=region)


_lock = threading.Lock()
_settings = S3Settings()
_fs_cache: dict[tuple, Any] = {}


def configure(endpoint_url: str | None = None, region: str | None = None) -> None:
    """Set the S3 endpoint/region for this process (clears cached filesystems)."""
    global _settings
    with _lock:
        _settings = S3Settings(endpoint_url=endpoint_url, region=region)
        _fs_cache.clear()


def settings() -> S3Settings:
    """The effective S3 settings (explicit configuration first, then the environment)."""
    return _settings.resolved()


def env_vars() -> dict[str, str]:
    """Environment variables that reproduce this process's storage settings in Ray workers."""
    s = settings()
    out = {"AWS_DEFAULT_REGION": s.region or "us-east-1"}
    if s.endpoint_url:
        out["AWS_ENDPOINT_URL"] = s.endpoint_url
    return out


# --------------------------------------------------------------------------------------------- URIs


def is_s3(uri: str) -> bool:
    return str(uri).startswith(_S3_SCHEMES)


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def normalize(uri: str | os.PathLike) -> str:
    """Canonical form: ``s3://bucket/key`` (no trailing slash) or an absolute local path."""
    uri = str(uri)
    if not uri:
        raise StorageError("empty path or URI", "give a local path or s3://bucket/prefix")
    if uri.startswith("s3a://"):
        uri = "s3://" + uri[len("s3a://"):]
    if is_s3(uri):
        rest = uri[len("s3://"):].strip("/")
        if not rest:
            raise StorageError(f"URI {uri!r} names no bucket", "use s3://bucket/prefix")
        return "s3://" + rest
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise StorageError(f"unsupported URI scheme {scheme!r} in {uri!r}", "use a local path or s3://bucket/prefix")
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Join path components onto a URI with '/' (both for local and S3)."""
    base = normalize(uri)
    clean = [p.strip("/") for p in parts if p and p.strip("/")]
    if not clean:
        return base
    if is_s3(base):
        return base.rstrip("/") + "/" + "/".join(clean)
    return os.path.join(base, *clean)


def parent(uri: str) -> str:
    uri = normalize(uri)
    if is_s3(uri):
        head = uri[len("s3://"):].rsplit("/", 1)[0]
        return "s3://" + head
    return os.path.dirname(uri)


def basename(uri: str) -> str:
    return normalize(uri).rstrip("/").rsplit("/", 1)[-1]


def strip_scheme(uri: str) -> str:
    """The path a filesystem object wants: ``bucket/key`` for S3, the absolute path locally."""
    uri = normalize(uri)
    return uri[len("s3://"):] if is_s3(uri) else uri


# ---------------------------------------------------------------------------------------- filesystems


def fsspec_fs(uri: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path)`` for a URI."""
    uri = normalize(uri)
    if is_s3(uri):
        s = settings()
        key = ("fsspec-s3", s.endpoint_url, s.region)
        with _lock:
            fs = _fs_cache.get(key)
            if fs is None:
                try:
                    import s3fs
                except ImportError as e:  # pragma: no cover - s3fs is a dependency
                    raise StorageError("s3fs is not installed", "pip install 's3fs>=2025.9'") from e
                client_kwargs: dict[str, Any] = {"region_name": s.region}
                if s.endpoint_url:
                    client_kwargs["endpoint_url"] = s.endpoint_url
                fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, use_listings_cache=False,
                                       skip_instance_cache=True)
                _fs_cache[key] = fs
        return fs, strip_scheme(uri)
    import fsspec

    return fsspec.filesystem("file"), uri


def arrow_fs(uri: str) -> tuple[Any, str]:
    """``(pyarrow.fs.FileSystem, path without scheme)`` for pyarrow, Ray Data and Ray Train."""
    import pyarrow.fs as pafs

    uri = normalize(uri)
    if is_s3(uri):
        s = settings()
        key = ("arrow-s3", s.endpoint_url, s.region)
        with _lock:
            fs = _fs_cache.get(key)
            if fs is None:
                kwargs: dict[str, Any] = {"region": s.region}
                if s.endpoint_url:
                    parsed = urlparse(s.endpoint_url if "://" in s.endpoint_url else "https://" + s.endpoint_url)
                    kwargs["endpoint_override"] = parsed.netloc
                    kwargs["scheme"] = parsed.scheme or "https"
                    kwargs["force_virtual_addressing"] = False
                fs = pafs.S3FileSystem(**kwargs)
                _fs_cache[key] = fs
        return fs, strip_scheme(uri)
    return pafs.LocalFileSystem(), uri


# ------------------------------------------------------------------------------------------- reading


@contextlib.contextmanager
def _errors(op: str, uri: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as e:
        raise StorageError(f"{op}: {uri} does not exist", "check the path/URI (and the S3 endpoint)") from e
    except PermissionError as e:
        raise StorageError(f"{op}: permission denied for {uri}",
                           "check file permissions or your AWS credentials") from e
    except OSError as e:
        raise StorageError(f"{op}: {uri}: {e}", "check the path/URI, the S3 endpoint and credentials") from e
    except Exception as e:  # botocore errors and friends
        name = type(e).__name__
        if "NoCredentials" in name or "ClientError" in name or "EndpointConnection" in name:
            raise StorageError(f"{op}: {uri}: {name}: {e}",
                               "check AWS credentials (environment/profile) and storage.s3_endpoint_url") from e
        raise


def exists(uri: str) -> bool:
    fs, path = fsspec_fs(uri)
    with _errors("exists", uri):
        return bool(fs.exists(path))


def isdir(uri: str) -> bool:
    fs, path = fsspec_fs(uri)
    with _errors("isdir", uri):
        return bool(fs.isdir(path))


def read_bytes(uri: str) -> bytes:
    fs, path = fsspec_fs(uri)
    with _errors("read", uri):
        return fs.cat_file(path)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    raw = read_bytes(uri)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise StorageError(f"{uri} is not valid JSON: {e}", "the file is damaged; rewrite it") from e


def size(uri: str) -> int:
    fs, path = fsspec_fs(uri)
    with _errors("stat", uri):
        return int(fs.size(path))


def listdir(uri: str) -> list[str]:
    """Immediate children of a directory/prefix as full URIs (sorted). Missing directory -> []."""
    uri = normalize(uri)
    fs, path = fsspec_fs(uri)
    with _errors("list", uri):
        if not fs.exists(path):
            return []
        entries = fs.ls(path, detail=False)
    out = []
    for e in entries:
        e = str(e).rstrip("/")
        if e == path.rstrip("/"):
            continue
        out.append("s3://" + e if is_s3(uri) else e)
    return sorted(out)


def walk_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """All files below a directory/prefix as full URIs, sorted; optionally filtered by suffix (case-insensitive)."""
    uri = normalize(uri)
    fs, path = fsspec_fs(uri)
    with _errors("list", uri):
        if not fs.exists(path):
            return []
        files = fs.find(path)
    out = []
    for f in files:
        if suffixes and not str(f).lower().endswith(tuple(s.lower() for s in suffixes)):
            continue
        out.append("s3://" + f if is_s3(uri) else f)
    return sorted(out)


@contextlib.contextmanager
def local_path(uri: str) -> Iterator[str]:
    """A local filesystem path holding the content of ``uri`` (a download for S3; the file itself locally)."""
    uri = normalize(uri)
    if not is_s3(uri):
        if not os.path.exists(uri):
            raise StorageError(f"{uri} does not exist", "check the path")
        yield uri
        return
    fs, path = fsspec_fs(uri)
    with tempfile.TemporaryDirectory(prefix="defectflow-") as d:
        target = os.path.join(d, basename(uri))
        with _errors("download", uri):
            if fs.isdir(path):
                fs.get(path.rstrip("/") + "/", target, recursive=True)
            else:
                fs.get_file(path, target)
        yield target


# ------------------------------------------------------------------------------------------- writing


def makedirs(uri: str) -> None:
    uri = normalize(uri)
    if is_s3(uri):
        return  # prefixes need no creation
    os.makedirs(uri, exist_ok=True)


@contextlib.contextmanager
def _atomic_local(uri: str) -> Iterator[str]:
    """A temporary sibling of ``uri`` to write; renamed onto ``uri`` on success, removed on failure."""
    with _errors("write", uri):
        os.makedirs(os.path.dirname(uri) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(uri) or ".")
        os.close(fd)
        try:
            yield tmp
            os.replace(tmp, uri)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def write_bytes(uri: str, data: bytes) -> None:
    """Atomically write ``data`` to ``uri`` (temp + rename locally, single PUT on S3)."""
    uri = normalize(uri)
    if is_s3(uri):
        fs, path = fsspec_fs(uri)
        with _errors("write", uri):
            fs.pipe_file(path, data)
        return
    with _atomic_local(uri) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any, indent: int = 2) -> None:
    write_bytes(uri, (json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(o, "model_dump"):
        return o.model_dump()
    return str(o)


def upload_file(local: str, uri: str) -> None:
    """Atomically copy a local file to ``uri``."""
    uri = normalize(uri)
    if is_s3(uri):
        fs, path = fsspec_fs(uri)
        with _errors("upload", uri):
            fs.put_file(local, path)
        return
    with _atomic_local(uri) as tmp:
        shutil.copyfile(local, tmp)


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy every file of a local directory below ``uri`` (each file atomically)."""
    for root, _dirs, files in os.walk(local_dir):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            upload_file(src, join(uri, rel))


def copy_tree(src: str, dst: str) -> None:
    """Copy every file below ``src`` to the same relative place below ``dst`` (any mix of local/S3)."""
    src = normalize(src)
    files = walk_files(src)
    if not files and exists(src) and not isdir(src):
        files = [src]
    for f in files:
        rel = f[len(src):].lstrip("/") if f != src else basename(src)
        if is_s3(src) or is_s3(dst):
            write_bytes(join(dst, rel), read_bytes(f))
        else:
            upload_file(f, join(dst, rel))


def delete(uri: str, recursive: bool = False) -> None:
    fs, path = fsspec_fs(uri)
    with _errors("delete", uri):
        if fs.exists(path):
            fs.rm(path, recursive=recursive)


# ------------------------------------------------------------------------------------------- parquet


def write_parquet(table: Any, uri: str) -> None:
    """Atomically write a pyarrow Table as one Parquet file."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(uri, buf.getvalue())


def read_parquet(uri: str, columns: list[str] | None = None) -> Any:
    """Read one Parquet file, or every ``*.parquet`` below a directory/prefix, as a pyarrow Table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    uri = normalize(uri)
    if isdir(uri):
        files = [f for f in walk_files(uri, (".parquet",)) if not basename(f).startswith((".", "_"))]
        if not files:
            raise StorageError(f"no Parquet files below {uri}", "run the step that writes it first")
        return pa.concat_tables([read_parquet(f, columns) for f in files], promote_options="default")
    fs, path = arrow_fs(uri)
    with _errors("read parquet", uri):
        return pq.read_table(path, filesystem=fs, columns=columns)


# -------------------------------------------------------------------------------------------- layout


class Layout:
    """Where each step's output lives below one root URI (local folder or S3 prefix).

    ::

        <root>/datasets/<name>/manifest.parquet        ingest
        <root>/synthetic/<name>/                        synthesize
        <root>/features/<backbone>/<dataset>/           features
        <root>/runs/<run>/                              Ray Train / Tune run storage, checkpoints
        <root>/models/<name>/<version>/                 artifacts (model.safetensors, detector.json, metrics.json)
        <root>/models/<name>/aliases.json               {"production": "3", ...}
        <root>/reports/<name>/                          evaluation/sweep reports, sheets, plots
    """

    def __init__(self, root: str):
        self.root = normalize(root)

    def dataset(self, name: str) -> str:
        return join(self.root, "datasets", name)

    def manifest(self, name: str) -> str:
        return join(self.root, "datasets", name, "manifest.parquet")

    def synthetic(self, name: str) -> str:
        return join(self.root, "synthetic", name)

    def features(self, backbone: str, dataset: str) -> str:
        return join(self.root, "features", backbone, dataset)

    def runs(self) -> str:
        return join(self.root, "runs")

    def run(self, name: str) -> str:
        return join(self.root, "runs", name)

    def models(self, name: str) -> str:
        return join(self.root, "models", name)

    def model(self, name: str, version: str) -> str:
        return join(self.root, "models", name, str(version))

    def reports(self, name: str) -> str:
        return join(self.root, "reports", name)

    # ---- registry

    def versions(self, name: str) -> list[str]:
        """Registered versions of a model, oldest first (versions are increasing integers)."""
        out = []
        for child in listdir(self.models(name)):
            v = basename(child)
            if v.isdigit() and exists(join(child, "detector.json")):
                out.append(v)
        return sorted(out, key=int)

    def next_version(self, name: str) -> str:
        existing = [int(basename(c)) for c in listdir(self.models(name)) if basename(c).isdigit()]
        return str(max(existing, default=0) + 1)

    def aliases(self, name: str) -> dict[str, str]:
        uri = join(self.models(name), "aliases.json")
        return read_json(uri) if exists(uri) else {}

    def set_alias(self, name: str, alias: str, version: str) -> None:
        if str(version) not in self.versions(name):
            raise StorageError(f"model {name} has no version {version}",
                               f"registered versions: {self.versions(name) or 'none'}")
        aliases = self.aliases(name)
        aliases[alias] = str(version)
        write_json(join(self.models(name), "aliases.json"), aliases)


def resolve_model(uri: str) -> str:
    """Resolve a model reference to the URI of an artifact directory holding ``detector.json``.

    Accepted forms: an artifact directory; ``<root>/models/<name>`` (alias "production" if set, else the newest
    version); ``<root>/models/<name>@<alias or version>``.
    """
    ref = str(uri)
    selector = None
    if "@" in ref.rsplit("/", 1)[-1]:
        ref, selector = ref.rsplit("@", 1)
    ref = normalize(ref)
    if selector is None and exists(join(ref, "detector.json")):
        return ref
    models_dir, name = parent(ref), basename(ref)
    layout = Layout(parent(models_dir))
    versions = layout.versions(name)
    if not versions:
        raise StorageError(f"no model artifact at {uri}",
                           "pass an artifact folder (with detector.json) or <root>/models/<name>[@alias|@version]")
    aliases = layout.aliases(name)
    if selector is None:
        version = aliases.get("production", versions[-1])
    elif selector in aliases:
        version = aliases[selector]
    elif selector == "latest":
        version = versions[-1]
    elif selector in versions:
        version = selector
    else:
        raise StorageError(f"model {name} has no alias or version {selector!r}",
                           f"versions: {versions}; aliases: {sorted(aliases) or 'none'}")
    return layout.model(name, version)
