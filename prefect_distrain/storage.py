"""A run's checkpoints on any fsspec filesystem, committed atomically by a manifest written last.

Layout of one run::

    <storage>/<run name>/
        checkpoint_000003-a0/              files of every rank that reported checkpoint 3,
                                           written by attempt 0 (never shared across attempts)
        _manifests/checkpoint_000003-a0.json   the commit: written by the driver after every
                                           reporting rank has uploaded; lists each file's size
                                           and sha256, the ranks, metrics, attempt, world size

Only checkpoints with a manifest exist for readers (``latest``, "best", resume). A folder without
one is staging: in progress, or torn by a dead attempt; the latter is removed by the next
attempt's first commit. Retention deletes a manifest before its folder, so no manifest ever
points at missing files.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .checkpoint import Checkpoint
from .exceptions import CheckpointUploadError, ConfigurationError

MANIFEST_SCHEMA_VERSION = 1
MANIFESTS = "_manifests"
ATTEMPTS = "_attempts"
_DIRNAME = re.compile(r"^checkpoint_(\d{6,})-a(\d+)$")
_HASH_CHUNK = 8 * 1024 * 1024


def checkpoint_dirname(index: int, attempt: int) -> str:
    return f"checkpoint_{index:06d}-a{attempt}"


def redact_url(url: str) -> str:
    """The URL without user, password, query or fragment: safe for logs and artifacts."""
    parts = urlsplit(url)
    if not parts.scheme or len(parts.scheme) == 1:  # a local path (or a Windows drive)
        return url
    if "@" not in parts.netloc and not parts.query and not parts.fragment:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


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


def file_digest(path: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _json_default(value: Any) -> Any:
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return repr(value)


@dataclass(frozen=True)
class RunStorage:
    """The folder of one run and how to reach it. Sent to the workers, so it holds no client."""

    storage: str
    name: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def run_url(self) -> str:
        base = self.storage
        if "://" not in base:
            base = os.path.abspath(os.path.expanduser(base))
        return base.rstrip("/") + "/" + self.name

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return filesystem(self.run_url, self.storage_options)

    def _join(self, *parts: str) -> str:
        return "/".join([self.filesystem()[1].rstrip("/"), *parts])

    def checkpoint(self, dirname: str, manifest: dict | None = None) -> Checkpoint:
        return Checkpoint(f"{self.run_url}/{dirname}", self.storage_options, manifest=manifest)

    # -- driver: before the run -------------------------------------------------------------------

    def check_writable(self) -> str:
        """Write a marker file into the run's folder; return its path for the workers to find.

        Catches a missing bucket, missing credentials or a read-only location before any
        worker starts, with a message that names the fix.
        """
        fs, root = self.filesystem()
        marker = f"{root.rstrip('/')}/.visible-{uuid.uuid4().hex}"
        shown = redact_url(self.run_url)
        try:
            if isinstance(fs, LocalFileSystem):
                fs.makedirs(root, exist_ok=True)
            fs.pipe_file(marker, b"prefect-distrain storage check\n")
        except FileNotFoundError as error:
            raise ConfigurationError(
                f"storage {shown!r} does not exist: create the bucket (or parent folder) first, "
                f"or fix the URL ({type(error).__name__})") from None
        except PermissionError as error:
            raise ConfigurationError(
                f"storage {shown!r} refused the write: check the credentials in storage_options "
                f"(or the storage block) and their permissions ({_brief(error)})") from None
        except Exception as error:  # noqa: BLE001 - botocore's NoCredentialsError and kin
            if "credential" in str(error).lower():
                raise ConfigurationError(
                    f"no credentials to write to storage {shown!r}: pass them in "
                    "RunConfig(storage_options={'key': ..., 'secret': ...}) or a storage block, "
                    "or set them in the environment of the driver and the workers") from None
            raise
        return marker

    def remove_marker(self, marker: str) -> None:
        fs, _ = self.filesystem()
        try:
            fs.rm_file(marker)
        except FileNotFoundError:
            pass

    def layout(self) -> tuple[list[dict], int]:
        """Committed manifests (by index) and the next attempt number for this run."""
        fs, root = self.filesystem()
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
        except FileNotFoundError:
            names = []
        attempts = [int(m.group(2)) for m in map(_DIRNAME.match, names) if m]
        manifests = self.read_manifests()
        attempts += [m["attempt"] for m in manifests]
        attempts += [a["attempt"] for a in self.read_attempts()]
        return manifests, (max(attempts) + 1 if attempts else 0)

    def write_json(self, record: dict, *parts: str) -> None:
        """A JSON record at ``<run>/<parts...>``, replaced atomically."""
        fs, _ = self.filesystem()
        data = json.dumps(record, default=_json_default, indent=1).encode()
        _atomic_write(fs, self._join(*parts), data)

    def read_json(self, *parts: str) -> dict | None:
        """The JSON record at ``<run>/<parts...>``, or None if there is none."""
        fs, _ = self.filesystem()
        try:
            return json.loads(fs.cat_file(self._join(*parts)))
        except FileNotFoundError:
            return None

    def record_attempt(self, record: dict) -> None:
        """The attempt ledger: one JSON file per start of the worker group, rewritten when
        the attempt ends. It also keeps attempt numbers unique across Prefect retries."""
        self.write_json(record, ATTEMPTS, f"attempt_{record['attempt']:05d}.json")

    def read_attempts(self) -> list[dict]:
        fs, _ = self.filesystem()
        try:
            paths = sorted(fs.ls(self._join(ATTEMPTS), detail=False))
        except FileNotFoundError:
            return []
        return sorted((json.loads(fs.cat_file(p)) for p in paths if p.endswith(".json")),
                      key=lambda a: a["attempt"])

    def read_manifests(self) -> list[dict]:
        fs, _ = self.filesystem()
        folder = self._join(MANIFESTS)
        try:
            paths = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".json"))
        except FileNotFoundError:
            return []
        manifests = []
        for path in paths:
            try:
                manifest = json.loads(fs.cat_file(path))
            except FileNotFoundError:  # deleted by retention while we listed
                continue
            if manifest.get("schema_version") == MANIFEST_SCHEMA_VERSION:
                manifests.append(manifest)
        return sorted(manifests, key=lambda m: m["index"])

    # -- worker: upload ---------------------------------------------------------------------------

    def upload(self, local_dir: str, index: int, attempt: int, rank: int) -> dict[str, dict]:
        """Copy a checkpoint directory into the staging folder of (index, attempt).

        Returns {relative path: {size, sha256, rank}} for the manifest. Files go up in one
        ``fs.put`` call, which object stores run concurrently and in multipart.
        """
        files: dict[str, dict] = {}
        local_paths, remote_paths = [], []
        target = self._join(checkpoint_dirname(index, attempt))
        for folder, dirs, names in os.walk(local_dir):
            dirs.sort()
            for name in sorted(names):
                path = os.path.join(folder, name)
                relative = os.path.relpath(path, local_dir).replace(os.sep, "/")
                size, sha256 = file_digest(path)
                files[relative] = {"size": size, "sha256": sha256, "rank": rank}
                local_paths.append(path)
                remote_paths.append(f"{target}/{relative}")
        fs, _ = self.filesystem()
        try:
            if isinstance(fs, LocalFileSystem):
                for remote in {p.rsplit("/", 1)[0] for p in remote_paths} | {target}:
                    fs.makedirs(remote, exist_ok=True)
            if local_paths:
                fs.put(local_paths, remote_paths)
        except Exception as error:
            raise CheckpointUploadError(
                f"uploading checkpoint {index} from rank {rank} to "
                f"{redact_url(self.run_url)} failed: {_brief(error)}", index=index,
                rank=rank) from None
        return files

    # -- driver: commit, retention, garbage ---------------------------------------------------

    def commit(self, index: int, attempt: int, files: dict[str, dict], *, metrics: dict,
               world_size: int, backend: str) -> dict:
        """Write the manifest: from now on the checkpoint exists. Written last and atomically."""
        manifest = {
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "index": index,
            "attempt": attempt,
            "directory": checkpoint_dirname(index, attempt),
            "files": dict(sorted(files.items())),
            "ranks": sorted({f["rank"] for f in files.values()}),
            "metrics": metrics,
            "world_size": world_size,
            "backend": backend,
            "committed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        data = json.dumps(manifest, default=_json_default, indent=1).encode()
        fs, _ = self.filesystem()
        path = self._join(MANIFESTS, manifest["directory"] + ".json")
        _atomic_write(fs, path, data)
        return json.loads(data)

    def delete(self, manifest: dict) -> None:
        """Manifest first, then files: a reader never finds a manifest without its files."""
        fs, _ = self.filesystem()
        try:
            fs.rm_file(self._join(MANIFESTS, manifest["directory"] + ".json"))
        except FileNotFoundError:
            pass
        self._remove_folder(fs, self._join(manifest["directory"]))

    def remove_torn(self, committed: Iterable[dict], attempt: int) -> list[str]:
        """Remove staging folders of earlier attempts that never got a manifest."""
        fs, root = self.filesystem()
        keep = {m["directory"] for m in committed}
        removed = []
        for path in fs.ls(root, detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            match = _DIRNAME.match(name)
            if match and name not in keep and int(match.group(2)) < attempt:
                self._remove_folder(fs, path)
                removed.append(name)
        return removed

    @staticmethod
    def _remove_folder(fs: fsspec.AbstractFileSystem, path: str) -> None:
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass


def find_manifest(checkpoint: Checkpoint) -> dict | None:
    """The manifest of a committed checkpoint given by its path, if it has one."""
    fs, path = checkpoint._fs_and_path()
    parent, _, name = path.rstrip("/").rpartition("/")
    try:
        manifest = json.loads(fs.cat_file(f"{parent}/{MANIFESTS}/{name}.json"))
    except FileNotFoundError:
        return None
    return manifest if manifest.get("schema_version") == MANIFEST_SCHEMA_VERSION else None


def _atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Local: temp file + rename (atomic on one filesystem). Object stores: one PUT, which
    is atomic there (a reader sees the old object or the whole new one)."""
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    else:
        fs.pipe_file(path, data)


def _brief(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:500]


def select_retained(manifests: list[dict], num_to_keep: int | None, score_attribute: str | None,
                    score_order: str, protected: set[str] = frozenset()) -> list[dict]:
    """The manifests to keep: the ``num_to_keep`` best by score (newest when no score), plus
    the latest and any protected one (e.g. the checkpoint a resume started from)."""
    if num_to_keep is None or not manifests:
        return list(manifests)
    if score_attribute is None:
        ranked = sorted(manifests, key=lambda m: m["index"], reverse=True)
    else:
        sign = 1 if score_order == "max" else -1
        ranked = sorted(manifests, key=lambda m: (sign * m["metrics"][score_attribute], m["index"]),
                        reverse=True)
    keep = {m["directory"] for m in ranked[:num_to_keep]}
    keep.add(max(manifests, key=lambda m: m["index"])["directory"])
    keep |= set(protected)
    return [m for m in manifests if m["directory"] in keep]


def latest_checkpoint(run: Any) -> Checkpoint | None:
    """The latest committed checkpoint of another run (a RunConfig with a name), e.g. to
    warm-start a new run from it: ``resume_from_checkpoint=pd.latest_checkpoint(prod)``."""
    manifests = _run_storage(run).read_manifests()
    return _checkpoint_of(run, manifests[-1]) if manifests else None


def best_checkpoint(run: Any, metric: str, mode: str = "min") -> Checkpoint | None:
    """The committed checkpoint of another run with the best ``metric`` (``mode`` "min" or
    "max"); checkpoints that did not report the metric are skipped."""
    if mode not in ("min", "max"):
        raise ConfigurationError(f"mode {mode!r}: use 'min' or 'max'")
    scored = [m for m in _run_storage(run).read_manifests()
              if isinstance(m["metrics"].get(metric), (int, float))]
    if not scored:
        return None
    pick = min if mode == "min" else max
    return _checkpoint_of(run, pick(scored, key=lambda m: (m["metrics"][metric], -m["index"])))


def _run_storage(run: Any) -> RunStorage:
    if getattr(run, "name", None) is None:
        raise ConfigurationError("give the run to read from a name: RunConfig(name='prod', ...)")
    url, options = run.resolved_storage()
    return RunStorage(url, run.name, options)


def _checkpoint_of(run: Any, manifest: dict) -> Checkpoint:
    return _run_storage(run).checkpoint(manifest["directory"], manifest)
