"""URIs to filesystems, atomic and create-only writes.

Where each step's output lives below a storage root, and the model catalog, are :mod:`components.catalog`.

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
import hashlib
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


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file (0666 minus the process umask)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()  # read once at import: os.umask is process-global


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


def worker_settings() -> dict[str, str | None]:
    """Keyword arguments of :func:`configure` that reproduce this process's S3 settings in a Ray worker (tasks and
    actors call ``storage.configure(**settings)`` first: they may run on nodes with another environment)."""
    s = settings()
    return {"endpoint_url": s.endpoint_url, "region": s.region}


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
    """Canonical form: ``s3://bucket/key`` (no trailing slash) or an absolute local path (relative paths: see
    :func:`_absolute_local`)."""
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
    return _absolute_local(uri)


# The submitter's working directory, which cluster/submit.sh passes to the job: relative local paths resolve there.
WORKDIR_ENV = "DEFECTFLOW_WORKDIR"
# Ray's job supervisor sets this in the environment of every `ray job submit` entrypoint (the job's driver).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


# Relative paths a plain `ray job submit` driver resolved into its working-dir copy (resolved -> as given).
_unanchored: dict[str, str] = {}


def _absolute_local(path: str) -> str:
    """A local path made absolute.

    A Ray job runs in Ray's per-session copy of its working dir (``.../runtime_resources/working_dir_files/
    _ray_pkg_<hash>``), which is deleted with the session: outputs written relative to it are lost. So relative paths
    resolve against ``DEFECTFLOW_WORKDIR`` when it is set, and a job driver without it refuses them. The refusal
    comes when such a path is used (normalized again, as every storage operation does), not when it is first
    resolved: config defaults such as ``storage.root: ./defectflow-data`` are validated when modules are imported.
    """
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        path = os.path.abspath(path)
        for resolved, given in _unanchored.items():
            if path == resolved or path.startswith(resolved + os.sep):
                raise StorageError(
                    f"relative local path {given!r} in a Ray job (storage.root defaults to ./defectflow-data): it "
                    f"resolves inside the job's temporary copy of the working dir ({os.getcwd()}), which Ray "
                    "deletes with the session",
                    f"submit with cluster/submit.sh (it passes your directory as {WORKDIR_ENV}), or set "
                    f"{WORKDIR_ENV} to an absolute directory in the job's runtime_env env_vars, or give an absolute "
                    "path that every node can reach or s3://bucket/prefix")
        return path
    base = os.environ.get(WORKDIR_ENV)
    if base:
        base = os.path.expanduser(base)
        if not os.path.isabs(base):
            raise StorageError(f"{WORKDIR_ENV}={base!r} is not an absolute path",
                               f"set {WORKDIR_ENV} to the directory relative paths are meant from, e.g. \"$PWD\"")
        return os.path.abspath(os.path.join(base, path))
    resolved = os.path.abspath(path)
    if os.environ.get(RAY_JOB_ENV):
        _unanchored[resolved] = path
    return resolved


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
            os.chmod(tmp, _FILE_MODE)  # mkstemp's 0600 would hide artifacts and reports from the rest of the team
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


def create_only(uri: str, data: bytes) -> bool:
    """Write ``data`` to ``uri`` only if nothing is there yet; True when this call created it.

    The one race-free way to claim a name (a model version, say) among concurrent writers: an exclusive create
    locally, a conditional PUT (``If-None-Match: *``) on S3, which S3 and S3-compatible stores answer with 412 when
    the key exists. Locally the claim is visible before its content is complete, so claim files carry no payload
    that readers depend on.
    """
    uri = normalize(uri)
    if is_s3(uri):
        bucket, _, key = strip_scheme(uri).partition("/")
        with _errors("create", uri):
            try:
                _s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            except Exception as e:
                code = str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
                if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    return False
                raise
        return True
    with _errors("create", uri):
        os.makedirs(os.path.dirname(uri) or ".", exist_ok=True)
        try:
            fd = os.open(uri, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True


def _s3_client() -> Any:
    """A boto3 S3 client with this process's endpoint/region (s3fs has no conditional PUT)."""
    s = settings()
    key = ("boto3-s3", s.endpoint_url, s.region)
    with _lock:
        client = _fs_cache.get(key)
        if client is None:
            import boto3

            client = boto3.client("s3", endpoint_url=s.endpoint_url, region_name=s.region)
            _fs_cache[key] = client
    return client


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


# ------------------------------------------------------------------------------------- local copies

_cache_lock = threading.Lock()
_local_copies: dict[str, str] = {}


def cache_root() -> str:
    return os.environ.get("DEFECTFLOW_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "defectflow")


def cached_local_dir(uri: str) -> str:
    """A local folder with the content of ``uri``: the folder itself when local; for S3 a copy below
    ``$DEFECTFLOW_CACHE/copies`` made once per process (and reused by later processes: the cache is keyed by
    URI, so publish a changed model under a new URI). Concurrent workers each download to a temporary folder and
    the first rename wins, so nobody reads a half-copied pipeline."""
    uri = normalize(uri)
    if not is_s3(uri):
        return uri
    with _cache_lock:
        if uri in _local_copies and os.path.isdir(_local_copies[uri]):
            return _local_copies[uri]
        target = os.path.join(cache_root(), "copies", hashlib.sha256(uri.encode()).hexdigest()[:24])
        if not os.path.isdir(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            log.info("downloading %s to %s", uri, target)
            tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(target))
            try:
                with local_path(uri) as src:
                    if os.path.isdir(src):
                        shutil.copytree(src, tmp, dirs_exist_ok=True)
                    else:
                        shutil.copy2(src, tmp)
                try:
                    os.replace(tmp, target)
                except OSError:  # another process finished first: use its copy
                    shutil.rmtree(tmp, ignore_errors=True)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        _local_copies[uri] = target
        return target
