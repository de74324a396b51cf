"""A run's folder on any fsspec filesystem: plain I/O, no policy.

Layout of one run::

    <storage>/<run name>/
        checkpoint_000003-a0/              files of every rank that reported checkpoint 3,
                                           written by attempt 0 (never shared across attempts)
        _manifests/checkpoint_000003-a0.json   the commit: written last, once, by the driver
                                           after every reporting rank has uploaded
        _attempts/attempt_00000.json       one record per start of the worker group, claimed
                                           by an exclusive create
        _lease/lease_000001.json           who writes the run now (checkpoint_manager.py)

What is committed, kept, latest, best and resumed from is decided in checkpoint_manager.py; this
module only moves bytes. Records are written atomically (``fs.atomic_write``); a manifest is
written once, by an exclusive create, so no writer ever replaces another's.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec

from . import fs as fsutil
from .checkpoint import Checkpoint
from .exceptions import CheckpointUploadError, ConfigurationError
from .manifest import FileEntry, Manifest, ManifestError, checkpoint_dirname, parse_dirname

MANIFESTS = "_manifests"
ATTEMPTS = "_attempts"
LEASE = "_lease"

logger = logging.getLogger("prefect_distrain")


@dataclass(frozen=True)
class RunStorage:
    """The folder of one run and how to reach it. Sent to the workers, so it holds no client.

    ``storage`` is made absolute when the value is built (on the driver): a relative local path
    means the driver's working directory, on every worker too."""

    storage: str
    name: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "storage", fsutil.absolute_url(self.storage))

    @property
    def run_url(self) -> str:
        return self.storage.rstrip("/") + "/" + self.name

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return fsutil.filesystem(self.run_url, self.storage_options)

    def path(self, *parts: str) -> str:
        """The filesystem path of ``<run>/<parts...>``."""
        return "/".join([self.filesystem()[1].rstrip("/"), *parts])

    def checkpoint(self, manifest: Manifest) -> Checkpoint:
        return Checkpoint(f"{self.run_url}/{manifest.directory}", self.storage_options,
                          manifest=manifest)

    def contains(self, path: str) -> bool:
        """Whether a checkpoint path lies in this storage (any run of it)."""
        root = self.storage.rstrip("/") + "/"
        return fsutil.absolute_url(path).rstrip("/").startswith(root)

    # -- before the run ---------------------------------------------------------------------------

    def check_writable(self) -> str:
        """Write a marker file into the run's folder; return its path for the workers to find.

        Catches a missing bucket, missing credentials or a read-only location before any
        worker starts, with a message that names the fix.
        """
        fs, root = self.filesystem()
        marker = f"{root.rstrip('/')}/.visible-{uuid.uuid4().hex}"
        shown = fsutil.redact_url(self.run_url)
        try:
            if fsutil.is_local(fs):
                fs.makedirs(root, exist_ok=True)
            fs.pipe_file(marker, b"prefect-distrain storage check\n")
        except FileNotFoundError as error:
            raise ConfigurationError(
                f"storage {shown!r} does not exist: create the bucket (or parent folder) first, "
                f"or fix the URL ({type(error).__name__})") from None
        except (NotADirectoryError, FileExistsError) as error:
            raise ConfigurationError(
                f"storage {shown!r} is under a file, not a folder: give a folder's path or "
                f"URL ({type(error).__name__}: {error})") from None
        except PermissionError as error:
            raise ConfigurationError(
                f"storage {shown!r} refused the write: check the credentials in storage_options "
                f"(or the storage block) and their permissions ({fsutil.brief(error)})") from None
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

    # -- records ----------------------------------------------------------------------------------

    def write_json(self, record: dict, *parts: str) -> None:
        """A JSON record at ``<run>/<parts...>``, replaced atomically."""
        fsutil.atomic_write(self.filesystem()[0], self.path(*parts), fsutil.dumps_json(record))

    def create_json(self, record: dict, *parts: str) -> bool:
        """A new JSON record at ``<run>/<parts...>``; False if one is there already."""
        return fsutil.create_exclusive(self.filesystem()[0], self.path(*parts), fsutil.dumps_json(record))

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

    def names(self, *parts: str) -> list[str]:
        """The names in ``<run>/<parts...>`` (the run's own folder with no parts)."""
        return fsutil.list_names(self.filesystem()[0], self.path(*parts))

    # -- checkpoints ------------------------------------------------------------------------------

    def upload(self, local_dir: str, index: int, attempt: int, rank: int) -> dict[str, FileEntry]:
        """Copy a local checkpoint directory into the folder of (index, attempt).

        Returns each file's size, sha256 and rank, for the manifest. Files go up in one
        ``fs.put`` call, which object stores run concurrently and in multipart.
        """
        files: dict[str, FileEntry] = {}
        local_paths, remote_paths = [], []
        target = self.path(checkpoint_dirname(index, attempt))
        for folder, dirs, names in os.walk(local_dir):
            dirs.sort()
            for name in sorted(names):
                path = os.path.join(folder, name)
                relative = os.path.relpath(path, local_dir).replace(os.sep, "/")
                size, sha256 = fsutil.file_digest(path)
                files[relative] = FileEntry(size, sha256, rank)
                local_paths.append(path)
                remote_paths.append(f"{target}/{relative}")
        fs, _ = self.filesystem()
        try:
            if fsutil.is_local(fs):
                for remote in {p.rsplit("/", 1)[0] for p in remote_paths} | {target}:
                    fs.makedirs(remote, exist_ok=True)
            if local_paths:
                fs.put(local_paths, remote_paths)
        except Exception as error:
            raise CheckpointUploadError(
                f"uploading checkpoint {index} from rank {rank} to "
                f"{fsutil.redact_url(self.run_url)} failed: {fsutil.brief(error)}", index=index,
                rank=rank) from error
        return files

    def write_manifest(self, manifest: Manifest) -> None:
        """Commit: from now on the checkpoint exists. Written once, last and atomically; a
        manifest that is already there (another writer's) is never replaced."""
        path = self.path(MANIFESTS, f"{manifest.directory}.json")
        if not fsutil.create_exclusive(self.filesystem()[0], path, manifest.to_json()):
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

    def read_manifest(self, directory: str) -> Manifest:
        """The manifest of one checkpoint folder; ManifestError if it has none or a bad one."""
        name = f"{directory}.json"
        data = fsutil.read_bytes(self.filesystem()[0], self.path(MANIFESTS, name))
        if data is None:
            raise ManifestError(f"checkpoint {directory} has no manifest in "
                                f"{fsutil.redact_url(self.run_url)}/{MANIFESTS}")
        return Manifest.from_json(data, name)

    def checkpoint_folders(self) -> list[tuple[str, int, int]]:
        """(name, index, attempt) of every checkpoint folder in the run, committed or not."""
        found = []
        for name in self.names():
            parsed = parse_dirname(name)
            if parsed:
                found.append((name, *parsed))
        return found

    def delete_checkpoint(self, manifest: Manifest) -> None:
        """Manifest first, then files: a reader never finds a manifest without its files."""
        fs, _ = self.filesystem()
        try:
            fs.rm_file(self.path(MANIFESTS, f"{manifest.directory}.json"))
        except FileNotFoundError:
            pass
        self.remove_folder(manifest.directory)

    def remove_folder(self, directory: str) -> None:
        """Remove one checkpoint folder of this run (only a checkpoint folder's name)."""
        if parse_dirname(directory) is None:
            raise ValueError(f"not a checkpoint folder: {directory!r}")
        fsutil.remove_tree(self.filesystem()[0], self.path(directory))
