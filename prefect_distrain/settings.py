"""Timeouts, intervals and defaults: ``PREFECT_DISTRAIN_*`` settings (environment variables).

Read when used (not at import), so a test or a deployment can change them with an environment
variable and no code. A bad value fails with pydantic's message naming the variable.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PREFIX = "PREFECT_DISTRAIN_"


class DistrainSettings(BaseSettings):
    """Every knob, with why its default has its value."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore")

    storage: str | None = Field(
        default=None, description="Storage when RunConfig(storage=...) is not given; unset: "
                                  "~/prefect_distrain_results, like Ray's ~/ray_results.")
    placement_group_timeout_s: float = Field(
        default=120.0, gt=0, description="How long to wait, with backoff, for the cluster to "
        "hold the group when it could but is busy or short of nodes now (start and restarts).")
    backoff_max_s: float = Field(
        default=16.0, gt=0, description="The longest pause between two looks at the cluster; "
                                        "the pauses start at 1 s and double.")
    backend_setup_timeout_s: float = Field(
        default=120.0, gt=0, description="Workers starting and the backend's set-up (e.g. "
                                         "joining the torch process group) on all of them.")
    shutdown_timeout_s: float = Field(
        default=10.0, gt=0, description="A graceful backend shutdown before the workers are "
                                        "killed anyway.")
    stop_grace_s: float = Field(
        default=30.0, ge=0, description="After a callback stops the run, how long the workers "
        "have to reach their next report(); a rank still running then (e.g. waiting in a "
        "collective for a rank that already stopped) is ended. Committed checkpoints are kept.")
    error_gather_timeout_s: float = Field(
        default=2.0, ge=0, description="After the first worker fails, how long to wait for the "
        "other ranks' outcomes: long enough to see that every rank hit the same bug, short "
        "enough not to stall. Once a worker is lost, 0.5 s at most: a lost worker decides the "
        "failure, and its peers wait for it.")
    lease_timeout_s: float = Field(
        default=60.0, gt=0, description="A run's writer renews its lease every quarter of this; "
        "a lease not renewed for this long is taken over by the next writer of the run name "
        "(sooner when its process is known to be gone). Long enough for a busy driver.")
    link_expiry_s: float = Field(
        default=0.0, ge=0, description="Links in Prefect's artifacts to checkpoints in object "
        "storage: 0 shows the path as text; more makes a presigned HTTPS link (S3, GCS) valid "
        "this long, which anyone holding it can download with until then.")
    warm_pool_idle_s: float = Field(
        default=30.0, ge=0, description="How long a worker group left by a finished train stays "
        "warm for the next train (or sweep trial) of the same flow run with the same backend and "
        "scaling, which then starts in a fraction of a second; 0 keeps none. It holds its "
        "workers' resources meanwhile, and ends at once when a run of this process needs them.")
    upload_memory_mb: int = Field(
        default=128, ge=5, description="About how much of a checkpoint's files a rank holds in "
        "memory while it uploads them to an object store that takes them in parts (S3): 16 MiB "
        "parts, 4 of a file at once. More is not faster on a fast link; less holds less.")
    allow_autoscaling: bool = Field(
        default=False, description="Skip the 'can this cluster ever hold the group' check, "
                                   "for clusters with an autoscaler.")


def settings() -> DistrainSettings:
    return DistrainSettings()


PLACEMENT_GROUP_TIMEOUT_ENV = f"{PREFIX}PLACEMENT_GROUP_TIMEOUT_S"
ALLOW_AUTOSCALING_ENV = f"{PREFIX}ALLOW_AUTOSCALING"
WARM_POOL_IDLE_ENV = f"{PREFIX}WARM_POOL_IDLE_S"
