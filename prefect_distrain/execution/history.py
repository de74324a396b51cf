"""What a run reported, across the restarts of one ``fit``: every complete iteration, one dict
per rank. A restart from checkpoint N forgets the iterations after N (they are redone)."""

from __future__ import annotations

from typing import Any


class RunHistory:
    """Every complete iteration of the run, in order: one list of metrics (rank order) each."""

    def __init__(self) -> None:
        self.all_ranks: list[list[dict[str, Any]]] = []

    def add(self, results: list[dict[str, Any]]) -> None:
        self.all_ranks.append(results)

    def forget_after(self, index: int) -> None:
        """A restart from checkpoint ``index``: the iterations after it are done again."""
        self.all_ranks = [r for r in self.all_ranks if r[0]["_training_iteration"] <= index]

    @property
    def rank0(self) -> list[dict[str, Any]]:
        """Rank 0's metrics of every iteration."""
        return [results[0] for results in self.all_ranks]

    @property
    def last_reported(self) -> int | None:
        return self.all_ranks[-1][0]["_training_iteration"] if self.all_ranks else None
