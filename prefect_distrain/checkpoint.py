"""The Checkpoint value: a directory, local or at any fsspec URL.

Same names as Ray Train's ``Checkpoint`` so a training loop ports by changing its imports.
A Checkpoint is only a reference; the files move when ``to_directory`` / ``as_directory`` are
called, never on construction.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .exceptions import CheckpointCorruptError, ConfigurationError


@dataclass(frozen=True)
class Checkpoint:
    """A directory of files that a training function saved.

    ``path`` is a local path or an fsspec URL (``s3://bucket/run/checkpoint_000003-a0``);
    ``storage_options`` are passed to fsspec and are never shown in ``repr``. A committed
    checkpoint carries its ``manifest``, and its files are checked against the manifest's sizes
    and sha256 hashes whenever they are read.
    """

    path: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    manifest: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def index(self) -> int | None:
        """The checkpoint's number within its run (None for one not committed by a run)."""
        return self.manifest["index"] if self.manifest else None

    @property
    def metrics(self) -> dict[str, Any]:
        """The metrics rank 0 reported with this checkpoint."""
        return dict(self.manifest["metrics"]) if self.manifest else {}

    def __repr__(self) -> str:
        from .storage import redact_url

        return f"Checkpoint(path={redact_url(self.path)!r})"

    def without_credentials(self) -> Checkpoint:
        """The same checkpoint with no storage options: safe to return, persist or show."""
        return Checkpoint(self.path, {}, self.manifest)

    @classmethod
    def from_directory(cls, path: str | os.PathLike) -> Checkpoint:
        """A checkpoint of a local directory the training function wrote."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ConfigurationError(
                f"Checkpoint.from_directory({path!r}): no such directory. Write the checkpoint "
                "files into a directory first (e.g. tempfile.mkdtemp()) and pass that directory"
            )
        return cls(os.path.abspath(path))

    @property
    def filesystem(self) -> fsspec.AbstractFileSystem:
        return self._fs_and_path()[0]

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, LocalFileSystem)

    def _fs_and_path(self) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, path = fsspec.core.url_to_fs(self.path, **self.storage_options)
        return fs, path

    def to_directory(self, path: str | os.PathLike | None = None) -> str:
        """Copy the checkpoint's files into ``path`` (a new temporary directory if None)."""
        target = os.fspath(path) if path is not None else tempfile.mkdtemp(prefix="checkpoint-")
        os.makedirs(target, exist_ok=True)
        fs, src = self._fs_and_path()
        if isinstance(fs, LocalFileSystem):
            shutil.copytree(src, target, dirs_exist_ok=True)
        elif self.manifest:  # exactly the committed files, fetched concurrently
            names = list(self.manifest["files"])
            for folder in {os.path.dirname(os.path.join(target, n)) for n in names}:
                os.makedirs(folder, exist_ok=True)
            fs.get([f"{src.rstrip('/')}/{n}" for n in names],
                   [os.path.join(target, *n.split("/")) for n in names])
        else:
            fs.get(src.rstrip("/") + "/", target.rstrip("/") + "/", recursive=True)
        self._verify(target)
        return target

    def _verify(self, local_dir: str) -> None:
        if not self.manifest:
            return
        from .storage import file_digest

        for name, expected in self.manifest["files"].items():
            path = os.path.join(local_dir, *name.split("/"))
            if not os.path.isfile(path):
                raise CheckpointCorruptError(f"checkpoint {self.path}: file {name!r} is missing")
            size, sha256 = file_digest(path)
            if (size, sha256) != (expected["size"], expected["sha256"]):
                raise CheckpointCorruptError(
                    f"checkpoint {self.path}: file {name!r} does not match its manifest "
                    f"(size {size} vs {expected['size']}, sha256 {sha256[:12]}... vs "
                    f"{expected['sha256'][:12]}...); it was changed after the commit")

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        """A local directory with the files: the checkpoint itself when it is local (no copy),
        else a temporary download that is removed afterwards. Treat it as read-only."""
        fs, src = self._fs_and_path()
        if isinstance(fs, LocalFileSystem):
            self._verify(src)
            yield src
            return
        target = self.to_directory()
        try:
            yield target
        finally:
            shutil.rmtree(target, ignore_errors=True)
