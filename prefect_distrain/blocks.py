"""Prefect blocks: where checkpoints go, with the credentials kept as secrets.

```python
from prefect_distrain.blocks import CheckpointStorage
CheckpointStorage(url="s3://models/runs", options={"client_kwargs": {"region_name": "eu-west-1"}},
                  secret_options={"key": "...", "secret": "..."}).save("models")
pd.train(loop, run=pd.RunConfig(storage=CheckpointStorage.load("models")))
```
"""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class CheckpointStorage(Block):
    """An fsspec URL and its options; the secret ones are stored encrypted and never shown."""

    _block_type_name = "Distrain Checkpoint Storage"
    _description = "Where prefect-distrain commits checkpoints: an fsspec URL and its options."

    url: str = Field(description="A local path or fsspec URL, e.g. s3://bucket/runs")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="fsspec storage options that are not secret")
    secret_options: dict[str, SecretStr] = Field(
        default_factory=dict, description="Options that are secret, e.g. key and secret")

    def fsspec_storage(self) -> tuple[str, dict[str, Any]]:
        """The URL and the full storage options, secrets revealed (for fsspec only)."""
        revealed = {k: v.get_secret_value() for k, v in self.secret_options.items()}
        return self.url, {**self.options, **revealed}
