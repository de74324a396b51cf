"""Every timeout and interval, each a named default with an environment override.

Read when used (not at import), so a test or a deployment can change them with an environment
variable and no code.
"""

from __future__ import annotations

import os


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None


#: How long to wait, with backoff, for the cluster to hold the group when it could but is busy
#: or short of nodes now (at the start, and at each restart).
PLACEMENT_GROUP_TIMEOUT_ENV = "PREFECT_DISTRAIN_PLACEMENT_GROUP_TIMEOUT_S"
PLACEMENT_GROUP_TIMEOUT_S = 120.0

#: The longest pause between two looks at the cluster while waiting for resources; the pauses
#: start at 1 s and double.
BACKOFF_MAX_ENV = "PREFECT_DISTRAIN_BACKOFF_MAX_S"
BACKOFF_MAX_S = 16.0

#: How long the backend's set-up (e.g. joining the torch process group) may take on all workers.
BACKEND_SETUP_TIMEOUT_ENV = "PREFECT_DISTRAIN_BACKEND_SETUP_TIMEOUT_S"
BACKEND_SETUP_TIMEOUT_S = 120.0

#: How long a graceful shutdown hook may take before the workers are killed anyway.
SHUTDOWN_TIMEOUT_ENV = "PREFECT_DISTRAIN_SHUTDOWN_TIMEOUT_S"
SHUTDOWN_TIMEOUT_S = 10.0

#: After the first worker fails, how long to wait for the other ranks' outcomes before the group
#: is killed. Long enough to see that every rank hit the same bug, short enough not to stall.
ERROR_GATHER_TIMEOUT_ENV = "PREFECT_DISTRAIN_ERROR_GATHER_TIMEOUT_S"
ERROR_GATHER_TIMEOUT_S = 2.0

#: Skip the "can this cluster ever hold the group" check, for clusters with an autoscaler.
ALLOW_AUTOSCALING_ENV = "PREFECT_DISTRAIN_ALLOW_AUTOSCALING"


def placement_group_timeout() -> float:
    return env_float(PLACEMENT_GROUP_TIMEOUT_ENV, PLACEMENT_GROUP_TIMEOUT_S)


def backoff_max() -> float:
    return env_float(BACKOFF_MAX_ENV, BACKOFF_MAX_S)


def backend_setup_timeout() -> float:
    return env_float(BACKEND_SETUP_TIMEOUT_ENV, BACKEND_SETUP_TIMEOUT_S)


def shutdown_timeout() -> float:
    return env_float(SHUTDOWN_TIMEOUT_ENV, SHUTDOWN_TIMEOUT_S)


def error_gather_timeout() -> float:
    return env_float(ERROR_GATHER_TIMEOUT_ENV, ERROR_GATHER_TIMEOUT_S)


def autoscaling_allowed() -> bool:
    return os.environ.get(ALLOW_AUTOSCALING_ENV, "").lower() in ("1", "true", "yes")
