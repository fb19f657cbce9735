"""Executor: one running service instance among many replicas on one database.

An executor registers a fresh id (new on every start; ``name`` is only a label), heartbeats
once per ``heartbeat_interval`` for the whole process, owns the runs begun through its
factory and the runs its recovery loop claims, and on ``drain`` hands them all back so that a
peer claims them at its next sweep. Liveness is judged only by the database's clock.

The heartbeat of a SQL store runs on its own thread, event loop and database connection, so
that neither a busy event loop nor an exhausted pool can starve it (the run traffic never
waits for it either).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from . import telemetry
from .checkpointer import Sleep, StoreCheckpointer, StoreCheckpointerFactory
from .codec import MessageCodec
from .config import (
    DEFAULT_DRAIN_GRACE,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_RECOVERY_CONCURRENCY,
    DEFAULT_STALE_AFTER,
    DEFAULT_SWEEP_INTERVAL,
    DEFAULT_THROTTLE,
    MAX_CLOCK_SKEW,
)
from .errors import CheckpointError, CheckpointFencedError, ShutdownError
from .protocols import Checkpointer, Clock, ExecutorStore
from .recovery import Accept, Dispatch, recover_interrupted
from .types import CheckpointSummary, ExecutorStats, RunCheckpoint, RunInfo

logger = logging.getLogger(__name__)


class _Heartbeat:
    """Beats every ``interval`` s until stopped; remembers how healthy it has been.

    On a :class:`SQLCheckpointStore` it runs in a thread with its own event loop and its own
    store (one connection, no pool shared with the runs); on another store (the in-memory one)
    it is a task of the caller's loop.
    """

    def __init__(
        self,
        store: ExecutorStore,
        executor_id: str,
        interval: float,
        make_store: Callable[[], Any] | None,
    ) -> None:
        self._store = store
        self._id = executor_id
        self._interval = interval
        self._make_store = make_store
        self.failures = 0
        self.beats = 0
        self.lost = False
        self.skew: float | None = None
        self.last_ok: float | None = time.monotonic()
        self.healthy_since: float | None = time.monotonic()
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None
        self._thread_stop: asyncio.Event | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        if self._make_store is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(self._store, asyncio.Event()), name=f"executus_ckpt.heartbeat:{self._id}"
            )
            return
        self._thread = threading.Thread(
            target=self._thread_main, name=f"executus_ckpt.heartbeat:{self._id}", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._thread is not None:
            loop, stop = self._thread_loop, self._thread_stop
            if loop is not None and stop is not None and not loop.is_closed():
                with contextlib.suppress(RuntimeError):  # its loop closed meanwhile
                    loop.call_soon_threadsafe(stop.set)
            await asyncio.to_thread(self._thread.join)

    def healthy_for(self) -> float:
        """Seconds the heartbeats have been succeeding on time (0 if failing or late).

        A beat that is late (the process stalled, or the database answered slowly) counts like
        a failure: peers' heartbeats may have been late for the same reason, so their
        expiry says nothing until ours have been on time for ``stale_after`` again.
        """
        now = time.monotonic()
        if self.healthy_since is None or self.last_ok is None:
            return 0.0
        if now - self.last_ok > 2 * self._interval:
            return 0.0
        return now - self.healthy_since

    def age(self) -> float | None:
        return None if self.last_ok is None else time.monotonic() - self.last_ok

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._thread_run())
        except Exception:  # the thread must not die silently: say so; peers will rescue
            self.healthy_since = None
            logger.exception(
                "the heartbeat of executor %s stopped on an error",
                self._id,
                extra={"action": "heartbeat_crashed", "executor_id": self._id},
            )

    async def _thread_run(self) -> None:
        assert self._make_store is not None
        self._thread_loop = asyncio.get_running_loop()
        self._thread_stop = asyncio.Event()
        if self._stopping.is_set():
            return
        store = self._make_store()
        try:
            await self._run(store, self._thread_stop)
        finally:
            await store.aclose()

    async def _run(self, store: ExecutorStore, stop: asyncio.Event) -> None:
        while not stop.is_set() and not self._stopping.is_set():
            started = time.monotonic()
            try:
                async with asyncio.timeout(max(self._interval, 1.0)):
                    db_now = await store.heartbeat_executor(self._id)
            except (CheckpointError, TimeoutError) as exc:
                self.failures += 1
                self.healthy_since = None
                logger.warning(
                    "heartbeat of executor %s failed: %s",
                    self._id,
                    exc,
                    extra={"action": "heartbeat_failed", "executor_id": self._id},
                )
            else:
                self.beats += 1
                if db_now is None:
                    if not self.lost:
                        logger.error(
                            "executor %s is no longer registered (stopped or pruned): its runs "
                            "may be taken over; their writes will be fenced",
                            self._id,
                            extra={"action": "executor_lost", "executor_id": self._id},
                        )
                    self.lost = True
                else:
                    now = time.monotonic()
                    late = self.last_ok is not None and now - self.last_ok > 2 * self._interval
                    if self.healthy_since is None or late:
                        self.healthy_since = now
                    self.last_ok = now
                    self.skew = time.time() - db_now
            delay = self._interval - (time.monotonic() - started)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, delay)):
                    await stop.wait()


class _ExecutorFactory(StoreCheckpointerFactory):
    """The executor's factory: runs begun through it are owned by the executor, and the task
    that began each one is cancelled (then its run released) by a drain."""

    def __init__(self, executor: Executor, **options: Any) -> None:
        super().__init__(executor.store, **options)
        self._executor = executor
        self._claimed: int | None = None

    async def _register(self, initial: RunCheckpoint) -> int:
        # A run this executor claimed is taken over only if still at the claimed epoch: if it
        # finished or was rescued meanwhile, begin() raises CheckpointFencedError instead of
        # recreating a finished run.
        claimed, self._claimed = self._claimed, None
        return await self._executor.store.register(initial, expect_epoch=claimed)

    async def begin(self, info: RunInfo) -> Checkpointer:
        if self._executor.state != "running":
            raise ShutdownError(f"executor {self._executor.id} is {self._executor.state}")
        self._claimed = self._executor._claimed.pop(info.run_id, None)
        checkpointer = await super().begin(info)
        task = asyncio.current_task()
        if task is not None:
            self._executor._track(info.run_id, task, checkpointer)
        return checkpointer


class Executor:
    """One service instance among replicas sharing a database (``async with``).

    Entering registers a fresh :attr:`id` and starts the heartbeat; leaving drains with
    ``grace=0`` (see :meth:`drain`). Runs begun through :meth:`factory` are owned by this
    executor; :meth:`recover` starts the loop that claims interrupted runs (those no live
    executor owns) every ``sweep_interval``.

    Worst-case time for a peer to take the runs of a replica that died: ``stale_after +
    sweep_interval`` (plus one claim); of a replica that drained: one ``sweep_interval``.

    Args:
        store: a store with executor support (:class:`SQLCheckpointStore`,
            :class:`InMemoryCheckpointStore` for one process).
        name: a label for operators (the host name or pod name); may repeat across restarts.
        app_version: recorded on the executor and on every checkpoint it writes.
        heartbeat_interval: seconds between heartbeats (one per process).
        stale_after: seconds without a heartbeat (by the database's clock) after which this
            executor's runs are taken by peers. Keep it several heartbeats long.
        sweep_interval: seconds between recovery sweeps.

    Raises:
        ValueError: a non-positive interval, or ``stale_after <= heartbeat_interval``.
    """

    def __init__(
        self,
        store: ExecutorStore,
        *,
        name: str | None = None,
        app_version: str | None = None,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        stale_after: float = DEFAULT_STALE_AFTER,
        sweep_interval: float = DEFAULT_SWEEP_INTERVAL,
    ) -> None:
        if not (heartbeat_interval > 0 and sweep_interval > 0 and stale_after > 0):
            raise ValueError("heartbeat_interval, stale_after and sweep_interval must be > 0")
        if stale_after <= heartbeat_interval:
            raise ValueError(
                f"stale_after ({stale_after} s) must be longer than heartbeat_interval "
                f"({heartbeat_interval} s), or a live executor looks dead between beats"
            )
        self.store = store
        self.id = uuid.uuid4().hex
        self.name = name
        self.app_version = app_version
        self.heartbeat_interval = float(heartbeat_interval)
        self.stale_after = float(stale_after)
        self.sweep_interval = float(sweep_interval)
        self.state = "new"
        self._heartbeat: _Heartbeat | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._begun: dict[str, asyncio.Task[Any]] = {}
        self._claimed: dict[str, int] = {}  # run id -> epoch of this executor's claim
        # Recovered runs: the writer their dispatch began; the runs it left unfinished
        # (run id -> epoch), handed back by the next sweep.
        self._writers: dict[str, Checkpointer] = {}
        self._orphans: dict[str, int] = {}
        self._recovered: set[asyncio.Task[None]] = set()
        self._drain_task: asyncio.Task[None] | None = None
        self._claims = 0
        self._rescues = 0
        self._releases = 0
        self._fenced = 0
        self._live_executors = 0

    def __repr__(self) -> str:
        return f"Executor(id={self.id!r}, name={self.name!r}, state={self.state!r})"

    # -- lifetime --------------------------------------------------------------------------

    async def __aenter__(self) -> Executor:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.drain(grace=0.0)

    async def start(self) -> None:
        """Register and start heartbeating (what entering the ``async with`` does)."""
        if self.state != "new":
            raise RuntimeError(f"executor {self.id} was already started")
        db_now = await self.store.register_executor(
            self.id,
            name=self.name,
            host=socket.gethostname(),
            pid=os.getpid(),
            app_version=self.app_version,
            stale_after=self.stale_after,
            heartbeat_interval=self.heartbeat_interval,
        )
        self.state = "running"
        self._heartbeat = _Heartbeat(
            self.store, self.id, self.heartbeat_interval, _heartbeat_store_maker(self.store)
        )
        self._heartbeat.skew = time.time() - db_now
        self._heartbeat.start()
        telemetry.watch_executor(self.id, self.name, self._heartbeat.age)
        self._warn_on_skew(self._heartbeat.skew)
        telemetry.log(
            logger,
            logging.INFO,
            "executor %s (%s) started",
            self.id,
            self.name or "unnamed",
            action="executor_started",
            executor_id=self.id,
            executor_name=self.name,
        )

    def factory(
        self,
        *,
        throttle: float = DEFAULT_THROTTLE,
        keep_failed: bool = False,
        verify: bool = False,
        clock: Clock | Callable[[], float] | None = None,
        sleep: Sleep | None = None,
        message_codec: MessageCodec[Any] | None = None,
    ) -> StoreCheckpointerFactory:
        """A factory whose runs this executor owns (``owner`` = :attr:`id`): a drain cancels
        the task that began each of them and releases the run. Options as for
        :class:`StoreCheckpointerFactory`."""
        return _ExecutorFactory(
            self,
            throttle=throttle,
            executor_id=self.id,
            app_version=self.app_version,
            keep_failed=keep_failed,
            verify=verify,
            clock=clock,
            sleep=sleep,
            on_fenced=self._count_fenced,
            message_codec=message_codec,
        )

    def recover(
        self,
        dispatch: Dispatch,
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        concurrency: int = DEFAULT_RECOVERY_CONCURRENCY,
        accept: Accept | None = None,
    ) -> None:
        """Start the recovery loop and return at once (boot never waits for recovered runs).

        At once and every ``sweep_interval`` the loop claims interrupted runs (each by exactly
        one replica) and dispatches them as tasks this executor owns, with the dead-letter,
        quarantine and crash-loop rules of :func:`recover_interrupted`. ``dispatch`` should
        run the run to its end (typically ``checkpointed_run(executor.factory(), ...)``).
        A dispatch that ends leaving its run active here (it raised outside
        ``checkpointed_run``, never began the run, or its ``fail()`` could not reach the
        database) has the run handed back at the next sweep, as a failed attempt: retried,
        and dead after ``max_attempts`` without progress, never stranded under a live owner.
        Runs of a peer whose heartbeat expired are taken only once this executor's own
        heartbeats have succeeded for ``stale_after`` (after a database outage every peer
        looks stale until it beats again).
        """
        if self.state != "running":
            raise RuntimeError(f"executor {self.id} is {self.state}: recover() needs it running")
        if self._sweeper is not None:
            raise RuntimeError("recover() was already called on this executor")
        if max_attempts < 1 or concurrency < 1:
            raise ValueError("max_attempts and concurrency must be >= 1")
        self._sweeper = asyncio.get_running_loop().create_task(
            self._sweep_loop(dispatch, max_attempts, concurrency, accept),
            name=f"executus_ckpt.recovery:{self.id}",
        )

    async def drain(self, grace: float = DEFAULT_DRAIN_GRACE) -> None:
        """Leave gracefully (call it on SIGTERM): stop claiming; wait up to ``grace`` seconds
        for owned runs to end; cancel the rest (their pending state is flushed and kept);
        release every run still owned so that a peer claims it at its next sweep; deregister.

        Idempotent; concurrent calls share one drain. A release is not a failed attempt.
        """
        if self.state in ("new", "stopped") and self._drain_task is None:
            self.state = "stopped"
            return
        if self._drain_task is None:
            # The caller is not cancelled (e.g. the task leaving the ``async with`` block after
            # beginning runs itself); its runs are released all the same.
            self._drain_task = asyncio.get_running_loop().create_task(
                self._drain(max(0.0, grace), asyncio.current_task()),
                name=f"executus_ckpt.drain:{self.id}",
            )
        await asyncio.shield(self._drain_task)

    def stats(self) -> ExecutorStats:
        """Counters and health of this executor (no I/O; the live-executor count is from the
        last sweep)."""
        hb = self._heartbeat
        return ExecutorStats(
            id=self.id,
            name=self.name,
            state=self.state,
            live_executors=self._live_executors,
            runs_owned=sum(1 for t in self._begun.values() if not t.done())
            + sum(1 for t in self._recovered if not t.done()),
            claims=self._claims,
            rescues=self._rescues,
            releases=self._releases,
            fenced_writes=self._fenced,
            heartbeat_age=None if hb is None else hb.age(),
            heartbeat_failures=0 if hb is None else hb.failures,
            clock_skew=None if hb is None else hb.skew,
        )

    # -- internals -------------------------------------------------------------------------

    def _track(self, run_id: str, task: asyncio.Task[Any], checkpointer: Checkpointer) -> None:
        self._begun[run_id] = task
        self._writers[run_id] = checkpointer
        task.add_done_callback(lambda t, r=run_id: self._forget(r, t))  # type: ignore[misc]

    def _forget(self, run_id: str, task: asyncio.Task[Any]) -> None:
        if self._begun.get(run_id) is task:
            del self._begun[run_id]
            self._writers.pop(run_id, None)

    def _note_unfinished(self, checkpoint: RunCheckpoint) -> None:
        """After a recovered run's dispatch ended: if it left the run active under this
        executor (it never began it, or its writer neither finished, released nor was
        fenced), remember it for the next sweep to hand back. A run owned by a live executor
        is never interrupted: without this it would wait for this executor to stop."""
        run_id = checkpoint.run_id
        writer = self._writers.pop(run_id, None)
        claimed = self._claimed.pop(run_id, None)
        if self.state != "running":
            return  # a drain releases every run this executor still owns
        if writer is None:
            epoch = claimed  # dispatched, never begun
        elif isinstance(writer, StoreCheckpointer) and not writer.settled:
            epoch = writer.epoch
        else:
            epoch = None
        if epoch is not None:
            self._orphans[run_id] = epoch

    async def _hand_back_unfinished(self) -> None:
        """Hand back (without progress: a failed attempt) the runs recovered dispatches left
        unfinished; kept for the next sweep while the store is unavailable."""
        for run_id, epoch in list(self._orphans.items()):
            try:
                handed = await self.store.release(run_id, epoch=epoch, progress=False)
            except CheckpointError:
                return
            del self._orphans[run_id]
            if handed:
                telemetry.log(
                    logger,
                    logging.WARNING,
                    "run %s was left unfinished by its dispatch; handed back for recovery",
                    run_id,
                    action="hand_back_run",
                    run_id=run_id,
                    executor_id=self.id,
                )

    def _count_fenced(self, run_id: str) -> None:
        self._fenced += 1

    def _count_claim(self, summary: CheckpointSummary, claimed: RunCheckpoint) -> None:
        self._claims += 1
        if summary.owner is not None:
            self._rescues += 1
            telemetry.log(
                logger,
                logging.INFO,
                "executor %s rescued run %s from owner %s",
                self.id,
                summary.run_id,
                summary.owner,
                action="rescue_run",
                run_id=summary.run_id,
                executor_id=self.id,
                previous_owner=summary.owner,
            )

    def _warn_on_skew(self, skew: float | None) -> None:
        if skew is not None and abs(skew) > MAX_CLOCK_SKEW:
            logger.warning(
                "the host clock differs from the database clock by %.1f s: liveness is judged "
                "by the database clock only, but logs and times shown here will disagree",
                skew,
                extra={"action": "clock_skew", "executor_id": self.id, "skew": skew},
            )

    async def _sweep_loop(
        self, dispatch: Dispatch, max_attempts: int, concurrency: int, accept: Accept | None
    ) -> None:
        assert self._heartbeat is not None
        warned_skew = False
        while self.state == "running":
            trusted = self._heartbeat.healthy_for() >= self.stale_after
            try:
                if self._orphans:
                    await self._hand_back_unfinished()
                executors = await self.store.list_executors()
                self._live_executors = sum(1 for e in executors if e.alive)
                await recover_interrupted(
                    self.store,
                    self._dispatcher(dispatch),
                    max_attempts=max_attempts,
                    concurrency=concurrency,
                    accept=accept,
                    owner=self.id,
                    stale_owners=trusted,
                    on_claim=self._count_claim,
                    exclude_owner=self.id,
                    batch_claims=True,
                )
            except CheckpointError as exc:
                logger.warning(
                    "recovery sweep of executor %s failed: %s",
                    self.id,
                    exc,
                    extra={"action": "sweep_failed", "executor_id": self.id},
                )
            if not warned_skew and self._heartbeat.skew is not None:
                self._warn_on_skew(self._heartbeat.skew)
                warned_skew = abs(self._heartbeat.skew) > MAX_CLOCK_SKEW
            await asyncio.sleep(self.sweep_interval)

    def _dispatcher(self, dispatch: Dispatch) -> Callable[[RunCheckpoint], Awaitable[None]]:
        """Non-suspects become owned tasks (the sweep goes on); a suspect (claimed before and
        no progress since: attempts >= 2) runs alone, after this executor's other recovered
        runs, and is awaited."""

        async def launch(checkpoint: RunCheckpoint) -> None:
            self._claimed[checkpoint.run_id] = checkpoint.epoch
            if checkpoint.attempts >= 2:
                others = {t for t in self._recovered if not t.done()}
                if others:
                    await asyncio.wait(others)
                await self._dispatch_one(dispatch, checkpoint)
                return
            task = asyncio.get_running_loop().create_task(
                self._run_recovered(dispatch, checkpoint),
                name=f"executus_ckpt.recovered:{checkpoint.run_id}",
            )
            self._recovered.add(task)
            task.add_done_callback(self._recovered.discard)

        return launch

    async def _dispatch_one(self, dispatch: Dispatch, checkpoint: RunCheckpoint) -> None:
        try:
            await dispatch(checkpoint)
        finally:
            self._note_unfinished(checkpoint)

    async def _run_recovered(self, dispatch: Dispatch, checkpoint: RunCheckpoint) -> None:
        try:
            await self._dispatch_one(dispatch, checkpoint)
        except asyncio.CancelledError:
            raise
        except CheckpointFencedError:
            logger.info(
                "recovered run %s finished or was taken elsewhere before it began here",
                checkpoint.run_id,
                extra={"action": "claim_superseded", "run_id": checkpoint.run_id},
            )
        except Exception as exc:
            logger.warning(
                "recovered run %s failed in dispatch (%s: %s)",
                checkpoint.run_id,
                type(exc).__name__,
                exc,
                extra={"action": "dispatch_failed", "run_id": checkpoint.run_id},
                exc_info=exc,
            )
            # Only for a run this executor still holds (handed back at the next sweep): a
            # run finished, kept as failed or taken over since keeps its own last error.
            epoch = self._orphans.get(checkpoint.run_id)
            if epoch is not None:
                with contextlib.suppress(CheckpointError):
                    await self.store.record_error(
                        checkpoint.run_id, f"{type(exc).__name__}: {exc}", epoch=epoch
                    )

    async def _drain(self, grace: float, caller: asyncio.Task[Any] | None) -> None:
        op = telemetry.operation(
            "drain",
            executor_id=self.id,
            executor_name=self.name,
            grace=grace,
            runs_cancelled=None,
            runs_released=None,
        )
        with op:
            await self._drain_traced(op, grace, caller)

    async def _drain_traced(
        self, op: telemetry.Operation, grace: float, caller: asyncio.Task[Any] | None
    ) -> None:
        self.state = "draining"
        op.log(
            logger,
            logging.INFO,
            "executor %s draining (grace %.1f s)",
            self.id,
            grace,
            action="drain",
        )
        with contextlib.suppress(CheckpointError):
            await self.store.set_executor_state(self.id, "draining")
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        tasks = [*self._begun.values(), *self._recovered]
        owned = {t for t in tasks if not t.done() and t is not caller}
        if owned and grace > 0:
            _, pending = await asyncio.wait(owned, timeout=grace)
        else:
            pending = owned
        for task in pending:
            task.cancel()
        if pending:
            # Each run's checkpointed_run flushes (bounded by its flush_timeout) and releases.
            await asyncio.wait(pending)
        released = 0
        try:
            released = await self.store.release_owned(self.id)
        except CheckpointError as exc:
            logger.warning(
                "executor %s could not release its runs (%s): peers take them after "
                "stale_after instead",
                self.id,
                exc,
                extra={"action": "release_failed", "executor_id": self.id},
            )
        self._releases += released + len(pending)
        with contextlib.suppress(CheckpointError):
            await self.store.set_executor_state(self.id, "stopped")
        if self._heartbeat is not None:
            await self._heartbeat.stop()
        telemetry.unwatch_executor(self.id)
        self.state = "stopped"
        op.set(runs_cancelled=len(pending), runs_released=released)
        op.log(
            logger,
            logging.INFO,
            "executor %s stopped: %d runs cancelled and released",
            self.id,
            len(pending) + released,
            action="executor_stopped",
        )


def _heartbeat_store_maker(store: ExecutorStore) -> Callable[[], Any] | None:
    """For a SQL store: a maker of a one-connection store on the same database, used by the
    heartbeat thread. None: heartbeat on the caller's loop (the in-memory store)."""
    from .stores.sql import SQLCheckpointStore

    if not isinstance(store, SQLCheckpointStore):
        return None
    url = store.engine.url.render_as_string(hide_password=False)
    timeout = store.operation_timeout

    def make() -> SQLCheckpointStore:
        from sqlalchemy.pool import NullPool

        return SQLCheckpointStore.from_url(
            url,
            operation_timeout=timeout,
            connect_timeout=min(timeout, 10.0),
            engine_options={"poolclass": NullPool},
        )

    return make
