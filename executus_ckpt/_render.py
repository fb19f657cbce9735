"""The JSON shapes the CLI prints, derived from the value types' fields.

Each document lists the fields of its dataclass in declaration order, so a field added to
:class:`CheckpointSummary`, :class:`RunCheckpoint`, :class:`RunCheckpointMeta` or
:class:`CheckpointStats` appears in ``--json`` output with no edit here. Values become JSON:
enum members their value, datetimes ISO 8601, sequences lists, mappings objects.

The shapes (README, "CLI"):

- ``summary_json``: ``run_id``, the listed meta fields flattened (``agent_id``,
  ``agent_name``), then every other :class:`CheckpointSummary` field.
- ``checkpoint_json``: ``run_id``, ``meta`` (every meta field but ``run_id``), then every
  other :class:`RunCheckpoint` field, with the transcript as ``message_count`` in its place
  and the last N ``messages`` at the end.
- ``show_json``: ``checkpoint_json`` with ``owner_executor`` after ``owner``: the
  ``executor_json`` of the owner when it is a registered executor, else null.
- ``stats_json``: every :class:`CheckpointStats` field.
- ``executor_json``: every :class:`ExecutorInfo` field (``executors``, one per line).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import fields
from datetime import datetime
from typing import Any

from .types import (
    CheckpointStats,
    CheckpointSummary,
    ExecutorInfo,
    RunCheckpoint,
    RunCheckpointMeta,
)

LISTED_META = ("agent_id", "agent_name")
"""The meta fields a listing shows (who ran it); ``show`` has them all."""


def json_value(value: Any) -> Any:
    """``value`` as a JSON-compatible value (enum → value, datetime → ISO 8601, ...)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [json_value(v) for v in value]
    raise TypeError(f"{type(value).__name__} is not rendered as JSON")


def meta_json(meta: RunCheckpointMeta) -> dict[str, Any]:
    """Every meta field but ``run_id``, in declaration order."""
    return {f.name: json_value(getattr(meta, f.name)) for f in fields(meta) if f.name != "run_id"}


def summary_json(summary: CheckpointSummary) -> dict[str, Any]:
    """The documented JSON shape of one listed run (``list --json``)."""
    doc: dict[str, Any] = {"run_id": summary.run_id}
    doc.update((name, json_value(getattr(summary.meta, name))) for name in LISTED_META)
    for f in fields(summary):
        if f.name != "meta":
            doc[f.name] = json_value(getattr(summary, f.name))
    return doc


def checkpoint_json(checkpoint: RunCheckpoint, last: int | None) -> dict[str, Any]:
    """The documented JSON shape of ``show``: the run with its ``last`` messages (None: none)."""
    messages = list(checkpoint.messages)
    doc: dict[str, Any] = {"run_id": checkpoint.run_id}
    for f in fields(checkpoint):
        if f.name == "meta":
            doc["meta"] = meta_json(checkpoint.meta)
        elif f.name == "messages":
            doc["message_count"] = len(messages)
        else:
            doc[f.name] = json_value(getattr(checkpoint, f.name))
    doc["messages"] = messages[-last:] if last else []  # already JSON values
    return doc


def show_json(
    checkpoint: RunCheckpoint, last: int | None, owner: ExecutorInfo | None
) -> dict[str, Any]:
    """The documented JSON shape of ``show``: :func:`checkpoint_json` with ``owner_executor``
    (the owning executor as :func:`executor_json`, or None) right after ``owner``."""
    doc: dict[str, Any] = {}
    for key, value in checkpoint_json(checkpoint, last).items():
        doc[key] = value
        if key == "owner":
            doc["owner_executor"] = None if owner is None else executor_json(owner)
    return doc


def executor_json(executor: ExecutorInfo) -> dict[str, Any]:
    """The documented JSON shape of one executor (``executors --json``)."""
    return {f.name: json_value(getattr(executor, f.name)) for f in fields(executor)}


def stats_json(stats: CheckpointStats) -> dict[str, Any]:
    """The documented JSON shape of ``stats``."""
    return {f.name: json_value(getattr(stats, f.name)) for f in fields(stats)}
