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
from dataclasses import MISSING, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Final, cast

from sqlalchemy import Column, LargeBinary, and_, case, func, literal
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

BOUNDARY: Final = ("boundary_message_count", "boundary_iteration", "boundary_extra")
"""The state at the last phase boundary: derived by the store at each save (a save whose
completed phases gained a phase over the stored ones is a boundary). ``progress_at`` is the time of
that save (or of a release): a run that reached no new boundary since its last recovery
claim made no progress."""

DERIVED: Final = frozenset({*COMPUTED, *BOUNDARY, "progress_at"})
"""Columns a save derives rather than copies from the checkpoint."""

KEPT_ON_SAVE: Final = frozenset({"created_at", "attempts", "status", "last_error", "claimed_at"})
"""Bookkeeping a ``save`` of an existing run leaves as stored (recovery owns it)."""

COLUMNS: Final = ("run_id", *META_FIELDS, *SUMMARY_FIELDS)
SELECT: Final = tuple(header.c[name] for name in COLUMNS)
"""Every header column: what a summary is read from."""

COPIED: Final = tuple(
    n for n in (*META_FIELDS, *SUMMARY_FIELDS) if n not in KEPT_ON_SAVE and n not in DERIVED
)
"""Columns a ``save`` copies from the checkpoint onto an existing run."""

SAVED: Final = (*COPIED, *COMPUTED)
"""Columns a ``save`` sets to a value (the boundary columns and ``progress_at`` are set by
an expression: they move only when the completed phases change)."""

TAKEN_OVER: Final = (*META_FIELDS, "app_version", "owner")
"""Columns a take-over (``register`` of an existing run) refreshes; progress is kept."""

APPENDED: Final = tuple(n for n in SAVED if n != "size_bytes")
"""Columns an append sets (``size_bytes`` is incremented instead)."""

APPENDED_PROGRESS: Final = tuple(n for n in APPENDED if n not in META_FIELDS)
"""Columns an append sets when the run's identity columns are stored already."""


def appended(identity: bool) -> tuple[str, ...]:
    """The columns an append sets, with the identity columns or without."""
    return APPENDED if identity else APPENDED_PROGRESS


_missing = set(header.c.keys()) ^ set(COLUMNS)
if _missing:  # pragma: no cover - caught by every test run
    raise RuntimeError(f"run_checkpoints columns and dataclass fields differ: {sorted(_missing)}")

_HINTS = {
    **typing.get_type_hints(RunCheckpointMeta),
    **typing.get_type_hints(CheckpointSummary),
}
_DEFAULTS = {
    f.name: f.default_factory
    for f in (*fields(RunCheckpointMeta), *fields(CheckpointSummary))
    if f.default_factory is not MISSING
}


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
        default = _DEFAULTS.get(name)
        if default is not None:  # NULL (a row written before the column existed): the default
            return lambda value: default() if value is None else codec.decode(value)
        return lambda value: None if value is None else codec.decode(value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return cast(Callable[[Any], Any], hint)
    return lambda value: value


def _encoder(name: str) -> Callable[[Any], Any]:
    if _is_json(header.c[name]):
        return lambda value: (
            None
            if value is None
            else codec.encode(list(value) if isinstance(value, tuple) else value)
        )
    hint = _HINTS.get(name)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return str
    if isinstance(header.c[name].type, UTCDateTime):
        return lambda value: None if value is None else as_utc(value)
    return _as_is


def _as_is(value: Any) -> Any:
    return value


_DECODE: Final = {name: _decoder(name) for name in (*META_FIELDS, *SUMMARY_FIELDS)}
_ENCODE: Final = {
    name: _encoder(name) for name in (*META_FIELDS, *SUMMARY_FIELDS) if name not in DERIVED
}

_META_NAMES: Final = frozenset(META_FIELDS)

_STATE_ENCODE: Final = tuple(
    (name, None if encode is _as_is else encode)
    for name, encode in _ENCODE.items()
    if name not in _META_NAMES
)
"""The non-identity columns of ``values_of`` and their encoders (None: stored as is)."""

PG_TYPES: Final = {
    name: header.c[name].type.compile(dialect=postgresql.dialect())  # type: ignore[no-untyped-call]
    for name in COLUMNS
}
"""PostgreSQL type of each header column, for the casts of array parameters."""


def meta_of(row: Mapping[str, Any]) -> RunCheckpointMeta:
    return RunCheckpointMeta(run_id=row["run_id"], **{n: _DECODE[n](row[n]) for n in META_FIELDS})


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
    """Every header column of ``checkpoint`` but the derived ones, encoded for Core.

    ``completed_phases`` passes the phases' encoding when the caller already has it.
    """
    values: dict[str, Any] = {"run_id": checkpoint.meta.run_id}
    values.update(_meta_values(checkpoint.meta))
    _encode_state(values, checkpoint, _STATE_ENCODE, completed_phases)
    return values


_APPENDED_ENCODE: Final = tuple(
    (name, encode) for name, encode in _STATE_ENCODE if name in APPENDED_PROGRESS
)
"""The progress columns an append copies from the checkpoint, and their encoders."""


def appended_values(
    checkpoint: RunCheckpoint, completed_phases: bytes, message_count: int, identity: bool
) -> dict[str, Any]:
    """The values of the columns an append sets (:func:`appended`), encoded for the driver:
    :func:`values_of` narrowed to them, a save's hot path (``completed_phases``: the phases'
    encoding, which the caller has from validating them)."""
    values: dict[str, Any] = dict(_meta_values(checkpoint.meta)) if identity else {}
    _encode_state(values, checkpoint, _APPENDED_ENCODE, completed_phases)
    values["message_count"] = message_count
    return values


def _encode_state(
    values: dict[str, Any],
    checkpoint: RunCheckpoint,
    columns: tuple[tuple[str, Callable[[Any], Any] | None], ...],
    completed_phases: bytes | None,
) -> None:
    """Add ``columns`` of ``checkpoint`` to ``values``, encoded (``completed_phases``: the
    phases' encoding if the caller has it)."""
    for name, encode in columns:
        if name == "completed_phases" and completed_phases is not None:
            values[name] = completed_phases
        elif encode is None:
            values[name] = getattr(checkpoint, name)
        else:
            values[name] = encode(getattr(checkpoint, name))


_META_MEMO: dict[int, tuple[RunCheckpointMeta, dict[str, Any]]] = {}
_MEMO_SIZE: Final = 4096


def _meta_values(meta: RunCheckpointMeta) -> dict[str, Any]:
    """The identity columns of ``meta``, encoded once per meta object (a run saves the same
    frozen meta at every save; this keeps the save's cost off its inputs' size)."""
    hit = _META_MEMO.get(id(meta))
    if hit is not None and hit[0] is meta:
        return hit[1]
    encoded = {name: _ENCODE[name](getattr(meta, name)) for name in META_FIELDS}
    if len(_META_MEMO) >= _MEMO_SIZE:
        _META_MEMO.clear()
    _META_MEMO[id(meta)] = (meta, encoded)
    return encoded


_NO_PHASES: Final = codec.encode([])


def new_boundary(values: Mapping[str, Any]) -> dict[str, Any]:
    """The boundary of a run's first stored state: the state itself if it has completed
    phases, else the empty start (no messages, iteration 0, no extra)."""
    if values["completed_phases"] == _NO_PHASES:
        return {
            "boundary_message_count": 0,
            "boundary_iteration": 0,
            "boundary_extra": None,
            "progress_at": None,
        }
    return {
        "boundary_message_count": values["message_count"],
        "boundary_iteration": values["iteration"],
        "boundary_extra": values["extra"],
        "progress_at": values["updated_at"],
    }


class Incoming:
    """Plain new values seen as attributes, like an upsert's ``excluded`` (for
    :func:`boundary_update` in an ``UPDATE``)."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = values

    def __getattr__(self, name: str) -> Any:
        try:
            value = self._values[name]
        except KeyError:
            raise AttributeError(name) from None
        # typed like its column, so that e.g. a time binds as the column stores it
        return literal(value, header.c[name].type)


def boundary_update(new: Any) -> dict[str, Any]:
    """SET expressions that move the boundary when a save's completed phases gained one over
    the stored ones (``new``: the incoming values, e.g. an upsert's ``excluded``), and otherwise
    keep it within the new transcript (a host that compacted mid-phase resumes from a
    prefix of what is stored). A boundary never recorded (NULL) stays so until the phases
    change."""
    # A phase appeared: the encoding of the list grew (a list that lost or swapped entries
    # is not a boundary; the boundary then only stays within the new transcript).
    changed = and_(
        header.c.completed_phases != new.completed_phases,
        func.length(new.completed_phases) > func.length(header.c.completed_phases),
    )
    count = header.c.boundary_message_count
    return {
        "boundary_message_count": case(
            (changed, new.message_count),
            (count.is_(None), None),
            (count <= new.message_count, count),
            else_=new.message_count,
        ),
        "boundary_iteration": case((changed, new.iteration), else_=header.c.boundary_iteration),
        "boundary_extra": case((changed, new.extra), else_=header.c.boundary_extra),
        "progress_at": case((changed, new.updated_at), else_=header.c.progress_at),
    }


def _progressed() -> Any:
    """The run reached a phase boundary (or was released) since its last claim."""
    return and_(
        header.c.claimed_at.is_not(None),
        header.c.progress_at.is_not(None),
        header.c.progress_at > header.c.claimed_at,
    )


def attempts_after_claim() -> Any:
    """A claim counts as a failed attempt only if the run made no progress (no save) since
    its previous claim; after progress the count restarts at 1 (this claim)."""
    return case((_progressed(), 1), else_=header.c.attempts + 1)


def suspect() -> Any:
    """Claimed before, and no progress since (``CheckpointSummary.suspect`` in SQL)."""
    return and_(header.c.claimed_at.is_not(None), ~_progressed())


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
