"""Run lifecycle: ``classify_outcome`` and ``checkpointed_run`` on every exit path.

Time is a ManualClock wherever throttling matters. Tests that touch a store run on every
backend through the ``store`` fixture. The only real waiting is the flush-timeout test, which
has to show that a hung store cannot hold a shutdown for longer than ``flush_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from executus_ckpt import (
    InMemoryCheckpointStore,
    NoopCheckpointer,
    RunCheckpointState,
    RunInfo,
    ShutdownError,
    StoreCheckpointer,
    StoreCheckpointerFactory,
    StoreUnavailableError,
)
from executus_ckpt.lifecycle import Outcome, checkpointed_run, classify_outcome
from executus_ckpt.testing import ManualClock

RUN = RunInfo("run-1", subject_id="agent", name="Agent", inputs={"prompt": "hi"})
LIFECYCLE_LOGGER = "executus_ckpt.lifecycle"


class HostShutdown(Exception):
    """A host's own "we are going down" exception."""


class HostShutdownChild(ShutdownError):
    """A subclass of the library's ShutdownError."""


def state(i: int, phases: tuple[str, ...] = ()) -> RunCheckpointState:
    return RunCheckpointState(
        messages=[{"i": k} for k in range(i)], iteration=i, completed_phases=phases
    )


def raised_from(exc: BaseException, cause: BaseException | None) -> BaseException:
    """``exc`` as it is after ``raise exc from cause`` (traceback and chaining set)."""
    try:
        raise exc from cause
    except BaseException as caught:
        return caught


def raised_during(exc: BaseException, context: BaseException) -> BaseException:
    """``exc`` raised implicitly while ``context`` was being handled (``__context__`` only)."""
    try:
        try:
            raise context
        except BaseException:
            raise exc  # noqa: B904 - implicit chaining is the point
    except BaseException as caught:
        return caught


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


class FaultyStore:
    """Wraps a store: ``register``, ``save`` or ``delete`` can fail or hang on demand."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.fail_register = False
        self.fail_delete = False
        self.hang_saves = False
        self.release = asyncio.Event()
        self.save_entered = asyncio.Event()
        self.saved: list[int] = []

    async def register(self, checkpoint: Any) -> int:
        if self.fail_register:
            raise StoreUnavailableError("injected register failure", run_id=checkpoint.run_id)
        return int(await self.inner.register(checkpoint))

    async def save(self, checkpoint: Any) -> None:
        if self.hang_saves:
            self.save_entered.set()
            await self.release.wait()  # "forever", until the test cleans up
        await self.inner.save(checkpoint)
        self.saved.append(checkpoint.iteration)

    async def delete(self, run_id: str, *, epoch: int | None = None) -> bool:
        if self.fail_delete:
            raise StoreUnavailableError("injected delete failure", run_id=run_id)
        return bool(await self.inner.delete(run_id, epoch=epoch))

    def __getattr__(self, name: str) -> Any:
        if name == "append":  # a plain store: every write goes through save()
            raise AttributeError(name)
        return getattr(self.inner, name)


# -- classify_outcome -------------------------------------------------------------------------


def test_no_exception_is_completed() -> None:
    assert classify_outcome(None) is Outcome.COMPLETED
    assert classify_outcome(None, (HostShutdown,)) is Outcome.COMPLETED


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad"),
        RuntimeError("x"),
        TimeoutError(),
        StoreUnavailableError("db"),
        KeyError(1),
    ],
    ids=lambda e: type(e).__name__,
)
def test_ordinary_errors_are_failed(exc: BaseException) -> None:
    assert classify_outcome(exc) is Outcome.FAILED


@pytest.mark.parametrize(
    "exc",
    [
        asyncio.CancelledError(),
        ShutdownError("deploy"),
        HostShutdownChild("deploy"),
        KeyboardInterrupt(),
        SystemExit(0),
        SystemExit(1),
    ],
    ids=lambda e: f"{type(e).__name__}",
)
def test_shutdown_exceptions_are_shutdown(exc: BaseException) -> None:
    assert classify_outcome(exc) is Outcome.SHUTDOWN


def test_custom_exception_is_failed_unless_declared_shutdown() -> None:
    assert classify_outcome(HostShutdown()) is Outcome.FAILED
    assert classify_outcome(HostShutdown(), (HostShutdown,)) is Outcome.SHUTDOWN
    # Declaring one kind does not turn other errors into shutdowns.
    assert classify_outcome(ValueError(), (HostShutdown,)) is Outcome.FAILED


def test_group_of_only_shutdowns_is_shutdown() -> None:
    assert classify_outcome(ExceptionGroup("g", [ShutdownError(), ShutdownError()])) is (
        Outcome.SHUTDOWN
    )
    group = BaseExceptionGroup("g", [asyncio.CancelledError(), KeyboardInterrupt(), SystemExit()])
    assert classify_outcome(group) is Outcome.SHUTDOWN


def test_group_mixing_a_failure_is_failed() -> None:
    group = BaseExceptionGroup("g", [asyncio.CancelledError(), ValueError("boom")])
    assert classify_outcome(group) is Outcome.FAILED
    assert classify_outcome(ExceptionGroup("g", [ValueError("a"), ValueError("b")])) is (
        Outcome.FAILED
    )


def test_group_of_custom_shutdowns_follows_shutdown_exceptions() -> None:
    group = ExceptionGroup("g", [HostShutdown(), ShutdownError()])
    assert classify_outcome(group) is Outcome.FAILED
    assert classify_outcome(group, (HostShutdown,)) is Outcome.SHUTDOWN


def test_nested_groups() -> None:
    only_shutdowns = BaseExceptionGroup(
        "outer",
        [
            ExceptionGroup("inner", [ShutdownError(), ExceptionGroup("deeper", [ShutdownError()])]),
            BaseExceptionGroup("inner2", [asyncio.CancelledError(), SystemExit()]),
        ],
    )
    assert classify_outcome(only_shutdowns) is Outcome.SHUTDOWN
    failure_deep_inside = BaseExceptionGroup(
        "outer",
        [
            asyncio.CancelledError(),
            ExceptionGroup("inner", [ShutdownError(), ExceptionGroup("deeper", [ValueError()])]),
        ],
    )
    assert classify_outcome(failure_deep_inside) is Outcome.FAILED


def test_causes_are_not_followed() -> None:
    # Only the exception itself (or the members of a group) is classified: a run that wrapped
    # a shutdown in its own error failed, unless the host lists that error as a shutdown.
    assert classify_outcome(raised_from(RuntimeError("wrapped"), ShutdownError())) is (
        Outcome.FAILED
    )
    assert classify_outcome(raised_from(RuntimeError(), asyncio.CancelledError())) is (
        Outcome.FAILED
    )
    assert classify_outcome(raised_from(RuntimeError(), HostShutdown()), (HostShutdown,)) is (
        Outcome.FAILED
    )
    assert classify_outcome(raised_from(HostShutdown(), ValueError()), (HostShutdown,)) is (
        Outcome.SHUTDOWN
    )


def test_group_member_raised_from_a_shutdown_is_a_failure() -> None:
    member = raised_from(RuntimeError("wrapped"), ShutdownError())
    assert classify_outcome(ExceptionGroup("g", [member, ShutdownError()])) is Outcome.FAILED


def test_implicit_context_is_not_followed() -> None:
    assert classify_outcome(raised_during(RuntimeError(), ShutdownError())) is Outcome.FAILED


async def test_a_timeout_inside_the_run_is_a_failure() -> None:
    # asyncio.timeout() and wait_for() raise TimeoutError from their own CancelledError:
    # a model call that timed out is a failed run, not a shutdown (issue 10 item 1).
    with pytest.raises(TimeoutError) as by_timeout:
        async with asyncio.timeout(0.001):
            await asyncio.sleep(1)
    assert isinstance(by_timeout.value.__cause__, asyncio.CancelledError)
    assert classify_outcome(by_timeout.value) is Outcome.FAILED
    with pytest.raises(TimeoutError) as by_wait_for:
        await asyncio.wait_for(asyncio.sleep(1), 0.001)
    assert classify_outcome(by_wait_for.value) is Outcome.FAILED


async def test_a_timed_out_run_deletes_its_checkpoint(store: Any) -> None:
    factory = StoreCheckpointerFactory(store)
    with pytest.raises(TimeoutError):
        async with checkpointed_run(factory, RUN) as cp:
            await cp.save(state(1))
            async with asyncio.timeout(0.001):
                await asyncio.sleep(1)
    assert await store.load("run-1") is None


def test_cause_cycle_terminates() -> None:
    a = RuntimeError("a")
    b = RuntimeError("b")
    a.__cause__ = b
    b.__cause__ = a
    assert classify_outcome(a) is Outcome.FAILED


# -- checkpointed_run on every backend --------------------------------------------------------


async def test_normal_exit_deletes_the_checkpoint(store: Any) -> None:
    factory = StoreCheckpointerFactory(store)
    after_block = False
    async with checkpointed_run(factory, RUN) as cp:
        assert isinstance(cp, StoreCheckpointer)
        await cp.save(state(2, ("plan",)))
        stored = await store.load("run-1")
        assert stored is not None and stored.iteration == 2
    after_block = True
    assert after_block
    assert await store.load("run-1") is None


async def test_exception_deletes_and_the_same_exception_propagates(store: Any) -> None:
    factory = StoreCheckpointerFactory(store)
    error = ValueError("terminal")
    with pytest.raises(ValueError) as caught:
        async with checkpointed_run(factory, RUN) as cp:
            await cp.save(state(1))
            raise error
    assert caught.value is error
    assert await store.load("run-1") is None


async def test_early_error_before_any_save_deletes_the_initial_row(store: Any) -> None:
    factory = StoreCheckpointerFactory(store)
    error = RuntimeError("bad configuration, before the run loop")
    with pytest.raises(RuntimeError) as caught:
        async with checkpointed_run(factory, RUN):
            initial = await store.load("run-1")
            assert initial is not None and initial.iteration == 0, "begin wrote the row"
            raise error
    assert caught.value is error
    assert await store.load("run-1") is None


async def test_undeclared_host_exception_is_a_failure(store: Any) -> None:
    factory = StoreCheckpointerFactory(store)
    with pytest.raises(HostShutdown):
        async with checkpointed_run(factory, RUN) as cp:
            await cp.save(state(1))
            raise HostShutdown()
    assert await store.load("run-1") is None


SHUTDOWNS: list[tuple[str, Any, tuple[type[BaseException], ...]]] = [
    ("ShutdownError", lambda: ShutdownError("deploy"), ()),
    ("host-declared", lambda: HostShutdown("deploy"), (HostShutdown,)),
    ("KeyboardInterrupt", KeyboardInterrupt, ()),
    ("SystemExit", lambda: SystemExit(0), ()),
    ("group", lambda: ExceptionGroup("g", [ShutdownError(), ShutdownError()]), ()),
    (
        "host-wrapper",
        lambda: raised_from(HostShutdown("wrapped"), ValueError()),
        (HostShutdown,),
    ),
]


@pytest.mark.parametrize(
    ("make", "declared"), [s[1:] for s in SHUTDOWNS], ids=[s[0] for s in SHUTDOWNS]
)
async def test_shutdown_keeps_the_newest_state(
    store: Any, make: Any, declared: tuple[type[BaseException], ...]
) -> None:
    clock = ManualClock()
    factory = StoreCheckpointerFactory(store, throttle=30, clock=clock)
    error = make()
    with pytest.raises(type(error)) as caught:
        async with checkpointed_run(factory, RUN, shutdown_exceptions=declared) as cp:
            await cp.save(state(1))
            await cp.save(state(2, ("plan",)))  # throttled: pending
            assert (await store.load("run-1")).iteration == 1
            raise error
    assert caught.value is error
    kept = await store.load("run-1")
    assert kept is not None, "a shut-down run keeps its checkpoint"
    assert kept.iteration == 2 and list(kept.messages) == [{"i": 0}, {"i": 1}]
    assert list(kept.completed_phases) == ["plan"]
    assert [c.run_id for c in await store.list_interrupted()] == ["run-1"]
    assert clock.sleepers == 0, "no trailing flush left behind"
    await clock.run_for(60)
    assert (await store.load("run-1")).iteration == 2


async def test_task_cancel_flushes_the_throttled_state_and_stays_cancelled(store: Any) -> None:
    clock = ManualClock()
    factory = StoreCheckpointerFactory(store, throttle=30, clock=clock)
    in_block = asyncio.Event()
    never = asyncio.Event()
    reached_end = False

    async def run() -> None:
        nonlocal reached_end
        async with checkpointed_run(factory, RUN) as cp:
            await cp.save(state(1))  # written
            await cp.save(state(2))  # throttled
            await cp.save(state(3, ("plan",)))  # throttled, newest
            in_block.set()
            await never.wait()
        reached_end = True

    task = asyncio.create_task(run())
    await in_block.wait()
    assert (await store.load("run-1")).iteration == 1, "2 and 3 are still pending"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert not reached_end
    kept = await store.load("run-1")
    assert kept is not None and kept.iteration == 3, "the pending state was flushed on shutdown"
    assert list(kept.messages) == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert list(kept.completed_phases) == ["plan"]
    assert clock.sleepers == 0


@pytest.mark.parametrize("pending", [False, True], ids=["nothing-pending", "throttled-pending"])
async def test_task_cancel_finishes_the_shutdown_finalize(
    caplog: pytest.LogCaptureFixture, pending: bool
) -> None:
    # The shutdown path runs to its end (flush, stop the trailing flush, log the run as kept)
    # whether or not a trailing flush was armed when the task was cancelled.
    caplog.set_level(logging.INFO, logger=LIFECYCLE_LOGGER)
    store = InMemoryCheckpointStore()
    clock = ManualClock()
    factory = StoreCheckpointerFactory(store, throttle=30, clock=clock)
    in_block = asyncio.Event()

    async def run() -> None:
        async with checkpointed_run(factory, RUN) as cp:
            await cp.save(state(1))
            if pending:
                await cp.save(state(2))
            in_block.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(run())
    await in_block.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await store.load("run-1")).iteration == (2 if pending else 1)
    kept = [r for r in caplog.records if getattr(r, "action", None) == "run_interrupted"]
    assert len(kept) == 1 and "run-1" in kept[0].getMessage()


# -- begin / complete / fail errors -----------------------------------------------------------


class FailingFactory:
    def __init__(self) -> None:
        self.calls = 0

    async def begin(self, info: RunInfo) -> Any:
        self.calls += 1
        raise StoreUnavailableError("database down", run_id=info.run_id)


async def test_begin_error_runs_the_block_non_durable(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LIFECYCLE_LOGGER)
    factory = FailingFactory()
    ran = False
    async with checkpointed_run(factory, RunInfo("run-begin-fails")) as cp:
        assert isinstance(cp, NoopCheckpointer)
        await cp.save(state(1))
        await cp.flush()
        ran = True
    assert ran and factory.calls == 1
    warnings = [r for r in caplog.records if r.name == LIFECYCLE_LOGGER]
    assert warnings, "the begin failure is logged"
    assert any(
        r.levelno == logging.WARNING and "run-begin-fails" in r.getMessage() for r in warnings
    )


async def test_store_register_error_runs_the_block_non_durable(
    store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LIFECYCLE_LOGGER)
    faulty = FaultyStore(store)
    faulty.fail_register = True
    factory = StoreCheckpointerFactory(faulty)
    async with checkpointed_run(factory, RUN) as cp:
        assert isinstance(cp, NoopCheckpointer)
        await cp.save(state(1))
    assert await store.load("run-1") is None, "nothing was written"
    records = [
        r for r in caplog.records if r.name == LIFECYCLE_LOGGER and r.levelno == logging.WARNING
    ]
    assert len(records) == 1
    assert "run-1" in records[0].getMessage()


async def test_begin_error_does_not_swallow_the_block_exception() -> None:
    error = ValueError("from the block")
    with pytest.raises(ValueError) as caught:
        async with checkpointed_run(FailingFactory(), RUN):
            raise error
    assert caught.value is error


async def test_complete_error_is_logged_and_does_not_escape(
    store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LIFECYCLE_LOGGER)
    faulty = FaultyStore(store)
    factory = StoreCheckpointerFactory(faulty)
    finished = False
    async with checkpointed_run(factory, RUN) as cp:
        await cp.save(state(1))
        faulty.fail_delete = True
    finished = True
    assert finished
    errors = [
        r for r in caplog.records if r.name == LIFECYCLE_LOGGER and r.levelno == logging.ERROR
    ]
    assert len(errors) == 1 and "run-1" in errors[0].getMessage()
    # The delete failed, so the row is still there for the next boot to find.
    assert (await store.load("run-1")).iteration == 1


async def test_fail_error_does_not_replace_the_run_exception(
    store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LIFECYCLE_LOGGER)
    faulty = FaultyStore(store)
    factory = StoreCheckpointerFactory(faulty)
    error = ValueError("the run's own error")
    with pytest.raises(ValueError) as caught:
        async with checkpointed_run(factory, RUN) as cp:
            await cp.save(state(1))
            faulty.fail_delete = True
            raise error
    assert caught.value is error
    errors = [
        r for r in caplog.records if r.name == LIFECYCLE_LOGGER and r.levelno == logging.ERROR
    ]
    assert len(errors) == 1 and "run-1" in errors[0].getMessage()


# -- flush on shutdown is bounded by flush_timeout --------------------------------------------


async def _finish_within(task: asyncio.Task[Any], seconds: float) -> float:
    """Wait up to ``seconds`` (real time) for ``task``; returns how long it took."""
    started = time.monotonic()
    await asyncio.wait({task}, timeout=seconds)
    return time.monotonic() - started


async def test_flush_timeout_bounds_a_hung_store_on_shutdown_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LIFECYCLE_LOGGER)
    inner = InMemoryCheckpointStore()
    faulty = FaultyStore(inner)
    clock = ManualClock()
    factory = StoreCheckpointerFactory(faulty, throttle=30, clock=clock)
    in_block = asyncio.Event()
    go = asyncio.Event()

    async def run() -> None:
        async with checkpointed_run(factory, RUN, flush_timeout=0.2) as cp:
            await cp.save(state(1))  # written
            await cp.save(state(2))  # pending
            in_block.set()
            await go.wait()
            raise ShutdownError("deploy")

    task = asyncio.create_task(run())
    try:
        await in_block.wait()
        faulty.hang_saves = True  # the database stops answering
        go.set()
        elapsed = await _finish_within(task, 3.0)
        assert task.done(), "a hung store held the shutdown past flush_timeout"
        assert elapsed < 2.0
        assert isinstance(task.exception(), ShutdownError), "the shutdown still propagates"
        assert faulty.save_entered.is_set(), "the flush was attempted"
        assert (await inner.load("run-1")).iteration == 1, "the last good state is kept"
        assert any(
            r.name == LIFECYCLE_LOGGER and r.levelno >= logging.WARNING for r in caplog.records
        ), "the lost flush is logged"
    finally:
        faulty.release.set()
        if not task.done():
            await asyncio.wait({task}, timeout=5)
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" noise
        await settle()


async def test_flush_timeout_bounds_a_hung_store_on_task_cancel() -> None:
    inner = InMemoryCheckpointStore()
    faulty = FaultyStore(inner)
    factory = StoreCheckpointerFactory(faulty, throttle=0)

    async def run() -> None:
        async with checkpointed_run(factory, RUN, flush_timeout=0.2) as cp:
            await cp.save(state(1))  # hangs in the store

    faulty.hang_saves = True
    task = asyncio.create_task(run())
    try:
        await faulty.save_entered.wait()
        task.cancel()
        elapsed = await _finish_within(task, 3.0)
        assert task.done(), "a hung store held the cancellation past flush_timeout"
        assert elapsed < 2.0
        assert task.cancelled(), "the cancellation still propagates"
    finally:
        faulty.release.set()
        if not task.done():
            await asyncio.wait({task}, timeout=5)
        if task.done() and not task.cancelled():
            task.exception()
        await settle()
