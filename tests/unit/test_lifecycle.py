"""Run lifecycle without a database: ``classify_outcome``, and ``checkpointed_run`` on the
in-memory store where a path does not depend on the backend (begin failures, cancellation,
the flush timeout).

Time is a ManualClock wherever throttling matters. The only real waiting is the flush-timeout
test, which has to show that a hung store cannot hold a shutdown for longer than
``flush_timeout``. ``checkpointed_run`` on every backend is in
``tests/integration/test_lifecycle_stores.py``.
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
    RunInfo,
    ShutdownError,
    StoreCheckpointerFactory,
    StoreUnavailableError,
)
from executus_ckpt.lifecycle import Outcome, checkpointed_run, classify_outcome
from executus_ckpt.testing import ManualClock
from tests._support.helpers import (
    LIFECYCLE_LOGGER,
    RUN,
    HostShutdown,
    HostShutdownChild,
    raised_during,
    raised_from,
    settle,
    state,
)
from tests._support.wrappers import FaultyStore

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


def test_cause_cycle_terminates() -> None:
    a = RuntimeError("a")
    b = RuntimeError("b")
    a.__cause__ = b
    b.__cause__ = a
    assert classify_outcome(a) is Outcome.FAILED


# -- checkpointed_run: cancellation -----------------------------------------------------------


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


async def test_begin_error_does_not_swallow_the_block_exception() -> None:
    error = ValueError("from the block")
    with pytest.raises(ValueError) as caught:
        async with checkpointed_run(FailingFactory(), RUN):
            raise error
    assert caught.value is error


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
