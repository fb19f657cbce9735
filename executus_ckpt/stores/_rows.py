"""Rows ↔ values, derived once from the Core tables and the dataclasses.

A header column is named like the dataclass field it stores: ``RunCheckpointMeta``'s fields
(but ``run_id``, the key) are the identity columns, ``CheckpointSummary``'s fields (but
``meta``) the rest. Column lists, the row ↔ dataclass conversion, the upsert's replaced
columns and PostgreSQL's parameter types all follow from that, so adding a column means the
schema, the dataclass and a migration, nothing here.

Encodings by field type: an enum is stored as its value, a ``LargeBinary`` column holds the
field as compact JSON (``completed_phases``), datetimes are aware UTC.
"""

from __future__ import annotations

import enum
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from typing import Any, Final, cast

from sqlalchemy import Column, LargeBinary
from sqlalchemy.dialects import postgresql

from .. import codec
from ..schema import UTCDateTime, run_checkpoints
from ..types import CheckpointSummary, RunCheckpoint, RunCheckpointMeta, utcnow

header = run_checkpoints

META_FIELDS: Final = tuple(f.name for f in fields(RunCheckpointMeta) if f.name != "run_id")
"""Identity columns, in the dataclass's order."""

SUMMARY_FIELDS: Final = tuple(f.name for f in fields(CheckpointSummary) if f.name != "meta")
"""Progress and bookkeeping columns, in the dataclass's order."""

COMPUTED: Final = frozenset({"message_count", "size_bytes"})
"""Columns the store derives from the transcript (not fields of :class:`RunCheckpoint`)."""

KEPT_ON_SAVE: Final = frozenset({"created_at", "attempts", "status", "last_error"})
"""Bookkeeping a ``save`` of an existing run leaves as stored (recovery owns it)."""

COLUMNS: Final = ("run_id", *META_FIELDS, *SUMMARY_FIELDS)
SELECT: Final = tuple(header.c[name] for name in COLUMNS)
"""Every header column: what a summary is read from."""

SAVED: Final = tuple(n for n in (*META_FIELDS, *SUMMARY_FIELDS) if n not in KEPT_ON_SAVE)
"""Columns a ``save`` writes on an existing run (``message_count``/``size_bytes`` included)."""

TAKEN_OVER: Final = (*META_FIELDS, "app_version", "owner")
"""Columns a take-over (``register`` of an existing run) refreshes; progress is kept."""

APPENDED: Final = tuple(n for n in SAVED if n != "size_bytes")
"""Columns an append sets (``size_bytes`` is incremented instead)."""

_missing = set(header.c.keys()) ^ set(COLUMNS)
if _missing:  # pragma: no cover - caught by every test run
    raise RuntimeError(f"run_checkpoints columns and dataclass fields differ: {sorted(_missing)}")

_HINTS = typing.get_type_hints(CheckpointSummary)


def as_utc(value: datetime) -> datetime:
    """Normalize a datetime to aware UTC (naive values are taken as UTC)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _is_json(column: Column[Any]) -> bool:
    return isinstance(column.type, LargeBinary)


def _decoder(name: str) -> Callable[[Any], Any]:
    hint = _HINTS.get(name)
    if _is_json(header.c[name]):
        return codec.decode
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return cast(Callable[[Any], Any], hint)
    return lambda value: value


def _encoder(name: str) -> Callable[[Any], Any]:
    if _is_json(header.c[name]):
        return lambda value: codec.encode(list(value) if isinstance(value, tuple) else value)
    hint = _HINTS.get(name)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return str
    if isinstance(header.c[name].type, UTCDateTime):
        return as_utc
    return lambda value: value


_DECODE: Final = {name: _decoder(name) for name in SUMMARY_FIELDS}
_ENCODE: Final = {name: _encoder(name) for name in SUMMARY_FIELDS if name not in COMPUTED}

PG_TYPES: Final = {
    name: header.c[name].type.compile(dialect=postgresql.dialect())  # type: ignore[no-untyped-call]
    for name in COLUMNS
}
"""PostgreSQL type of each header column, for the casts of array parameters."""


def meta_of(row: Mapping[str, Any]) -> RunCheckpointMeta:
    return RunCheckpointMeta(run_id=row["run_id"], **{n: row[n] for n in META_FIELDS})


def summary_of(row: Any) -> CheckpointSummary:
    """A summary from a header row (a SQLAlchemy ``Row`` or a mapping)."""
    mapping: Mapping[str, Any] = row if isinstance(row, Mapping) else row._mapping
    return CheckpointSummary(
        meta=meta_of(mapping), **{n: _DECODE[n](mapping[n]) for n in SUMMARY_FIELDS}
    )


def checkpoint_of(row: Any, messages: Sequence[bytes]) -> RunCheckpoint:
    return summary_of(row).with_messages(codec.decode_messages(messages))


def values_of(
    checkpoint: RunCheckpoint, *, completed_phases: bytes | None = None
) -> dict[str, Any]:
    """Every header column of ``checkpoint`` but the computed ones, encoded for Core.

    ``completed_phases`` passes the phases' encoding when the caller already has it.
    """
    values: dict[str, Any] = {"run_id": checkpoint.meta.run_id}
    for name in META_FIELDS:
        values[name] = getattr(checkpoint.meta, name)
    for name, encode in _ENCODE.items():
        values[name] = encode(getattr(checkpoint, name))
    if completed_phases is not None:
        values["completed_phases"] = completed_phases
    return values


def cutoff(older_than: float | None) -> datetime | None:
    """The ``updated_at`` bound for an ``older_than`` filter in seconds."""
    if older_than is None:
        return None
    return utcnow() - timedelta(seconds=older_than)


def appended_tail(
    messages: Sequence[object], base: int, encoded_tail: Sequence[bytes] | None, run_id: str
) -> list[bytes]:
    """Encodings of ``messages[base:]``: those the caller made (the checkpointer encoded them
    when it validated them), else made here."""
    if encoded_tail is not None and len(encoded_tail) == len(messages) - base:
        return list(encoded_tail)
    return codec.encode_messages(messages[base:], run_id)


def valid_base(base_count: int, messages: Sequence[object]) -> int | None:
    """``base_count`` if it can describe a prefix of ``messages``, else None (full write)."""
    if isinstance(base_count, bool) or not isinstance(base_count, int):
        return None
    return base_count if 0 <= base_count <= len(messages) else None
