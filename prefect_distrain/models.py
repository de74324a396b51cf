"""Model promotion: named aliases ("digits:production") that point at committed checkpoints.

Why: a serving job, a batch scorer or the next fine-tuning run needs "the production model",
not a run name and a checkpoint number; and moving that pointer is a decision that must be
made once (two promoters never both win), recorded (who, when, why, with which metrics) and
undoable. An alias is an append-only history in the storage itself, next to the runs::

    <storage>/_models/<model>/<alias>/v000001.json, v000002.json, ...

Each version is created exclusively (``create_exclusive``: a hard link on local disk, a
conditional PUT on S3): a promoter reads the highest version N and creates N+1; of two that
read N, one creates it and the other gets ``AliasConflictError``. Every record names the
checkpoint (its URL without credentials), the sha256 of its manifest, its metrics, the value
it replaced, who wrote it (user, host, pid, Prefect flow and task run) and why, and the sha256
of the record before it (a hash chain: an edited or deleted older record is noticed).

```python
import prefect_distrain as pd

result = pd.train(train_loop, run=pd.RunConfig(name="digits-0612", storage="s3://models/runs"))
pd.promote(result.checkpoint, model="digits", alias="production", storage="s3://models/runs",
           reason="accuracy 0.97 on the May holdout", expected=None)   # None: no value yet
checkpoint = pd.load_alias("digits", "production", storage="s3://models/runs")
state = pd.torch.load_state(checkpoint, "model.pt")     # every file checked against its sha256
pd.rollback("digits", "production", storage="s3://models/runs", reason="latency regression")
for entry in pd.alias_history("digits", "production", storage="s3://models/runs"):
    print(entry.version, entry.action, entry.checkpoint, entry.created_by["user"], entry.reason)
```
Only committed checkpoints (with a valid manifest) are promoted, and ``load_alias`` refuses
one whose manifest changed since: the returned ``Checkpoint`` carries that manifest, so its
download checks every file. A promoted checkpoint is pinned in its run (``<run>/_pins/``):
the run's retention (``num_to_keep``) keeps it, so every value an alias had can be rolled
back to. Inside a Prefect run a promotion (or rollback) also emits the event
``prefect-distrain.model.promoted`` (``...model.rolled-back``), resource
``prefect-distrain.model.<model>.<alias>``, and an artifact ``<model>-<alias>`` that shows the
checkpoint as committed ones are shown (a link where a browser opens it, else its path). Prefect
is imported only then.
"""

from __future__ import annotations

import datetime
import getpass
import hashlib
import json
import logging
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .checkpoints import fs as fsutil
from .checkpoints.checkpoint import Checkpoint
from .checkpoints.fs import create_exclusive, redact_url
from .checkpoints.manifest import Manifest, ManifestError, parse_dirname
from .checkpoints.retry import RetryPolicy, with_retries
from .checkpoints.storage import MANIFESTS, PINS, VALIDATIONS, pin_name
from .checkpoints.validation import ValidationRecord, ValidationRecordError
from .config import RunConfig
from .exceptions import CheckpointCorruptError, ConfigurationError, DistrainError

logger = logging.getLogger("prefect_distrain")

__all__ = ["AliasConflictError", "AliasCorruptError", "AliasEntry", "AliasNotFoundError",
           "alias_history", "load_alias", "promote", "rollback"]

#: The folder of every alias, under the storage root (a run name never starts with "_").
MODELS = "_models"
FORMAT = "prefect_distrain.alias"
SCHEMA_VERSION = 1

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_FILE = re.compile(r"^v(\d{6,})\.json$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ACTIONS = ("promote", "rollback")
#: How long a writer that lost a version waits for the winner's record to be readable.
_WINNER_WAIT_S = 5.0


class _Any:
    def __repr__(self) -> str:
        return "<any current value>"


#: ``expected``'s default: write whatever the current value is (still one winner per version).
ANY = _Any()


class AliasConflictError(DistrainError):
    """The alias is not what this writer expected: another promoter wrote a version first (the
    compare-and-swap lost), or ``expected=`` names another value than the current one. Nothing
    was written. ``current`` is the alias's current entry (None: it has no value)."""

    def __init__(self, message: str, *, model: str = "", alias: str = "",
                 current: AliasEntry | None = None):
        super().__init__(message)
        self.model, self.alias, self.current = model, alias, current

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, {"model": self.model, "alias": self.alias,
                                                   "current": self.current}))


class AliasCorruptError(DistrainError):
    """A version record of an alias that cannot be trusted: unreadable, not an alias record,
    its fields not those of its file, or the hash chain to the record before it broken. It is
    never skipped for an older one: a person decides (restore the file, or remove it)."""


class AliasNotFoundError(DistrainError, LookupError):
    """The alias has never been given a value in this storage."""


def _rebuild(cls, args, state):
    return cls(*args, **state)


@dataclass(frozen=True)
class AliasEntry:
    """One version of an alias, as its record holds it.

    ``checkpoint`` is the checkpoint's URL without credentials, ``manifest_sha256`` the sha256 of
    its manifest file when promoted; ``previous`` / ``previous_version`` /
    ``previous_manifest_sha256`` the value this entry replaced; ``restores`` the version whose
    value a rollback made current again;
    ``rollback_to`` the version a ``rollback`` from this entry restores (None: none earlier).
    ``created_by``: user, host, pid and, inside Prefect, flow_run_id, flow_run_name and
    task_run_id."""

    model: str
    alias: str
    version: int
    action: str
    checkpoint: str
    manifest_sha256: str
    index: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    previous: str | None = None
    previous_version: int | None = None
    previous_manifest_sha256: str | None = None
    restores: int | None = None
    rollback_to: int | None = None
    reason: str = ""
    created_at: str = ""
    created_by: dict[str, Any] = field(default_factory=dict)
    previous_record_sha256: str | None = None

    @property
    def name(self) -> str:
        return f"{self.model}:{self.alias}"

    def describe(self) -> str:
        """One line for messages: the version, its checkpoint, who set it, when and why."""
        who = self.created_by.get("user") or "?"
        where = self.created_by.get("host") or "?"
        if self.created_by.get("flow_run_id"):
            where += f", flow run {self.created_by['flow_run_id']}"
        if self.created_by.get("task_run_id"):
            where += f", task run {self.created_by['task_run_id']}"
        why = f" ({self.reason!r})" if self.reason else ""
        verb = "promoted" if self.action == "promote" else "rolled back to"
        return (f"v{self.version} = {self.checkpoint}, {verb} by {who} on {where} at "
                f"{self.created_at}{why}")

    def to_record(self) -> dict[str, Any]:
        previous = None if self.previous is None else {
            "version": self.previous_version, "checkpoint": self.previous,
            "manifest_sha256": self.previous_manifest_sha256}
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "model": self.model,
                "alias": self.alias, "version": self.version, "action": self.action,
                "checkpoint": {"url": self.checkpoint, "manifest_sha256": self.manifest_sha256,
                               "index": self.index, "metrics": self.metrics},
                "previous": previous, "restores": self.restores,
                "rollback_to": self.rollback_to, "reason": self.reason,
                "created_at": self.created_at, "created_by": self.created_by,
                "previous_record_sha256": self.previous_record_sha256}


# -- the public API ---------------------------------------------------------------------------


def promote(checkpoint: Checkpoint | str, model: str, alias: str = "production", *,
            storage: Any, storage_options: dict[str, Any] | None = None, reason: str = "",
            expected: Any = ANY, verify_hashes: bool = False) -> AliasEntry:
    """Make ``checkpoint`` the value of ``model:alias``: a new version, written exclusively.

    ``checkpoint``: a committed ``Checkpoint`` (``result.checkpoint``, ``pd.best_checkpoint``)
    or the path/URL of a committed checkpoint folder; a folder with no valid manifest is refused
    (``ConfigurationError``), and so is one whose files are not all there with their sizes
    (``CheckpointCorruptError``; ``verify_hashes=True`` downloads them and checks every sha256).
    ``storage``: a local path or fsspec URL (with ``storage_options``), a storage block
    (anything with ``fsspec_storage()``) or a ``RunConfig``; usually the runs' own storage.
    ``expected``: the value you mean to replace: a ``Checkpoint`` or URL, an ``AliasEntry`` or
    version number, or None for "the alias has no value yet"; left out, any current value is
    replaced. A mismatch, or another promoter writing the same version first, raises
    ``AliasConflictError`` naming the current value, and nothing is written. Promoting the
    current value again (a retried promotion, say) writes nothing and returns the current
    entry, whatever ``expected`` says.
    """
    _check_names(model, alias)
    root = _Root.of(storage, storage_options)
    if not isinstance(reason, str):
        raise ConfigurationError(f"reason must be a string (got {type(reason).__name__})")
    target = _committed_for_promotion(checkpoint, root)
    if verify_hashes:
        with target.checkpoint.as_directory():
            pass  # downloaded and checked against the manifest, file by file
    history = _History(root, model, alias)
    head = history.head()
    current = head[0] if head is not None else None
    if current is not None and _same_value(current, target.url, target.digest):
        logger.info("%s:%s is already %s (v%d): nothing written", model, alias, target.url,
                    current.version)
        return current  # also under expected=: a retried promotion finds its own done
    _check_expected(current, expected, model, alias)
    _pin(target.url, target.checkpoint.storage_options, model, alias)
    entry = history.append(
        action="promote", url=target.url, digest=target.digest, manifest=target.manifest,
        metrics=target.checkpoint.metrics, head=head, restores=None,
        rollback_to=current.version if current is not None else None, reason=reason)
    _announce(entry, target.checkpoint)
    return entry


def load_alias(model: str, alias: str = "production", *, storage: Any,
               storage_options: dict[str, Any] | None = None,
               checkpoint_options: dict[str, Any] | None = None) -> Checkpoint:
    """The checkpoint ``model:alias`` points at now, with its manifest: reading its files
    (``as_directory``, ``to_directory``, ``pd.torch.load_state``) checks each one's sha256.

    ``AliasNotFoundError`` when the alias has no value; ``AliasCorruptError`` when its current
    record is damaged (never an older one instead); ``CheckpointCorruptError`` when the
    checkpoint's manifest is gone or changed since the promotion. ``checkpoint_options``: the
    fsspec options of the checkpoint when it lives on another storage than the alias (default:
    the alias storage's own, for a checkpoint of the same protocol).
    """
    _check_names(model, alias)
    root = _Root.of(storage, storage_options)
    head = _History(root, model, alias).head()
    if head is None:
        raise AliasNotFoundError(
            f"alias {model}:{alias} has no value in {redact_url(root.url)}: promote a "
            "checkpoint first (pd.promote)")
    return _verified(head[0], root, checkpoint_options)


def rollback(model: str, alias: str = "production", *, storage: Any,
             storage_options: dict[str, Any] | None = None, reason: str = "",
             to_version: int | None = None, expected: Any = ANY,
             checkpoint_options: dict[str, Any] | None = None) -> AliasEntry:
    """Make the value before the current one current again, as a new version (exclusive, like
    a promotion; ``expected`` as there).

    The value restored is the one the current value replaced, and a second rollback goes on
    back (an undo: promote A, B, C; rollback gives B, rollback again gives A, then
    ``ConfigurationError``: nothing earlier). ``to_version=K`` restores version K's value
    instead. The checkpoint restored must still be there with the manifest it was promoted
    with (``CheckpointCorruptError`` otherwise: retention may have removed it).
    """
    _check_names(model, alias)
    root = _Root.of(storage, storage_options)
    history = _History(root, model, alias)
    records = history.records()  # the whole chain is checked before the past is trusted
    entries = [entry for entry, _ in records]
    head = entries[0] if entries else None
    if head is None:
        raise AliasNotFoundError(f"alias {model}:{alias} has no value in "
                                 f"{redact_url(root.url)}: there is nothing to roll back")
    _check_expected(head, expected, model, alias)
    if to_version is not None:
        if not isinstance(to_version, int) or isinstance(to_version, bool) \
                or not 1 <= to_version <= head.version:
            raise ConfigurationError(
                f"to_version={to_version!r}: {model}:{alias} has versions 1 to {head.version}")
        target_version = to_version
    else:
        target_version = head.rollback_to
        if target_version is None:
            raise ConfigurationError(
                f"{model}:{alias} has nothing earlier to roll back to: its value now "
                f"({head.describe()}) is the first one it had. Promote another checkpoint, or "
                "pass to_version= a version of pd.alias_history(...)")
    target = entries[head.version - target_version]
    if _same_value(head, target.checkpoint, target.manifest_sha256):
        logger.info("%s:%s is already the value of v%d (v%d): nothing written", model, alias,
                    target.version, head.version)
        return head
    checkpoint = _verified(target, root, checkpoint_options)
    _pin(target.checkpoint, checkpoint.storage_options, model, alias)
    entry = history.append(
        action="rollback", url=target.checkpoint, digest=target.manifest_sha256,
        manifest=checkpoint.manifest, head=records[0], restores=target.version,
        rollback_to=target.rollback_to, reason=reason)
    _announce(entry, checkpoint)
    return entry


def alias_history(model: str, alias: str = "production", *, storage: Any,
                  storage_options: dict[str, Any] | None = None,
                  limit: int | None = None) -> list[AliasEntry]:
    """Every version of ``model:alias``, newest first ([] for an alias never set); ``limit``:
    the newest that many. Each record and the hash chain between them is checked
    (``AliasCorruptError`` names the first that fails)."""
    _check_names(model, alias)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigurationError(f"limit must be a positive whole number or None, got {limit!r}")
    return _History(_Root.of(storage, storage_options), model, alias).entries(limit)


# -- where aliases live -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Root:
    """The storage root: its URL and options (never shown) and how to reach it."""

    url: str
    options: dict[str, Any] = field(repr=False)

    @classmethod
    def of(cls, storage: Any, storage_options: dict[str, Any] | None) -> _Root:
        """As ``RunConfig(storage=..., storage_options=...)`` resolves it (and validates it),
        or a ``RunConfig`` itself."""
        if isinstance(storage, os.PathLike):
            storage = os.fspath(storage)
        if hasattr(storage, "resolved_storage"):
            url, options = storage.resolved_storage()
            return cls(url, {**options, **dict(storage_options or {})})
        return cls(*RunConfig(storage=storage, storage_options=storage_options).resolved_storage())

    def filesystem(self, fresh: bool = False) -> tuple[Any, str]:
        options = {**self.options, "skip_instance_cache": True} if fresh else self.options
        return fsutil.filesystem(self.url, options)

    def options_for(self, url: str, given: dict[str, Any] | None) -> dict[str, Any]:
        """A checkpoint's options: those given, else this storage's for the same protocol."""
        if given is not None:
            return dict(given)
        return dict(self.options) if _protocol(url) == _protocol(self.url) else {}


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


class _History:
    """The version records of one alias."""

    def __init__(self, root: _Root, model: str, alias: str):
        self.root, self.model, self.alias = root, model, alias
        self.shown = f"{redact_url(root.url).rstrip('/')}/{MODELS}/{model}/{alias}"

    def folder(self, fresh: bool = False) -> tuple[Any, str]:
        fs, path = self.root.filesystem(fresh)
        return fs, f"{path.rstrip('/')}/{MODELS}/{self.model}/{self.alias}"

    def versions(self) -> list[int]:
        """The versions there, ascending (temporary files and other names are not versions)."""
        fs, folder = self.folder()
        fs.invalidate_cache(folder)  # another process may have written since we listed
        found = []
        for name in fsutil.list_names(fs, folder):
            match = _VERSION_FILE.match(name)
            if match:
                found.append(int(match.group(1)))
        return sorted(found)

    def read(self, version: int) -> tuple[AliasEntry, bytes]:
        fs, folder = self.folder()
        path = f"{folder}/{_file(version)}"
        fs.invalidate_cache(path)  # s3fs reads a file's size from its cached listing first
        data = fsutil.read_bytes(fs, path)
        if data is None:
            raise AliasCorruptError(f"{self.shown}/{_file(version)} is missing: the history of "
                                    f"{self.model}:{self.alias} was cut (records are never "
                                    "removed by prefect-distrain)")
        return _parse(data, self.model, self.alias, version, f"{self.shown}/{_file(version)}"), data

    def head(self) -> tuple[AliasEntry, bytes] | None:
        """The current entry and its bytes, its link to the record before it checked; None:
        the alias was never set."""
        versions = self.versions()
        if not versions:
            return None
        top = versions[-1]
        entry, data = self.read(top)
        if top > 1:
            self._check_link(entry, self.read(top - 1)[1])
        return entry, data

    def entries(self, limit: int | None = None) -> list[AliasEntry]:
        return [entry for entry, _ in self.records(limit)]

    def records(self, limit: int | None = None) -> list[tuple[AliasEntry, bytes]]:
        """(entry, bytes), newest first; every record read is checked, and the chain between
        them."""
        versions = self.versions()
        if not versions:
            return []
        top = versions[-1]
        count = top if limit is None else min(top, limit + 1)  # one more: the last link
        found = [self.read(version) for version in range(top, top - count, -1)]
        for (newer, _), (_, older_bytes) in zip(found, found[1:]):
            self._check_link(newer, older_bytes)
        return found[:limit]

    def _check_link(self, entry: AliasEntry, before: bytes) -> None:
        if entry.previous_record_sha256 != _sha256(before):
            raise AliasCorruptError(
                f"{self.shown}/{_file(entry.version - 1)} is not the record that "
                f"{_file(entry.version)} was written after (its sha256 differs from the one "
                "recorded): the history was edited. Restore the file from a backup or a "
                "bucket version; prefect-distrain does not pick a value for you")

    def append(self, *, action: str, url: str, digest: str, manifest: Manifest | None,
               head: tuple[AliasEntry, bytes] | None, restores: int | None,
               rollback_to: int | None, reason: str,
               metrics: dict[str, Any] | None = None) -> AliasEntry:
        """Create version head+1 exclusively; AliasConflictError if another writer did.
        ``metrics``: the checkpoint's, its validation's included (default: the manifest's)."""
        current, previous_bytes = head if head is not None else (None, None)
        version = (current.version if current else 0) + 1
        entry = AliasEntry(
            model=self.model, alias=self.alias, version=version, action=action, checkpoint=url,
            manifest_sha256=digest, index=manifest.index if manifest else None,
            metrics=dict(metrics if metrics is not None else manifest.metrics if manifest
                         else {}),
            previous=current.checkpoint if current else None,
            previous_version=current.version if current else None,
            previous_manifest_sha256=current.manifest_sha256 if current else None,
            restores=restores,
            rollback_to=rollback_to, reason=reason,
            created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
            created_by=_who(),
            previous_record_sha256=_sha256(previous_bytes) if previous_bytes is not None
            else None)
        data = fsutil.dumps_json(entry.to_record())

        def attempt(fresh: bool) -> bool:
            fs, folder = self.folder(fresh)
            path = f"{folder}/{_file(version)}"
            try:
                if create_exclusive(fs, path, data):
                    return True
            except Exception as error:
                if not _conditional_conflict(error):
                    raise
                return False  # S3: another conditional write of this name is in flight
            # After a retry, a file with exactly our bytes is ours (the first answer was lost).
            return fresh and fsutil.read_bytes(fs, path) == data

        if not with_retries(f"writing {self.shown}/{_file(version)}", RetryPolicy(), attempt):
            winner = self._winner(version)
            raise AliasConflictError(
                f"alias {self.model}:{self.alias} changed while this {action} was written: "
                + (f"another writer created v{version} first ({winner.describe()})" if winner
                   else f"another writer was creating v{version} at the same moment")
                + ". Nothing was written. "
                "Load the alias again (pd.load_alias / pd.alias_history), decide, and retry, "
                "passing expected= the value you mean to replace",
                model=self.model, alias=self.alias, current=winner)
        logger.info("%s:%s v%d: %s %s (was %s)%s", self.model, self.alias, version, action,
                    url, entry.previous or "no value", f": {reason}" if reason else "")
        return entry

    def _winner(self, version: int) -> AliasEntry | None:
        """The record that won ``version``. An object store may answer a losing conditional
        write while the winner's is still in flight (S3's 409): it is waited for, briefly."""
        deadline = time.monotonic() + _WINNER_WAIT_S
        while True:
            try:
                return self.read(version)[0]
            except AliasCorruptError:
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.1)


def _conditional_conflict(error: BaseException) -> bool:
    """S3's answer to a conditional write while another one of the same key is in flight
    (409 ConditionalRequestConflict): that other writer is about to win."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        response = getattr(current, "response", None)
        if isinstance(response, dict) and (response.get("Error") or {}).get(
                "Code") == "ConditionalRequestConflict":
            return True
        current = current.__cause__ or current.__context__
    return False


def _file(version: int) -> str:
    return f"v{version:06d}.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_names(model: Any, alias: Any) -> None:
    for what, value in (("model", model), ("alias", alias)):
        if not isinstance(value, str) or not _NAME.match(value):
            raise ConfigurationError(
                f"{what} name {value!r} is not usable: use letters, digits, '.', '_' and '-' "
                "(at most 128, starting with a letter or digit), e.g. 'digits' / 'production'")


# -- records ----------------------------------------------------------------------------------


def _parse(data: bytes, model: str, alias: str, version: int, shown: str) -> AliasEntry:
    """An alias record, validated against the file it was read from."""
    def bad(why: str) -> AliasCorruptError:
        return AliasCorruptError(f"{shown}: {why}. The current value of {model}:{alias} is "
                                 "unknown until a person restores or removes this file")

    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise bad(f"not valid JSON ({error})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise bad("not an alias record")
    schema = record.get("schema_version")
    if schema != SCHEMA_VERSION:
        if isinstance(schema, int) and schema > SCHEMA_VERSION:
            raise AliasCorruptError(f"{shown}: written by a newer prefect-distrain (schema "
                                    f"{schema}; this one reads {SCHEMA_VERSION}): upgrade it")
        raise bad(f"unknown schema version {schema!r}")
    if (record.get("model"), record.get("alias"), record.get("version")) != (model, alias,
                                                                               version):
        raise bad(f"it says it is {record.get('model')!r}:{record.get('alias')!r} "
                  f"v{record.get('version')!r}, not the record of its own file")
    if record.get("action") not in _ACTIONS:
        raise bad(f"unknown action {record.get('action')!r}")
    checkpoint = record.get("checkpoint")
    if not isinstance(checkpoint, dict):
        raise bad("no checkpoint")
    url, digest = checkpoint.get("url"), checkpoint.get("manifest_sha256")
    if not isinstance(url, str) or not url or redact_url(url) != url:
        raise bad("its checkpoint URL is missing or holds credentials")
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise bad("its manifest sha256 is not 64 hex digits")
    index, metrics = checkpoint.get("index"), checkpoint.get("metrics", {})
    if not (index is None or _natural(index)) or not isinstance(metrics, dict):
        raise bad("its checkpoint index or metrics are malformed")
    previous = record.get("previous")
    chained = record.get("previous_record_sha256")
    if version == 1:
        if previous is not None or chained is not None:
            raise bad("the first version names a previous value")
        previous_url = previous_version = previous_digest = None
    else:
        if not isinstance(previous, dict) or previous.get("version") != version - 1 \
                or not isinstance(previous.get("checkpoint"), str):
            raise bad(f"its previous value is not version {version - 1}'s")
        if not isinstance(chained, str) or not _SHA256.match(chained):
            raise bad("the sha256 of the record before it is missing")
        previous_url, previous_version = previous["checkpoint"], version - 1
        previous_digest = previous.get("manifest_sha256")
        if not isinstance(previous_digest, str) or not _SHA256.match(previous_digest):
            raise bad("the manifest sha256 of its previous value is not 64 hex digits")
    restores, rollback_to = record.get("restores"), record.get("rollback_to")
    for name, value in (("restores", restores), ("rollback_to", rollback_to)):
        if value is not None and not (_natural(value) and 1 <= value < version):
            raise bad(f"{name} {value!r} is not an earlier version")
    if (record["action"] == "rollback") != (restores is not None):
        raise bad("'restores' goes with a rollback, and only with one")
    by = record.get("created_by", {})
    if not isinstance(by, dict) or not isinstance(record.get("reason", ""), str):
        raise bad("'created_by' or 'reason' is malformed")
    return AliasEntry(model=model, alias=alias, version=version, action=record["action"],
                      checkpoint=url, manifest_sha256=digest, index=index, metrics=metrics,
                      previous=previous_url, previous_version=previous_version,
                      previous_manifest_sha256=previous_digest,
                      restores=restores, rollback_to=rollback_to,
                      reason=record.get("reason", ""),
                      created_at=str(record.get("created_at", "")), created_by=by,
                      previous_record_sha256=chained)


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _normal(url: str) -> str:
    """A checkpoint URL as records hold it: absolute, without credentials or a trailing /."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    return redact_url(fsutil.absolute_url(url)).rstrip("/")


def _same_value(entry: AliasEntry, url: str, digest: str) -> bool:
    return entry.checkpoint == url and entry.manifest_sha256 == digest


def _check_expected(head: AliasEntry | None, expected: Any, model: str, alias: str) -> None:
    if expected is ANY:
        return
    if expected is None:
        matches, wanted = head is None, "no value"
    elif isinstance(expected, AliasEntry):
        matches, wanted = head is not None and head.version == expected.version, \
            f"v{expected.version}"
    elif isinstance(expected, int) and not isinstance(expected, bool):
        matches, wanted = head is not None and head.version == expected, f"v{expected}"
    elif isinstance(expected, (Checkpoint, str, os.PathLike)):
        path = expected.path if isinstance(expected, Checkpoint) else os.fspath(expected)
        wanted = _normal(path)
        matches = head is not None and head.checkpoint == wanted
    else:
        raise ConfigurationError(
            "expected takes the value you mean to replace: a Checkpoint or its path/URL, an "
            f"AliasEntry or a version number, or None for no value; got {type(expected).__name__}")
    if not matches:
        now = head.describe() if head is not None else "no value"
        raise AliasConflictError(
            f"alias {model}:{alias} is not {wanted} as expected: it is {now}. Nothing was "
            "written. Load the alias again (pd.load_alias / pd.alias_history), decide, and "
            "retry with expected= its current value", model=model, alias=alias, current=head)


# -- checkpoints ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    checkpoint: Checkpoint
    url: str
    manifest: Manifest
    digest: str


def _manifest_of(url: str, options: dict[str, Any]) -> tuple[Any, str, bytes | None, str]:
    """(filesystem, folder path, manifest bytes or None, manifest file name) of a checkpoint
    folder's URL; ValueError when the folder's name is not one of a run's checkpoints."""
    fs, path = fsutil.filesystem(url, options)
    parent, _, name = path.rstrip("/").rpartition("/")
    if parse_dirname(name) is None:
        raise ValueError(name)
    manifest_path = f"{parent}/{MANIFESTS}/{name}.json"
    fs.invalidate_cache(f"{parent}/{MANIFESTS}")
    return fs, path, fsutil.read_bytes(fs, manifest_path), f"{name}.json"


def _committed_for_promotion(checkpoint: Checkpoint | str, root: _Root) -> _Target:
    """The committed checkpoint to promote, its manifest read from storage; refused when it
    has none, or when its files are not all there with their sizes."""
    if isinstance(checkpoint, os.PathLike):
        checkpoint = os.fspath(checkpoint)
    if isinstance(checkpoint, str):
        if not checkpoint.strip():
            raise ConfigurationError("promote('') names no checkpoint: pass result.checkpoint "
                                     "or a committed checkpoint folder's path/URL")
        url, given = checkpoint, None
    elif isinstance(checkpoint, Checkpoint):
        url, given = checkpoint.path, checkpoint.storage_options or None
    else:
        raise ConfigurationError(f"promote takes a Checkpoint or its path/URL, got "
                                 f"{type(checkpoint).__name__}")
    url = _normal(url)
    options = root.options_for(url, given)
    unverifiable = (f"{url} is not a committed checkpoint: it has no valid manifest in its "
                    f"run's {MANIFESTS}/, so its files can't be verified (never promoted)")
    try:
        fs, path, data, name = _manifest_of(url, options)
    except ValueError:
        raise ConfigurationError(
            f"{unverifiable}. Its folder is not a run's checkpoint folder "
            "(checkpoint_NNNNNN-aN): promote result.checkpoint, pd.best_checkpoint(...) or "
            "pd.latest_checkpoint(...) of a run") from None
    if data is None:
        raise ConfigurationError(
            f"{unverifiable}: it was never committed (torn by a failure) or its manifest was "
            "removed. Promote a committed checkpoint (result.checkpoint, pd.latest_checkpoint)")
    try:
        manifest = Manifest.from_json(data, name)
    except ManifestError as error:
        raise ConfigurationError(f"{unverifiable}: {error}") from None
    if isinstance(checkpoint, Checkpoint) and checkpoint.manifest is not None and (
            checkpoint.manifest.index, checkpoint.manifest.attempt, checkpoint.manifest.files
    ) != (manifest.index, manifest.attempt, manifest.files):
        raise CheckpointCorruptError(
            f"checkpoint {url}: its manifest in storage is not the one this Checkpoint was "
            "committed with; load it again (pd.latest_checkpoint / result.checkpoint)")
    _check_sizes(fs, path, manifest, url)
    return _Target(Checkpoint(url, options, manifest, _validation_of(fs, path, manifest)), url,
                   manifest, _sha256(data))


def _validation_of(fs: Any, path: str, manifest: Manifest) -> ValidationRecord | None:
    """The checkpoint's validation record, if it has one of its own (pd.Validation)."""
    parent, _, name = path.rstrip("/").rpartition("/")
    data = fsutil.read_bytes(fs, f"{parent}/{VALIDATIONS}/{name}.json")
    try:
        record = ValidationRecord.from_json(data, f"{name}.json") if data else None
    except ValidationRecordError as error:
        logger.warning("Ignoring %s", error)
        return None
    return record if record is not None and record.belongs_to(manifest) else None


def _pin(url: str, options: dict[str, Any], model: str, alias: str) -> None:
    """Keep the checkpoint from its run's retention, before the alias points at it (a pin that
    outlives a lost race only keeps a checkpoint longer). Pins stay: every value an alias ever
    had can be rolled back to; remove ``<run>/_pins/<model>.<alias>.<folder>.pin`` to let
    retention take that checkpoint again."""
    fs, path = fsutil.filesystem(url, options)
    run, _, folder = path.rstrip("/").rpartition("/")
    fsutil.ensure_folder(fs, f"{run}/{PINS}")
    fs.pipe_file(f"{run}/{PINS}/{pin_name(model, alias, folder)}",
                 json.dumps({"model": model, "alias": alias, "checkpoint": folder}).encode())


def _check_sizes(fs: Any, path: str, manifest: Manifest, url: str) -> None:
    """Every file the manifest lists is there with its size (one listing, no download)."""
    fs.invalidate_cache(path)
    try:
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        found = {}
    prefix = path.rstrip("/") + "/"
    sizes = {key[len(prefix):]: info.get("size") for key, info in found.items()
             if key.startswith(prefix)}
    for name, expected in manifest.files.items():
        if name not in sizes:
            raise CheckpointCorruptError(f"checkpoint {url}: file {name!r} of its manifest is "
                                         "missing (removed after the commit?): not promoted")
        if sizes[name] != expected.size:
            raise CheckpointCorruptError(
                f"checkpoint {url}: file {name!r} has {sizes[name]} bytes, its manifest "
                f"{expected.size}: it was changed after the commit; not promoted")


def _verified(entry: AliasEntry, root: _Root,
              checkpoint_options: dict[str, Any] | None) -> Checkpoint:
    """The entry's checkpoint with its manifest, which must be the one promoted."""
    options = root.options_for(entry.checkpoint, checkpoint_options)
    try:
        fs, path, data, name = _manifest_of(entry.checkpoint, options)
    except ValueError:
        raise AliasCorruptError(f"{entry.name} v{entry.version} names {entry.checkpoint}, "
                                "which is not a run's checkpoint folder") from None
    if data is None:
        raise CheckpointCorruptError(
            f"{entry.name} v{entry.version}: checkpoint {entry.checkpoint} has no manifest any "
            "more (deleted after the promotion, e.g. by a run's num_to_keep): it can't be "
            "verified. Roll back (pd.rollback) or promote another checkpoint")
    if _sha256(data) != entry.manifest_sha256:
        raise CheckpointCorruptError(
            f"{entry.name} v{entry.version}: the manifest of checkpoint {entry.checkpoint} is "
            "not the one promoted (its sha256 differs): the checkpoint was changed or replaced "
            "after the promotion. Roll back (pd.rollback) or promote a checkpoint again")
    try:
        manifest = Manifest.from_json(data, name)
    except ManifestError as error:
        raise CheckpointCorruptError(f"{entry.name} v{entry.version}: {error}") from None
    return Checkpoint(entry.checkpoint, options, manifest, _validation_of(fs, path, manifest))


# -- who, and Prefect -------------------------------------------------------------------------


def _who() -> dict[str, Any]:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in this container
        user = None
    who: dict[str, Any] = {"user": user, "host": socket.gethostname(), "pid": os.getpid()}
    flow_run, task_run = _prefect_runs()
    if task_run is not None:
        who["task_run_id"] = str(task_run.task_run.id)
        if task_run.task_run.flow_run_id is not None:
            who["flow_run_id"] = str(task_run.task_run.flow_run_id)
    if flow_run is not None and getattr(flow_run, "flow_run", None) is not None:
        who["flow_run_id"] = str(flow_run.flow_run.id)
        who["flow_run_name"] = flow_run.flow_run.name
    return who


def _prefect_runs() -> tuple[Any, Any]:
    """(flow run context, task run context) of the Prefect run this code is in, or Nones.
    Without Prefect imported there is no run: it is not imported for the question."""
    if "prefect" not in sys.modules:
        return None, None
    try:
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:
        return None, None
    return FlowRunContext.get(), TaskRunContext.get()


def _announce(entry: AliasEntry, checkpoint: Checkpoint) -> None:
    """The event and the artifact, inside a Prefect run; a failure here is logged (the alias
    is written, and that is what counts)."""
    flow_run, task_run = _prefect_runs()
    if flow_run is None and task_run is None:
        return
    try:
        _publish(entry, checkpoint.storage_options)
    except Exception as error:  # noqa: BLE001
        logger.warning("%s v%d was written, but announcing it to Prefect failed: %s",
                       entry.name, entry.version, fsutil.brief(error))


def _publish(entry: AliasEntry, storage_options: dict[str, Any]) -> None:
    """As a committed checkpoint is announced (prefect/artifacts.py): an event, and the
    checkpoint as a link where a browser opens it, else its path as text to copy."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact
    from prefect.events import emit_event

    from .prefect.artifacts import artifact_key, browser_url, checkpoint_link

    shown_url = checkpoint_link(entry.checkpoint)
    metrics = {k: v for k, v in entry.metrics.items() if not k.startswith("_")}
    resource = {"prefect.resource.id": f"prefect-distrain.model.{entry.model}.{entry.alias}",
                "prefect.resource.name": entry.name,
                "prefect-distrain.version": str(entry.version)}
    related = []
    parts = entry.checkpoint.rstrip("/").rsplit("/", 2)
    if len(parts) == 3 and entry.index is not None:  # <storage>/<run>/checkpoint_...
        run = parts[1]
        related = [{"prefect.resource.id": f"prefect-distrain.checkpoint.{run}.{entry.index}",
                    "prefect.resource.role": "checkpoint", "prefect-distrain.path": shown_url},
                   {"prefect.resource.id": f"prefect-distrain.run.{run}",
                    "prefect.resource.role": "run", "prefect.resource.name": run}]
    name = "promoted" if entry.action == "promote" else "rolled-back"
    previous = checkpoint_link(entry.previous) if entry.previous else None
    payload = {"version": entry.version, "action": entry.action, "checkpoint": shown_url,
               "previous": previous, "previous_version": entry.previous_version,
               "restores": entry.restores, "reason": entry.reason, "metrics": metrics,
               "manifest_sha256": entry.manifest_sha256}
    emit_event(event=f"prefect-distrain.model.{name}", resource=resource, related=related,
               payload=json.loads(json.dumps(payload, default=str)))
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in metrics.items())
    what = f"checkpoint {entry.index}" if entry.index is not None else "checkpoint"
    description = (f"{entry.name} v{entry.version} ({entry.action}): {what}, "
                   f"{shown or 'no metrics'}. "
                   + (f"Why: {entry.reason}." if entry.reason else "No reason given.")
                   + (f" It replaced {previous} (v{entry.previous_version})." if previous
                      else ""))
    key = artifact_key(f"{entry.model}-{entry.alias}")
    url = browser_url(entry.checkpoint, storage_options)
    if url is not None:
        create_link_artifact(link=url, link_text=f"{entry.name} v{entry.version}", key=key,
                             description=description)
    else:  # a path no browser opens: shown as text, to copy
        create_markdown_artifact(
            markdown=f"{entry.name} v{entry.version}: `{shown_url}`", key=key,
            description=description)
