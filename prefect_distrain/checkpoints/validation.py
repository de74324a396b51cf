"""A checkpoint's validation record: ``_validations/<folder>.json`` beside its manifest.

The manifest is written once and never changes; what a validation learns later (its status,
its metrics, its error) goes into this record, replaced atomically by the run's writer as the
validation moves on. Like a manifest it is read from storage others can write to: a record that
is not one is skipped with the reason; one without a manifest, or made for another commit of
the same folder (its ``committed_at`` is the manifest's), means nothing.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from typing import Any

COMMITTED = "committed"
VALIDATING = "validating"
VALIDATED = "validated"
FAILED = "validation failed"
STATUSES = (COMMITTED, VALIDATING, VALIDATED, FAILED)


class ValidationRecordError(ValueError):
    """A file in ``_validations`` that is not a validation record."""


@dataclass(frozen=True)
class ValidationRecord:
    """Where one checkpoint's validation stands: ``status`` (validating, validated or
    validation failed), the metrics it returned, or its error."""

    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    attempt: int = 0
    updated_at: str = ""
    #: The ``committed_at`` of the manifest it belongs to.
    committed_at: str = ""

    def belongs_to(self, manifest: Any) -> bool:
        return self.committed_at == manifest.committed_at

    @classmethod
    def now(cls, status: str, metrics: dict[str, Any] | None = None, error: str | None = None,
            attempt: int = 0) -> ValidationRecord:
        return cls(status, dict(metrics or {}), error, attempt,
                   datetime.datetime.now(datetime.timezone.utc).isoformat())

    def to_record(self) -> dict[str, Any]:
        return {"status": self.status, "metrics": self.metrics, "error": self.error,
                "attempt": self.attempt, "updated_at": self.updated_at,
                "committed_at": self.committed_at}

    @classmethod
    def from_json(cls, data: bytes, name: str) -> ValidationRecord:
        try:
            record = json.loads(data)
        except (ValueError, UnicodeDecodeError) as error:
            raise ValidationRecordError(f"validation record {name}: not valid JSON ({error})") \
                from None
        if not isinstance(record, dict) or record.get("status") not in STATUSES[1:]:
            raise ValidationRecordError(
                f"validation record {name}: its status is not one of {STATUSES[1:]}")
        metrics, error = record.get("metrics", {}), record.get("error")
        if not isinstance(metrics, dict) or not all(
                isinstance(k, str) and not k.startswith("_")
                and (v is None or isinstance(v, (bool, int, float, str)))
                for k, v in metrics.items()):
            raise ValidationRecordError(
                f"validation record {name}: 'metrics' is not a mapping of names (not starting "
                "with '_') to numbers, strings, booleans or None")
        attempt = record.get("attempt", 0)
        return cls(record["status"], metrics, None if error is None else str(error),
                   attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else 0,
                   str(record.get("updated_at", "")), str(record.get("committed_at", "")))
