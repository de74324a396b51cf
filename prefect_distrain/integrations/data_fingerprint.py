"""What data a checkpoint was trained on: a fingerprint of a run's datasets, and what changed.

Each attempt's ledger record keeps the fingerprint of the ``datasets=`` it trained on
(``data``). A resume or a warm start compares the record of the checkpoint's attempt with the
data given now; ``DataConfig(on_data_change=...)`` says what a difference does (the trainer
applies it): "warn" (default: logged, and listed in the run's summary), "fail"
(``DataChangedError`` before anything trains) or "ignore".

A URL's fingerprint lists its parquet / CSV files with their sizes and versions (the ETag on
object stores, the modification time elsewhere), so a file added, removed or rewritten shows;
beyond ``MAX_FILES`` files it keeps their count, total size and a digest of the listing
instead (a change shows, not which file). A Ray Dataset's lists the names of the files it
reads (``input_files``: a file added or removed shows, one rewritten in place does not) or,
once materialized, its row count and schema; one built in memory and not materialized has
none and is never compared. Names are kept without credentials or query strings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from ..checkpoints import fs as fsutil
from .data import FORMATS

_VERSION_KEYS = ("generation", "ETag", "etag", "mtime", "LastModified", "last_modified",
                 "updated")
#: Beyond this many files a URL's fingerprint is a digest of its listing.
MAX_FILES = 1000
logger = logging.getLogger("prefect_distrain")


def fingerprints(datasets: Mapping[str, Any] | None, storage_url: str = "",
                 storage_options: Mapping[str, Any] | None = None) -> dict[str, dict]:
    """The fingerprint of each dataset (URLs read with the run's storage options where they are
    on the same kind of storage, as ``resolve_datasets`` reads them)."""
    from fsspec.utils import get_protocol

    found = {}
    for name, value in (datasets or {}).items():
        try:
            if isinstance(value, (str, os.PathLike)):
                url = os.fspath(value)
                same = get_protocol(url) == get_protocol(storage_url or "file://")
                found[name] = _of_url(url, dict(storage_options or {}) if same else {})
            else:
                found[name] = _of_dataset(value)
        except Exception as error:  # noqa: BLE001 - a fingerprint is not worth the run
            logger.warning("Could not fingerprint dataset %r (%s): it is not compared on a "
                           "resume", name, fsutil.brief(error))
            found[name] = {}
    return found


def _of_url(url: str, options: dict[str, Any]) -> dict:
    fs, path = fsutil.filesystem(url, options)
    fs.invalidate_cache(path)  # a long-lived driver's listing cache may miss new files
    if not fs.exists(path):
        return {"url": fsutil.redact_url(url), "files": {}}
    infos = [fs.info(path)] if fs.isfile(path) else [
        info for info in fs.find(path, detail=True).values()
        if os.path.splitext(info["name"])[1] in FORMATS]
    root = path.rstrip("/")
    files = {}
    for info in sorted(infos, key=lambda i: i["name"]):
        relative = info["name"][len(root):].lstrip("/") or os.path.basename(info["name"])
        version = next((info[k] for k in _VERSION_KEYS if info.get(k) not in (None, "")), None)
        files[fsutil.redact_url(relative)] = {
            "size": info.get("size"), "version": None if version is None else str(version)}
    if len(files) > MAX_FILES:
        listing = json.dumps(files, sort_keys=True).encode()
        return {"url": fsutil.redact_url(url), "count": len(files),
                "bytes": sum(f["size"] or 0 for f in files.values()),
                "listing_sha256": hashlib.sha256(listing).hexdigest()}
    return {"url": fsutil.redact_url(url), "files": files}


def _of_dataset(dataset: Any) -> dict:
    from ray.data.dataset import MaterializedDataset

    if isinstance(dataset, MaterializedDataset):
        return {"rows": dataset.count(), "schema": str(dataset.schema())}
    try:
        files = dataset.input_files()
    except Exception:  # noqa: BLE001 - a plan Ray can't tell its files of: nothing to compare
        files = []
    return {"input_files": sorted(fsutil.redact_url(f) for f in files)} if files else {}


def changes(before: Mapping[str, dict], now: Mapping[str, dict]) -> list[str]:
    """How the data given now differs from the data a checkpoint was trained on, one line per
    difference; datasets with no fingerprint on either side are not compared."""
    lines = []
    if not isinstance(before, Mapping):
        return lines
    for name in sorted(set(before) | set(now)):
        old, new = before.get(name), now.get(name)
        if old is not None and not isinstance(old, dict):
            continue  # a record written by someone else: nothing to compare
        if old is None:
            lines.append(f"dataset {name!r} is new")
        elif new is None:
            lines.append(f"dataset {name!r} is no longer given")
        elif old and new and old != new:
            try:
                lines.append(f"dataset {name!r}: {_difference(old, new)}")
            except (AttributeError, KeyError, TypeError):  # a record not in our shape
                lines.append(f"dataset {name!r}: its recorded fingerprint is unreadable")
    return lines


def _difference(old: dict, new: dict) -> str:
    if "files" in old and "files" in new:
        before, after = old["files"], new["files"]
        parts = [f"{f} added" for f in sorted(set(after) - set(before))]
        parts += [f"{f} removed" for f in sorted(set(before) - set(after))]
        for f in sorted(set(before) & set(after)):
            if before[f] != after[f]:
                size = (f" (size {before[f].get('size')} -> {after[f].get('size')})"
                        if before[f].get("size") != after[f].get("size") else "")
                parts.append(f"{f} rewritten{size}")
        where = f" ({new['url']})" if old.get("url") == new.get("url") else \
            f" ({old.get('url')} -> {new.get('url')})"
        return ", ".join(parts or ["its location changed"]) + where
    if "listing_sha256" in old and "listing_sha256" in new:
        return (f"its {old.get('count')} files ({old.get('bytes')} bytes) are now "
                f"{new.get('count')} ({new.get('bytes')} bytes), or some were rewritten "
                f"({new.get('url')})")
    if "rows" in old and "rows" in new and old["rows"] != new["rows"]:
        return f"{old['rows']} rows -> {new['rows']} rows"
    return "its files or schema differ"
