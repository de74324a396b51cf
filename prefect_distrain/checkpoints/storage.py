"""A run's folder on any fsspec filesystem: plain I/O, no policy.

Layout of one run::

    <storage>/<run name>/
        checkpoint_000003-a0/              files of every rank that reported checkpoint 3,
                                           written by attempt 0 (never shared across attempts)
        _manifests/checkpoint_000003-a0.json   the commit: written last, once, by the driver
                                           after every reporting rank has uploaded
        _validations/checkpoint_000003-a0.json   its validation's status and metrics
                                           (pd.Validation), replaced as it moves on
        _attempts/attempt_00000.json       one record per start of the worker group, claimed
                                           by an exclusive create
        _lease/lease_000001.json           who writes the run now (lease.py)
        forensics/attempt_00000-hang.txt   every rank's stack when an attempt hung

What is committed, kept, latest, best and resumed from is decided in checkpoint_manager.py; this
module only moves bytes. Records are written atomically (``fs.atomic_write``); a manifest is
written once, by an exclusive create, so no writer ever replaces another's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import fsspec

from .. import settings
from ..exceptions import CheckpointUploadError, DistrainError, StorageError
from . import fs as fsutil
from .checkpoint import Checkpoint
from .manifest import FileEntry, Manifest, ManifestError, checkpoint_dirname, parse_dirname
from .retry import RetryPolicy, with_retries
from .validation import ValidationRecord, ValidationRecordError

MANIFESTS = "_manifests"
ATTEMPTS = "_attempts"
#: Checkpoints that a model alias points at (models.py): ``<model>.<alias>.<folder>.pin``.
PINS = "_pins"
FORENSICS = "forensics"
LEASE = "_lease"
VALIDATIONS = "_validations"

logger = logging.getLogger("prefect_distrain")


@dataclass(frozen=True)
class RunStorage:
    """The folder of one run and how to reach it. Sent to the workers, so it holds no client.

    ``storage`` is made absolute when the value is built (on the driver): a relative local path
    means the driver's working directory, on every worker too."""

    storage: str
    run_name: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    #: How uploads and record writes are retried (``CheckpointConfig(upload_retries=...)``).
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: About how many bytes of checkpoint files a rank holds in memory while it uploads them
    #: (PREFECT_DISTRAIN_UPLOAD_MEMORY_MB, read where this is built: on the driver).
    upload_memory_bytes: int = field(
        default_factory=lambda: settings.settings().upload_memory_mb * 2**20)

    def __post_init__(self) -> None:
        object.__setattr__(self, "storage", fsutil.absolute_url(self.storage))

    @property
    def run_url(self) -> str:
        return self.storage.rstrip("/") + "/" + self.run_name

    def filesystem(self, fresh: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
        """The run's filesystem; ``fresh``: a new instance, not fsspec's cached one (a new
        client that looks its credentials up again)."""
        options = {**self.storage_options, "skip_instance_cache": True} if fresh \
            else self.storage_options
        return fsutil.filesystem(self.run_url, options)

    def path(self, *parts: str) -> str:
        """The filesystem path of ``<run>/<parts...>``."""
        return "/".join([self.filesystem()[1].rstrip("/"), *parts])

    def checkpoint(self, manifest: Manifest,
                   validation: ValidationRecord | None = None) -> Checkpoint:
        return Checkpoint(f"{self.run_url}/{manifest.directory}", self.storage_options,
                          manifest=manifest, validation=validation)

    def contains(self, path: str) -> bool:
        """Whether a checkpoint path lies in this storage (any run of it)."""
        root = self.storage.rstrip("/") + "/"
        return fsutil.absolute_url(path).rstrip("/").startswith(root)

    # -- records ----------------------------------------------------------------------------------

    def write_json(self, record: dict, *parts: str, on_retry: Callable[[], None] | None = None
                   ) -> None:
        """A JSON record at ``<run>/<parts...>``, replaced atomically (retried)."""
        data, path = fsutil.dumps_json(record), self.path(*parts)
        with_retries(f"writing {'/'.join(parts)}", self.retry,
                     lambda fresh: fsutil.atomic_write(self.filesystem(fresh)[0], path, data),
                     on_retry)

    def create_json(self, record: dict, *parts: str,
                    on_retry: Callable[[], None] | None = None) -> bool:
        """A new JSON record at ``<run>/<parts...>``; False if one is there already."""
        return self._create(self.path(*parts), fsutil.dumps_json(record), "/".join(parts),
                            on_retry)

    def _create(self, path: str, data: bytes, what: str,
                on_retry: Callable[[], None] | None) -> bool:
        """Exclusive create, retried; after a retry, a file that is there with exactly our
        bytes is ours (the try before wrote it, and its answer was lost)."""
        def attempt(fresh: bool) -> bool:
            fs = self.filesystem(fresh)[0]
            if fsutil.create_exclusive(fs, path, data):
                return True
            return fresh and fsutil.read_bytes(fs, path) == data

        return with_retries(f"writing {what}", self.retry, attempt, on_retry)

    def read_json(self, *parts: str) -> dict | None:
        """The JSON record at ``<run>/<parts...>``; None if there is none or it is unreadable
        (said in the log: a torn or foreign file never stops a run)."""
        data = fsutil.read_bytes(self.filesystem()[0], self.path(*parts))
        if data is None:
            return None
        try:
            record = json.loads(data)
        except (ValueError, UnicodeDecodeError) as error:
            logger.warning("Ignoring %s: not valid JSON (%s)", "/".join(parts), error)
            return None
        if not isinstance(record, dict):
            logger.warning("Ignoring %s: not a JSON object", "/".join(parts))
            return None
        return record

    def write_text(self, text: str, *parts: str) -> None:
        """A text file at ``<run>/<parts...>`` (a hang's forensics, say), replaced atomically."""
        fsutil.atomic_write(self.filesystem()[0], self.path(*parts), text.encode())

    def names(self, *parts: str) -> list[str]:
        """The names in ``<run>/<parts...>`` (the run's own folder with no parts)."""
        return fsutil.list_names(self.filesystem()[0], self.path(*parts))

    # -- checkpoints ------------------------------------------------------------------------------

    def upload(self, local_dir: str, index: int, attempt: int, rank: int,
               on_retry: Callable[[], None] | None = None,
               skip: Iterable[str] = ()) -> dict[str, FileEntry]:
        """Copy a local checkpoint directory into the folder of (index, attempt), but for the
        files named in ``skip`` (a lower rank uploads those).

        Returns each uploaded file's size, sha256 and rank, for the manifest. Files go up in
        ``fs.put`` calls, which object stores run concurrently and in multipart, with about
        PREFECT_DISTRAIN_UPLOAD_MEMORY_MB of them in memory at once; a transient
        failure puts them all again (on a fresh filesystem), up to the retry policy. The
        hashes are computed while the files go up (hashlib releases the GIL), not before.
        """
        relatives, local_paths, remote_paths = [], [], []
        target = self.path(checkpoint_dirname(index, attempt))
        skip = set(skip)
        for relative, path in local_files(local_dir):
            if relative in skip:
                continue
            relatives.append(relative)
            local_paths.append(path)
            remote_paths.append(f"{target}/{relative}")
        hashing = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-hash")
        digests = hashing.submit(lambda: [fsutil.file_digest(p) for p in local_paths])
        hashing.shutdown(wait=False)

        def put(fresh: bool) -> None:
            fs, _ = self.filesystem(fresh)
            for remote in {p.rsplit("/", 1)[0] for p in remote_paths} | {target}:
                fsutil.ensure_folder(fs, remote)
            fsutil.put_files(fs, local_paths, remote_paths, self.upload_memory_bytes)

        try:
            with_retries(f"uploading checkpoint {index} from rank {rank}", self.retry, put,
                         on_retry)
        except Exception as error:
            raise CheckpointUploadError(
                f"uploading checkpoint {index} from rank {rank} to "
                f"{fsutil.redact_url(self.run_url)} failed: {fsutil.brief(error)}", index=index,
                rank=rank) from error
        return {relative: FileEntry(size, sha256, rank)
                for relative, (size, sha256) in zip(relatives, digests.result(), strict=True)}

    def write_manifest(self, manifest: Manifest,
                       on_retry: Callable[[], None] | None = None) -> None:
        """Commit: from now on the checkpoint exists. Written once, last and atomically
        (retried); a manifest that is already there (another writer's) is never replaced."""
        path = self.path(MANIFESTS, f"{manifest.directory}.json")
        if not self._create(path, manifest.to_json(), f"{MANIFESTS}/{manifest.directory}.json",
                            on_retry):
            raise FileExistsError(f"manifest {manifest.directory}.json exists already: another "
                                  "writer committed this checkpoint of this attempt")

    def read_manifests(self) -> tuple[list[Manifest], list[str]]:
        """The run's valid manifests by index, and why each other file in ``_manifests`` is not
        one (never deleted here: a person may want to look at it)."""
        fs, _ = self.filesystem()
        valid, problems = [], []
        for name in self.names(MANIFESTS):
            if not name.endswith(".json"):
                continue
            data = fsutil.read_bytes(fs, self.path(MANIFESTS, name))
            if data is None:  # deleted by retention while we listed
                continue
            try:
                valid.append(Manifest.from_json(data, name))
            except ManifestError as error:
                problems.append(str(error))
        return sorted(valid, key=lambda m: (m.index, m.attempt)), problems

    def checkpoints(self) -> list[Checkpoint]:
        """The run's committed checkpoints, oldest first, each with its validation record."""
        manifests, _ = self.read_manifests()
        validations, _ = self.read_validations()
        return [self.checkpoint(m, record if (record := validations.get(m.directory))
                                and record.belongs_to(m) else None) for m in manifests]

    def read_manifest(self, directory: str) -> Manifest:
        """The manifest of one checkpoint folder; ManifestError if it has none or a bad one."""
        name = f"{directory}.json"
        data = fsutil.read_bytes(self.filesystem()[0], self.path(MANIFESTS, name))
        if data is None:
            raise ManifestError(f"checkpoint {directory} has no manifest in "
                                f"{fsutil.redact_url(self.run_url)}/{MANIFESTS}")
        return Manifest.from_json(data, name)

    def write_validation(self, directory: str, record: ValidationRecord,
                         on_retry: Callable[[], None] | None = None) -> None:
        """The validation record of one checkpoint folder, replaced atomically (retried)."""
        self.write_json(record.to_record(), VALIDATIONS, f"{directory}.json", on_retry=on_retry)

    def read_validations(self) -> tuple[dict[str, ValidationRecord], list[str]]:
        """The validation records by checkpoint folder, and why each other file in
        ``_validations`` is not one (left as it is)."""
        fs, _ = self.filesystem()
        records, problems = {}, []
        for name in self.names(VALIDATIONS):
            if not name.endswith(".json") or parse_dirname(name[:-len(".json")]) is None:
                continue
            data = fsutil.read_bytes(fs, self.path(VALIDATIONS, name))
            if data is None:  # deleted by retention while we listed
                continue
            try:
                records[name[:-len(".json")]] = ValidationRecord.from_json(data, name)
            except ValidationRecordError as error:
                problems.append(str(error))
        return records, problems

    def checkpoint_folders(self) -> list[tuple[str, int, int]]:
        """(name, index, attempt) of every checkpoint folder in the run, committed or not."""
        found = []
        for name in self.names():
            parsed = parse_dirname(name)
            if parsed:
                found.append((name, *parsed))
        return found

    def delete_checkpoint(self, manifest: Manifest) -> None:
        """Manifest first, then its validation record and files: a reader never finds a
        manifest without its files (a record without a manifest means nothing)."""
        fs, _ = self.filesystem()
        for record in (self.path(MANIFESTS, f"{manifest.directory}.json"),
                       self.path(VALIDATIONS, f"{manifest.directory}.json")):
            try:
                fs.rm_file(record)
            except FileNotFoundError:
                pass
        self.remove_folder(manifest.directory)

    def remove_folder(self, directory: str) -> None:
        """Remove one checkpoint folder of this run (only a checkpoint folder's name)."""
        if parse_dirname(directory) is None:
            raise ValueError(f"not a checkpoint folder: {directory!r}")
        fsutil.remove_tree(self.filesystem()[0], self.path(directory))


@contextlib.contextmanager
def driver_io(what: str, storage: RunStorage) -> Iterator[None]:
    """A storage operation of the driver: its failure (disk full, no permission, a network
    error) is a StorageError (infrastructure: restarted, retried) with the original error as
    its cause. Errors that mean something else pass unchanged."""
    try:
        yield
    except (DistrainError, FileExistsError):
        raise
    except Exception as error:
        raise StorageError(f"{what} in {fsutil.redact_url(storage.run_url)} failed: "
                           f"{fsutil.brief(error)}") from error


def local_files(local_dir: str) -> list[tuple[str, str]]:
    """(name in the checkpoint, local path) of every file under ``local_dir``, in order."""
    found = []
    for folder, dirs, names in os.walk(local_dir):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(folder, name)
            found.append((os.path.relpath(path, local_dir).replace(os.sep, "/"), path))
    return found


def digests(local_dir: str, names: Iterable[str], rank: int) -> dict[str, FileEntry]:
    """Size, sha256 and rank of the named files under ``local_dir``."""
    wanted = set(names)
    return {relative: FileEntry(*fsutil.file_digest(path), rank)
            for relative, path in local_files(local_dir) if relative in wanted}


def pin_name(model: str, alias: str, directory: str) -> str:
    return f"{model}.{alias}.{directory}.pin"


def pinned_folder(name: str) -> str | None:
    """The checkpoint folder a pin's file name holds, or None for another name."""
    if not name.endswith(".pin"):
        return None
    folder = name[:-len(".pin")].rsplit(".", 1)[-1]
    return folder if parse_dirname(folder) is not None else None
