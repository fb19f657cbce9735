"""What a checkpointer knows of its run's transcript, so that a save writes only what is new.

An append-only host hands the same growing list at every save. :class:`Transcript` validates
and encodes only the messages it has not seen (keeping their encodings for the store, so each
message is serialized once) and tells whether the newest state extends the one last written,
so the store can append instead of rewriting.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

from . import codec
from .types import JSONValue


@dataclass(frozen=True, slots=True)
class TranscriptSnapshot:
    """One saved transcript: its messages and the encodings of ``messages[encoded_from:]``."""

    messages: tuple[JSONValue, ...]
    encoded_from: int
    encoded: tuple[bytes, ...]


class Transcript:
    """Validated prefix, cached encodings and the transcript last written, for one run."""

    __slots__ = ("_run_id", "_seen", "_stored")

    def __init__(self, run_id: str) -> None:
        self._run_id = run_id
        # The messages of the previous snapshot, all validated.
        self._seen: tuple[JSONValue, ...] = ()
        # The transcript as last written; () once the run's row is known to hold none.
        self._stored: tuple[JSONValue, ...] | None = None

    def snapshot(self, messages: Sequence[JSONValue]) -> TranscriptSnapshot:
        """Validate ``messages`` and keep the encodings of those not validated before.

        Every message that is not the very object validated at the same position last time is
        checked: the new ones (the usual append), and any earlier one the host replaced. The
        test is a pointer comparison per message, so an appending host pays for its new
        messages only.

        Raises:
            CheckpointSerializationError: a message is not JSON-compatible.
        """
        copied = tuple(messages)
        start = _first_replaced(self._seen, copied)
        encoded = tuple(codec.encode(m, run_id=self._run_id) for m in copied[start:])
        self._seen = copied
        return TranscriptSnapshot(copied, start, encoded)

    def mark_empty(self) -> None:
        """The run's row was just registered: assume it holds no transcript (an append at 0;
        the store falls back to a full write if a taken-over row holds one)."""
        self._stored = ()

    def written(self, snap: TranscriptSnapshot) -> None:
        """``snap`` is now what the store holds."""
        self._stored = snap.messages

    def base_of(self, snap: TranscriptSnapshot) -> int | None:
        """``len(stored)`` if ``snap`` extends the transcript last written, else None.

        Identity first: an append-only host hands the same message objects again, so this is
        a pointer comparison per message, no encoding and no database work. Messages must not
        be mutated in place after they were saved (see :class:`RunCheckpointState`).
        """
        stored = self._stored
        if stored is None or len(snap.messages) < len(stored):
            return None
        for old, new in zip(stored, snap.messages, strict=False):
            if old is not new and old != new:
                return None
        return len(stored)


def _first_replaced(seen: tuple[JSONValue, ...], messages: tuple[JSONValue, ...]) -> int:
    """Index of the first message of ``messages`` that is not the object at the same index
    of ``seen`` (``len(seen)`` when ``messages`` extends it object for object)."""
    shared = min(len(seen), len(messages))
    if all(map(operator.is_, seen[:shared], messages[:shared])):
        return shared
    return next(i for i in range(shared) if seen[i] is not messages[i])
