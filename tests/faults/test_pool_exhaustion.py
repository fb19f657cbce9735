"""An exhausted connection pool (issue 10 item 4): typed errors in bounded time, and a
throttled run's trailing flush that keeps retrying until its state is written.

The store runs on a pool of one connection (``pool_size=1, max_overflow=0``) with
``operation_timeout=0.5`` (also the pool's wait); the test holds that connection.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest

from executus_ckpt import (
    RunCheckpoint,
    RunCheckpointMeta,
    RunCheckpointState,
    RunInfo,
    SQLCheckpointStore,
    StoreCheckpointerFactory,
    StoreUnavailableError,
)
from executus_ckpt.testing import ManualClock

pytestmark = pytest.mark.timeout(60)

OPERATION_TIMEOUT = 0.5
BOUND = 2.0
"""Seconds an operation may wait for the pool: the 0.5 s timeout plus slack."""


def state(i: int) -> RunCheckpointState:
    return RunCheckpointState(messages=[{"n": n} for n in range(2 * i)], iteration=i)


@pytest.fixture
async def store(
    sql_url: str, unretrieved: list[dict[str, Any]]
) -> AsyncIterator[SQLCheckpointStore]:
    async with SQLCheckpointStore.open(
        sql_url,
        operation_timeout=OPERATION_TIMEOUT,
        engine_options={"pool_size": 1, "max_overflow": 0},
    ) as store:
        yield store


async def idle(store: SQLCheckpointStore) -> None:
    """Wait until the store gave its connection back (the SQLite writer keeps it a moment)."""
    deadline = time.monotonic() + 5
    while store.engine.pool.checkedout():  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the store never returned its connection"
        await asyncio.sleep(0.01)


async def fails_in_time(what: str, aw: Awaitable[Any]) -> None:
    start = time.monotonic()
    with pytest.raises(StoreUnavailableError) as info:
        async with asyncio.timeout(BOUND + 20):
            await aw
    elapsed = time.monotonic() - start
    print(f"{what} on an exhausted pool: StoreUnavailableError after {elapsed:.2f} s")
    assert elapsed < BOUND
    assert info.value.__cause__ is not None


async def test_exhausted_pool_gives_the_typed_error(store: SQLCheckpointStore) -> None:
    factory = StoreCheckpointerFactory(store)
    cp = await factory.begin(RunInfo("starved"))
    await cp.save(state(1))
    other = await factory.begin(RunInfo("other"))
    await idle(store)

    async with store.engine.connect():  # the pool's only connection
        await fails_in_time("checkpointer save (append)", cp.save(state(2)))
        rewrite = RunCheckpoint(
            meta=RunCheckpointMeta("starved"), messages=[{"n": "x"}], iteration=7, epoch=0
        )
        await fails_in_time("store save (rewrite)", store.save(rewrite))
        await fails_in_time("load", store.load("starved"))
        await fails_in_time("delete", store.delete("other"))
        await fails_in_time("complete", other.complete())
        await fails_in_time("list_interrupted", store.list_interrupted())

    # Released: everything works again, and nothing above was half-applied.
    loaded = await store.load("starved")
    assert loaded is not None and loaded.iteration == 1
    assert list(loaded.messages) == list(state(1).messages)
    await cp.save(state(3))
    loaded = await store.load("starved")
    assert loaded is not None and loaded.iteration == 3
    assert list(loaded.messages) == list(state(3).messages)
    await other.complete()
    await cp.complete()
    assert await store.count() == 0


async def test_trailing_flush_retries_until_the_pool_frees_up(
    store: SQLCheckpointStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="executus_ckpt")
    clock = ManualClock()
    cp = await StoreCheckpointerFactory(store, throttle=0.5, clock=clock).begin(RunInfo("late"))
    await cp.save(state(1))  # written: opens the window
    await idle(store)

    def failures() -> int:
        return sum(r.__dict__.get("action") == "trailing_flush_failed" for r in caplog.records)

    async def failed_times(n: int) -> None:
        deadline = time.monotonic() + 10
        while failures() < n:
            assert time.monotonic() < deadline, f"the trailing flush did not fail {n} times"
            await asyncio.sleep(0.02)

    async with store.engine.connect():
        clock.advance(0.1)
        await cp.save(state(2))  # inside the window: kept for the trailing flush
        clock.advance(1.0)  # the window ends: the trailing flush fails on the pool
        await failed_times(1)
        clock.advance(30.0)  # past the backoff: it tries again, and fails again
        await failed_times(2)
    print(f"trailing flush failed {failures()} times while the pool was held")

    async def written() -> bool:
        clock.advance(30.0)
        loaded = await store.load("late")
        return loaded is not None and loaded.iteration == 2

    deadline = time.monotonic() + 10
    while not await written():
        assert time.monotonic() < deadline, "the trailing flush never wrote the newest state"
        await asyncio.sleep(0.02)
    loaded = await store.load("late")
    assert loaded is not None and list(loaded.messages) == list(state(2).messages)
    await cp.complete()


async def test_timed_out_write_leaves_no_unretrieved_error(
    sql_url: str, unretrieved: list[dict[str, Any]]
) -> None:
    # The pool gives up after the operation did: the write fails after its caller left.
    async with SQLCheckpointStore.open(
        sql_url,
        operation_timeout=OPERATION_TIMEOUT,
        engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 1.0},
    ) as store:
        cp = await StoreCheckpointerFactory(store).begin(RunInfo("abandoned"))
        await cp.save(state(1))
        await idle(store)
        async with store.engine.connect():
            await fails_in_time("save", cp.save(state(2)))
            await asyncio.sleep(1.0)  # the pool's own timeout ends the write
        gc.collect()
    gc.collect()
    assert [c["message"] for c in unretrieved] == []
