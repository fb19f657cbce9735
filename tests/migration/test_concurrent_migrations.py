"""Replicas migrate at boot, all at once: concurrent migrations of one database all succeed.

Issue 10 item 9: two processes migrating one fresh PostgreSQL database raised
``UniqueViolationError`` (6 times out of 7), and two tasks in one process ``KeyError('config')``
(alembic's module-global ``context`` is shared by the runs of one process). Each test runs on a
fresh, empty database of each backend and is bounded in time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from executus_ckpt import RunCheckpoint, RunCheckpointMeta, SQLCheckpointStore, migrate
from executus_ckpt.migrate import current_revision
from executus_ckpt.schema import REQUIRED_REVISION

TIMEOUT = 60.0


async def _assert_migrated(url: str) -> None:
    engine = create_async_engine(url)
    try:
        assert await current_revision(engine) == REQUIRED_REVISION
    finally:
        await engine.dispose()
    async with SQLCheckpointStore.open(url) as store:
        await store.save(RunCheckpoint(RunCheckpointMeta("r"), messages=[{"m": 1}], iteration=1))
        loaded = await store.load("r")
    assert loaded is not None and loaded.messages == [{"m": 1}]


async def test_tasks_migrate_at_once(empty_sql_url: str) -> None:
    async with asyncio.timeout(TIMEOUT):
        await asyncio.gather(*(migrate(empty_sql_url) for _ in range(3)))
    await _assert_migrated(empty_sql_url)


async def test_tasks_migrate_one_engine_at_once(empty_sql_url: str) -> None:
    engine = create_async_engine(empty_sql_url)
    try:
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(migrate(engine), migrate(engine), migrate(empty_sql_url))
    finally:
        await engine.dispose()
    await _assert_migrated(empty_sql_url)


async def _in_another_loop(url: str, revision: str = "head") -> None:
    """``migrate(url)`` on a new event loop in a daemon thread (a hang cannot hold the run)."""
    done: concurrent.futures.Future[None] = concurrent.futures.Future()

    def target() -> None:
        try:
            asyncio.run(asyncio.wait_for(migrate(url, revision), TIMEOUT))
            done.set_result(None)
        except BaseException as exc:
            done.set_exception(exc)

    threading.Thread(target=target, name="migrate-in-thread", daemon=True).start()
    await asyncio.wrap_future(done)


async def test_event_loops_in_threads_migrate_at_once(empty_sql_url: str) -> None:
    # Another thread's loop (a host running a loop per thread) shares alembic's globals too.
    async with asyncio.timeout(TIMEOUT):
        await asyncio.gather(
            _in_another_loop(empty_sql_url),
            _in_another_loop(empty_sql_url),
            migrate(empty_sql_url),
        )
    await _assert_migrated(empty_sql_url)


async def test_migration_does_not_block_the_event_loop_while_waiting(
    empty_sql_url: str,
) -> None:
    # While one migration holds the process's turn, the loop keeps running other work.
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    tick_task = asyncio.create_task(ticker())
    try:
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*(migrate(empty_sql_url) for _ in range(3)))
    finally:
        done.set()
        await tick_task
    assert ticks > 3
    await _assert_migrated(empty_sql_url)


async def test_processes_migrate_at_once(empty_sql_url: str) -> None:
    code = "import asyncio, sys, executus_ckpt; asyncio.run(executus_ckpt.migrate(sys.argv[1]))"
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            empty_sql_url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(os.environ),
        )
        for _ in range(3)
    ]
    try:
        async with asyncio.timeout(TIMEOUT):
            outputs = await asyncio.gather(*(p.communicate() for p in procs))
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err.decode()
    await _assert_migrated(empty_sql_url)


async def test_tasks_migrate_different_databases_at_once(
    empty_sql_url: str, tmp_path: Path
) -> None:
    # No database lock is shared between two databases: within the process, the runs must
    # still take turns (alembic's `context` is one module-global for the whole process).
    others = [f"sqlite+aiosqlite:///{tmp_path}/other{i}.db" for i in range(3)]
    async with asyncio.timeout(TIMEOUT):
        await asyncio.gather(migrate(empty_sql_url), *(migrate(url) for url in others))
    for url in [empty_sql_url, *others]:
        await _assert_migrated(url)


async def test_a_migration_cancelled_while_waiting_for_its_turn_leaves_none_held(
    empty_sql_url: str,
) -> None:
    from executus_ckpt.migrate import _one_migration_at_a_time

    async with _one_migration_at_a_time():  # another migration of this process is running
        waiting = asyncio.create_task(migrate(empty_sql_url))
        await asyncio.sleep(0.05)
        assert not waiting.done(), "it waits for its turn"
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert waiting.cancelled()
    async with asyncio.timeout(TIMEOUT):
        await migrate(empty_sql_url)
        await _in_another_loop(empty_sql_url, "base")
        await migrate(empty_sql_url)
    await _assert_migrated(empty_sql_url)


async def test_migrations_are_not_cut_by_the_statement_timeout(pg_empty_url: str) -> None:
    """migrate(url) runs its statements without the store's per-statement timeout (asyncpg's
    command_timeout, 30 s): a data migration of a large database, or a replica waiting on the
    advisory lock behind another one's migration, may take longer. (SQLite has no statement
    timeout; its busy timeout bounds the wait for a writer.)"""
    from sqlalchemy import Connection

    from executus_ckpt.migrate import run_with_connection

    seen: list[object] = []

    def inspect_timeout(connection: Connection) -> None:
        driver = connection.connection.driver_connection
        seen.append(driver._config.command_timeout)

    await run_with_connection(pg_empty_url, inspect_timeout)
    assert seen == [None]
