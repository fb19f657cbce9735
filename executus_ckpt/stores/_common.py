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


def check_header(checkpoint: RunCheckpoint) -> bytes:
    """Validate a checkpoint's identity and progress; returns the encoded completed phases.

    Raises before anything is written.
    """
    run_id = checkpoint.meta.run_id
    if not isinstance(run_id, str) or not run_id or len(run_id) > MAX_ID_LENGTH:
        raise CheckpointError(
            f"run_id must be a non-empty str of at most {MAX_ID_LENGTH} characters, "
            f"got {run_id!r:.80}",
            run_id=None,
        )
    for name in _META_FIELDS:
        value = getattr(checkpoint.meta, name)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_ID_LENGTH):
            raise CheckpointError(
                f"meta.{name} of run {run_id!r} must be a str of at most {MAX_ID_LENGTH} "
                f"characters, got {type(value).__name__} of length {len(str(value))}",
                run_id=run_id,
            )
    if checkpoint.meta.prompt is not None and not isinstance(checkpoint.meta.prompt, str):
        raise CheckpointError(f"meta.prompt of run {run_id!r} must be a str", run_id=run_id)
    for name, value in (
        ("run_id", run_id),
        *((f"meta.{n}", getattr(checkpoint.meta, n)) for n in (*_META_FIELDS, "prompt")),
        ("app_version", checkpoint.app_version),
        ("owner", checkpoint.owner),
    ):
        # PostgreSQL text cannot hold NUL; refuse it everywhere so every backend agrees.
        if isinstance(value, str) and "\x00" in value:
            raise CheckpointError(
                f"{name} of run {run_id!r} contains a NUL character, which SQL text cannot hold",
                run_id=run_id,
            )
    if not isinstance(checkpoint.iteration, int) or isinstance(checkpoint.iteration, bool):
        raise CheckpointError(
            f"iteration of run {run_id!r} must be an int, got {checkpoint.iteration!r}",
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
    """Diagnostic text (errors) made storable everywhere: NUL becomes the two chars ``\\0``."""
    return text.replace("\x00", "\\0")


def encode_messages(messages: Sequence[object], run_id: str) -> list[bytes]:
    """Encode each message once (one stored row per message)."""
    return [codec.encode(m, run_id=run_id) for m in messages]


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
