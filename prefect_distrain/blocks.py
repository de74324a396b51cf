"""Prefect blocks: the Ray cluster to train on, and where checkpoints go (secrets encrypted).

Registered through the ``prefect.collections`` entry point (``prefect block register -m
prefect_distrain.blocks`` also works).
"""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

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
    """The Ray cluster that training runs on: its address, runtime environment and the other
    options of ``ray.init``. One definition for ``pd.train(ray_cluster=...)`` and for the
    flow's task runner.

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
    runtime_env: dict[str, Any] = Field(
        default_factory=dict, description="Ray runtime environment of the job (pip, env_vars, "
                                          "working_dir...).")
    init_options: dict[str, Any] = Field(
        default_factory=dict, description="Other keyword arguments for ray.init.")

    def ray_init_arguments(self) -> tuple[str | None, dict[str, Any]]:
        """(address, ray.init keyword arguments)."""
        options = dict(self.init_options)
        if self.runtime_env:
            options["runtime_env"] = self.runtime_env
        return self.address, options
