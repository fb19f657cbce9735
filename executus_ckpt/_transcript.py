"""What a checkpointer knows of its run's transcript, so that a save writes only what changed.

The stored transcript must equal, byte for byte as encoded, what the host handed at its last
save, and a save must not cost more as the transcript grows for a host that appends. So a
message is trusted unchanged only if it is the very object validated at the same position
last time *and* is not among the last :data:`RECHECKED` messages of the previous save (where
hosts stream text in place); everything else is encoded and compared with the digest of its
previous encoding. Values that Python calls equal but JSON does not (``1``/``1.0``/``True``,
``0.0``/``-0.0``) therefore count as changes. ``verify=True`` re-checks every message at
every save (cost: one encoding of the whole transcript per save) for hosts that edit older
messages in place.

The encodings made here are kept for the store (each message is serialized once). With a
:class:`~executus_ckpt.codec.MessageCodec`, the host's objects are tracked by identity the same
way and only those re-checked are dumped; the snapshot holds their JSON values.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import codec
from .codec import MessageCodec
from .errors import CheckpointSerializationError
from .types import JSONValue

RECHECKED = 2
"""Messages at the end of the previous save that are re-encoded at every save."""


@dataclass(frozen=True, slots=True)
class TranscriptSnapshot:
    """One saved transcript: its messages, the first index that differs from the previous
    snapshot, and the encodings of ``messages[changed_from:]``."""

    id: int
    messages: tuple[JSONValue, ...]
    changed_from: int
    encoded: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Delta:
    """How a snapshot differs from the transcript last written."""

    stored: int
    """Messages the store holds."""
    changed_from: int
    """First index whose message differs from the stored one (``stored`` for an append)."""


class Transcript:
    """Digests of the previous snapshot, and what the store holds, for one run."""

    __slots__ = (
        "_changes",
        "_codec",
        "_digests",
        "_dumped",
        "_ids",
        "_run_id",
        "_seen",
        "_stored",
        "_verify",
    )

    def __init__(
        self, run_id: str, *, verify: bool = False, message_codec: MessageCodec[Any] | None = None
    ) -> None:
        self._run_id = run_id
        self._verify = verify
        self._codec = message_codec
        self._ids = 0
        # The previous snapshot's messages and the hash of each one's encoding; with a codec,
        # ``_dumped`` holds their JSON values (what the store is given).
        self._seen: tuple[Any, ...] = ()
        self._dumped: tuple[JSONValue, ...] = ()
        # Per message of the previous snapshot: its encoding for the last RECHECKED (compared
        # byte for byte at the next save), the hash of its encoding before them (a message
        # is hashed once, when it leaves that window).
        self._digests: list[int | bytes] = []
        # The transcript as last written: (snapshot id, length); None until known.
        self._stored: tuple[int, int] | None = None
        # (snapshot id, changed_from) of the snapshots taken since that write.
        self._changes: list[tuple[int, int]] = []

    def snapshot(self, messages: Sequence[Any]) -> TranscriptSnapshot:
        """Validate and encode what may have changed since the previous snapshot.

        Raises:
            CheckpointSerializationError: a message is not JSON-compatible, or the codec
                failed on it (the previous snapshot stands).
        """
        copied = tuple(messages)
        seen, digests = self._seen, self._digests
        shared = min(len(seen), len(copied))
        same = _first_replaced(seen, copied, shared)
        start = 0 if self._verify else min(same, max(0, len(seen) - RECHECKED))
        if self._codec is None:
            values: tuple[Any, ...] = copied
            fresh: Sequence[Any] = copied[start:]
        else:
            dump = self._codec.dump_one
            fresh = [dump(m, start + i, self._run_id) for i, m in enumerate(copied[start:])]
            values = self._dumped[:start] + tuple(fresh)
        encoded = self._encode(fresh, start)
        changed = shared if len(copied) >= len(seen) else len(copied)
        for i in range(start, shared):
            old = digests[i]
            if old != (encoded[i - start] if type(old) is bytes else hash(encoded[i - start])):
                changed = i
                break
        kept = max(start, len(copied) - RECHECKED)
        self._seen = copied
        self._dumped = values if self._codec is not None else ()
        # in place: O(new messages), not O(transcript)
        del digests[start:]
        digests.extend(map(hash, encoded[: kept - start]))
        digests.extend(encoded[kept - start :])
        self._ids += 1
        self._changes.append((self._ids, changed))
        return TranscriptSnapshot(self._ids, values, changed, tuple(encoded[changed - start :]))

    def _encode(self, messages: Sequence[object], start: int) -> list[bytes]:
        encode, run_id = codec.encode, self._run_id
        try:
            return [encode(m, run_id=run_id) for m in messages]
        except CheckpointSerializationError:
            # Name the message: find the first one that fails (rare path, so a second pass).
            for i, m in enumerate(messages):
                try:
                    encode(m, run_id=run_id)
                except CheckpointSerializationError as exc:
                    raise CheckpointSerializationError(
                        f"message {start + i}: {exc}", run_id=run_id
                    ) from exc
            raise

    def mark_empty(self) -> None:
        """The run's row was just registered: assume it holds no transcript (an append at 0;
        the store falls back to a full write if a taken-over row holds one)."""
        self._stored = (self._ids, 0)

    def written(self, snap: TranscriptSnapshot) -> None:
        """``snap`` is now what the store holds."""
        self._stored = (snap.id, len(snap.messages))
        self._changes = [(i, c) for i, c in self._changes if i > snap.id]

    def delta(self, snap: TranscriptSnapshot) -> Delta | None:
        """How ``snap`` differs from the stored transcript; None if unknown or shorter (a
        full rewrite)."""
        if self._stored is None:
            return None
        written_id, stored = self._stored
        if len(snap.messages) < stored:
            return None
        changed = stored
        for i, c in self._changes:  # usually one entry: the snapshot being written
            if written_id < i <= snap.id and c < changed:
                changed = c
        return Delta(stored=stored, changed_from=changed)


def _first_replaced(seen: tuple[Any, ...], messages: tuple[Any, ...], shared: int) -> int:
    """Index of the first message among the first ``shared`` that is not the object at the
    same index of ``seen`` (``shared`` if there is none)."""
    if all(map(operator.is_, seen, messages)):  # stops at the shorter: ``shared``
        return shared
    return next(i for i in range(shared) if seen[i] is not messages[i])
