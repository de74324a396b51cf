"""Train on the Ray cluster of a flow that runs on prefect-ray's ``RayTaskRunner`` (extra
``[ray-runner]``).

```python
from prefect import flow, task
import prefect_distrain as pd

@flow(task_runner=pd.ray_task_runner())        # or ray_task_runner(RayCluster.load("prod"))
def pipeline():
    urls = preprocess.submit(...)               # a Ray task
    return pd.train.submit(loop, datasets=urls, scaling=pd.ScalingConfig(num_workers=2)).result()
```

``train``, called in the flow or submitted to the runner, uses the runner's Ray connection: its
workers are placed on the same cluster and no second cluster starts. ``ray_task_runner`` builds
a ``RayTaskRunner`` that adds to prefect-ray's:

- **The flow's Prefect API crosses into the Ray tasks.** prefect-ray sends the flow's settings
  context with each task; but on Prefect's ephemeral API (no ``PREFECT_API_URL``: ``python
  flow.py`` without a server) that context names no server, so every Ray worker process that
  ran a task started an ephemeral server of its own (5-8 s each, measured here; more processes
  on the same database). The runner passes the URL of the server the flow talks to
  (``PREFECT_API_URL``, or the address of the flow process's own ephemeral server) to every
  task: in the settings context and as the ``PREFECT_API_URL`` environment variable of the
  task's process (``runtime_env``), so every thread there, and ``train``'s logs, artifacts and
  events, reach the flow's API and the task's own run. Secrets (``PREFECT_API_KEY``,
  ``PREFECT_API_AUTH_STRING``) travel only inside the serialized settings context, as
  prefect-ray already sends them: never in the runtime_env, which Ray writes in clear to its
  ``runtime_env_agent.log`` and shows on its dashboard. A task's logs and events are sent
  before its result, so none is lost when a temporary cluster stops with the flow run.
- **``train`` holds no CPU of its own.** A Ray task holds one CPU by default; the ``train`` task
  only waits on its workers, so the runner submits it with ``num_cpus=0`` (``train_num_cpus``),
  and a group that fills the cluster still fits. On a plain ``RayTaskRunner``, ``train`` counts
  what its task holds and fails at once, naming this fix, when the group cannot fit beside it.
- **One cluster definition.** ``ray_task_runner(cluster)`` takes the ``RayCluster`` block (or
  its name) that ``pd.train(ray_cluster=...)`` takes: address, runtime_env and ``ray.init``
  options. Without an address it starts a new local Ray (``RAY_ADDRESS`` if set), never one
  that another program left running on this machine (plain ``RayTaskRunner()`` would connect
  to that).

Tasks and training functions from the user's own modules (a flow file that a deployment loads,
not ``__main__``) are sent by value, as ``pd.train`` sends its training function: the Ray
workers need not import them.
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from typing import Any
from urllib.parse import urlparse

import ray

try:
    from prefect_ray.context import RemoteOptionsContext, remote_options
    from prefect_ray.task_runners import RayTaskRunner
except ImportError as error:
    raise ImportError("pd.ray_task_runner needs prefect-ray: pip install "
                      f"'prefect-distrain[ray-runner]' ({error})") from error

from ..blocks import RayCluster
from ..exceptions import ConfigurationError
from ..execution.pickling import by_value, user_modules
from ..execution.ray_auth import ray_auth, reload_ray_auth, split_auth

logger = logging.getLogger("prefect_distrain")

__all__ = ["DistrainRayTaskRunner", "flow_api_url", "ray_task_runner"]


def flow_api_url(start: bool = True) -> str | None:
    """The URL of the Prefect API this process talks to: ``PREFECT_API_URL``, else the address
    of its ephemeral server (started here if ``start`` and Prefect's ephemeral mode is on, as
    the first Prefect client would); None if there is none."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    url = PREFECT_API_URL.value()
    if url:
        return url
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer._instances.get(None)  # the instance get_client() uses
    if server is not None and server.running:
        return server.api_url
    if start and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        server = SubprocessASGIServer()
        server.start()
        return server.api_url
    return None


def _send_logs_and_events(timeout: float = 5.0) -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        try:
            service.drain_all(timeout=timeout)
        except Exception:  # never fail a finished task over its logs
            logger.debug("Could not send the remaining %s items", service.__name__,
                         exc_info=True)


def _is_train(task: Any) -> bool:
    from .tasks import train

    return getattr(task, "fn", None) is train.fn


class DistrainRayTaskRunner(RayTaskRunner):
    """prefect-ray's ``RayTaskRunner``, made to share its cluster and Prefect API with
    ``pd.train``; build it with :func:`ray_task_runner`."""

    def __init__(self, address: str | None = None, init_kwargs: dict[str, Any] | None = None,
                 *, cluster_block: str | None = None, train_num_cpus: float = 0.0,
                 forward_api: bool = True):
        super().__init__(address=address, init_kwargs=init_kwargs)
        self.cluster_block = cluster_block
        self.train_num_cpus = train_num_cpus
        self.forward_api = forward_api
        self._api_url: str | None = None
        self._warned_unreachable = False

    def duplicate(self) -> DistrainRayTaskRunner:
        return type(self)(address=self.address, init_kwargs=self.init_kwargs,
                          cluster_block=self.cluster_block, train_num_cpus=self.train_num_cpus,
                          forward_api=self.forward_api)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, DistrainRayTaskRunner) and super().__eq__(other)
                and (self.cluster_block, self.train_num_cpus, self.forward_api)
                == (other.cluster_block, other.train_num_cpus, other.forward_api))

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by settings

    def __enter__(self) -> DistrainRayTaskRunner:
        if not ray.is_initialized():  # in a Ray task (prefect-ray enters a copy there) it is
            if self.cluster_block is not None:
                address, init_kwargs = RayCluster.load(self.cluster_block).ray_init_arguments()
                self.address = address
                self.init_kwargs = {"namespace": "prefect", **init_kwargs}
            self.address = self.address or os.environ.get("RAY_ADDRESS") or None
            if self.address is None and "address" not in self.init_kwargs:
                # "local": a new Ray, as pd.train starts one; a plain ray.init() would join
                # any cluster that `ray start` or another program left on this machine.
                self.init_kwargs = {**self.init_kwargs, "address": "local"}
        # A RayCluster block's token: in Ray's environment only while connecting (cluster.py).
        self.init_kwargs, auth = split_auth(self.init_kwargs)
        with ray_auth(auth):
            super().__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            super().__exit__(*exc_info)
        finally:
            if not ray.is_initialized():
                reload_ray_auth()  # the next Ray this process starts is not the cluster's

    # -- submitting -----------------------------------------------------------------------------

    def submit(self, task: Any, parameters: dict[str, Any], wait_for: Any = None,
               dependencies: Any = None) -> Any:
        current = RemoteOptionsContext.get().current_remote_options
        extra: dict[str, Any] = {}
        if _is_train(task) and "num_cpus" not in current:
            extra["num_cpus"] = self.train_num_cpus
        with ExitStack() as stack:
            url = self._flow_api_url() if self.forward_api else None
            if url:
                runtime_env = dict(current.get("runtime_env") or {})
                env_vars = dict(runtime_env.get("env_vars") or {})
                env_vars.setdefault("PREFECT_API_URL", url)
                extra["runtime_env"] = {**runtime_env, "env_vars": env_vars}
                from prefect.settings import PREFECT_API_URL, temporary_settings

                if PREFECT_API_URL.value() != url:  # the ephemeral server's: in the context too
                    stack.enter_context(temporary_settings(updates={PREFECT_API_URL: url}))
            if extra:
                stack.enter_context(remote_options(**extra))
            stack.enter_context(by_value(user_modules(
                [getattr(task, "fn", None), *parameters.values()])))
            return super().submit(task, parameters, wait_for, dependencies)

    @staticmethod
    def _run_prefect_task(*upstream_ray_obj_refs: Any, **kwargs: Any) -> Any:
        """In the Ray worker: prefect-ray's, then the task run's logs and events are sent
        before its result is, so they are in the API when the flow sees the task finish (and
        are not lost when a temporary cluster shuts down with the flow run)."""
        try:
            return RayTaskRunner._run_prefect_task(*upstream_ray_obj_refs, **kwargs)
        finally:
            _send_logs_and_events()

    def _flow_api_url(self) -> str | None:
        if self._api_url is None:
            self._api_url = flow_api_url()
            if self._api_url is not None:
                self._warn_if_unreachable(self._api_url)
        return self._api_url

    def _warn_if_unreachable(self, url: str) -> None:
        """A loopback URL (the ephemeral server) is out of reach of tasks on other nodes."""
        host = urlparse(url).hostname or ""
        if self._warned_unreachable or not (host == "localhost" or host.startswith("127.")):
            return
        here = ray.util.get_node_ip_address()
        elsewhere = [n["NodeManagerAddress"] for n in ray.nodes()
                     if n.get("Alive") and n.get("NodeManagerAddress") != here]
        if elsewhere:
            self._warned_unreachable = True
            logger.warning(
                "The flow's Prefect API is at %s, on this machine only, but the Ray cluster has "
                "nodes elsewhere (%s): tasks placed there cannot reach it. Run a Prefect server "
                "they can reach (`prefect server start --host 0.0.0.0`) and set PREFECT_API_URL "
                "to its address", url, ", ".join(sorted(set(elsewhere))[:3]))


def ray_task_runner(cluster: RayCluster | str | None = None, *, address: str | None = None,
                    init_kwargs: dict[str, Any] | None = None, train_num_cpus: float = 0.0,
                    forward_api: bool = True) -> DistrainRayTaskRunner:
    """A prefect-ray ``RayTaskRunner`` whose tasks and ``pd.train`` share one Ray cluster and
    the flow's Prefect API.

    ``cluster``: a ``RayCluster`` block, or its name (loaded when a flow run starts, from the
    flow's API), the same that ``pd.train(ray_cluster=...)`` takes; or ``address`` and
    ``init_kwargs`` as for ``RayTaskRunner``. Neither: a new local Ray for each flow run
    (``RAY_ADDRESS`` if set). ``train_num_cpus``: the CPUs that a submitted ``train`` task
    holds itself (0: it only waits on its workers). ``forward_api``: send the flow's Prefect
    API URL to the Ray tasks (so none starts an ephemeral server of its own).
    """
    block_name = None
    if cluster is not None:
        if address is not None or init_kwargs is not None:
            raise ConfigurationError("give either cluster=... or address/init_kwargs, not both")
        if isinstance(cluster, str):
            block_name = cluster
        elif isinstance(cluster, RayCluster):
            address, init_kwargs = cluster.ray_init_arguments()
        else:
            raise ConfigurationError(
                f"cluster must be a RayCluster block or its name, got {type(cluster).__name__}")
    return DistrainRayTaskRunner(address=address, init_kwargs=init_kwargs,
                                 cluster_block=block_name, train_num_cpus=train_num_cpus,
                                 forward_api=forward_api)
