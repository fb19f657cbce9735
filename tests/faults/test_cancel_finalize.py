"""A cancellation that lands while ``complete()``/``fail()`` waits on the database does not
abandon the delete (issue 10 item 2), on every backend.

The delete is held up by a lock another connection holds: a row lock
(``SELECT ... FOR UPDATE``) on PostgreSQL, the write lock (``BEGIN IMMEDIATE``) on SQLite, a
gate in front of the store's calls for the in-memory store. The task running ``complete()``
is cancelled, the lock released, and the run's checkpoint must then be gone: a finished run
is never re-dispatched.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from executus_ckpt import (
    InMemoryCheckpointStore,
    RunCheckpoint,
    RunCheckpointState,
    RunInfo,
    SQLCheckpointStore,
    StoreCheckpointerFactory,
)

pytestmark = pytest.mark.timeout(60)

RUN = "finishing-run"


def state(i: int) -> RunCheckpointState:
    return RunCheckpointState(messages=[{"n": n} for n in range(i)], iteration=i)


class GatedStore(InMemoryCheckpointStore):
    """The in-memory store whose writes wait at a gate while it is closed: a database that
    is slow to answer, for the checkpointer's point of view."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = 0

    async def _wait(self) -> None:
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1

    async def save(self, checkpoint: RunCheckpoint) -> None:
        await self._wait()
        await super().save(checkpoint)

    async def append(self, checkpoint: RunCheckpoint, **kwargs: Any) -> None:
        await self._wait()
        await super().append(checkpoint, **kwargs)

    async def delete(self, run_id: str, *, epoch: int | None = None) -> bool:
        await self._wait()
        return await super().delete(run_id, epoch=epoch)


Lock = Callable[[], Any]
"""An async context manager factory: holds the lock a delete of RUN waits for."""


@pytest.fixture
async def backend(
    store_url: str | None, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Any, Lock, Any]]:
    """(store, lock, waiting): ``waiting()`` is true once a write of RUN waits on the lock."""
    if store_url is None:
        memory = GatedStore()

        @asynccontextmanager
        async def gate() -> AsyncIterator[None]:
            memory.gate.clear()
            try:
                yield
            finally:
                memory.gate.set()

        async def gated() -> bool:
            return memory.waiting > 0

        yield memory, gate, gated
        return

    async with SQLCheckpointStore.open(store_url) as store:
        if store.dialect == "postgresql":
            dsn = make_url(store_url).set(drivername="postgresql")
            dsn_text = dsn.render_as_string(hide_password=False)

            @asynccontextmanager
            async def row_lock() -> AsyncIterator[None]:
                conn = await asyncpg.connect(dsn_text)
                try:
                    async with conn.transaction():
                        locked = await conn.fetch(
                            "SELECT run_id FROM run_checkpoints WHERE run_id = $1 FOR UPDATE", RUN
                        )
                        assert len(locked) == 1
                        yield
                finally:
                    await conn.close()

            async def blocked() -> bool:
                conn = await asyncpg.connect(dsn_text)
                try:
                    waiting = await conn.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                        "current_database() AND wait_event_type = 'Lock'"
                    )
                finally:
                    await conn.close()
                return bool(waiting)

            yield store, row_lock, blocked
        else:
            path = make_url(store_url).database
            assert path is not None

            @asynccontextmanager
            async def write_lock() -> AsyncIterator[None]:
                conn = sqlite3.connect(path, isolation_level=None)
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    yield
                    conn.execute("ROLLBACK")
                finally:
                    conn.close()

            waited_since: list[float] = []

            async def busy() -> bool:
                # SQLite does not show who waits on its lock: give the write time to reach it
                # (it is then in SQLite's busy handler, on the driver's thread).
                waited_since.append(time.monotonic())
                return time.monotonic() - waited_since[0] > 0.3

            yield store, write_lock, busy


async def eventually(check: Callable[[], Any], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition never met"
        await asyncio.sleep(0.02)


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("finalize", ["complete", "fail"])
async def test_cancelled_finalize_still_deletes(
    backend: tuple[Any, Lock, Any], finalize: str
) -> None:
    store, lock, waiting = backend
    cp = await StoreCheckpointerFactory(store).begin(RunInfo(RUN))
    await cp.save(state(2))

    async with lock():
        call = cp.complete() if finalize == "complete" else cp.fail(RuntimeError("boom"))
        task = asyncio.get_running_loop().create_task(call)
        await eventually(waiting)
        assert not task.done()  # the delete waits on the lock
        await _cancel(task)
        assert await store.load(RUN) is not None  # still held up: not deleted yet
    # Released: the delete that started goes through although its caller was cancelled.

    async def gone() -> bool:
        return await store.load(RUN) is None

    await eventually(gone, within=3.0)


async def test_cancelled_complete_behind_an_in_flight_save_still_deletes(
    backend: tuple[Any, Lock, Any],
) -> None:
    """complete() waits for a save in flight; cancelled there, it must still delete."""
    store, lock, waiting = backend
    cp = await StoreCheckpointerFactory(store).begin(RunInfo(RUN))
    await cp.save(state(2))

    async with lock():
        loop = asyncio.get_running_loop()
        saving = loop.create_task(cp.save(state(3)))
        await eventually(waiting)
        finishing = loop.create_task(cp.complete())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not finishing.done()  # behind the save
        await _cancel(finishing)
    await saving  # the save in flight finishes as a whole

    async def gone() -> bool:
        return await store.load(RUN) is None

    await eventually(gone, within=3.0)
    await cp.save(state(4))  # a finished run is not resurrected
    assert await store.load(RUN) is None
