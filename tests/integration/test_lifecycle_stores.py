"""``checkpointed_run`` on every store (memory, SQLite, PostgreSQL): what each exit path
leaves in the database.

Time is a ManualClock wherever throttling matters. ``classify_outcome`` and the store-free
paths are in ``tests/unit/test_lifecycle.py``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from executus_ckpt import (
    NoopCheckpointer,
    ShutdownError,
    StoreCheckpointer,
    StoreCheckpointerFactory,
)
from executus_ckpt.lifecycle import checkpointed_run
from executus_ckpt.testing import ManualClock
from tests._support.helpers import (
    LIFECYCLE_LOGGER,
    RUN,
    HostShutdown,
    raised_from,
    state,
)
from tests._support.wrappers import FaultyStore

# -- a timeout inside the run ----------------------------------------------------------------


async def test_a_timed_out_run_deletes_its_checkpoint(store: Any) -> None:
    factory = StoreCheckpointerFactory(store)
    with pytest.raises(TimeoutError):
        async with checkpointed_run(factory, RUN) as cp:
            await cp.save(state(1))
            async with asyncio.timeout(0.001):
                await asyncio.sleep(1)
    assert await store.load("run-1") is None


# -- checkpointed_run on every backend --------------------------------------------------------


async def test_normal_exit_deletes_the_checkpoint(store: Any) -> None:
    factory = StoreCheckpointerFactory(store)
    after_block = False
    async with checkpointed_run(factory, RUN) as cp:
        assert isinstance(cp, StoreCheckpointer)
        await cp.save(state(2, phases=("plan",)))
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
            await cp.save(state(1, phases=("plan",)))
            await cp.save(state(2, phases=("plan",)))  # throttled: pending
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
            await cp.save(state(1, phases=("plan",)))  # written
            await cp.save(state(2, phases=("plan",)))  # throttled
            await cp.save(state(3, phases=("plan",)))  # throttled, newest
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


# -- begin / complete / fail errors -----------------------------------------------------------


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
