"""The one set of rules for what can be stored: identity text, progress, transcript shape.

Used by the checkpointer at ``save`` (so a bad state is refused when it is handed over, even
inside a throttle window) and by every store before it touches storage (so a direct caller
gets the same typed error and nothing is written). Raises :class:`CheckpointError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Final

from . import codec
from .errors import CheckpointError, CheckpointTooLargeError
from .types import RunCheckpoint, RunCheckpointMeta

MAX_ID_LENGTH: Final = 255
"""Longest run id and identity string (the width of their columns)."""

MAX_ITERATION: Final = 2**31 - 1
"""Largest iteration number (the column is a 32-bit integer)."""

_UNBOUNDED_TEXT: Final = frozenset({"prompt"})
"""Identity fields stored as unbounded text."""

_META_TEXT: Final = tuple(
    f.name for f in fields(RunCheckpointMeta) if f.name != "run_id" and f.name != "inputs"
)


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


def check_text(
    name: str,
    value: object,
    run_id: str | None,
    *,
    optional: bool = True,
    max_length: int | None = MAX_ID_LENGTH,
) -> None:
    """Raise :class:`CheckpointError` unless ``value`` is storable identity text."""
    if value is None and optional:
        return
    problem = storable_text(value, max_length)
    if problem is None and value == "" and name == "run_id":
        problem = "must not be empty"
    if problem is not None:
        where = f" of run {run_id!r}" if run_id and name != "run_id" else ""
        raise CheckpointError(
            f"{name}{where} {problem}", run_id=None if name == "run_id" else run_id
        )


_VALID_IDENTITIES: dict[int, tuple[RunCheckpointMeta, str | None, str | None]] = {}
_MEMO_SIZE = 4096


def check_identity(
    meta: RunCheckpointMeta, app_version: str | None = None, owner: str | None = None
) -> None:
    """Validate a run's identity text (ids, names, prompt, app version, owner).

    A run hands the same frozen meta to every save: a meta object found valid is not
    checked again (its ``inputs`` must not be mutated after it is handed over)."""
    hit = _VALID_IDENTITIES.get(id(meta))
    if hit is not None and hit[0] is meta and hit[1] == app_version and hit[2] == owner:
        return
    _check_identity(meta, app_version, owner)
    if len(_VALID_IDENTITIES) >= _MEMO_SIZE:
        _VALID_IDENTITIES.clear()
    _VALID_IDENTITIES[id(meta)] = (meta, app_version, owner)


def _check_identity(meta: RunCheckpointMeta, app_version: str | None, owner: str | None) -> None:
    run_id = meta.run_id
    check_text("run_id", run_id, None, optional=False)
    for name in _META_TEXT:
        limit = None if name in _UNBOUNDED_TEXT else MAX_ID_LENGTH
        check_text(f"meta.{name}", getattr(meta, name), run_id, max_length=limit)
    check_json_mapping("meta.inputs", meta.inputs, run_id, optional=False)
    check_text("app_version", app_version, run_id)
    check_text("owner", owner, run_id)


def check_json_mapping(name: str, value: object, run_id: str, *, optional: bool = True) -> None:
    """A JSON object: ``None`` (if optional) or a mapping with str keys and JSON values."""
    if value is None and optional:
        return
    if not isinstance(value, Mapping):
        raise CheckpointError(
            f"{name} of run {run_id!r} must be a mapping, got {type(value).__name__}",
            run_id=run_id,
        )
    codec.encode(dict(value), run_id=run_id)


_VALID_PHASES: dict[int, tuple[tuple[str, ...], bytes]] = {}
_PHASES_BY_VALUE: dict[tuple[str, ...], bytes] = {}


def check_progress(run_id: str, iteration: object, completed_phases: object) -> bytes:
    """Validate iteration and completed phases; returns the phases' stored encoding.

    A tuple found valid is not checked again (a checkpointer hands the store the same tuple
    at every save until a phase completes)."""
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
    if type(completed_phases) is tuple:
        hit = _VALID_PHASES.get(id(completed_phases))
        if hit is not None and hit[0] is completed_phases:
            return hit[1]
    # A host usually builds a new list of the same phases at each save: plain ``str`` phases
    # encode by value alone, so a list equal to one seen before shares its encoding.
    plain: tuple[str, ...] | None = None
    if type(completed_phases) is list or type(completed_phases) is tuple:
        plain = tuple(completed_phases)
        if all(type(p) is str for p in plain):
            known = _PHASES_BY_VALUE.get(plain)
            if known is not None:
                return known
        else:
            plain = None
    if (
        isinstance(completed_phases, str | bytes)
        or not isinstance(completed_phases, Sequence)
        or not all(isinstance(p, str) for p in completed_phases)
    ):
        raise CheckpointError(
            f"completed_phases of run {run_id!r} must be a sequence of str, "
            f"got {type(completed_phases).__name__}",
            run_id=run_id,
        )
    encoded = codec.encode(list(completed_phases), run_id=run_id)
    if plain is not None:
        if len(_PHASES_BY_VALUE) >= _MEMO_SIZE:
            _PHASES_BY_VALUE.clear()
        _PHASES_BY_VALUE[plain] = encoded
    if type(completed_phases) is tuple:
        if len(_VALID_PHASES) >= _MEMO_SIZE:
            _VALID_PHASES.clear()
        _VALID_PHASES[id(completed_phases)] = (completed_phases, encoded)
    return encoded


def check_messages(run_id: str, messages: object) -> Sequence[object]:
    """A transcript must be a sequence of messages (a ``str``, a mapping or a generator is
    not: storing it would replace the transcript with its characters, keys or items)."""
    if type(messages) is list or type(messages) is tuple:
        return messages  # the common case, without the ABC check (~1 µs a save)
    if isinstance(messages, str | bytes | bytearray) or not isinstance(messages, Sequence):
        raise CheckpointError(
            f"messages of run {run_id!r} must be a sequence of messages (a list), "
            f"got {type(messages).__name__}",
            run_id=run_id,
        )
    return messages


def check_header(checkpoint: RunCheckpoint) -> bytes:
    """Validate a checkpoint's identity, progress and transcript shape before anything is
    written; returns the encoded completed phases."""
    run_id = checkpoint.meta.run_id
    check_identity(checkpoint.meta, checkpoint.app_version, checkpoint.owner)
    phases = check_progress(run_id, checkpoint.iteration, checkpoint.completed_phases)
    check_messages(run_id, checkpoint.messages)
    check_json_mapping("extra", checkpoint.extra, run_id)
    return phases


def check_limit(limit: object) -> int | None:
    """A listing's ``limit``: ``None`` (no limit) or an int >= 0 (``0`` lists nothing)."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise CheckpointError(f"limit must be None or an int >= 0, got {limit!r:.40}")
    return limit


def check_size(run_id: str, size_bytes: int, max_bytes: int) -> None:
    """Raise :class:`CheckpointTooLargeError` if the transcript is over the store's cap."""
    if size_bytes > max_bytes:
        raise CheckpointTooLargeError(
            f"transcript of run {run_id!r} encodes to {size_bytes} bytes, over the store's "
            f"limit of {max_bytes} bytes (max_checkpoint_bytes)",
            run_id=run_id,
            size_bytes=size_bytes,
            max_bytes=max_bytes,
        )


def clean_text(text: str) -> str:
    """Diagnostic text (errors) made storable everywhere: NUL becomes the two characters
    ``\\0`` and a lone surrogate its ``\\udXXX`` escape."""
    text = text.replace("\x00", "\\0")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def check_tail_limit(limit: object, run_id: str | None) -> int:
    """A tail read's ``limit``: a non-negative ``int`` (not a bool)."""
    if type(limit) is not int or limit < 0:
        raise CheckpointError(f"limit must be a non-negative int, got {limit!r}", run_id=run_id)
    return limit
