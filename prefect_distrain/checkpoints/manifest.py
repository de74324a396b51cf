"""The manifest: the record that makes a checkpoint exist, typed, versioned and validated.

A manifest is read from storage that others can write to, so nothing in it is trusted as a path:
file names must be relative, without ``..``, empty or absolute parts; the folder is a single
``checkpoint_<index>-a<attempt>`` name inside the run's folder and matches the manifest's own
index and attempt; sizes and sha256 hashes are well formed. A manifest that fails is refused
with a ``ManifestError`` that names the file; readers skip it and say so.

Version 2 adds the lease generation the committing writer held (``lease``). Version 1 manifests
(no ``lease``) are read as they are; a newer version is refused with the fix (upgrade). The
optional ``data_positions`` (each rank's place in its training data, session/positions.py) is
read where it is well formed and ignored by readers that do not know it.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..exceptions import DistrainError
from .fs import dumps_json

SCHEMA_VERSION = 2
READS = (1, 2)

_DIRNAME = re.compile(r"^checkpoint_(\d{6,})-a(\d+)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(DistrainError):
    """A manifest that cannot be used: unreadable, of an unknown version, or with fields that
    are not what a manifest holds (e.g. a file name that leaves the checkpoint's folder)."""


def checkpoint_dirname(index: int, attempt: int) -> str:
    return f"checkpoint_{index:06d}-a{attempt}"


def parse_dirname(name: str) -> tuple[int, int] | None:
    """(index, attempt) of a checkpoint folder's name, or None for any other name."""
    match = _DIRNAME.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str
    rank: int


@dataclass(frozen=True)
class Manifest:
    """One committed checkpoint: its files with their sizes and hashes, the ranks that wrote
    them, rank 0's metrics of that report, and who committed it."""

    index: int
    attempt: int
    files: dict[str, FileEntry]
    metrics: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    backend: str = ""
    committed_at: str = ""
    lease: int | None = None
    schema_version: int = SCHEMA_VERSION
    #: Every rank's position in its training data at this checkpoint (session/positions.py).
    data_positions: dict[str, Any] | None = None

    @property
    def directory(self) -> str:
        """The checkpoint's folder in the run's folder."""
        return checkpoint_dirname(self.index, self.attempt)

    @property
    def ranks(self) -> list[int]:
        return sorted({f.rank for f in self.files.values()})

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    @classmethod
    def new(cls, index: int, attempt: int, files: dict[str, FileEntry], *, metrics: dict,
            world_size: int, backend: str, lease: int | None,
            data_positions: dict[str, Any] | None = None) -> Manifest:
        return cls(index=index, attempt=attempt, files=dict(sorted(files.items())),
                   metrics=dict(metrics), world_size=world_size, backend=backend,
                   committed_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   lease=lease, data_positions=data_positions or None)

    def to_json(self) -> bytes:
        record = {
            "schema_version": self.schema_version, "index": self.index, "attempt": self.attempt,
            "directory": self.directory,
            "files": {name: {"size": f.size, "sha256": f.sha256, "rank": f.rank}
                      for name, f in self.files.items()},
            "ranks": self.ranks, "metrics": self.metrics, "world_size": self.world_size,
            "backend": self.backend, "committed_at": self.committed_at, "lease": self.lease,
        }
        if self.data_positions:
            record["data_positions"] = self.data_positions  # rank numbers become strings
        return dumps_json(record)

    @classmethod
    def from_json(cls, data: bytes | str, name: str) -> Manifest:
        """Parse and validate; ``name`` is the manifest's file name (``<folder>.json``)."""
        try:
            record = json.loads(data)
        except (ValueError, UnicodeDecodeError) as error:
            raise ManifestError(f"manifest {name}: not valid JSON ({error})") from None
        if not isinstance(record, dict):
            raise ManifestError(f"manifest {name}: not a JSON object")
        version = record.get("schema_version")
        if version not in READS:
            if isinstance(version, int) and version > SCHEMA_VERSION:
                raise ManifestError(
                    f"manifest {name}: schema version {version} was written by a newer "
                    f"prefect-distrain (this one reads versions {READS}): upgrade it to read "
                    "this checkpoint")
            raise ManifestError(f"manifest {name}: unknown schema version {version!r}")
        index, attempt = record.get("index"), record.get("attempt")
        if not _natural(index) or not _natural(attempt):
            raise ManifestError(f"manifest {name}: index and attempt must be whole numbers >= 0")
        folder = checkpoint_dirname(index, attempt)
        if record.get("directory", folder) != folder or name != f"{folder}.json":
            raise ManifestError(
                f"manifest {name}: its folder {record.get('directory')!r} is not "
                f"{folder!r}, the checkpoint folder of its index and attempt in the run")
        files = record.get("files")
        if not isinstance(files, dict):
            raise ManifestError(f"manifest {name}: 'files' is not a mapping of names")
        entries = {}
        for file_name, entry in files.items():
            problem = unsafe_name(file_name)
            if problem:
                raise ManifestError(f"manifest {name}: file name {file_name!r} {problem}")
            if not isinstance(entry, dict) or not _natural(entry.get("size")) \
                    or not isinstance(entry.get("sha256"), str) \
                    or not _SHA256.match(entry["sha256"]) or not _natural(entry.get("rank")):
                raise ManifestError(
                    f"manifest {name}: file {file_name!r} needs a size, a sha256 (64 hex "
                    "digits) and a rank")
            entries[file_name] = FileEntry(entry["size"], entry["sha256"], entry["rank"])
        metrics = record.get("metrics", {})
        if not isinstance(metrics, dict):
            raise ManifestError(f"manifest {name}: 'metrics' is not a mapping")
        lease = record.get("lease")
        if lease is not None and not _natural(lease):
            raise ManifestError(f"manifest {name}: 'lease' is not a whole number")
        world_size = record.get("world_size", 1)
        return cls(index=index, attempt=attempt, files=entries, metrics=metrics,
                   world_size=world_size if _natural(world_size) else 1,
                   backend=str(record.get("backend", "")),
                   committed_at=str(record.get("committed_at", "")), lease=lease,
                   schema_version=version,
                   data_positions=_positions(record.get("data_positions")))


_POSITION_NUMBERS = ("epoch", "batches", "world_size", "batch_size", "size", "seed")
_ROWS_NUMBERS = ("epoch", "rows", "world_size")


def _positions(value: Any, depth: int = 0) -> dict[str, Any] | None:
    """Well-formed data positions (session/positions.py: ``{"ranks": {rank: position},
    "base": <the same, optional>}``, every rank of one world, one order, one kind), else
    None: a resume then starts the interrupted pass from its beginning, as it always could."""
    if not isinstance(value, dict) or not isinstance(value.get("ranks"), dict) or depth > 16:
        return None
    ranks = {}
    rows = any(isinstance(p, dict) and "rows" in p for p in value["ranks"].values())
    for rank, position in value["ranks"].items():
        if not (isinstance(rank, (str, int)) and re.fullmatch(r"[0-9]{1,6}", str(rank))
                and isinstance(position, dict)):
            return None
        if rows:  # a Ray Data shard's rows
            if not all(_natural(position.get(k)) for k in _ROWS_NUMBERS) \
                    or position["world_size"] < 1:
                return None
            ranks[int(rank)] = {k: position[k] for k in _ROWS_NUMBERS}
            continue
        if not all(_natural(position.get(k)) for k in _POSITION_NUMBERS) \
                or not isinstance(position.get("shuffle"), bool) \
                or not isinstance(position.get("drop_last"), bool) \
                or position["world_size"] < 1 or position["batch_size"] < 1:
            return None
        ranks[int(rank)] = {k: position[k] for k in (*_POSITION_NUMBERS, "shuffle",
                                                     "drop_last")}
    world = ranks.get(0, {}).get("world_size")
    shared = ("epoch", "world_size") if rows else \
        ("epoch", "world_size", "size", "seed", "shuffle", "drop_last")
    if set(ranks) != set(range(world or 0)) or any(
            p[k] != ranks[0][k] for p in ranks.values() for k in shared):
        return None
    chain: dict[str, Any] = {"ranks": ranks}
    if value.get("base") is not None:
        base = _positions(value["base"], depth + 1)
        if base is None or ("rows" in base["ranks"][0]) != rows:
            return None
        chain["base"] = base
    return chain


def unsafe_name(name: Any) -> str | None:
    """Why a file name from a manifest could reach outside the checkpoint's folder, or None."""
    if not isinstance(name, str) or not name:
        return "is not a non-empty string"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "is absolute"
    if "\\" in name or "\x00" in name:
        return "holds a backslash or a NUL"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "has an empty, '.' or '..' part"
    return None


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
