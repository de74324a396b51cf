"""Backends by name. Adding a backend is adding one module here that defines ``CONFIG``.

Modules are found on disk and imported only when their name is asked for, so no framework is
imported before it is used.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..exceptions import ConfigurationError
from .base import Backend, BackendConfig

__all__ = ["Backend", "BackendConfig", "available_backends", "resolve_backend"]


def available_backends() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__)
                  if m.name != "base" and not m.name.startswith("_"))


def resolve_backend(backend: str | BackendConfig) -> BackendConfig:
    """``"torch"`` -> ``TorchConfig()``; a config passes through unchanged."""
    if isinstance(backend, BackendConfig):
        return backend
    names = available_backends()
    if not isinstance(backend, str) or backend not in names:
        raise ConfigurationError(
            f"unknown backend {backend!r}: choose one of {', '.join(repr(n) for n in names)}, "
            "or pass a backend config such as prefect_distrain.TorchConfig(...)")
    module = importlib.import_module(f"{__name__}.{backend}")
    return module.CONFIG()
