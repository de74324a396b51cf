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

from .exceptions import ConfigurationError


@dataclass(frozen=True)
class Checkpoint:
    """A directory of files that a training function saved.

    ``path`` is a local path or an fsspec URL (``s3://bucket/run/checkpoint_000003``);
    ``storage_options`` are passed to fsspec and are never shown in ``repr``.
    """

    path: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

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
        else:
            fs.get(src.rstrip("/") + "/", target.rstrip("/") + "/", recursive=True)
        return target

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        """A local directory with the files: the checkpoint itself when it is local (no copy),
        else a temporary download that is removed afterwards. Treat it as read-only."""
        fs, src = self._fs_and_path()
        if isinstance(fs, LocalFileSystem):
            yield src
            return
        target = self.to_directory()
        try:
            yield target
        finally:
            shutil.rmtree(target, ignore_errors=True)
