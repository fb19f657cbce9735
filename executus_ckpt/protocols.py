"""The seams: what a run loop, a factory and a store must provide."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Protocol, runtime_checkable

from .types import (
    CheckpointStats,
    CheckpointStatus,
    CheckpointSummary,
    ExecutorInfo,
    JSONValue,
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

    async def register(self, checkpoint: RunCheckpoint, *, expect_epoch: int | None = None) -> int:
        """Insert the run's initial row, or take over the existing one; returns the new epoch.

        With ``expect_epoch`` (the epoch of a claim this writer made) nothing is inserted and
        the take-over happens only if the run is still at that epoch; otherwise
        :class:`CheckpointFencedError` (it finished or was taken over since).

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
        stale_owners: bool = True,
    ) -> list[RunCheckpoint]:
        """Interrupted checkpoints, oldest ``updated_at`` first.

        Interrupted = active and owned by no live executor: no owner (released), an owner
        that never registered (hosts without an :class:`Executor`), a stopped one, or one
        whose heartbeat expired by the database's clock.

        Args:
            agent_id: only runs of this agent.
            older_than: only runs not updated for at least this many seconds.
            limit: at most this many (``None``: all; ``0``: none).
            stale_owners: count runs of executors whose heartbeat expired (False: only of
                executors that are gone for sure).
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
        interrupted: bool = False,
        stale_owners: bool = True,
    ) -> AsyncIterator[CheckpointSummary]:
        """Stream checkpoints without their transcripts, in ``updated_at`` order.

        Memory stays bounded by one page whatever the number of rows. ``status=None`` lists
        every status. ``updated_before`` (aware) bounds the scan absolutely, so rows touched
        while it runs are not listed again. ``interrupted`` keeps only runs no live executor
        owns (see :meth:`list_interrupted`).
        """
        ...

    async def claim(
        self, run_id: str, *, epoch: int, owner: str | None = None, stale_owners: bool = True
    ) -> RunCheckpoint | None:
        """Atomically claim an interrupted run for recovery.

        Succeeds only if the stored epoch still equals ``epoch`` (nobody claimed or took it over
        since it was listed) and the run is still interrupted (checked in the same statement):
        raises the epoch and, unless the run progressed since its previous claim, the attempt
        count; records ``owner``; sets ``updated_at`` to now and returns the claimed checkpoint.
        Returns ``None`` if the claim was lost.

        A run held by a registered owner whose heartbeat expired (``stale_owners``) is taken
        only if ``owner`` is not a registered executor, or is one whose own heartbeats have
        been on time for its ``stale_after`` (judged in the same statement): when a stall
        delayed every heartbeat, the claimer's included, an expired heartbeat proves nothing.
        """
        ...

    async def mark_dead(self, run_id: str, *, reason: str, epoch: int | None = None) -> bool:
        """Keep the run for the operator with ``reason`` as its last error; never resumed.

        True if the run was marked; with ``epoch``, a run taken over since is left alone.
        """
        ...

    async def release(self, run_id: str, *, epoch: int, progress: bool = True) -> bool:
        """Hand back a run cut off by a graceful shutdown: owner cleared, epoch raised (its
        writer is fenced), and the release counts as progress, so the next recovery claim is
        not a failed attempt. False if the run is gone, not active, or taken over since.

        ``progress=False``: the run is handed back without progress (its dispatch ended
        without finishing it), so the next claim counts as a failed attempt.
        """
        ...

    async def mark_failed(self, run_id: str, *, error: str, epoch: int | None = None) -> bool:
        """Keep a run that failed terminally for the operator: status ``failed``, ``error``
        as its last error; never resumed (``keep_failed=True`` on the factory).

        True if the run was marked; with ``epoch``, a run taken over since is left alone.
        """
        ...

    async def record_error(self, run_id: str, error: str, *, epoch: int | None = None) -> bool:
        """Store ``error`` as the run's last error (status unchanged); True if it was stored.
        With ``epoch``, a run taken over since (a newer epoch) is left alone."""
        ...


@runtime_checkable
class BatchClaimingStore(CheckpointStore, Protocol):
    """A store that claims several interrupted runs in one statement (an :class:`Executor`'s
    sweeps use it, so that replicas sweeping at once take different runs)."""

    async def claim_interrupted(
        self,
        *,
        limit: int,
        owner: str | None,
        stale_owners: bool = True,
        exclude_owner: str | None = None,
        agent_id: str | None = None,
        older_than: float | None = None,
    ) -> list[tuple[RunCheckpoint, str | None]]:
        """Claim up to ``limit`` interrupted runs, oldest first, as :meth:`claim` claims one
        (epoch and attempts raised, ``owner`` recorded, the claimer judged), skipping
        suspects (runs claimed before with no progress since: they are claimed one at a
        time) and runs of ``exclude_owner``; runs another claimer holds at that moment are
        skipped, not waited for. Returns each claimed checkpoint with its previous owner;
        ``[]`` when there is nothing to claim."""
        ...


@runtime_checkable
class TailReadingStore(CheckpointStore, Protocol):
    """A store that reads the end of a transcript without loading all of it (a session's
    ``get_items(limit)``)."""

    async def load_tail(self, run_id: str, limit: int) -> list[JSONValue] | None:
        """The last ``limit`` messages of the stored transcript, oldest first (all of them if
        it holds fewer); ``None`` if the run has no checkpoint. Cost grows with ``limit``, not
        with the transcript.

        Raises:
            CheckpointError: ``limit`` is not a non-negative int.
            StoreUnavailableError: the database could not be read.
        """
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


@runtime_checkable
class ExecutorStore(CheckpointStore, Protocol):
    """What :class:`Executor` needs on top of a store: executor rows judged by the database's
    clock (seconds since the epoch), and bulk release."""

    async def register_executor(
        self,
        executor_id: str,
        *,
        name: str | None,
        host: str | None,
        pid: int | None,
        app_version: str | None,
        stale_after: float,
        heartbeat_interval: float | None = None,
    ) -> float:
        """Record a starting executor as alive for ``stale_after`` s, beating every
        ``heartbeat_interval`` s; returns the database's clock.

        With an interval, the executor is also a judge: its claims of runs whose owner's
        heartbeat expired succeed only while its own heartbeats have been on time (no gap
        over two intervals) for ``stale_after`` (see :meth:`CheckpointStore.claim`)."""
        ...

    async def heartbeat_executor(self, executor_id: str) -> float | None:
        """Extend the executor's life (a beat over two intervals late restarts its healthy
        period); the database's clock, or None if it is gone or stopped."""
        ...

    async def set_executor_state(self, executor_id: str, state: str) -> None:
        """``draining`` (still owns its runs) or ``stopped`` (deregistered)."""
        ...

    async def release_owned(self, owner: str) -> int:
        """Release every active run ``owner`` holds; returns how many."""
        ...

    async def list_executors(self, *, include_stopped: bool = False) -> list[ExecutorInfo]:
        """Registered executors, newest first."""
        ...

    async def database_time(self) -> float:
        """The database's clock, in seconds since the epoch."""
        ...
