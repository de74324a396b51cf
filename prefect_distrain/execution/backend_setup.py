"""The one caller of a backend's hooks. The trainer tells it what happens to the worker group
(started, about to train, shutting down, discarded); nothing else sees a backend."""

from __future__ import annotations

import logging

from .. import settings
from ..backends import BackendConfig
from .worker import freeze_heap
from .worker_group import WorkerGroup


class BackendSetup:
    """A backend config's hooks around the life of worker groups."""

    def __init__(self, config: BackendConfig, logger: logging.Logger | logging.LoggerAdapter):
        self.config = config
        self.backend = config.make_backend()
        self.logger = logger

    @property
    def name(self) -> str:
        return self.config.name

    def worker_env(self) -> dict[str, str]:
        """Environment variables the worker processes need from their start."""
        return self.backend.worker_env(self.config)

    def group_started(self, group: WorkerGroup) -> None:
        self.backend.on_start(group, self.config)
        if not group.local:  # local mode's rank is the caller's process: not ours to freeze
            group.execute(freeze_heap, timeout=settings.settings().backend_setup_timeout_s)

    def training_starts(self, group: WorkerGroup) -> None:
        if not group.local:  # local mode: one rank in the caller's process, nothing to set up
            self.backend.on_training_start(group, self.config)

    def is_runtime_failure(self, error: BaseException) -> bool:
        return self.backend.is_runtime_failure(error)

    def group_rests(self, group: WorkerGroup) -> None:
        """After a clean run, for a group kept warm for the next run (warm_pool.py): leave the
        framework's runtime (raises if that fails: the group then ends instead) and begin
        putting every worker back as it started (the taker waits for that, placement.py);
        the next run's ``group_started`` sets the backend up anew."""
        self.backend.on_shutdown(group, self.config)
        group.rest()

    def group_ends(self, group: WorkerGroup | None, graceful: bool) -> None:
        """Before the group's actors are killed: a graceful shutdown after a clean run (its
        failure is logged, the actors die anyway); in every case, free the driver's side."""
        try:
            if graceful and group is not None and group.started and not group.local:
                try:
                    self.backend.on_shutdown(group, self.config)
                except Exception as error:  # noqa: BLE001 - the actors die below anyway
                    self.logger.warning("Backend shutdown failed (%s); killing the workers",
                                        error)
        finally:
            if group is not None:
                group.shutdown()
            self.backend.on_discard(self.config)
