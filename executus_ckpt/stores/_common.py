"""What every store does the same way: validate and encode before touching storage."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import cast

from .. import codec
from ..errors import CheckpointError, CheckpointTooLargeError
from ..types import RunCheckpoint, utcnow

MAX_ID_LENGTH = 255
"""Longest run id and meta string (the width of their columns)."""

_META_FIELDS = (
    "agent_id",
    "agent_name",
    "caller_id",
    "channel_id",
    "guild_id",
    "parent_run_id",
    "model_tier",
)


MAX_ITERATION = 2**31 - 1
"""Largest iteration number (the column is a 32-bit integer)."""


def storable_text(value: object, max_length: int | None = MAX_ID_LENGTH) -> str | None:
    """Why ``value`` cannot be stored as SQL text, or None if it can.

    The same rules on every backend: a ``str``, at most ``max_length`` characters, no NUL
    (PostgreSQL text cannot hold it) and valid Unicode (no lone surrogates).
    """
    if not isinstance(value, str):
        return f"must be a str, got {type(value).__name__}"
    if max_length is not None and len(value) > max_length:
        return f"must be at most {max_length} characters, got {len(value)}"
    if "\x00" in value:
        return "contains a NUL character, which SQL text cannot hold"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (it contains a lone surrogate)"
    return None


def is_storable_id(run_id: object) -> bool:
    """False for an id no store could hold: a lookup by it finds nothing."""
    return isinstance(run_id, str) and bool(run_id) and storable_text(run_id) is None


def check_text(name: str, value: object, run_id: str | None, *, optional: bool = True) -> None:
    """Raise :class:`CheckpointError` unless ``value`` is storable identity text."""
    if value is None and optional:
        return
    problem = storable_text(value)
    if problem is None and value == "" and name == "run_id":
        problem = "must not be empty"
    if problem is not None:
        where = f" of run {run_id!r}" if run_id and name != "run_id" else ""
        raise CheckpointError(
            f"{name}{where} {problem}", run_id=None if name == "run_id" else run_id
        )


def check_header(checkpoint: RunCheckpoint) -> bytes:
    """Validate a checkpoint's identity and progress; returns the encoded completed phases.

    Raises :class:`CheckpointError` before anything is written, identically on every backend.
    """
    run_id = checkpoint.meta.run_id
    check_text("run_id", run_id, None, optional=False)
    for name in _META_FIELDS:
        check_text(f"meta.{name}", getattr(checkpoint.meta, name), run_id)
    prompt = checkpoint.meta.prompt
    if prompt is not None:
        problem = storable_text(prompt, max_length=None)
        if problem is not None:
            raise CheckpointError(f"meta.prompt of run {run_id!r} {problem}", run_id=run_id)
    check_text("app_version", checkpoint.app_version, run_id)
    check_text("owner", checkpoint.owner, run_id)
    iteration = checkpoint.iteration
    if (
        not isinstance(iteration, int)
        or isinstance(iteration, bool)
        or not 0 <= iteration <= MAX_ITERATION
    ):
        raise CheckpointError(
            f"iteration of run {run_id!r} must be an int from 0 to {MAX_ITERATION}, "
            f"got {iteration!r:.40}",
            run_id=run_id,
        )
    phases = checkpoint.completed_phases
    if isinstance(phases, str) or not all(isinstance(p, str) for p in phases):
        raise CheckpointError(
            f"completed_phases of run {run_id!r} must be a sequence of str", run_id=run_id
        )
    messages = checkpoint.messages
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise CheckpointError(
            f"messages of run {run_id!r} must be a sequence, got {type(messages).__name__}",
            run_id=run_id,
        )
    return codec.encode(list(phases), run_id=run_id)


def clean_text(text: str) -> str:
    """Diagnostic text (errors) made storable everywhere: NUL becomes the two characters
    ``\\0`` and a lone surrogate its ``\\udXXX`` escape."""
    text = text.replace("\x00", "\\0")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def encode_messages(messages: Sequence[object], run_id: str) -> list[bytes]:
    """Encode each message once (one stored row per message)."""
    return [codec.encode(m, run_id=run_id) for m in messages]


def tail_encodings(
    messages: Sequence[object],
    start: int,
    encoded_tail: Sequence[bytes] | None,
    run_id: str,
) -> list[bytes]:
    """Encodings of ``messages[start:]``: those the caller already made (the checkpointer
    validated them by encoding them), else encoded here."""
    if encoded_tail is not None and len(encoded_tail) == len(messages) - start:
        return list(encoded_tail)
    return encode_messages(messages[start:], run_id)


def check_size(run_id: str, size_bytes: int, max_bytes: int) -> None:
    if size_bytes > max_bytes:
        raise CheckpointTooLargeError(
            f"transcript of run {run_id!r} encodes to {size_bytes} bytes, over the store's "
            f"limit of {max_bytes} bytes (max_checkpoint_bytes)",
            run_id=run_id,
            size_bytes=size_bytes,
            max_bytes=max_bytes,
        )


def valid_base(base_count: int | None, messages: Sequence[object]) -> int | None:
    """``base_count`` if it can describe a prefix of ``messages``, else None (full write)."""
    if base_count is None or not 0 < base_count <= len(messages):
        return None
    return base_count


def join_messages(rows: Sequence[bytes]) -> list[object]:
    """Decode stored message rows in one pass."""
    if not rows:
        return []
    return cast(list[object], codec.decode(b"[" + b",".join(rows) + b"]"))


def cutoff(older_than: float | None) -> datetime | None:
    """The ``updated_at`` bound for an ``older_than`` filter in seconds."""
    if older_than is None:
        return None
    return utcnow() - timedelta(seconds=older_than)


def as_utc(value: datetime) -> datetime:
    """Normalize a datetime to aware UTC (naive values are taken as UTC)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
