"""Filesystem primitives on fsspec: lookup, URL redaction, hashing, atomic and exclusive writes.

A leaf: it imports nothing of this package but its errors, so that storage, checkpoints and the
lease can all stand on it.

```python
fs, path = filesystem("s3://models/runs", {"key": ..., "secret": ...})
atomic_write(fs, path + "/record.json", b"{}")           # a reader sees the old or the new file
created = create_exclusive(fs, path + "/claim.json", b"{}")  # False: someone created it first
```
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import os
import threading
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..exceptions import ConfigurationError

logger = logging.getLogger("prefect_distrain")

HASH_CHUNK = 8 * 1024 * 1024

#: Object stores: one PUT is atomic there (a reader sees the old object or the whole new one).
_ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "abfs", "az", "abfss", "memory"}


#: Protocols whose user part names a container, not a credential (abfs://container@account).
_CONTAINER_IN_USER = {"abfs", "abfss", "az"}


def redact_url(url: str) -> str:
    """The URL without credentials, query or fragment: safe for logs and artifacts. A local
    path (anything without ``://``, as storage reads it) is returned as it is."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc and not parts.query and not parts.fragment:
        return url
    user, at, host = parts.netloc.rpartition("@")
    if at and parts.scheme in _CONTAINER_IN_USER and ":" not in user:
        host = f"{user}@{host}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def absolute_url(url: str) -> str:
    """A local path made absolute (``~`` expanded) against this process's working directory;
    URLs as they are. Resolved once, on the driver, so every worker uses the same folder."""
    if "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def filesystem(url: str, storage_options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's filesystem for a URL, with errors that say what to install or change."""
    try:
        return fsspec.core.url_to_fs(url, **storage_options)
    except ImportError as error:  # fsspec's message names the package to install
        raise ImportError(f"storage {redact_url(url)!r} needs an extra package: {error}. "
                          "For s3:// install prefect-distrain[s3]") from error
    except ValueError as error:
        if "Protocol not known" not in str(error):
            raise
        known = ", ".join(sorted(p for p in fsspec.available_protocols() if len(p) > 1)[:20])
        raise ConfigurationError(
            f"storage {redact_url(url)!r}: unknown protocol. Use a local path or a URL of a "
            f"protocol fsspec knows ({known}, ...)") from error


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def file_digest(path: str) -> tuple[int, str]:
    """(size, sha256) of a local file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


#: The size of the parts a multipart upload sends (S3's least is 5 MiB).
PART_BYTES = 16 * 2**20
#: Parts of one file in flight at once (s3fs's default is 10 of 50 MiB).
PARTS_PER_FILE = 4
#: The most parts of one multipart upload (S3's limit).
MAX_PARTS = 10_000


@functools.cache
def _uploads_in_parts(fs_class: type) -> bool:
    """Whether ``_put_file`` takes a part size and a number of parts in flight (s3fs), in the
    class or one it wraps (a subclass whose ``_put_file`` passes ``**kwargs`` on)."""
    for cls in fs_class.__mro__:
        method = cls.__dict__.get("_put_file")
        if method is not None and {"chunksize", "max_concurrency"} <= set(
                inspect.signature(method).parameters):
            return True
    return False


def put_files(fs: fsspec.AbstractFileSystem, local_paths: list[str], remote_paths: list[str],
              memory_bytes: int) -> None:
    """``fs.put`` of the files, holding at most about ``memory_bytes`` of them in memory where
    the filesystem uploads in parts (s3fs): its defaults read 10 parts of 50 MiB of every file
    it puts at once (a 2 GB checkpoint held 1 GB more). Files that go up in one request (under
    two parts) go first, as many at once as fit; then the larger ones, in parts; a file too big
    for 10,000 such parts alone, one part at a time, in parts as large as it needs."""
    if not local_paths:
        return
    if not _uploads_in_parts(type(fs)):
        fs.put(local_paths, remote_paths)
        return
    parts = max(1, memory_bytes // PART_BYTES)
    per_file = min(PARTS_PER_FILE, parts)
    sizes = [os.path.getsize(p) for p in local_paths]
    groups = (  # (which files, files at once, part size, parts of a file at once)
        (lambda size: size < 2 * PART_BYTES, max(1, parts // 2), PART_BYTES, 1),
        (lambda size: 2 * PART_BYTES <= size <= MAX_PARTS * PART_BYTES,
         max(1, parts // per_file), PART_BYTES, per_file),
        (lambda size: size > MAX_PARTS * PART_BYTES, 1, None, 1))
    for picks, batch, part, concurrency in groups:
        chosen = [i for i, size in enumerate(sizes) if picks(size)]
        if chosen:
            fs.put([local_paths[i] for i in chosen], [remote_paths[i] for i in chosen],
                   batch_size=batch, chunksize=part, max_concurrency=concurrency)


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    protocol = fs.protocol
    return set(protocol) if isinstance(protocol, (tuple, list)) else {protocol}


def ensure_folder(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Create ``path`` on stores with real folders (local, sftp, hdfs...); nothing on object
    stores, whose "folders" are key prefixes (and where creating one could create a bucket)."""
    if not (_protocols(fs) & _ATOMIC_PUT):
        fs.makedirs(path, exist_ok=True)


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Replace ``path`` so that a reader sees the old content or all of the new.

    Local: a temporary file, fsync, rename. Object stores: one PUT. Other stores (sftp, smb,
    webdav, hdfs...), whose writes may be seen half-done: a temporary name, read back and
    compared, then a rename."""
    if is_local(fs):
        temp = _local_temp(path, data)
        os.replace(temp, path)
    elif _protocols(fs) & _ATOMIC_PUT:
        fs.pipe_file(path, data)
    else:
        temp = _remote_temp(fs, path, data)
        fs.mv(temp, path)


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Write ``path`` only if it does not exist yet, atomically; False if it already did.

    Local: a temporary file hard-linked to the name (the link fails if the name exists). S3:
    a conditional PUT (``If-None-Match: *``). Other stores have no exclusive create: the file
    is written after a look (two writers racing within that moment can both think they won),
    which is logged once per protocol."""
    if is_local(fs):
        temp = _local_temp(path, data)
        try:
            os.link(temp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(temp)
    if _native_create(fs):
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
    _warn_weak(fs)
    with _weak_lock:
        if fs.exists(path):
            return False
        atomic_write(fs, path, data)
        return True


_weak_lock = threading.Lock()
_warned: set[str] = set()


def _native_create(fs: fsspec.AbstractFileSystem) -> bool:
    """Stores whose ``pipe_file(mode="create")`` is one conditional request."""
    try:
        from s3fs import S3FileSystem
    except ImportError:
        return False
    return isinstance(fs, S3FileSystem)


def _warn_weak(fs: fsspec.AbstractFileSystem) -> None:
    name = "/".join(sorted(_protocols(fs)))
    if name not in _warned and name != "memory":  # memory:// lives in one process
        _warned.add(name)
        logger.warning(
            "Storage protocol %r has no exclusive create: a run's attempts and lease are claimed "
            "by a look, then a write. Two writers starting on one run name within that moment "
            "are not told apart; use s3:// or a local or mounted folder where that matters", name)


def _local_temp(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return temp


def _remote_temp(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> str:
    temp = f"{path}.tmp-{uuid.uuid4().hex}"
    ensure_folder(fs, path.rsplit("/", 1)[0])
    fs.pipe_file(temp, data)
    if fs.cat_file(temp) != data:
        fs.rm_file(temp)
        raise OSError(f"writing {temp}: the file read back differs from what was written")
    return temp


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes | None:
    """The file's bytes, or None if it does not exist (deleted while we listed, say)."""
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def list_names(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    """The names in ``folder`` (not paths), sorted; [] if it does not exist."""
    try:
        paths = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in paths)


def remove_tree(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def dumps_json(record: Any) -> bytes:
    """JSON of a record whose values may be numpy / torch scalars (their ``item()``)."""
    return json.dumps(record, default=_json_default, indent=1).encode()


def _json_default(value: Any) -> Any:
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return repr(value)


def brief(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:500]
