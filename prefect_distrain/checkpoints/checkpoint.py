"""The Checkpoint value: a directory, local or at any fsspec URL.

Same names as Ray Train's ``Checkpoint`` so a training loop ports by changing its imports.
A Checkpoint is only a reference; the files move when ``to_directory`` / ``as_directory`` are
called, never on construction. A committed checkpoint carries its manifest: exactly the files it
lists are read, each checked against its size and sha256.

``Checkpoint.from_dict`` / ``to_dict`` keep a dict (RaySGD's checkpoints) as files, with safe
formats only, never arbitrary pickle: JSON values in ``dict_checkpoint.json`` (which also indexes
the other files), values holding torch tensors in ``dict_checkpoint.pt`` (``torch.save``, read
with ``torch.load(weights_only=True)``), numpy arrays as ``dict_checkpoint_arrays/<n>.npy``
(``allow_pickle=False``). torch and numpy are imported only when a dict needs them.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import fsspec

from ..exceptions import CheckpointCorruptError, ConfigurationError, UnsafeCheckpointError
from . import background as background_writes
from .fs import file_digest, filesystem, is_local, redact_url
from .validation import COMMITTED, ValidationRecord

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
    #: Its validation record (``pd.Validation``), if it was validated or is being validated.
    validation: ValidationRecord | None = field(default=None, repr=False, compare=False)

    @property
    def index(self) -> int | None:
        """The checkpoint's number within its run (None for one not committed by a run)."""
        return self.manifest.index if self.manifest else None

    @property
    def metrics(self) -> dict[str, Any]:
        """The metrics rank 0 reported with this checkpoint, and those its validation returned
        (a validated value replaces a reported one of the same name)."""
        reported = dict(self.manifest.metrics) if self.manifest else {}
        return {**reported, **self.validation.metrics} if self.validation else reported

    @property
    def status(self) -> str | None:
        """"committed", "validating", "validated" or "validation failed"; None for a folder
        that no run committed."""
        if self.manifest is None:
            return None
        return self.validation.status if self.validation else COMMITTED

    def __repr__(self) -> str:
        return f"Checkpoint(path={redact_url(self.path)!r})"

    def without_credentials(self) -> Checkpoint:
        """The same checkpoint with no storage options: safe to return, persist or show."""
        return Checkpoint(self.path, {}, self.manifest, self.validation)

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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], background: bool = False) -> Checkpoint:
        """A checkpoint of ``data`` in a new temporary directory (yours to remove once it is
        reported; with ``background=True``, the report's), read back with ``to_dict()``.

        Values may be JSON values (str-keyed dicts, lists, numbers, strings, bools, None; tuples
        come back as lists, as JSON has them), values holding torch tensors (a tensor, a
        ``state_dict()``, an optimizer's: dicts, lists and tuples of tensors and plain values,
        any plain keys), and numpy arrays or scalars as values of their own key. A value whose
        keys all start with ``module.`` (a DDP model's state dict) is stored without the
        prefix, so it loads into the unwrapped model. Anything else is a TypeError naming the
        key: nothing is pickled that only a full unpickler could read back.

        ``background=True`` returns once ``data`` is copied (on a GPU: copies into pinned host
        memory, queued on the current CUDA stream) and writes the files in a thread, so the
        loop goes on while they are written. It holds one host copy of the tensors, kept for
        the next checkpoint of the same tensors (report it from one rank: each rank that makes
        one holds its own). Leave the folder to the report, which uploads it once written and
        removes it after (one never reported stays yours). Read it before reporting it, if at
        all: ``to_dict`` and ``as_directory`` wait for the write and raise its error; once
        reported, read the committed checkpoint (``pd.get_checkpoint()``).
        """
        index, tensors, arrays = _encode_dict(data)
        if tensors:
            _import_torch(tensors)
        folder = tempfile.mkdtemp(prefix="dict-checkpoint-")
        try:
            if background:
                background_writes.start(folder, index, tensors, arrays,
                                        dict_file_names(tensors, arrays))
            else:
                write_dict_files(folder, json.dumps(index), tensors, arrays)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return cls(folder)

    def to_dict(self) -> dict[str, Any]:
        """The dict of a ``from_dict`` checkpoint; a committed one is downloaded and verified
        against its manifest first. Tensors come back on the CPU. ValueError for a folder that
        is not a dict checkpoint; ``UnsafeCheckpointError`` for a file that only unpickling
        arbitrary objects could read (never attempted)."""
        with self.as_directory() as folder:
            return _read_dict(folder, repr(self))

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
        background_writes.wait_written(self.path)
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
            background_writes.wait_written(src)
            yield src
            return
        target = self.to_directory()
        try:
            yield target
        finally:
            shutil.rmtree(target, ignore_errors=True)


# -- dict checkpoints (from_dict / to_dict) -----------------------------------------------------

#: The index (and the JSON values), the torch values, the folder of numpy arrays.
DICT_INDEX = "dict_checkpoint.json"
DICT_TORCH = "dict_checkpoint.pt"
DICT_ARRAYS = "dict_checkpoint_arrays"
_DICT_FORMAT = "prefect_distrain.dict_checkpoint"
_ARRAY_FILE = re.compile(rf"^{DICT_ARRAYS}/[0-9]+\.npy$")
_PLAIN = (str, int, float, bool, type(None))
_DDP_PREFIX = "module."
_FIX = ("convert it to torch tensors or to JSON values (numbers, strings, lists, str-keyed "
        "dicts), or write your own files into a folder and use "
        "Checkpoint.from_directory(folder)")


def _type_name(value: Any) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _needs_torch(value: Any, where: str) -> bool:
    """Whether a nested value needs torch's file (tensors, non-string keys, bytes) rather than
    JSON; TypeError naming ``where`` for what neither JSON nor ``torch.load(weights_only=True)``
    reads back."""
    kind = type(value)
    if kind in _PLAIN:
        return False
    torch, numpy = sys.modules.get("torch"), sys.modules.get("numpy")
    if kind is bytes or (torch is not None and (isinstance(value, torch.Tensor)
                                               or kind is torch.Size)):
        return True
    if torch is not None and isinstance(value, torch.nn.Module):
        raise TypeError(
            f"Checkpoint.from_dict: {where} is a torch module ({_type_name(value)}); store its "
            "state_dict() instead (a DDP model's 'module.' prefix is removed for you)")
    if numpy is not None and isinstance(value, (numpy.ndarray, numpy.generic)):
        raise TypeError(
            f"Checkpoint.from_dict: {where} is a numpy value inside a container; give it a key "
            "of its own, or convert it (torch.from_numpy(a), a.tolist(), x.item())")
    if kind in (dict, collections.OrderedDict):
        needs = False
        for key, item in value.items():
            if type(key) not in _PLAIN:
                raise TypeError(
                    f"Checkpoint.from_dict: {where} has the key {key!r} ({_type_name(key)}); "
                    "keys must be strings, numbers, bools or None")
            needs = _needs_torch(item, f"{where}[{key!r}]") or needs or type(key) is not str
        return needs
    if kind in (list, tuple):
        needs = False
        for position, item in enumerate(value):
            needs = _needs_torch(item, f"{where}[{position}]") or needs
        return needs
    raise TypeError(f"Checkpoint.from_dict: {where} is a {_type_name(value)}, which cannot be "
                    f"stored without pickle: {_FIX}")


def _encode_dict(data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any],
                                                   dict[str, Any]]:
    """(index with the JSON values, torch values by key, numpy arrays by file name)."""
    if not isinstance(data, Mapping):
        raise TypeError(f"Checkpoint.from_dict takes a dict, got {_type_name(data)}")
    index: dict[str, Any] = {"format": _DICT_FORMAT, "version": 1, "keys": [], "json": {},
                             "torch": [], "numpy": {}}
    tensors: dict[str, Any] = {}
    arrays: dict[str, Any] = {}
    numpy = sys.modules.get("numpy")
    for key, value in data.items():
        if type(key) is not str:
            raise TypeError(f"Checkpoint.from_dict: the key {key!r} is not a string; the "
                            "top-level keys of a checkpoint are names")
        index["keys"].append(key)
        where = f"the value of {key!r}"
        if numpy is not None and isinstance(value, (numpy.ndarray, numpy.generic)):
            if value.dtype.hasobject:
                raise TypeError(f"Checkpoint.from_dict: {where} is a numpy array of Python "
                                f"objects (dtype {value.dtype}), which only pickle stores: {_FIX}")
            name = f"{DICT_ARRAYS}/{len(arrays)}.npy"
            arrays[name] = value
            index["numpy"][key] = {"file": name, "scalar": isinstance(value, numpy.generic)}
        elif _needs_torch(value, where):
            index["torch"].append(key)
            tensors[key] = _without_ddp_prefix(value)
        else:
            index["json"][key] = value
    return index, tensors, arrays


def _without_ddp_prefix(value: Any) -> Any:
    """A DDP model's state dict (every key ``module.``-prefixed) without the prefix, as torch's
    ``consume_prefix_in_state_dict_if_present`` leaves it; the caller's dict is not changed."""
    if type(value) not in (dict, collections.OrderedDict) or not value or not all(
            type(k) is str and k.startswith(_DDP_PREFIX) for k in value):
        return value
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    stripped = collections.OrderedDict(value)
    metadata = getattr(value, "_metadata", None)
    if metadata is not None:
        stripped._metadata = collections.OrderedDict(metadata)  # type: ignore[attr-defined]
    consume_prefix_in_state_dict_if_present(stripped, _DDP_PREFIX)
    return stripped if type(value) is collections.OrderedDict else dict(stripped)


def _import_torch(tensors: dict[str, Any]) -> None:
    try:
        import torch  # noqa: F401
    except ImportError as error:  # bytes or non-string keys without any tensor
        raise TypeError(f"Checkpoint.from_dict: the values of {sorted(tensors)} need torch to "
                        f"be stored (install it), or {_FIX}") from error


def dict_file_names(tensors: dict[str, Any], arrays: dict[str, Any]) -> list[str]:
    """The names of the files ``write_dict_files`` writes, in the order a folder lists them."""
    return sorted([DICT_INDEX] + ([DICT_TORCH] if tensors else []) + list(arrays))


def write_dict_files(folder: str, index: str, tensors: dict[str, Any],
                     arrays: dict[str, Any]) -> None:
    """A dict checkpoint's files: ``index`` (JSON text) last, so a folder with it is whole."""
    if tensors:
        import torch

        torch.save(tensors, os.path.join(folder, DICT_TORCH))
    if arrays:
        import numpy

        os.makedirs(os.path.join(folder, DICT_ARRAYS))
        for name, array in arrays.items():
            numpy.save(os.path.join(folder, *name.split("/")), array, allow_pickle=False)
    with open(os.path.join(folder, DICT_INDEX), "w", encoding="utf-8") as handle:
        handle.write(index)


def _read_dict(folder: str, shown: str) -> dict[str, Any]:
    if not os.path.isdir(folder):
        raise ValueError(f"{shown} is not a dict checkpoint: there is no such folder")
    path = os.path.join(folder, DICT_INDEX)
    if not os.path.isfile(path):
        found = sorted(os.path.relpath(os.path.join(parent, name), folder).replace(os.sep, "/")
                       for parent, _, names in os.walk(folder) for name in names)
        listed = ", ".join(found[:10]) + (f", ... ({len(found)} files)" if len(found) > 10
                                           else "")
        raise ValueError(
            f"{shown} is not a dict checkpoint: it has no {DICT_INDEX} (it holds "
            f"{listed or 'no files'}). Read its files with checkpoint.as_directory(); to_dict "
            "reads the checkpoints that Checkpoint.from_dict writes")
    try:
        with open(path, encoding="utf-8") as handle:
            index = json.load(handle)
    except ValueError:  # not JSON (or not UTF-8)
        index = None
    if not isinstance(index, dict) or index.get("format") != _DICT_FORMAT:
        raise ValueError(f"{shown} is not a dict checkpoint: its {DICT_INDEX} was not written "
                         "by Checkpoint.from_dict")
    if index.get("version") != 1:
        raise ValueError(f"{shown}: dict checkpoint version {index.get('version')!r} is newer "
                         "than this prefect-distrain reads (1)")
    keys, values = index.get("keys"), index.get("json")
    in_torch, in_numpy = index.get("torch"), index.get("numpy")
    if not (isinstance(keys, list) and isinstance(values, dict) and isinstance(in_torch, list)
            and isinstance(in_numpy, dict)):
        raise CheckpointCorruptError(f"{shown}: its {DICT_INDEX} is malformed")
    values = dict(values)
    if in_torch:
        values.update(_load_torch(os.path.join(folder, DICT_TORCH), shown))
    for key, entry in in_numpy.items():
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not _ARRAY_FILE.match(name):
            raise CheckpointCorruptError(f"{shown}: its {DICT_INDEX} names the array file "
                                         f"{name!r}, not one in {DICT_ARRAYS}/")
        values[key] = _load_array(os.path.join(folder, *name.split("/")),
                                  bool(entry.get("scalar")), shown)
    missing = [key for key in keys if key not in values]
    if missing:
        raise CheckpointCorruptError(f"{shown}: the values of {missing} are not in its files")
    return {key: values[key] for key in keys}


def _load_torch(path: str, shown: str) -> dict[str, Any]:
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"{shown} holds torch tensors ({DICT_TORCH}): install torch to read "
                          "it") from error
    if not os.path.isfile(path):
        raise CheckpointCorruptError(f"{shown}: {DICT_TORCH} is missing")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"refused to load {DICT_TORCH} of {shown}: it holds objects other than tensors and "
            "plain containers, and unpickling them could run code (Checkpoint.from_dict never "
            "writes such a file). If you trust it, load it with torch.load(..., "
            "weights_only=False) yourself") from error
    if not isinstance(loaded, dict):
        raise CheckpointCorruptError(f"{shown}: {DICT_TORCH} does not hold a dict")
    return loaded


def _load_array(path: str, scalar: bool, shown: str) -> Any:
    import numpy

    if not os.path.isfile(path):
        raise CheckpointCorruptError(f"{shown}: {os.path.basename(path)} is missing")
    try:
        array = numpy.load(path, allow_pickle=False)
    except ValueError as error:  # pickled data, object arrays, or not .npy at all
        raise UnsafeCheckpointError(
            f"refused to load {DICT_ARRAYS}/{os.path.basename(path)} of {shown}: it is not a "
            f"plain .npy array ({error})") from error
    return array[()] if scalar else array
