"""Seeded SIGKILL trials: every acknowledged save survives ``kill -9``, never torn.

Per backend, ``KILLS`` times: a child process (tests/faults/sigkill_child.py) saves several
runs concurrently, append-heavy with a compaction every 10 iterations, and prints each save
that returned; it is SIGKILLed at a random moment drawn from a seeded generator. Then the
store is reopened and, for each run: the stored iteration is at least the last one
acknowledged and at most one more (the save in flight), and the stored transcript, phases and
header are exactly those of the stored iteration, never a mix. At the end every run of every
trial is checked again (later kills and opens never disturbed an earlier run).

The seed is ``EXECUTUS_CKPT_FAULT_SEED`` (printed, so a failure can be replayed).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest

from executus_ckpt import CheckpointStatus, SQLCheckpointStore
from tests.faults.sigkill_child import phases, transcript

REPO = Path(__file__).resolve().parents[2]
KILLS = 30
RUNS = 4
MAX_DELAY = 0.5
"""Seconds after the child's READY within which it is killed."""
SEED = int(os.environ.get("EXECUTUS_CKPT_FAULT_SEED", "20261125"))


async def _trial(url: str, prefix: str, delay: float) -> tuple[dict[str, int], set[str]]:
    """Run one child, kill it ``delay`` s after READY; its acknowledged saves and begun runs."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.faults.sigkill_child",
        url,
        prefix,
        str(RUNS),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONASYNCIODEBUG": "0"},
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            assert (await proc.stdout.readline()).strip() == b"READY"
            await asyncio.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            output = await proc.stdout.read()  # every line printed before the kill
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL, output[-200:]
    acked: dict[str, int] = {}
    begun: set[str] = set()
    for line in output.decode().split("\n")[:-1]:  # the last piece may be cut mid-line
        kind, run, *rest = line.split()
        if kind == "BEGUN":
            begun.add(run)
        else:
            assert kind == "ACK", line
            iteration = int(rest[0])
            assert iteration == acked.get(run, 0) + 1  # in order, none skipped
            acked[run] = iteration
    return acked, begun


async def _check(store: SQLCheckpointStore, run: str, low: int, high: int) -> int:
    """The stored state of ``run`` is one whole iteration in ``[low, high]``; returns it."""
    loaded = await store.load(run)
    assert loaded is not None, f"{run}: acknowledged, then lost"
    i = loaded.iteration
    assert low <= i <= high, f"{run}: stored iteration {i}, acknowledged {low}"
    assert list(loaded.messages) == transcript(run, i), f"{run}: torn transcript at {i}"
    assert list(loaded.completed_phases) == phases(i), f"{run}: torn phases at {i}"
    assert loaded.status is CheckpointStatus.ACTIVE
    return i


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_seeded_sigkills_lose_no_acknowledged_save(sql_url: str) -> None:
    rng = random.Random(SEED)
    stored: dict[str, int] = {}
    acked_total = 0
    unacked_in_flight = 0
    started = time.monotonic()
    for trial in range(KILLS):
        delay = rng.uniform(0.0, MAX_DELAY)
        acked, begun = await _trial(sql_url, f"k{trial}", delay)
        acked_total += sum(acked.values())
        async with SQLCheckpointStore.open(sql_url) as store:  # reopened after every kill
            for r in range(RUNS):
                run = f"k{trial}-r{r}"
                if run in acked:
                    stored[run] = await _check(store, run, acked[run], acked[run] + 1)
                    unacked_in_flight += stored[run] - acked[run]
                elif run in begun or await store.load(run) is not None:
                    # Its initial row is durable (or its begin was in flight and committed);
                    # its first save may be too.
                    stored[run] = await _check(store, run, 0, 1)
            # The header agrees with the stored transcript (count of messages).
            counts = {s.run_id: s.message_count async for s in store.iter_summaries()}
            for run, i in stored.items():
                assert counts[run] == len(transcript(run, i)), run

    # Every run of every trial is still exactly as verified after its own kill.
    async with SQLCheckpointStore.open(sql_url) as store:
        for run, i in stored.items():
            assert await _check(store, run, i, i) == i
        assert await store.count() == len(stored)
    elapsed = time.monotonic() - started
    print(
        f"seed {SEED}: {KILLS} SIGKILLs in {elapsed:.1f} s, {acked_total} acknowledged saves "
        f"all present, {unacked_in_flight} saves in flight found committed, "
        f"{len(stored)} runs checked"
    )
    assert acked_total > KILLS  # the kills landed while runs were saving
