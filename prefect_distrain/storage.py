"""Where a run's checkpoints live: ``<storage>/<run name>/checkpoint_<index>``, on fsspec.

The driver builds a RunStorage and sends it to the workers; a worker copies the directory it
reported into the checkpoint's folder; the driver reads the folders back to find the latest.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .checkpoint import Checkpoint
from .exceptions import ConfigurationError

_CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d{6,})$")


def checkpoint_dirname(index: int) -> str:
    return f"checkpoint_{index:06d}"


def _filesystem(url: str, storage_options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(url, **storage_options)
    except ImportError as error:  # fsspec's message names the package to install
        raise ImportError(f"storage {url!r} needs an extra package: {error}") from error
    except ValueError as error:  # unknown protocol
        raise ConfigurationError(
            f"storage {url!r}: {error}. Use a local path or a URL of a protocol fsspec knows "
            f"(one of: {', '.join(sorted(fsspec.available_protocols())[:12])}, ...)"
        ) from error


@dataclass(frozen=True)
class RunStorage:
    """The folder of one run, and how to reach it."""

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
        return _filesystem(self.run_url, self.storage_options)

    def checkpoint(self, index: int) -> Checkpoint:
        return Checkpoint(f"{self.run_url}/{checkpoint_dirname(index)}", self.storage_options)

    def persist(self, local_dir: str, index: int) -> Checkpoint:
        """Copy a worker's checkpoint directory into the run (files of several ranks merge)."""
        target = self.checkpoint(index)
        fs, path = target._fs_and_path()
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(path, exist_ok=True)
        fs.put(local_dir.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)
        return target

    def checkpoint_indices(self) -> list[int]:
        fs, path = self.filesystem()
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        found = (_CHECKPOINT_DIR.match(e.rstrip("/").rsplit("/", 1)[-1]) for e in entries)
        return sorted(int(m.group(1)) for m in found if m)

    def latest_checkpoint(self) -> Checkpoint | None:
        indices = self.checkpoint_indices()
        return self.checkpoint(indices[-1]) if indices else None
