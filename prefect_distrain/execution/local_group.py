"""Local mode (``ScalingConfig(num_workers=0)``): one rank, in the calling process, no Ray.

The same worker (``TrainWorker``, made in-process) behind the same driver: reports, callbacks,
checkpoints, the ledger and Prefect's artifacts work as in a group, so a training loop can be
stepped through with pdb or unit-tested in a second. What needs other processes does not run:
no backend set-up (world size 1 needs no process group), no Ray Data shards, and a hung
function can't be killed (its thread is the caller's).
"""

from __future__ import annotations

import os
import socket
import threading
from collections import deque
from typing import Any, Callable, Iterator

from ..session.context import WorkerInfo
from .worker import TrainWorker
from .worker_group import Member

_END = object()


class LocalStream:
    """The in-process worker's outbox batches, pumped off its generator by a thread."""

    def __init__(self, generator: Iterator, ready: threading.Condition):
        self.items: deque = deque()
        self.ready = ready
        threading.Thread(target=self._pump, args=(generator,), daemon=True,
                         name="local-worker-outbox").start()

    def _pump(self, generator: Iterator) -> None:
        try:
            for batch in generator:
                self._put(batch)
        finally:
            self._put(_END)

    def _put(self, item: Any) -> None:
        with self.ready:
            self.items.append(item)
            self.ready.notify_all()


class LocalGroup:
    """A group of one in-process worker, with ``WorkerGroup``'s interface."""

    local = True

    def __init__(self) -> None:
        self.size = 1
        self.members: list[Member] = []
        self._ready = threading.Condition()

    def __len__(self) -> int:
        return len(self.members)

    @property
    def started(self) -> bool:
        return bool(self.members)

    def start(self, timeout: float = 0.0) -> None:
        info = WorkerInfo(world_rank=0, world_size=1, local_rank=0, local_world_size=1,
                          node_rank=0, node_ip="127.0.0.1")
        metadata = {"node_id": None, "node_ip": "127.0.0.1", "hostname": socket.gethostname(),
                    "pid": os.getpid(), "gpu_ids": []}
        self.members = [Member(TrainWorker(in_process=True), info, metadata)]

    def share(self, blob: bytes) -> bytes:
        return blob

    def execute(self, fn: Callable, *args: Any, timeout: float | None = None) -> list[Any]:
        return [fn(*args) for _ in self.members]

    def execute_single(self, rank: int, fn: Callable, *args: Any,
                       timeout: float | None = None) -> Any:
        return fn(*args)

    def judge(self, iteration: int, stop_reason: str | None) -> None:
        for member in self.members:
            member.actor.judge(iteration, stop_reason)

    def stacks(self, timeout: float) -> list[str]:
        return [member.actor.stacks() for member in self.members]

    def request_stop(self, reason: str, at: int) -> None:
        for member in self.members:
            member.actor.request_stop(reason, at)

    def preempt(self, why: str) -> None:
        for member in self.members:
            member.actor.preempt(why)

    def acknowledge_commit(self, index: int, ranks: list[int]) -> None:
        for rank in ranks:
            self.members[rank].actor.acknowledge_commit(index)

    def plan_uploads(self, index: int, plan: dict[int, list[str]]) -> None:
        for rank, skip in plan.items():
            self.members[rank].actor.plan_upload(index, skip)

    def run(self, fn_blob: Any, pass_config: bool, config: Any,
            session_args: list[dict[str, Any]]) -> list[LocalStream]:
        return [LocalStream(m.actor.run(fn_blob, pass_config, config, args), self._ready)
                for m, args in zip(self.members, session_args)]

    def ready(self, streams: list[LocalStream], timeout: float) -> list[LocalStream]:
        with self._ready:
            self._ready.wait_for(lambda: any(s.items for s in streams), timeout)
            return [s for s in streams if s.items]

    @staticmethod
    def take(stream: LocalStream) -> list:
        with stream.ready:
            item = stream.items.popleft()
        if item is _END:
            raise StopIteration
        return item

    def shutdown(self) -> None:
        """Forget the worker. Its training thread, if still running, ends with its function
        (a thread of this process can't be killed)."""
        self.members = []
