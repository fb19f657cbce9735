"""kill -9 in the middle of a save: the stored state is the old or the new snapshot, never torn."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from executus_ckpt import SQLCheckpointStore

REPO = Path(__file__).resolve().parents[2]


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
            assert (await proc.stdout.readline()).strip() == b"PAUSED"
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL

    async with SQLCheckpointStore.open(sql_url) as store:
        loaded = await store.load("crash-run")
        assert loaded is not None
        # The save in flight never committed: exactly the first snapshot, header and messages.
        assert loaded.iteration == 1
        assert [m["n"] for m in loaded.messages] == list(range(6))
        (summary,) = [s async for s in store.iter_summaries()]
        assert summary.message_count == 6 == len(loaded.messages)
