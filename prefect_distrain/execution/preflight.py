"""Before training: the run's storage is writable from the driver and visible from every worker.

```python
with storage_preflight(storage) as check_workers_see:   # a bad bucket or credentials fail here
    group = start_the_workers()
    check_workers_see(group)                            # a path some node can't see fails here
```
The driver writes a marker into the run's folder (catching a missing bucket, missing credentials
or a read-only location before any worker starts), then every worker must see it: a local path
private to one node, or ``memory://``, would lose checkpoints.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Callable, Iterator

from ..checkpoints.fs import brief, ensure_folder, redact_url
from ..checkpoints.storage import RunStorage
from ..exceptions import ConfigurationError
from .worker_group import WorkerGroup


@contextlib.contextmanager
def storage_preflight(storage: RunStorage) -> Iterator[Callable[[WorkerGroup], None]]:
    marker = _write_marker(storage)
    try:
        yield lambda group: _check_workers_see(storage, marker, group)
    finally:
        fs, _ = storage.filesystem()
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(marker)


def _write_marker(storage: RunStorage) -> str:
    fs, root = storage.filesystem()
    marker = f"{root.rstrip('/')}/.visible-{uuid.uuid4().hex}"
    shown = redact_url(storage.run_url)
    try:
        ensure_folder(fs, root)
        fs.pipe_file(marker, b"prefect-distrain storage check\n")
    except FileNotFoundError as error:
        raise ConfigurationError(
            f"storage {shown!r} does not exist: create the bucket (or parent folder) first, "
            f"or fix the URL ({type(error).__name__})") from None
    except (NotADirectoryError, FileExistsError) as error:
        raise ConfigurationError(
            f"storage {shown!r} is under a file, not a folder: give a folder's path or URL "
            f"({type(error).__name__}: {error})") from None
    except PermissionError as error:
        raise ConfigurationError(
            f"storage {shown!r} refused the write: check the credentials in storage_options "
            f"(or the storage block) and their permissions ({brief(error)})") from None
    except Exception as error:  # noqa: BLE001 - botocore's NoCredentialsError and kin
        if "credential" in str(error).lower():
            raise ConfigurationError(
                f"no credentials to write to storage {shown!r}: pass them in "
                "RunConfig(storage_options={'key': ..., 'secret': ...}) or a storage block, or "
                "set them in the environment of the driver and the workers") from None
        raise
    return marker


def storage_is_visible(storage: RunStorage, marker: str) -> str | None:
    """On a worker: None if it sees the driver's marker file, else why not."""
    try:
        fs, _ = storage.filesystem()
        return None if fs.exists(marker) else "the driver's marker file is not there"
    except Exception as error:  # noqa: BLE001 - reported to the driver as the reason
        return f"{type(error).__name__}: {error}"


def _check_workers_see(storage: RunStorage, marker: str, group: WorkerGroup) -> None:
    reasons = group.execute(storage_is_visible, storage, marker)
    blind = [(m, why) for m, why in zip(group.members, reasons) if why is not None]
    if blind:
        where = "; ".join(f"rank {m.info.world_rank} on {m.info.node_ip} ({why})"
                          for m, why in blind)
        raise ConfigurationError(
            f"storage {redact_url(storage.run_url)!r} is not visible from {where}. A local "
            "path is private to one node and memory:// to one process; a custom fsspec "
            "protocol must be installed on every node. Use storage every worker can reach: "
            "s3://, gs://, or a folder mounted on every node")
