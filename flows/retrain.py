"""Scheduled retraining with a champion/challenger gate: each run fine-tunes the production
model (``<model>:production``, else the best checkpoint of the latest earlier run, else
nothing), scores its best checkpoint and the production model on the same held-out data, and
promotes it only when it is better by ``margin``.

    python flows/retrain.py                      # once, here
    (see deployments/prefect.yaml for the nightly deployment and the event-driven ones)

The flow's result and a markdown artifact ``<model>-production-gate`` say which won and by how
much; the promotion itself is ``pd.promote`` (compare-and-swap on the alias: a retraining that
raced another one never overwrites its promotion).

Event-driven, the same steps are two deployments: ``retrain(data_uri=..., promote=False)``
when a new data set is materialized, then ``promote_run(run=...)`` when that training run's
``prefect-distrain.run.completed`` event arrives.
"""

from __future__ import annotations

import datetime
import os
import sys

import fsspec
from prefect import flow, task

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from digits import digits_loop  # noqa: E402
from pipeline import DEFAULT_STORAGE, data_asset, evaluate, prepare_digits  # noqa: E402

import prefect_distrain as pd  # noqa: E402


def previous_runs(storage: str, model: str) -> list[str]:
    """Earlier retraining runs of ``model`` in storage, oldest first (names sort by time)."""
    fs, root = fsspec.core.url_to_fs(storage)
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(f"{model}-"))


@flow(name="digits-retraining", log_prints=True)
def retrain(storage: str = DEFAULT_STORAGE, model: str = "digits", epochs: int = 3,
            num_workers: int = 2, hidden: int = 64, ray_address: str | None = None,
            lr: float = 0.02, margin: float = 0.0, alias: str = "production",
            data_uri: str | None = None, promote: bool = True) -> dict:
    """``data_uri``: train on this data set (the asset whose materialization triggered the
    run) instead of preparing one. ``promote=False``: train and score only; the promotion
    deployment gates the run when its completed event arrives."""
    train = pd.train
    if data_uri is None:
        data_uri = prepare_digits(storage, seed=datetime.date.today().toordinal() % 1000)
    else:  # the model asset is made from this data asset
        train = pd.train.with_options(asset_deps=[data_asset(data_uri)])
    champion = production(storage, model, alias)
    start_from = champion or latest_best(storage, model)
    if start_from is not None:
        print(f"warm start from {start_from.path.rstrip('/').rsplit('/', 2)[-2]} checkpoint "
              f"{start_from.index}" + (f" (the {alias} model)" if champion else ""))
    else:
        print("no earlier run: training from scratch")
    name = f"{model}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"
    result = train(digits_loop, config={"data_uri": data_uri, "epochs": epochs,
                                           "hidden": hidden, "lr": lr},
                      scaling=pd.ScalingConfig(num_workers=num_workers),
                      run=pd.RunConfig(name=name, storage=storage, total=epochs),
                      checkpoint=pd.CheckpointConfig(checkpoint_score_attribute="accuracy"),
                      resume_from_checkpoint=start_from, ray_address=ray_address)
    challenger = result.best_checkpoints[0][0]
    score = evaluate(challenger, data_uri, hidden)
    print(f"retrained run {name}: test accuracy {score:.3f}")
    if not promote:
        return {"run": name, "accuracy": score, "warm_started": start_from is not None,
                "promoted": False, "winner": None}
    decision = gate(challenger, score, champion, data_uri, hidden, storage=storage,
                    model=model, alias=alias, margin=margin)
    return {"run": name, "accuracy": score, "warm_started": start_from is not None, **decision}


@flow(name="digits-promotion", log_prints=True)
def promote_run(run: str, storage: str = DEFAULT_STORAGE, model: str = "digits",
                hidden: int = 64, margin: float = 0.0, alias: str = "production",
                data_uri: str | None = None) -> dict:
    """Gate a finished training run (named by its ``prefect-distrain.run.completed`` event)
    against the production model, on the newest data set's held-out split (or ``data_uri``)."""
    challenger = pd.best_checkpoint(pd.RunConfig(name=run, storage=storage), "accuracy",
                                    mode="max")
    if challenger is None:
        raise ValueError(f"run {run!r} in {storage} has no checkpoint with an accuracy to gate")
    data_uri = data_uri or newest_data(storage)
    score = evaluate(challenger, data_uri, hidden)
    champion = production(storage, model, alias)
    decision = gate(challenger, score, champion, data_uri, hidden, storage=storage,
                    model=model, alias=alias, margin=margin)
    return {"run": run, "accuracy": score, **decision}


def newest_data(storage: str) -> str:
    fs, root = fsspec.core.url_to_fs(f"{storage.rstrip('/')}/datasets")
    found = sorted(fs.ls(root, detail=True), key=lambda f: f.get("mtime") or f.get("created")
                   or 0) if fs.exists(root) else []
    if not found:
        raise ValueError(f"no data set in {storage}/datasets to evaluate on: pass data_uri")
    return fs.unstrip_protocol(found[-1]["name"])


def production(storage: str, model: str, alias: str) -> pd.Checkpoint | None:
    try:
        return pd.load_alias(model, alias, storage=storage)
    except pd.AliasNotFoundError:
        return None


def latest_best(storage: str, model: str) -> pd.Checkpoint | None:
    for earlier in reversed(previous_runs(storage, model)):
        best = pd.best_checkpoint(pd.RunConfig(name=earlier, storage=storage), "accuracy",
                                  mode="max")
        if best is not None:
            return best
    return None


@task
def gate(challenger: pd.Checkpoint, score: float, champion: pd.Checkpoint | None,
         data_uri: str, hidden: int, *, storage: str, model: str, alias: str,
         margin: float) -> dict:
    """Promote the challenger when it beats the champion on the same held-out data by more
    than ``margin`` (or when there is no champion); an artifact says which won and by how
    much."""
    from prefect.artifacts import create_markdown_artifact

    champion_score = evaluate.fn(champion, data_uri, hidden) if champion is not None else None
    delta = None if champion_score is None else score - champion_score
    promoted = champion_score is None or delta > margin
    if champion_score is None:
        why = f"no {alias} model yet: the challenger becomes it"
    elif promoted:
        why = f"the challenger is better by {delta:+.4f} (more than the margin {margin:g})"
    else:
        why = f"the challenger is not better by more than {margin:g} ({delta:+.4f}): " \
              f"{alias} stays on the champion"
    if promoted:
        pd.promote(challenger, model, alias, storage=storage, expected=champion,
                   reason=f"test accuracy {score:.4f}: {why}")
    winner = "challenger" if promoted else "champion"
    print(f"{winner} wins: {why}")
    create_markdown_artifact(
        key=f"{model}-{alias}-gate", description=f"Champion/challenger gate of {model}:{alias}",
        markdown="\n".join([
            f"# {model}:{alias}: the {winner} wins", "", why, "",
            "| | checkpoint | test accuracy |", "|---|---|---|",
            f"| challenger | `{challenger.path}` | {score:.4f} |",
            f"| champion | `{champion.path}` | {champion_score:.4f} |" if champion else
            "| champion | none | - |"]))
    return {"promoted": promoted, "winner": winner, "champion_accuracy": champion_score,
            "delta": delta, "why": why}


if __name__ == "__main__":
    retrain()
