"""Dict checkpoints written by a background thread: ``Checkpoint.from_dict(data, background=True)``.

The loop waits only for a snapshot of its state. On a GPU the snapshot is a set of copies into
pinned host memory, queued on each device's current CUDA stream: the loop's next kernels run
after them, so what it changes next is copied first. On the CPU it is an in-memory copy. A thread
then writes the files from the snapshot. The host buffers are kept for the next checkpoint of the
same tensors (torch's ``StateDictStager``; they go with the tensors), so each snapshot first
waits for the previous write, which may still be reading them.

Every reader of such a folder waits for its write first (``wait_written``): a report uploads it
once written (session/uploader.py), ``to_dict`` and ``as_directory`` read it once written.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Write:
    """A folder's write under way or done: its files' names are known from the start."""

    names: list[str]
    done: Future


_lock = threading.Lock()
_stager: Any = None  # torch's StateDictStager, made on first use
_last: Future | None = None  # the last write: its snapshot's buffers are reused next
_writes: dict[str, Write] = {}  # by folder; a failed write stays, for every reader to see


def start(folder: str, index: dict[str, Any], tensors: dict[str, Any],
          arrays: dict[str, Any], names: list[str]) -> None:
    """Snapshot ``tensors`` and ``arrays`` (returns once the state may change) and write the
    dict checkpoint's files into ``folder`` in a thread."""
    global _last
    text = json.dumps(index)  # now: the JSON values may change after we return
    with _lock:
        if _last is not None:
            _last.exception()  # its buffers are reused; its error is its own reader's
        snapshot, events = _snapshot(tensors) if tensors else ({}, [])
        if arrays:
            import numpy

            arrays = {name: numpy.array(array, copy=True) for name, array in arrays.items()}
        done: Future = Future()
        _writes[os.path.abspath(folder)] = Write(names, done)
        _last = done
    threading.Thread(target=_write, args=(folder, text, snapshot, arrays, events, done),
                     name="checkpoint-write", daemon=True).start()


def pending(folder: str) -> Write | None:
    """The background write of ``folder``, if it had one not yet waited for."""
    return _writes.get(os.path.abspath(folder))


def wait_written(folder: str) -> None:
    """Returns once ``folder``'s background write (if any) is done; raises its error if it
    failed. A folder without one returns at once."""
    key = os.path.abspath(folder)
    write = _writes.get(key)
    if write is None:
        return
    error = write.done.exception()
    if error is not None:
        raise RuntimeError(f"Checkpoint.from_dict(..., background=True) could not write "
                           f"{folder}: {type(error).__name__}: {error}") from error
    _writes.pop(key, None)


def _snapshot(tensors: dict[str, Any]) -> tuple[Any, list[Any]]:
    """A host copy of ``tensors`` in reused buffers, and a CUDA event per device it copied
    from (the copies are queued, not done, when this returns)."""
    global _stager
    import torch

    try:
        from torch.distributed.checkpoint._state_dict_stager import StateDictStager
    except ImportError as error:
        raise ImportError(f"Checkpoint.from_dict(..., background=True) needs torch >= 2.8 "
                          f"(torch {torch.__version__} is installed): pip install -U torch, or "
                          "leave background off") from error
    cuda = torch.cuda.is_available()
    if _stager is None:
        _stager = StateDictStager(pin_memory=cuda)
    devices = {t.device for t in _walk(tensors) if t.device.type == "cuda"} if cuda else set()
    snapshot = _stager.stage(tensors, non_blocking=bool(devices))
    events = []
    for device in devices:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        events.append(event)
    return snapshot, events


def _walk(value: Any) -> Any:
    """The tensors in a nested value of dicts, lists and tuples."""
    torch = sys.modules["torch"]
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _walk(item)


def _write(folder: str, text: str, snapshot: dict[str, Any], arrays: dict[str, Any],
           events: list[Any], done: Future) -> None:
    from .checkpoint import write_dict_files

    try:
        for event in events:
            event.synchronize()  # the queued copies have landed in host memory
        write_dict_files(folder, text, snapshot, arrays)
    except BaseException as error:  # noqa: BLE001 - every reader of the folder raises it
        done.set_exception(error)
    else:
        done.set_result(None)
