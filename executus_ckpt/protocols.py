"""The seams: what a run loop, a factory and a store must provide."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Protocol, runtime_checkable

from .types import (
    CheckpointStatus,
    CheckpointSummary,
    RunCheckpoint,
    RunCheckpointState,
    RunInfo,
)


@runtime_checkable
class Checkpointer(Protocol):
    """Per-run persistence handle used by the host's run loop."""

    async def save(self, state: RunCheckpointState) -> None:
        """Persist ``state`` (possibly later, within the throttle window)."""
        ...

    async def complete(self) -> None:
        """The run finished: delete its checkpoint. Idempotent; later saves are no-ops."""
        ...

    async def fail(self, error: BaseException | None = None) -> None:
        """The run failed terminally: delete its checkpoint. Idempotent; later saves are no-ops."""
        ...

    async def flush(self) -> None:
        """Write a pending throttled state now; a no-op when none is pending."""
        ...


@runtime_checkable
class CheckpointerFactory(Protocol):
    """Mints the per-run :class:`Checkpointer` when a run begins."""

    async def begin(self, info: RunInfo) -> Checkpointer:
        """Start checkpointing the run described by ``info``."""
        ...


@runtime_checkable
class CheckpointStore(Protocol):
    """Where checkpoints live. :class:`InMemoryCheckpointStore` is the reference semantics.

    Times are aware UTC; durations are float seconds. ``epoch`` arguments fence stale writers:
    a write carrying an epoch lower than the stored one raises :class:`CheckpointFencedError`.
    """

    async def save(self, checkpoint: RunCheckpoint) -> None:
        """Insert or replace the run's state.

        On an existing row the state, meta, ``app_version``, ``owner`` and ``updated_at`` are
        replaced; ``created_at``, ``attempts``, ``status`` and ``last_error`` are kept.
        A store may also accept ``base_count=`` (a hint that the stored transcript is
        ``checkpoint.messages[:base_count]``, so that only newer messages are written; if it is
        not, the whole transcript is rewritten) and ``encoded_tail=`` (the encodings of those
        newer messages); the checkpointer passes them to stores whose ``save`` takes them.
        Either way the stored transcript is exactly ``checkpoint.messages``.

        Raises:
            CheckpointFencedError: the stored epoch is newer than ``checkpoint.epoch``.
            CheckpointSerializationError, CheckpointTooLargeError: nothing was written.
            StoreUnavailableError: the database failed.
        """
        ...

    async def register(self, checkpoint: RunCheckpoint) -> int:
        """Insert the run's initial row, or take over the existing one; returns the new epoch.

        The initial row has no messages (``checkpoint.messages`` is ignored).

        A take-over raises the epoch (fencing any older writer), refreshes meta, ``app_version``
        and ``owner``, and keeps the stored transcript, progress and attempt count.
        """
        ...

    async def load(self, run_id: str) -> RunCheckpoint | None:
        """The stored checkpoint of ``run_id``, or ``None``."""
        ...

    async def delete(self, run_id: str, *, epoch: int | None = None) -> bool:
        """Delete the run's checkpoint; True if one was deleted.

        With ``epoch``, a row taken over by a newer writer is left alone (returns False).
        """
        ...

    async def list_interrupted(
        self,
        *,
        agent_id: str | None = None,
        older_than: float | None = None,
        limit: int | None = None,
    ) -> list[RunCheckpoint]:
        """Active checkpoints, oldest ``updated_at`` first.

        Args:
            agent_id: only runs of this agent.
            older_than: only runs not updated for at least this many seconds.
            limit: at most this many.
        """
        ...

    def iter_summaries(
        self,
        *,
        status: CheckpointStatus | None = CheckpointStatus.ACTIVE,
        agent_id: str | None = None,
        older_than: float | None = None,
        updated_before: datetime | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> AsyncIterator[CheckpointSummary]:
        """Stream checkpoints without their transcripts, in ``updated_at`` order.

        Memory stays bounded by one page whatever the number of rows. ``status=None`` lists
        every status. ``updated_before`` (aware) bounds the scan absolutely, so rows touched
        while it runs are not listed again.
        """
        ...

    async def claim(
        self, run_id: str, *, epoch: int, owner: str | None = None
    ) -> RunCheckpoint | None:
        """Atomically claim an active run for recovery.

        Succeeds only if the stored epoch still equals ``epoch`` (nobody claimed or took it over
        since it was listed): raises the attempt count and the epoch, records ``owner``, sets
        ``updated_at`` to now and returns the claimed checkpoint. Returns ``None`` if the claim
        was lost.
        """
        ...

    async def mark_dead(self, run_id: str, *, reason: str, epoch: int | None = None) -> bool:
        """Keep the run for the operator with ``reason`` as its last error; never resumed.

        True if the run was marked; with ``epoch``, a run taken over since is left alone.
        """
        ...

    async def record_error(self, run_id: str, error: str) -> bool:
        """Store ``error`` as the run's last error (status unchanged); True if the run exists."""
        ...
