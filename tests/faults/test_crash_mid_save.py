"""kill -9 in the middle of a save: the stored state is the old or the new snapshot, never torn."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from executus_ckpt import SQLCheckpointStore

REPO = Path(__file__).resolve().parents[2]


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _wait_for_pg_sleep(url: str) -> None:
    conn = await asyncpg.connect(_dsn(url))
    try:
        for _ in range(400):
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event = 'PgSleep'"
            )
            if waiting:
                return
            await asyncio.sleep(0.025)
        raise AssertionError("the append never reached the INSERT trigger")
    finally:
        await conn.close()


async def _drop_pause_trigger(url: str) -> None:
    conn = await asyncpg.connect(_dsn(url))
    try:
        # The killed client's statement is still sleeping server-side, uncommitted: end it.
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        await conn.execute("DROP TRIGGER IF EXISTS executus_test_pause ON run_checkpoint_messages")
    finally:
        await conn.close()


@pytest.mark.parametrize("pause_at", ["insert", "commit"])
async def test_kill_mid_save_leaves_the_previous_snapshot(sql_url: str, pause_at: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.faults.crash_child",
        sql_url,
        pause_at,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            assert (await proc.stdout.readline()).strip() == b"READY"
            frozen = (await proc.stdout.readline()).strip()
            if frozen == b"SENT":  # PostgreSQL append: wait until the server sits in the trigger
                await _wait_for_pg_sleep(sql_url)
            else:
                assert frozen == b"PAUSED"
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL

    if "postgresql" in sql_url:
        await _drop_pause_trigger(sql_url)  # and end the orphaned server-side statement
    async with SQLCheckpointStore.open(sql_url) as store:
        loaded = await store.load("crash-run")
        assert loaded is not None
        # The save in flight never committed: exactly the first snapshot, header and messages
        # (the header UPDATE of the append, or the DELETE of the rewrite, rolled back).
        assert loaded.iteration == 1
        assert [m["n"] for m in loaded.messages] == list(range(6))
        (summary,) = [s async for s in store.iter_summaries()]
        assert summary.message_count == 6 == len(loaded.messages)
