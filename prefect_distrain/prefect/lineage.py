"""A run as a Prefect asset: the model it trains, and the data and models it was made from.

``train`` declares, when it starts, that its task run materializes the run's model asset (key:
the run's storage URL without credentials, e.g. ``s3://models/runs/digits``) from its upstream
assets: the ``datasets=`` URLs, the run a ``resume_from_checkpoint`` comes from, and whatever
asset the calling flow handed it (the outputs of ``@materialize`` tasks upstream, which Prefect
tracks itself). At the end it adds the model's metadata: backend, world size, the best
checkpoint's URL and metrics, and a digest of the config. Prefect's task engine then emits the
asset events (``prefect.asset.referenced`` for each upstream, ``prefect.asset.materialization.
succeeded`` or ``.failed`` for the model), and tasks downstream of ``train`` see the model as
their upstream asset.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ..checkpoints.checkpoint import Checkpoint
from ..checkpoints.fs import absolute_url, redact_url
from ..result import TrainResult

#: Who materializes the model, as Prefect's asset graph shows it.
MATERIALIZED_BY = "prefect-distrain"
_RESTRICTED = set("\n\r\t\0 #?&%\"'<>[]{}|\\^`")
_MAX_KEY = 512


def asset_key(url: str) -> str | None:
    """An asset key for a location: its URL without credentials (a local path as
    ``file://...``); None when Prefect could not take it as a key."""
    shown = redact_url(absolute_url(url)).rstrip("/")
    key = shown if "://" in shown else f"file://{shown}"
    scheme = key.split("://", 1)[0]
    if not scheme or scheme != scheme.lower() or not scheme.isalnum() \
            or _RESTRICTED & set(key) or len(key) > _MAX_KEY:
        return None
    return key


def declare(run_url: str, datasets: dict[str, Any] | None, resume_from: Any) -> str | None:
    """In the ``train`` task run: this run materializes its model from these upstreams.
    Returns the model's asset key (None outside a task run or for an unusable key)."""
    from prefect.assets import Asset
    from prefect.context import AssetContext

    context = AssetContext.get()
    key = asset_key(run_url)
    if context is None or key is None:
        return None
    upstream = {k for k in (_dataset_key(v) for v in (datasets or {}).values()) if k}
    if (resumed := _run_of(resume_from)) is not None and resumed != key:
        upstream.add(resumed)
    context.direct_asset_dependencies |= {Asset(key=k) for k in upstream}
    context.downstream_assets = context.downstream_assets | {Asset(key=key)}
    context.materialized_by = MATERIALIZED_BY
    context.update_tracked_assets()  # tasks that take train's result see the model upstream
    return key


def describe(key: str | None, result: TrainResult, config: Any) -> None:
    """The model asset's metadata, once the run completed."""
    from prefect.context import AssetContext

    context = AssetContext.get()
    if context is None or key is None:
        return
    best = result.best_checkpoints[0] if result.best_checkpoints else None
    metadata = {
        "backend": result.backend, "world_size": result.world_size,
        "run": result.run_name, "attempts": result.attempt + 1,
        "checkpoint": redact_url(best[0].path) if best else None,
        "metrics": {k: v for k, v in (best[1] if best else result.metrics or {}).items()
                    if not k.startswith("_")},
        "config_sha256": hashlib.sha256(repr(config).encode()).hexdigest(),
    }
    context.materialization_metadata[key] = {
        **context.materialization_metadata.get(key, {}), **metadata}


def _dataset_key(value: Any) -> str | None:
    """A ``datasets=`` value that names its data (a URL or path); a Ray Dataset does not."""
    return asset_key(value) if isinstance(value, str) else None


def _run_of(value: Any) -> str | None:
    """The asset of the run a checkpoint belongs to: its folder's parent."""
    if isinstance(value, Checkpoint):
        value = value.path
    if not isinstance(value, str) or value == "latest" or not value.strip():
        return None
    return asset_key(value.rstrip("/").rsplit("/", 1)[0])
