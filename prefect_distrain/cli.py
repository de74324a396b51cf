"""``prefect-distrain``: look into runs where they are stored, without writing Python.

```
prefect-distrain runs ls s3://models/runs
prefect-distrain checkpoints ls s3://models/runs/digits --verify
prefect-distrain verify s3://models/runs/digits 3
prefect-distrain best s3://models/runs/digits --metric loss --mode min
prefect-distrain gc s3://models/runs/digits --dry-run
prefect-distrain attempts s3://models/runs/digits --json
```
A run is named by its folder's URL or path; with ``--block NAME`` (a ``CheckpointStorage``
block) by its name under the block's storage, with the block's credentials. Otherwise
credentials come from ``--storage-options`` (JSON) or the environment, as fsspec finds them.
Every rule is the library's: the checkpoint manager decides what is committed, best, torn.
Exit codes: 0 fine, 1 a check failed (a corrupt checkpoint, nothing with the metric), 2 the
input or the storage is wrong (no such run, the run is in use by a live writer).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import settings
from .checkpoints.checkpoint import Checkpoint
from .checkpoints.fs import absolute_url, filesystem, list_names, redact_url
from .checkpoints.lease import RunInUseError, holder_identity
from .checkpoints.manager import CheckpointManager, best_first, score
from .checkpoints.manifest import Manifest
from .checkpoints.storage import ATTEMPTS, MANIFESTS, RunStorage
from .config import RunConfig
from .exceptions import CheckpointCorruptError, DistrainError

app = typer.Typer(help="Look into prefect-distrain runs where they are stored.",
                  no_args_is_help=True, add_completion=False)
runs_app = typer.Typer(help="The runs in a storage location.", no_args_is_help=True)
checkpoints_app = typer.Typer(help="The checkpoints of a run.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
app.add_typer(checkpoints_app, name="checkpoints")
console = Console()

OptionsOption = typer.Option(None, "--storage-options", "-o",
                             help="fsspec options as JSON (credentials are never printed)")
BlockOption = typer.Option(None, "--block", "-b", help="a CheckpointStorage block's name")
JsonOption = typer.Option(False, "--json", help="print JSON instead of a table")


def main() -> None:
    """The console script: our own errors and the storage's as one line, exit 2."""
    try:
        app()
    except (DistrainError, OSError) as error:
        Console(stderr=True, soft_wrap=True).print(f"error: {error}", highlight=False,
                                                   markup=False)
        raise SystemExit(2) from None


def _fail(message: str, code: int = 2) -> None:
    Console(stderr=True, soft_wrap=True).print(f"error: {message}", markup=False,
                                               highlight=False)
    raise typer.Exit(code)


def _options(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        _fail(f"--storage-options is not JSON ({error.msg}): e.g. "
              "'{\"key\": \"...\", \"secret\": \"...\"}'")
    if not isinstance(value, dict):
        _fail("--storage-options takes a JSON object, e.g. '{\"anon\": true}'")
    return value


def _storage(location: str, options: str | None, block: str | None) -> tuple[str, dict]:
    """(URL, options) of a storage location, or of the block's storage."""
    if block:
        from .blocks import CheckpointStorage

        try:
            loaded = CheckpointStorage.load(block)
        except Exception as error:  # noqa: BLE001 - Prefect's own "not found" and kin
            _fail(f"could not load the CheckpointStorage block {block!r}: {error}")
        url, found = RunConfig(storage=loaded).resolved_storage()
        return url, {**found, **_options(options)}
    return absolute_url(location), _options(options)


def _run(run: str, options: str | None, block: str | None) -> RunStorage:
    """The run named by its folder's URL (or its name under ``--block``'s storage)."""
    if block:
        url, found = _storage("", options, block)
        name = run.strip("/")
    else:
        full = absolute_url(run).rstrip("/")
        if "/" not in full.split("://", 1)[-1]:
            _fail(f"{redact_url(run)!r} names no run: give the run's folder, e.g. "
                  "s3://models/runs/digits")
        url, name = full.rsplit("/", 1)
        found = _options(options)
    storage = RunStorage(url, name, found)
    fs, root = storage.filesystem()
    if not (fs.exists(f"{root}/{MANIFESTS}") or fs.exists(f"{root}/{ATTEMPTS}")):
        _fail(f"{redact_url(storage.run_url)} is not a prefect-distrain run (no {MANIFESTS} or "
              f"{ATTEMPTS} folder): list the runs with `prefect-distrain runs ls "
              f"{redact_url(url) or '.'}`")
    return storage


def _show(rows: list[dict[str, Any]], columns: list[str], as_json: bool, title: str) -> None:
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    console.print(table)


def _metrics(checkpoint: Checkpoint) -> str:
    shown = {k: v for k, v in checkpoint.metrics.items() if not k.startswith("_")}
    return json.dumps(shown, default=str)[:80]


def _verify(storage: RunStorage, manifest: Manifest) -> str | None:
    """None if every file matches the manifest, else why not."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            storage.checkpoint(manifest).to_directory(os.path.join(folder, "copy"))
        except (CheckpointCorruptError, FileNotFoundError) as error:
            return str(error)
    return None


@runs_app.command("ls", short_help="The runs in a storage location.")
def runs_ls(storage: str = typer.Argument(".", help="a storage URL or path"),
            storage_options: Optional[str] = OptionsOption, block: Optional[str] = BlockOption,
            as_json: bool = JsonOption) -> None:
    """The runs in STORAGE: their checkpoints, the latest, how their last attempt ended."""
    url, options = _storage(storage, storage_options, block)
    fs, root = filesystem(url, options)
    if not fs.exists(root):
        _fail(f"{redact_url(url)} does not exist")
    rows = []
    for name in list_names(fs, root):
        folder = f"{root.rstrip('/')}/{name}"
        if not (fs.exists(f"{folder}/{MANIFESTS}") or fs.exists(f"{folder}/{ATTEMPTS}")):
            continue
        run = RunStorage(url, name, options)
        manifests, problems = run.read_manifests()
        attempts = CheckpointManager(run).attempts()
        rows.append({"run": name, "checkpoints": len(manifests),
                     "latest": manifests[-1].index if manifests else None,
                     "attempts": len(attempts),
                     "last attempt": attempts[-1].get("status") if attempts else None,
                     "bad manifests": len(problems) or None})
    _show(rows, ["run", "checkpoints", "latest", "attempts", "last attempt", "bad manifests"],
          as_json, f"Runs in {redact_url(url)}")


@checkpoints_app.command("ls", short_help="Every checkpoint folder of a run.")
def checkpoints_ls(run: str = typer.Argument(..., help="the run's folder URL or path"),
                   verify: bool = typer.Option(False, "--verify",
                                               help="check every file's sha256"),
                   storage_options: Optional[str] = OptionsOption,
                   block: Optional[str] = BlockOption, as_json: bool = JsonOption) -> None:
    """Every checkpoint folder of RUN: committed (verified with --verify), torn, or with a bad
    manifest."""
    storage = _run(run, storage_options, block)
    manifests, problems = storage.read_manifests()
    committed = {m.directory: m for m in manifests}
    validations, more = storage.read_validations()
    rows, corrupt = [], 0
    for name, index, attempt in sorted(storage.checkpoint_folders(), key=lambda f: f[1:]):
        manifest = committed.get(name)
        row = {"index": index, "attempt": attempt, "folder": name}
        if manifest is None:
            row["status"] = "torn (no manifest: never used)"
        else:
            checkpoint = storage.checkpoint(manifest, validations.get(name))
            row.update(files=len(manifest.files),
                       size=sum(f.size for f in manifest.files.values()),
                       metrics=_metrics(checkpoint), status=checkpoint.status)
            if verify:
                problem = _verify(storage, manifest)
                row["status"] = "verified" if problem is None else f"CORRUPT: {problem}"
                corrupt += problem is not None
        rows.append(row)
    for problem in problems:
        rows.append({"status": f"bad manifest: {problem}"})
    for problem in more:
        rows.append({"status": f"bad record: {problem}"})
    _show(rows, ["index", "attempt", "files", "size", "metrics", "status"], as_json,
          f"Checkpoints of {redact_url(storage.run_url)}")
    if corrupt:
        raise typer.Exit(1)


@app.command(short_help="Check checkpoints against their manifests.")
def verify(run: str = typer.Argument(..., help="the run's folder URL or path"),
           index: Optional[int] = typer.Argument(None, help="one checkpoint (default: all)"),
           storage_options: Optional[str] = OptionsOption, block: Optional[str] = BlockOption,
           as_json: bool = JsonOption) -> None:
    """Check the files of RUN's committed checkpoints (or checkpoint INDEX) against their
    manifests; exit 1 if one does not match."""
    storage = _run(run, storage_options, block)
    manifests, _ = storage.read_manifests()
    chosen = [m for m in manifests if index is None or m.index == index]
    if not chosen:
        _fail(f"{redact_url(storage.run_url)} has no committed checkpoint"
              + (f" {index}" if index is not None else ""))
    rows = []
    for manifest in chosen:
        problem = _verify(storage, manifest)
        rows.append({"index": manifest.index, "folder": manifest.directory,
                     "verified": problem is None, "problem": problem})
    _show(rows, ["index", "folder", "verified", "problem"], as_json,
          f"Verified in {redact_url(storage.run_url)}")
    if not all(r["verified"] for r in rows):
        raise typer.Exit(1)


@app.command(short_help="The checkpoint with the best value of a metric.")
def best(run: str = typer.Argument(..., help="the run's folder URL or path"),
         metric: str = typer.Option(..., "--metric", "-m", help="a reported metric"),
         mode: str = typer.Option("min", "--mode", help="min or max"),
         storage_options: Optional[str] = OptionsOption, block: Optional[str] = BlockOption,
         as_json: bool = JsonOption) -> None:
    """The committed checkpoint of RUN with the best METRIC (the library's ordering: missing
    and NaN values never win); exit 1 if none has it."""
    if mode not in ("min", "max"):
        _fail(f"--mode {mode!r}: use min or max")
    storage = _run(run, storage_options, block)
    ordered = best_first(storage.checkpoints(), metric, mode)  # validated metrics count
    if not ordered or score(ordered[0].metrics, metric) is None:
        Console(stderr=True, soft_wrap=True).print(
            f"no committed checkpoint has a value of {metric!r}", markup=False)
        raise typer.Exit(1)
    winner = ordered[0]
    path = redact_url(winner.path)
    if as_json:
        typer.echo(json.dumps({"index": winner.index, "path": path,
                               metric: winner.metrics.get(metric)}, default=str))
    else:
        typer.echo(path)


@app.command(short_help="Remove torn checkpoint folders.")
def gc(run: str = typer.Argument(..., help="the run's folder URL or path"),
       dry_run: bool = typer.Option(False, "--dry-run", help="only say what would go"),
       storage_options: Optional[str] = OptionsOption, block: Optional[str] = BlockOption,
       as_json: bool = JsonOption) -> None:
    """Remove RUN's torn checkpoint folders (no manifest) of attempts that are provably over,
    by the trainer's own rules. It takes the run's lease: a run in use is left alone (exit 2)."""
    storage = _run(run, storage_options, block)
    manager = CheckpointManager(storage)
    if dry_run:
        gone = manager.torn_folders(current_attempt=-1)
    else:
        try:
            manager.open(holder_identity(), settings.settings().lease_timeout_s)
        except RunInUseError as error:
            _fail(f"the run is in use, so nothing was removed: {error}")
        try:
            gone = manager.remove_torn(current_attempt=-1)
        finally:
            manager.close()
    rows = [{"folder": name, "action": "would remove" if dry_run else "removed"}
            for name in gone]
    _show(rows, ["folder", "action"], as_json,
          f"Torn folders of {redact_url(storage.run_url)}" + (" (dry run)" if dry_run else ""))


@app.command(short_help="The attempt ledger of a run.")
def attempts(run: str = typer.Argument(..., help="the run's folder URL or path"),
             storage_options: Optional[str] = OptionsOption, block: Optional[str] = BlockOption,
             as_json: bool = JsonOption) -> None:
    """RUN's attempt ledger: every start of its worker group, how it ended and why."""
    storage = _run(run, storage_options, block)
    records = CheckpointManager(storage).attempts()
    if as_json:
        typer.echo(json.dumps(records, indent=2, default=str))
        return
    rows = [{"attempt": r.get("attempt"), "status": r.get("status"),
             "started": str(r.get("started_at") or "")[:19].replace("T", " "),
             "workers": r.get("world_size"),
             "resumed from": (r.get("resumed_from") or "").rsplit("/", 1)[-1] or None,
             "cause": (r.get("cause") or "")[:100] or None} for r in records]
    _show(rows, ["attempt", "status", "started", "workers", "resumed from", "cause"],
          False, f"Attempts of {redact_url(storage.run_url)}")


if __name__ == "__main__":  # pragma: no cover
    main()
