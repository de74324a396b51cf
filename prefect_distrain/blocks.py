"""Prefect blocks: the Ray cluster to train on, and where checkpoints go (secrets encrypted).

Registered through the ``prefect.collections`` entry point (``prefect block register -m
prefect_distrain.blocks`` also works).
"""

from __future__ import annotations

from typing import Any, Literal

from prefect.blocks.core import Block
from pydantic import Field, SecretStr, model_validator

_DOCS = "https://github.com/prefect-distrain/prefect-distrain#readme"


class CheckpointStorage(Block):
    """Where prefect-distrain commits checkpoints: an fsspec URL and its options, the secret ones
    stored encrypted and never shown.

    Example:
        ```python
        from prefect_distrain.blocks import CheckpointStorage
        storage = CheckpointStorage.load("BLOCK_NAME")
        pd.train(loop, run=pd.RunConfig(name="digits", storage=storage))
        ```
    """

    _block_type_name = "Distrain Checkpoint Storage"
    _documentation_url = _DOCS

    url: str = Field(description="A local path or fsspec URL, e.g. s3://bucket/runs.")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="fsspec storage options that are not secret.")
    secret_options: dict[str, SecretStr] = Field(
        default_factory=dict, description="fsspec storage options that are secret, e.g. key and "
                                          "secret.")

    def fsspec_storage(self) -> tuple[str, dict[str, Any]]:
        """The URL and the full storage options, secrets revealed (for fsspec only)."""
        revealed = {k: v.get_secret_value() for k, v in self.secret_options.items()}
        return self.url, {**self.options, **revealed}


class RayCluster(Block):
    """The Ray cluster that training runs on: its address, its auth token (stored encrypted,
    never shown), runtime environment and the other options of ``ray.init``. One definition
    for ``pd.train(ray_cluster=...)`` and for the flow's task runner.

    A cluster started with ``ray start --head`` (Ray >= 2.52) or KubeRay's ``authOptions``
    has token authentication on: set ``auth_token`` to its token (on the head:
    ``~/.ray/auth_token`` of the user who ran ``ray start --head``, printed by
    ``ray get-auth-token``). ``train`` hands it to Ray only while it connects (as
    ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN``), then restores the environment; it never
    reaches a log, an artifact or an error message.

    Example:
        ```python
        from prefect_distrain.blocks import RayCluster
        cluster = RayCluster.load("BLOCK_NAME")
        pd.train(loop, ray_cluster=cluster)
        ```
    """

    _block_type_name = "Distrain Ray Cluster"
    _documentation_url = _DOCS

    address: str | None = Field(
        default=None, description="Ray address (ray://host:10001, host:6379 or auto); empty "
                                  "starts a local Ray.")
    auth_token: SecretStr | None = Field(
        default=None, description="The cluster's token when it has token authentication on "
                                  "(Ray's RAY_AUTH_TOKEN; on the head: ~/.ray/auth_token, or "
                                  "`ray get-auth-token`). Empty: RAY_AUTH_TOKEN, "
                                  "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token of the machine "
                                  "that runs the flow, as Ray finds them.")
    auth_mode: Literal["token", "disabled"] | None = Field(
        default=None, description="Ray's RAY_AUTH_MODE for the connection. Empty: 'token' "
                                  "when auth_token is set, else this machine's RAY_AUTH_MODE.")
    runtime_env: dict[str, Any] = Field(
        default_factory=dict, description="Ray runtime environment of the job (pip, env_vars, "
                                          "working_dir...). Not for secrets: Ray logs it.")
    init_options: dict[str, Any] = Field(
        default_factory=dict, description="Other keyword arguments for ray.init.")

    @model_validator(mode="after")
    def _token_needs_token_mode(self) -> RayCluster:
        if self.auth_token is not None and self.auth_mode == "disabled":
            raise ValueError("auth_token is set but auth_mode is 'disabled': Ray would not send "
                             "it. Leave auth_mode empty (or 'token'), or clear auth_token")
        return self

    def ray_init_arguments(self) -> tuple[str | None, dict[str, Any]]:
        """(address, ray.init keyword arguments). With ``auth_token`` / ``auth_mode`` set, the
        arguments also hold them (a ``RayAuth`` under ``ray_auth.AUTH_KEY``, the token still a
        ``SecretStr``): ``ray_connection`` takes them out and applies them around
        ``ray.init``; code that calls ``ray.init`` itself must do the same
        (``cluster.split_auth`` and ``cluster.ray_auth``)."""
        options = dict(self.init_options)
        if self.runtime_env:
            options["runtime_env"] = self.runtime_env
        if self.auth_token is not None or self.auth_mode is not None:
            from .execution.ray_auth import AUTH_KEY, RayAuth

            options[AUTH_KEY] = RayAuth(mode=self.auth_mode, token=self.auth_token)
        return self.address, options
