"""Per-run checkpointers: throttle, trailing flush, finalize, fencing; and the factory."""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, cast

from . import codec, telemetry
from ._transcript import Transcript, TranscriptSnapshot
from ._validation import check_identity, check_json_mapping, check_messages, check_progress
from .codec import MessageCodec
from .config import DEFAULT_THROTTLE
from .errors import CheckpointError, CheckpointFencedError
from .protocols import AppendingStore, Checkpointer, CheckpointStore, Clock
from .types import (
    JSONValue,
    ResumeState,
    RunCheckpoint,
    RunCheckpointMeta,
    RunCheckpointState,
    RunInfo,
    utcnow,
)

logger = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]
"""Sleep for the given seconds of the clock's time."""


class _MonotonicClock:
    """A :class:`Clock` over a plain ``() -> float`` (``time.monotonic`` by default)."""

    __slots__ = ("_now", "_sleep")

    def __init__(self, now: Callable[[], float], sleep: Sleep) -> None:
        self._now = now
        self._sleep = sleep

    def __call__(self) -> float:
        return self._now()

    async def sleep(self, seconds: float) -> None:
        await self._sleep(seconds)


def _as_clock(clock: Clock | Callable[[], float] | None, sleep: Sleep | None) -> Clock:
    """The checkpointer's clock: a :class:`Clock` as given (``sleep`` overriding its own), or
    a plain callable (or ``time.monotonic``) with ``sleep`` or ``asyncio.sleep``."""
    if isinstance(clock, Clock) and sleep is None:
        return clock
    now = clock or time.monotonic
    return _MonotonicClock(
        now, sleep or (clock.sleep if isinstance(clock, Clock) else asyncio.sleep)
    )


MAX_RETRY_DELAY = 30.0
"""Longest wait, in seconds, between retries of a failed trailing flush."""


def _settle_outcome(outcome: asyncio.Future[None], task: asyncio.Task[None]) -> None:
    """Settle a write's outcome from its finished task (a failure or a cancellation; a
    success settles it from the task itself, a loop turn sooner)."""
    if outcome.done():
        return
    if task.cancelled():
        outcome.cancel()
    elif (exc := task.exception()) is not None:
        outcome.set_exception(exc)
    else:
        outcome.set_result(None)


class _State(enum.Enum):
    OPEN = "open"
    """Saves are taken."""
    CLOSED = "closed"
    """Finalizing or closed: saves are no-ops; a pending state may still be flushed."""
    DELETED = "deleted"
    """complete()/fail() deleted the checkpoint: nothing more is written."""
    RELEASED = "released"
    """A shutdown handed the run back for recovery: nothing more is written."""
    FENCED = "fenced"
    """A newer writer took the run over: saves and flushes raise CheckpointFencedError."""


_FINISHED = frozenset({_State.DELETED, _State.RELEASED})


def _retrieve(task: asyncio.Task[None]) -> None:
    """Done-callback: mark a shielded task's error as retrieved (its caller may have been
    cancelled and no longer awaits it; a later call retries and reports it)."""
    if not task.cancelled():
        task.exception()


class NoopCheckpointer:
    """A :class:`Checkpointer` whose every method is a successful no-op (no store)."""

    async def save(self, state: RunCheckpointState) -> None:
        return None

    async def complete(self) -> None:
        return None

    async def fail(self, error: BaseException | None = None) -> None:
        return None

    async def flush(self) -> None:
        return None

    async def aclose(self, *, release: bool = False) -> None:
        return None

    def __repr__(self) -> str:
        return "NoopCheckpointer()"


@dataclass(frozen=True, slots=True)
class _Snapshot:
    seq: int
    transcript: TranscriptSnapshot
    iteration: int
    completed_phases: tuple[str, ...]
    extra: Mapping[str, JSONValue] | None


class StoreCheckpointer:
    """The per-run :class:`Checkpointer` over a :class:`CheckpointStore`.

    Build it with :func:`new_checkpointer` or :class:`StoreCheckpointerFactory`.

    Throttle: at most one write per ``throttle`` seconds. A save inside the window is kept and
    written when the window ends (trailing flush), so the stored state is never more than
    ``throttle`` seconds behind the newest save while the store is up. The window advances
    only after a successful write: a failed write raises to the caller and the next save is
    not throttled. Writes are serialized by an ``asyncio.Lock`` and never reorder; saves that
    pile up behind a write are coalesced (one write of the newest state satisfies them all).
    A write that started is finished even if its caller is cancelled.

    A save that completes a phase (its ``completed_phases`` differ from the previous save's)
    is a phase boundary: it is written at once, whatever the throttle, so the store records
    the transcript, iteration and ``extra`` at that boundary exactly (what a resumed run gets).

    ``complete()``/``fail()`` delete the checkpoint after any in-flight write (with
    ``keep_failed``, ``fail()`` keeps it as ``failed`` with the error), cancel the trailing
    flush and turn later saves into no-ops. If a newer writer took the run over, the next
    write raises :class:`CheckpointFencedError` and this checkpointer stops writing.

    ``verify=True`` re-checks every message at every save for hosts that edit older messages
    in place (see ``_transcript``); by default the last messages of the previous save and
    every replaced message object are checked. With a ``message_codec``, ``save`` takes the
    host's message objects and dumps each new or re-checked one once (see
    :class:`~executus_ckpt.codec.MessageCodec`).
    """

    def __init__(
        self,
        store: CheckpointStore,
        meta: RunCheckpointMeta,
        *,
        throttle: float = DEFAULT_THROTTLE,
        clock: Clock | Callable[[], float] | None = None,
        sleep: Sleep | None = None,
        epoch: int | None = None,
        app_version: str | None = None,
        owner: str | None = None,
        keep_failed: bool = False,
        verify: bool = False,
        on_fenced: Callable[[str], None] | None = None,
        message_codec: MessageCodec[Any] | None = None,
    ) -> None:
        self._store = store
        self._keep_failed = keep_failed
        self._on_fenced = on_fenced
        self._appending = isinstance(store, AppendingStore)
        self._store_kind = telemetry.store_kind(store)
        self._default_path = "append" if self._appending else "upsert"
        self._meta = meta
        self._throttle = float(throttle)
        self._clock = _as_clock(clock, sleep)
        # None: not registered yet; the first write takes the run over (write_initial=False).
        self._epoch = epoch
        self._app_version = app_version
        self._owner = owner

        self._state = _State.OPEN
        self._fenced: CheckpointFencedError | None = None
        self._lock = asyncio.Lock()
        self._seq = 0
        self._latest: _Snapshot | None = None
        self._written_seq = 0
        self._transcript = Transcript(meta.run_id, verify=verify, message_codec=message_codec)
        if epoch is not None:
            # The row was registered (begin): a fresh run holds no transcript yet.
            self._transcript.mark_empty()
        self._validated_identity = False
        self._last_write: float | None = None
        self._timer: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._finalizer: asyncio.Task[None] | None = None

    @property
    def meta(self) -> RunCheckpointMeta:
        return self._meta

    @property
    def run_id(self) -> str:
        return self._meta.run_id

    @property
    def epoch(self) -> int | None:
        """The epoch this writer holds (``None`` until its first write takes the run over)."""
        return self._epoch

    @property
    def settled(self) -> bool:
        """True once this writer is done with the run's row: deleted (complete/fail),
        released by a shutdown, or fenced by a newer writer."""
        return self._state in _FINISHED or self._state is _State.FENCED

    @property
    def pending(self) -> bool:
        """True while a saved state is not yet written (throttled or in flight)."""
        return self._latest is not None and self._latest.seq > self._written_seq

    # -- Checkpointer --------------------------------------------------------------------

    async def save(self, state: RunCheckpointState) -> None:
        """Persist ``state``, now or at the end of the throttle window.

        The state is validated here, with the store's rules, even when its write is deferred
        by the throttle: a bad state is refused at once and the previous one stands.

        Raises:
            CheckpointError: the state cannot be stored (not a sequence of messages, a bad
                iteration or phase list, identity text the store refuses).
            CheckpointSerializationError: the new messages are not JSON-compatible.
            CheckpointFencedError: the run was taken over by a newer writer.
            StoreUnavailableError: the write failed; the next save is not throttled.
        """
        if self._fenced is not None:
            raise self._fenced
        if self._state is not _State.OPEN:
            return
        previous = self._latest
        snap = self._snapshot(state)
        self._latest = snap
        boundary = previous is None or previous.completed_phases != snap.completed_phases
        now = self._clock()
        if (
            self._throttle > 0
            and not boundary
            and (
                self._lock.locked()
                or (self._last_write is not None and now - self._last_write < self._throttle)
            )
        ):
            # Inside the window (or a write is under way and will open one): keep the newest
            # state for the trailing flush.
            self._arm_timer()
            return
        await self._write_inline(snap.seq)

    async def flush(self) -> None:
        """Write the pending throttled state now; a no-op when nothing is pending.

        Raises:
            CheckpointFencedError, StoreUnavailableError: as for :meth:`save`.
        """
        if self._fenced is not None:
            raise self._fenced
        if self._state in _FINISHED or self._latest is None or not self.pending:
            return
        await self._write_through(self._latest.seq)

    async def complete(self) -> None:
        """The run finished: delete its checkpoint (idempotent; later saves are no-ops)."""
        await self._finalize("completed", None)

    async def fail(self, error: BaseException | None = None) -> None:
        """The run failed terminally: delete its checkpoint (idempotent)."""
        await self._finalize("failed", error)

    async def aclose(self, *, release: bool = False) -> None:
        """Stop without finalizing: cancel the trailing flush, wait for in-flight writes.

        The stored checkpoint stays as last written (what a shutdown leaves for recovery).
        Call :meth:`flush` first to write a pending state. With ``release`` (what
        :func:`checkpointed_run` does on a shutdown) the run is handed back: owner cleared,
        epoch raised, and the next recovery claim is not counted as a failed attempt.
        """
        self._close()
        await self._cancel_timer()
        await self._writes_done()
        if release and self._state is _State.CLOSED and self._epoch is not None:
            async with self._lock:
                if self._state is _State.CLOSED:
                    with telemetry.operation(
                        "release", run_id=self.run_id, epoch=self._epoch
                    ) as op:
                        released = await self._store.release(self.run_id, epoch=self._epoch)
                        op.set(result="released" if released else "fenced")
                    self._state = _State.RELEASED
                    if not released:
                        telemetry.count_fenced("release")
                    op.log(
                        logger,
                        logging.INFO,
                        "run %s released for recovery",
                        self.run_id,
                        action="release_run",
                    )

    # -- internals -----------------------------------------------------------------------

    def _close(self) -> None:
        if self._state is _State.OPEN:
            self._state = _State.CLOSED

    def _snapshot(self, state: RunCheckpointState) -> _Snapshot:
        run_id = self.run_id
        if not self._validated_identity:
            check_identity(self._meta, self._app_version, self._owner)
            self._validated_identity = True
        check_progress(run_id, state.iteration, state.completed_phases)
        messages = check_messages(run_id, state.messages)
        check_json_mapping("extra", state.extra, run_id)
        transcript = self._transcript.snapshot(messages)
        phases = tuple(state.completed_phases)
        previous = self._latest
        if previous is not None and phases == previous.completed_phases:
            # the same tuple as last time: the store's validation of it is a memo hit
            phases = previous.completed_phases
        self._seq += 1
        return _Snapshot(self._seq, transcript, state.iteration, phases, state.extra)

    async def _write_inline(self, seq: int) -> None:
        """Make sure state ``seq`` (or a newer one) is written, in the caller's own task: a
        save's common path, with no task to start and no loop turn back to the caller (about
        25 µs a save on PostgreSQL, measured interleaved against the write task).

        A caller cancelled before the write finished hands it to a task this checkpointer
        owns, so that a cancelled save's state is still written, as by
        :meth:`_write_through` (``complete``/``aclose`` wait for that task). The store call it
        interrupted may or may not have been applied: the next write's guard tells (an
        append that finds the transcript moved on rewrites it whole).
        """
        try:
            await self._locked_write(seq)
        except asyncio.CancelledError:
            if self._state is _State.OPEN or self._state is _State.CLOSED:
                self._spawn_write(self._locked_write(seq))
            raise

    def _spawn_write(self, write: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``write`` as a task this checkpointer owns (``aclose``/``complete`` wait for
        it; its error is retrieved and the state stays pending)."""
        task = asyncio.get_running_loop().create_task(
            write, name=f"executus_ckpt.write:{self.run_id}"
        )
        self._writes.add(task)
        task.add_done_callback(self._write_done)
        return task

    async def _writes_done(self) -> None:
        """Wait until no write is in flight (write tasks, and saves writing in their own
        task, which hold the lock)."""
        while self._writes or self._lock.locked():
            if self._writes:
                await asyncio.wait(set(self._writes))
            else:
                async with self._lock:
                    pass

    async def _write_through(self, seq: int) -> None:
        """Make sure state ``seq`` (or a newer one) is written; finishes even if cancelled.

        The write is a task of its own; the caller waits on a future that a successful
        task settles in its last step (cancelling the caller cancels only that future). Like
        ``asyncio.shield``, minus the event-loop turn of shield's done-callback on the
        common path; a failed or cancelled write settles it from its done-callback.
        """
        outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = self._spawn_write(self._write_and_report(seq, outcome))
        task.add_done_callback(functools.partial(_settle_outcome, outcome))
        await outcome

    async def _write_and_report(self, seq: int, outcome: asyncio.Future[None]) -> None:
        await self._locked_write(seq)
        if not outcome.done():
            outcome.set_result(None)

    def _write_done(self, task: asyncio.Task[None]) -> None:
        self._writes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Retrieved here so a write whose caller was cancelled does not warn; the state
            # stays pending and is written by the next save, flush or trailing flush.
            logger.debug("write of run %s failed: %r", self.run_id, task.exception())

    async def _locked_write(self, seq: int) -> None:
        async with self._lock:
            latest = self._latest
            if self._written_seq >= seq or latest is None or self._state in _FINISHED:
                return
            if self._fenced is not None:
                raise self._fenced
            await self._store_write(latest)

    async def _store_write(self, snap: _Snapshot) -> None:
        started = self._clock()
        # None unless something listens (tracing, metrics, DEBUG logs): then the store
        # reports its path and sizes into it (telemetry.note_save) and it becomes one span,
        # the save metrics and one log line.
        record = telemetry.save_started(logger, self.run_id, self._store_kind, self._default_path)
        transcript = snap.transcript
        try:
            if self._epoch is None:
                # Register as begin() would (the initial row); the state itself follows.
                initial = RunCheckpoint(
                    meta=self._meta, app_version=self._app_version, owner=self._owner
                )
                self._epoch = await self._store.register(initial)
                self._transcript.mark_empty()
            checkpoint = self._checkpoint(snap, self._epoch)
            if not self._appending:
                await self._store.save(checkpoint)
            else:
                # Appends never create the run: a writer whose run was finished or taken
                # over elsewhere is fenced instead of resurrecting it.
                # checked once in __init__ (a runtime Protocol isinstance costs ~25 µs)
                store = cast(AppendingStore, self._store)
                delta = self._transcript.delta(transcript)
                stored = delta.stored if delta is not None else 0
                own = delta is not None and delta.stored == transcript.changed_from
                await store.append(
                    checkpoint,
                    base_count=stored,
                    encoded_tail=transcript.encoded if own else None,
                    replace_from=0 if delta is None else delta.changed_from,
                )
        except CheckpointFencedError as exc:
            self._fenced = exc
            self._state = _State.FENCED
            if self._on_fenced is not None:
                self._on_fenced(self.run_id)
            if record is not None:
                record.finish(self._epoch, snap.iteration, exc)
            telemetry.count_fenced("save")
            telemetry.log(
                logger,
                logging.WARNING,
                "run %s was taken over by a newer writer; this checkpointer stops writing",
                self.run_id,
                action="fenced",
                run_id=self.run_id,
                epoch=self._epoch,
                operation="save",
            )
            raise
        except BaseException as exc:
            if record is not None:
                record.finish(self._epoch, snap.iteration, exc)
            raise
        if record is not None:
            record.finish(self._epoch, snap.iteration, None)
        self._written_seq = max(self._written_seq, snap.seq)
        self._transcript.written(transcript)
        if self._last_write is None or started > self._last_write:
            self._last_write = started

    def _checkpoint(self, snap: _Snapshot, epoch: int) -> RunCheckpoint:
        now = utcnow()
        return RunCheckpoint(
            meta=self._meta,
            messages=snap.transcript.messages,
            iteration=snap.iteration,
            completed_phases=snap.completed_phases,
            extra=snap.extra,
            created_at=now,  # a new row's; an existing run keeps its own
            updated_at=now,
            app_version=self._app_version,
            owner=self._owner,
            epoch=epoch,
        )

    def _arm_timer(self) -> None:
        if self._timer is None or self._timer.done():
            self._timer = asyncio.get_running_loop().create_task(
                self._trailing_flush(), name=f"executus_ckpt.trailing_flush:{self.run_id}"
            )

    async def _trailing_flush(self) -> None:
        """Owned by this checkpointer: write the newest throttled state when the window ends.

        A failed write is retried with a backoff that doubles from ``throttle`` (at least
        0.1 s) up to :data:`MAX_RETRY_DELAY` seconds, until the state is written, the run is
        finalized or closed, or it is fenced.
        """
        failures = 0
        while self._state is _State.OPEN and self._latest is not None and self.pending:
            if self._writes or self._lock.locked():
                # A write is under way: the window opens when it started, which is known
                # (and only counts) once it succeeded. At most one write per window.
                await self._writes_done()
                continue
            last = self._last_write if self._last_write is not None else -math.inf
            delay = last + self._throttle - self._clock()
            if delay > 0:
                await self._clock.sleep(delay)
                continue
            try:
                # Shielded: cancelling the timer (complete/aclose) never interrupts a write.
                await self._write_through(self._latest.seq)
                failures = 0
            except CheckpointFencedError:
                return
            except CheckpointError as exc:
                backoff = min(MAX_RETRY_DELAY, max(self._throttle, 0.1) * 2**failures)
                failures += 1
                telemetry.log(
                    logger,
                    logging.WARNING,
                    "trailing flush of run %s failed, retrying in %.1fs: %s",
                    self.run_id,
                    backoff,
                    exc,
                    action="trailing_flush_failed",
                    run_id=self.run_id,
                    error=type(exc).__name__,
                )
                await self._clock.sleep(backoff)

    async def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is None or timer.done():
            return
        current = asyncio.current_task()
        # A run being cancelled finalizes while its own cancellation is pending: note the
        # count, so that only a *new* cancellation of ours is re-raised, not the timer's.
        before = current.cancelling() if current is not None else 0
        timer.cancel()
        try:
            await timer
        except asyncio.CancelledError:
            if current is not None and current.cancelling() > before:
                raise

    async def _finalize(self, outcome: str, error: BaseException | None) -> None:
        """Delete (or keep as failed) the checkpoint. The work runs as a task this
        checkpointer owns and is shielded like a write: a cancellation that lands while it
        waits for an in-flight write or for the database does not abandon it (a finished
        run must not be recovered). A repeated call joins the same task."""
        self._close()
        await self._cancel_timer()
        if self._finalizer is None:
            self._finalizer = asyncio.get_running_loop().create_task(
                self._finalize_locked(outcome, error),
                name=f"executus_ckpt.finalize:{self.run_id}",
            )
            self._finalizer.add_done_callback(_retrieve)
        await asyncio.shield(self._finalizer)

    async def _finalize_locked(self, outcome: str, error: BaseException | None) -> None:
        op = telemetry.operation(
            "complete" if outcome == "completed" else "fail",
            run_id=self.run_id,
            epoch=self._epoch,
            error=type(error).__name__ if error is not None else None,
        )
        if outcome == "failed":
            op.fail(error, f"run failed: {op.fields['error'] or 'no error given'}")
        try:
            with op:
                async with self._lock:  # after any in-flight write
                    if self._state in _FINISHED:
                        op.set(result="skipped")
                        return
                    if self._state is _State.FENCED:
                        # the run is another writer's now: leave its checkpoint alone
                        op.set(result="fenced")
                        return
                    kept = outcome == "failed" and self._keep_failed
                    if kept:
                        text = "none given" if error is None else f"{type(error).__name__}: {error}"
                        done = await self._store.mark_failed(
                            self.run_id, error=text, epoch=self._epoch
                        )
                    else:
                        done = await self._store.delete(self.run_id, epoch=self._epoch)
                    self._state = _State.DELETED
                    op.set(epoch=self._epoch)
                    if not done and self._epoch is not None:
                        op.set(result="fenced")
                        telemetry.count_fenced("complete" if outcome == "completed" else "fail")
                        op.log(
                            logger,
                            logging.WARNING,
                            "run %s %s, but its checkpoint is gone or was taken over by another "
                            "owner (this writer's epoch %d): nothing changed",
                            self.run_id,
                            outcome,
                            self._epoch,
                            action="finalize_fenced",
                        )
                        return
                    op.set(result="kept_failed" if kept else "deleted")
        except BaseException:
            self._finalizer = None  # a later complete()/fail() tries again
            raise
        op.log(
            logger,
            logging.INFO,
            "run %s %s: checkpoint %s",
            self.run_id,
            outcome,
            "kept as failed" if kept else "deleted",
            action=f"run_{outcome}",
        )

    def __repr__(self) -> str:
        return f"StoreCheckpointer(run_id={self.run_id!r}, throttle={self._throttle})"


def new_checkpointer(
    store: CheckpointStore | None,
    meta: RunCheckpointMeta,
    *,
    throttle: float = DEFAULT_THROTTLE,
    clock: Clock | None = None,
    sleep: Sleep | None = None,
    epoch: int | None = None,
    app_version: str | None = None,
    owner: str | None = None,
    keep_failed: bool = False,
    verify: bool = False,
    message_codec: MessageCodec[Any] | None = None,
) -> Checkpointer:
    """A per-run checkpointer over ``store``; ``store=None`` gives a :class:`NoopCheckpointer`.

    Args:
        store: where checkpoints go.
        meta: the run's identity.
        throttle: seconds between persisted saves; ``<= 0`` persists every save.
        clock: monotonic seconds (tests inject one). If it has an async ``sleep(seconds)``
            method (like :class:`executus_ckpt.testing.ManualClock`), the trailing flush waits
            on it.
        sleep: an explicit sleep for the trailing flush, overriding ``clock.sleep``.
        epoch: the fencing epoch this writer holds (from ``store.register``); ``None``
            (default) registers the run, or takes it over, at the first write. Writes never
            create a run after that: a run deleted or taken over elsewhere raises
            :class:`CheckpointFencedError`.
        app_version: stored on every checkpoint (see ``recover_interrupted(accept=...)``).
        owner: the executor id stored on every checkpoint.
        keep_failed: ``fail()`` keeps the checkpoint as ``failed`` with the error instead of
            deleting it (never resumed; the CLI lists, requeues and purges it).
        verify: re-check every message at every save (for hosts that edit older messages in
            place; one encoding of the whole transcript per save).
        message_codec: lets ``save`` take a framework's message objects (see
            :class:`~executus_ckpt.codec.MessageCodec`).
    """
    if store is None:
        return NoopCheckpointer()
    return StoreCheckpointer(
        store,
        meta,
        throttle=throttle,
        clock=clock,
        sleep=sleep,
        epoch=epoch,
        app_version=app_version,
        owner=owner,
        keep_failed=keep_failed,
        verify=verify,
        message_codec=message_codec,
    )


class StoreCheckpointerFactory:
    """A :class:`CheckpointerFactory` minting a :class:`StoreCheckpointer` per run.

    ``begin(info)`` derives the meta from ``info`` and, by default, writes the initial row
    (iteration 0, the prompt) so that a run that dies before its first save is still recovered.
    On a ``run_id`` that already has a row (a recovered run) it takes the row over: the epoch
    rises (fencing any older writer), the stored transcript and recovery-attempt count are kept.

    Args:
        store: where checkpoints go; ``None`` makes every run non-durable (no-op).
        throttle: seconds between persisted saves of a run.
        executor_id: this service instance's id, stored as each checkpoint's owner.
        app_version: the host's release (or a digest of its phase graph), stored on every
            checkpoint so recovery can refuse runs from an incompatible deploy.
        write_initial: write the initial row in ``begin``; when False, the first save does.
        keep_failed: ``fail()`` keeps a run's checkpoint as ``failed`` with the error (see
            :func:`new_checkpointer`).
        verify: re-check every message at every save (see :func:`new_checkpointer`).
        message_codec: lets ``save`` take a framework's message objects and
            :meth:`resume_state` give them back (see :class:`~executus_ckpt.codec.MessageCodec`).

    ``begin`` stores the JSON-compatible entries of ``info.inputs`` (given back by
    ``checkpoint.run_info()``); other entries are left out with one WARNING naming their keys.
    """

    def __init__(
        self,
        store: CheckpointStore | None,
        *,
        throttle: float = DEFAULT_THROTTLE,
        executor_id: str | None = None,
        app_version: str | None = None,
        write_initial: bool = True,
        clock: Clock | Callable[[], float] | None = None,
        sleep: Sleep | None = None,
        keep_failed: bool = False,
        verify: bool = False,
        on_fenced: Callable[[str], None] | None = None,
        message_codec: MessageCodec[Any] | None = None,
    ) -> None:
        self._store = store
        self._keep_failed = keep_failed
        self._verify = verify
        self._message_codec = message_codec
        self._on_fenced = on_fenced
        self._throttle = throttle
        self._executor_id = executor_id
        self._app_version = app_version
        self._write_initial = write_initial
        self._clock = clock
        self._sleep = sleep

    @property
    def store(self) -> CheckpointStore | None:
        return self._store

    @property
    def message_codec(self) -> MessageCodec[Any] | None:
        """The codec ``save`` and :meth:`resume_state` use, if any."""
        return self._message_codec

    def resume_state(self, checkpoint: RunCheckpoint) -> ResumeState:
        """``checkpoint.resume_state()`` with messages loaded by this factory's codec.

        Raises:
            CheckpointSerializationError: the codec could not load a stored message.
        """
        return checkpoint.resume_state(codec=self._message_codec)

    async def _register(self, initial: RunCheckpoint) -> int:
        """Write the initial row (or take it over); an executor's factory makes the take-over
        of a run it claimed conditional on the claim."""
        assert self._store is not None
        return await self._store.register(initial)

    async def begin(self, info: RunInfo) -> Checkpointer:
        """Start checkpointing a run.

        Raises:
            StoreUnavailableError: the initial row could not be written.
            CheckpointError: the run's info is invalid (e.g. an over-long id).
        """
        if self._store is None:
            return NoopCheckpointer()
        meta = RunCheckpointMeta.from_run_info(info, _storable_inputs(info))
        epoch: int | None = None
        if self._write_initial:
            initial = RunCheckpoint(
                meta=meta, app_version=self._app_version, owner=self._executor_id
            )
            with telemetry.operation(
                "begin",
                run_id=meta.run_id,
                agent_id=meta.agent_id,
                executor_id=self._executor_id,
                epoch=None,
            ) as op:
                try:
                    epoch = await self._register(initial)
                except CheckpointFencedError:
                    telemetry.count_fenced("begin")
                    raise
                op.set(epoch=epoch)
            op.log(
                logger,
                logging.INFO,
                "run %s began (epoch %d)",
                meta.run_id,
                epoch,
                action="run_began",
            )
        return StoreCheckpointer(
            self._store,
            meta,
            throttle=self._throttle,
            clock=self._clock,
            sleep=self._sleep,
            epoch=epoch,
            app_version=self._app_version,
            owner=self._executor_id,
            keep_failed=self._keep_failed,
            verify=self._verify,
            on_fenced=self._on_fenced,
            message_codec=self._message_codec,
        )


def _storable_inputs(info: RunInfo) -> dict[str, JSONValue]:
    """The JSON-compatible entries of ``info.inputs``; the others are left out, with one
    WARNING naming their keys (never their values: inputs may hold user data)."""
    kept: dict[str, JSONValue] = {}
    left_out: list[str] = []
    for key, value in info.inputs.items():
        if not isinstance(key, str):
            left_out.append(repr(key))
            continue
        try:
            codec.encode(value, run_id=info.run_id)
        except CheckpointError:
            left_out.append(key)
            continue
        kept[key] = value  # type: ignore[assignment]
    if left_out:
        logger.warning(
            "run %s: inputs %s are not JSON-compatible and are not stored; run_info() of a "
            "recovered run will lack them",
            info.run_id,
            ", ".join(left_out),
            extra={"action": "inputs_left_out", "run_id": info.run_id, "keys": left_out},
        )
    return kept
