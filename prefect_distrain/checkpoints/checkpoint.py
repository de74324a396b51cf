"""The Checkpoint value: a directory, local or at any fsspec URL.

Same names as Ray Train's ``Checkpoint`` so a training loop ports by changing its imports.
A Checkpoint is only a reference; the files move when ``to_directory`` / ``as_directory`` are
called, never on construction. A committed checkpoint carries its manifest: exactly the files it
lists are read, each checked against its size and sha256.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import fsspec

from ..exceptions import CheckpointCorruptError, ConfigurationError
from .fs import file_digest, filesystem, is_local, redact_url

if TYPE_CHECKING:
    from .manifest import Manifest


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
    manifest: Manifest | None = field(default=None, repr=False, compare=False)

    @property
    def index(self) -> int | None:
        """The checkpoint's number within its run (None for one not committed by a run)."""
        return self.manifest.index if self.manifest else None

    @property
    def metrics(self) -> dict[str, Any]:
        """The metrics rank 0 reported with this checkpoint."""
        return dict(self.manifest.metrics) if self.manifest else {}

    def __repr__(self) -> str:
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
        return self.location()[0]

    @property
    def is_local(self) -> bool:
        return is_local(self.filesystem)

    def location(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """(filesystem, path on it) of the checkpoint's folder."""
        return filesystem(self.path, self.storage_options)

    def to_directory(self, path: str | os.PathLike | None = None) -> str:
        """Copy the checkpoint's files into ``path`` (a new temporary directory if None)."""
        target = os.fspath(path) if path is not None else tempfile.mkdtemp(prefix="checkpoint-")
        os.makedirs(target, exist_ok=True)
        fs, src = self.location()
        if self.manifest:  # exactly the committed files (their names are checked when parsed)
            names = list(self.manifest.files)
            for folder in {os.path.dirname(os.path.join(target, *n.split("/"))) for n in names}:
                os.makedirs(folder, exist_ok=True)
            sources = [f"{src.rstrip('/')}/{n}" for n in names]
            targets = [os.path.join(target, *n.split("/")) for n in names]
            if is_local(fs):
                for source, destination in zip(sources, targets):
                    shutil.copyfile(source, destination)
            elif names:
                fs.get(sources, targets)
        elif is_local(fs):
            shutil.copytree(src, target, dirs_exist_ok=True)
        else:
            fs.get(src.rstrip("/") + "/", target.rstrip("/") + "/", recursive=True)
        self._verify(target)
        return target

    def _verify(self, local_dir: str) -> None:
        if not self.manifest:
            return
        for name, expected in self.manifest.files.items():
            path = os.path.join(local_dir, *name.split("/"))
            if not os.path.isfile(path):
                raise CheckpointCorruptError(
                    f"checkpoint {redact_url(self.path)}: file {name!r} is missing")
            size, sha256 = file_digest(path)
            if (size, sha256) != (expected.size, expected.sha256):
                raise CheckpointCorruptError(
                    f"checkpoint {redact_url(self.path)}: file {name!r} does not match its "
                    f"manifest (size {size} vs {expected.size}, sha256 {sha256[:12]}... vs "
                    f"{expected.sha256[:12]}...); it was changed after the commit")

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        """A local directory with the files, removed afterwards. A committed checkpoint is
        always a copy (writing into it can't change what was committed); a local folder of
        your own is handed out as it is."""
        fs, src = self.location()
        if is_local(fs) and not self.manifest:
            yield src
            return
        target = self.to_directory()
        try:
            yield target
        finally:
            shutil.rmtree(target, ignore_errors=True)
