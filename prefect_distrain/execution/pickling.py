"""Sending functions to Ray workers: the user's own modules travel by value.

A training function defined in a flow file or a test module (not ``__main__``, not an installed
package) lives in a module the Ray workers may not be able to import. Its module is pickled by
value, as ``__main__`` is; installed packages stay references. ``train`` pickles its function
once, before anything starts; the prefect-ray runner does the same for the tasks it submits.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import os
import site
import sys
import sysconfig
import threading
import types
from typing import Any, Callable, Iterable, Iterator

from ray import cloudpickle

from ..exceptions import ConfigurationError

#: Where installed packages live (the interpreter's, site-packages and dist-packages folders,
#: the user's): modules there are imported by the workers, not sent.
_INSTALLED = tuple(os.path.realpath(p) + os.sep for p in {
    *(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")),
    *site.getsitepackages(), site.getusersitepackages()})
#: Packages that every worker has.
_EVERYWHERE = ("prefect_distrain", "prefect", "ray")
_lock = threading.Lock()


def user_modules(objects: Iterable[Any]) -> list[types.ModuleType]:
    """The user's own modules that the callables among ``objects`` come from, and those of the
    functions and classes they use from other modules of the user's (a helper imported from a
    sibling file, say), followed a few levels deep."""
    found: list[types.ModuleType] = []
    todo = collections.deque((obj, 0) for obj in objects)  # breadth first: each at its least
    seen: set[int] = set()                                    # depth
    while todo:
        obj, depth = todo.popleft()
        if not callable(obj) or id(obj) in seen:
            continue
        seen.add(id(obj))
        name = getattr(obj, "__module__", None) or ""
        module = sys.modules.get(name)
        file = getattr(module, "__file__", None)
        if name.split(".")[0] in _EVERYWHERE or (
                file and os.path.realpath(file).startswith(_INSTALLED)):
            continue
        # Not importable here (a file loaded by path): pickled by value anyway, but what it
        # uses may come from modules that are.
        if module is not None and file and name != "__main__" and module not in found:
            found.append(module)
        if depth < 3 and inspect.isfunction(obj):
            try:
                used = inspect.getclosurevars(obj)
            except (TypeError, ValueError):
                continue
            todo += [(value, depth + 1) for value in
                     (*used.globals.values(), *used.nonlocals.values())]
    return found


@contextlib.contextmanager
def by_value(modules: list[types.ModuleType]) -> Iterator[None]:
    """While inside: functions of ``modules`` are pickled by value (Ray's cloudpickle, which
    both ``train`` and Ray's task submission use). One registration at a time."""
    if not modules:
        yield
        return
    with _lock:
        already = getattr(cloudpickle.cloudpickle, "_is_registered_pickle_by_value",
                          lambda module: False)
        registered = [m for m in modules if not already(m)]
        for module in registered:
            cloudpickle.register_pickle_by_value(module)
        try:
            yield
        finally:
            for module in registered:
                cloudpickle.unregister_pickle_by_value(module)


def serialize_train_function(fn: Callable, what: str = "the training function") -> bytes:
    """Pickle the function once for all workers; say what it captured when that fails."""
    if not callable(fn):
        raise ConfigurationError(
            f"{what} must be callable, got {type(fn).__name__}: pass the "
            "function itself, e.g. train(train_loop), not train(train_loop())")
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise ConfigurationError(
            f"{what} {getattr(fn, '__qualname__', fn)!r} is `async def`: each "
            "worker calls it and needs its result, not a coroutine. Make it a plain `def` (run "
            "async code inside it with asyncio.run(...))")
    try:
        with by_value(user_modules([fn])):
            return cloudpickle.dumps(fn)
    except Exception as error:
        culprits = ", ".join(_unpicklable_captures(fn)) or "an object that can't be pickled"
        raise ConfigurationError(
            f"{what} {getattr(fn, '__qualname__', fn)!r} can't be pickled to "
            f"send it to the Ray workers: it captures {culprits}. Create such objects inside "
            f"the function, or pass plain values through config=... ({error})") from error


def _unpicklable_captures(fn: Callable) -> list[str]:
    try:
        captured = inspect.getclosurevars(fn)
    except TypeError:
        return []
    found = []
    for kind, names in (("variable", captured.nonlocals), ("global", captured.globals)):
        for name, value in names.items():
            try:
                cloudpickle.dumps(value)
            except Exception:  # noqa: BLE001 - we are looking for exactly these
                found.append(f"{kind} {name!r} ({type(value).__module__}."
                             f"{type(value).__qualname__})")
    return found


def takes_config(fn: Callable) -> bool:
    """Whether the training function takes the config (``fn(config)``) or nothing."""
    try:
        return len(inspect.signature(fn).parameters) > 0
    except (TypeError, ValueError):
        return True
