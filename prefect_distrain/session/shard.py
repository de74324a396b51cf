"""The training dataset's shard on a worker: the rows each pass consumed, for the data position
every report carries; the pass a resume stopped in going on where it stopped; and in
``CheckpointConfig(mode="auto")`` the passes that begin automatic checkpoints.

Passes are numbered from the resumed position's (a loop resuming from its own checkpoint's
epoch makes its first pass the one that checkpoint stopped in), in mode "auto" from 0 (the
replayed passes count). A pass the loop left early (``break``) counts as not done. A pass with
a local shuffle (``local_shuffle_buffer_size``) or batches whose rows can't be counted has no
position: a resume starts it from its beginning.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..integrations.data import TrainingData

#: The DataIterator methods that make a pass over the shard.
PASSES = ("iter_batches", "iter_torch_batches", "iter_tf_batches", "iter_rows")


class TrainingShard:
    """Wraps a rank's ``DataIterator`` of the training dataset (other methods pass through).
    Like Ray's, each ``iter_*`` returns an iterable whose every iteration is a pass."""

    def __init__(self, data: TrainingData, session: Any):
        self._data = data
        self._auto = session.auto if session.auto.claim_training_loader() else None
        if self._auto is not None:
            session.data_loader = self  # its position goes with every report
        #: The next pass's number, and the current one's position (before the first pass:
        #: the resumed one's, still to go on from).
        self._next = 0 if session.auto.enabled else data.epoch
        self._epoch, self._rows, self._base = data.epoch, data.skip, data.base
        self._tracked = True
        self._batches = 0
        self._continue = bool(data.skip or data.continued is not None)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in PASSES:
            return lambda *args, **kwargs: _Passes(self, name, args, kwargs)
        return getattr(self._data.iterator, name)

    def position(self) -> dict[str, Any] | None:
        """``{"at": {"epoch", "rows", "world_size"}, "base": chain}`` (session/positions.py),
        or None in a pass whose rows can't be counted."""
        if not self._tracked:
            return None
        return {"at": {"epoch": self._epoch, "rows": self._rows,
                       "world_size": self._data.world_size}, "base": self._base}

    def _pass(self, method: str, args: tuple, kwargs: dict[str, Any]) -> Iterator[Any]:
        replay = self._auto is not None and self._auto.begin_pass()
        epoch, self._next = self._next, self._next + 1
        data = self._data
        goes_on = not replay and self._continue and epoch == data.epoch
        if goes_on:
            self._continue = False
        if self._auto is not None and not replay:
            self._auto.went_on(goes_on, "the training dataset's shard")
        source = data.continued if goes_on and data.continued is not None else data.iterator
        self._epoch, self._batches = epoch, 0
        self._rows, self._base = (data.skip, data.base) if goes_on else (0, None)
        # A local shuffle consumes rows out of their order: no position to go on from.
        self._tracked = not kwargs.get("local_shuffle_buffer_size")
        batches = getattr(source, method)(*args, **kwargs)
        return self._count(batches, data.skip if goes_on else 0, replay, method == "iter_rows")

    def _count(self, batches: Any, skip: int, replay: bool, rows: bool) -> Iterator[Any]:
        from . import current_session

        session = current_session()  # each batch is progress, for the hang detection
        for batch in batches:
            n = 1 if rows else _rows(batch)
            if n is None:  # rows that can't be counted can't be skipped either
                self._tracked, n, skip = False, 0, 0
            if session is not None:
                session.step()
            self._batches += 1
            if skip:  # consumed before the restart
                if n <= skip:
                    skip -= n
                    continue
                batch, n, skip = _tail(batch, skip), n - skip, 0
            self._rows += n
            yield batch
            if replay:  # a pass done before the restart (mode "auto"): one batch, undone later
                return
            if self._auto is not None and self._tracked:
                self._auto.after_batch(self._batches)
        self._epoch, self._rows, self._base = self._epoch + 1, 0, None  # the pass is done


class _Passes:
    """What ``iter_*`` returns: each iteration over it is a pass (as with Ray's)."""

    def __init__(self, shard: TrainingShard, method: str, args: tuple, kwargs: dict[str, Any]):
        self._shard, self._method, self._args, self._kwargs = shard, method, args, kwargs

    def __iter__(self) -> Iterator[Any]:
        return self._shard._pass(self._method, self._args, self._kwargs)


def _rows(batch: Any) -> int | None:
    """The rows in a batch of Ray Data's formats (a dict of columns, a table, a DataFrame) or
    a collated tuple of them; None when it can't be told."""
    if isinstance(batch, dict):
        return len(next(iter(batch.values()))) if batch else 0
    if isinstance(batch, (tuple, list)):
        return _rows(batch[0]) if batch else None
    if hasattr(batch, "num_rows"):
        return int(batch.num_rows)
    try:
        return len(batch)
    except TypeError:
        return None


def _tail(batch: Any, start: int) -> Any:
    """The rows of a batch from ``start`` on."""
    if isinstance(batch, dict):
        return {k: v[start:] for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_tail(part, start) for part in batch)
    if hasattr(batch, "iloc"):
        return batch.iloc[start:]
    if hasattr(batch, "slice"):
        return batch.slice(start)
    return batch[start:]
