"""Dict checkpoints written by a background thread: ``Checkpoint.from_dict(data, background=True)``.

The loop waits only for a snapshot of its state. On a GPU the snapshot is a set of copies into
pinned host memory, queued on each device's current CUDA stream: the loop's next kernels run
after them, so what it changes next is copied first. On the CPU it is an in-memory copy. A thread
then writes the files from the snapshot. The host buffers are kept for the next checkpoint of the
same tensors (torch's ``StateDictStager``; they go with the tensors), so each snapshot first
waits for the previous write, which may still be reading them.

Every reader of such a folder waits for its write first: ``to_dict`` and ``as_directory``
(``wait_written``), and the report, which takes the folder (``claim``), uploads it once written
and removes it after (session/uploader.py).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Write:
    """A folder's write under way or done: its files' names are known from the start."""

    names: list[str]
    done: Future

    def wait(self, folder: str) -> None:
        """Returns once the files are written; raises the write's error if it failed."""
        error = self.done.exception()
        if error is not None:
            raise RuntimeError(f"Checkpoint.from_dict(..., background=True) could not write "
                               f"{folder}: {type(error).__name__}: {error}") from error


_lock = threading.Lock()
_stagers: dict[bool, Any] = {}  # torch's StateDictStager, pinned (for GPU state) or not
_last: Future | None = None  # the last write: its snapshot's buffers are reused next
_writes: dict[str, Write] = {}  # by folder, until a report takes it (``claim``)


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
        threading.Thread(target=_write, args=(folder, text, snapshot, arrays, events, done),
                         name="checkpoint-write", daemon=True).start()
        _writes[os.path.abspath(folder)] = Write(names, done)
        _last = done


def claim(folder: str) -> Write | None:
    """The background write of ``folder``, taken by the report that uploads (and then
    removes) it; None for a folder without one."""
    return _writes.pop(os.path.abspath(folder), None)


def wait_written(folder: str) -> None:
    """Returns once ``folder``'s background write (if any) is done; raises its error if it
    failed. A folder without one returns at once."""
    write = _writes.get(os.path.abspath(folder))
    if write is not None:
        write.wait(folder)


def _snapshot(tensors: dict[str, Any]) -> tuple[Any, list[Any]]:
    """A host copy of ``tensors`` in reused buffers, and a CUDA event per device it copied
    from (the copies are queued, not done, when this returns)."""
    import torch

    try:
        from torch.distributed.checkpoint._state_dict_stager import StateDictStager
    except ImportError as error:
        raise ImportError(f"Checkpoint.from_dict(..., background=True) needs torch >= 2.8 "
                          f"(torch {torch.__version__} is installed): pip install -U torch, or "
                          "leave background off") from error
    devices = ({t.device for t in _walk(tensors) if t.device.type == "cuda"}
               if torch.cuda.is_available() else set())
    gpu = bool(devices)  # pinned host memory only for GPU state: pinning needs a CUDA context
    if gpu not in _stagers:
        _stagers[gpu] = StateDictStager(pin_memory=gpu)
    snapshot = _stagers[gpu].stage(tensors, non_blocking=gpu)
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
        del snapshot, arrays  # the error outlives this frame: not the state's copy with it
        traceback.clear_frames(error.__traceback__)
        done.set_exception(error)
    else:
        done.set_result(None)
