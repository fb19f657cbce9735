"""The seams: what a run loop, a factory and a store must provide."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Protocol, runtime_checkable

from .types import (
    CheckpointStats,
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

    async def aclose(self, *, release: bool = False) -> None:
        """Stop without finalizing: cancel a pending trailing flush, wait for in-flight writes.

        The stored checkpoint stays as last written (what a shutdown leaves for recovery);
        call :meth:`flush` first to write a pending state. With ``release`` the run is handed
        back for recovery (see :meth:`CheckpointStore.release`): what a graceful shutdown
        does. Idempotent.
        """
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

    async def release(self, run_id: str, *, epoch: int) -> bool:
        """Hand back a run cut off by a graceful shutdown: owner cleared, epoch raised (its
        writer is fenced), and the release counts as progress, so the next recovery claim is
        not a failed attempt. False if the run is gone, not active, or taken over since."""
        ...

    async def mark_failed(self, run_id: str, *, error: str, epoch: int | None = None) -> bool:
        """Keep a run that failed terminally for the operator: status ``failed``, ``error``
        as its last error; never resumed (``keep_failed=True`` on the factory).

        True if the run was marked; with ``epoch``, a run taken over since is left alone.
        """
        ...

    async def record_error(self, run_id: str, error: str) -> bool:
        """Store ``error`` as the run's last error (status unchanged); True if the run exists."""
        ...


@runtime_checkable
class AppendingStore(CheckpointStore, Protocol):
    """A store that can extend a stored transcript without rewriting it (the save fast path).

    The checkpointer calls :meth:`append` instead of ``save`` when the new transcript extends
    the one it last wrote; stores that do not implement it get whole-transcript ``save`` calls.
    A wrapper store (metrics, tracing) should forward ``append`` too, or it loses the fast path.
    """

    async def append(
        self,
        checkpoint: RunCheckpoint,
        *,
        base_count: int,
        encoded_tail: Sequence[bytes] | None = None,
        replace_from: int | None = None,
    ) -> None:
        """Store ``checkpoint`` over the existing run, writing only what changed.

        The caller believes the stored transcript is ``checkpoint.messages[:base_count]``
        except from ``replace_from`` on (default ``base_count``: a pure append); only the
        messages after it are written (``encoded_tail``, when given, holds the encodings of
        ``messages[base_count:]``). If the stored transcript is not what the caller believes,
        the whole transcript is rewritten in the same transaction, never a mix. Afterwards
        the stored state is exactly ``checkpoint``, as after :meth:`CheckpointStore.save`.
        Unlike ``save``, ``append`` never creates a run: this is how a checkpointer writes,
        so a stale writer cannot resurrect a run that was finished or taken over.

        Raises:
            CheckpointFencedError: the run is gone or its stored epoch is newer.
            CheckpointSerializationError, CheckpointTooLargeError: nothing was written.
            StoreUnavailableError: the database failed.
        """
        ...


@runtime_checkable
class AdminStore(CheckpointStore, Protocol):
    """The operator's surface (the CLI): bulk listing, requeue, purge, counts."""

    async def requeue(self, run_id: str) -> bool:
        """Make a dead or failed run recoverable again (status active, attempts 0); True if it
        was dead or failed."""
        ...

    async def purge(
        self,
        *,
        older_than: float,
        status: CheckpointStatus | None = CheckpointStatus.DEAD,
        dry_run: bool = False,
        batch_size: int = 500,
        on_progress: Callable[[int], None] | None = None,
    ) -> int:
        """Delete checkpoints not updated for ``older_than`` seconds; returns how many.

        ``status=None`` purges every status; ``dry_run`` only counts; ``on_progress`` gets the
        running total after each batch.
        """
        ...

    async def stats(self) -> CheckpointStats:
        """Counts by status and agent, sizes, and the oldest interrupted run."""
        ...

    async def count(self, *, status: CheckpointStatus | None = None) -> int:
        """How many checkpoints are stored (with ``status``, only those)."""
        ...


@runtime_checkable
class Clock(Protocol):
    """Monotonic time for throttling: ``clock()`` reads seconds, ``sleep(s)`` waits.

    :class:`executus_ckpt.testing.ManualClock` is one for tests; the default is
    :data:`MONOTONIC` (``time.monotonic`` and ``asyncio.sleep``).
    """

    def __call__(self) -> float:
        """Monotonic seconds."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait until the clock has advanced ``seconds``."""
        ...
