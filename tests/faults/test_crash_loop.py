"""Crash loops: a poison run is dead-lettered within its budget, innocent runs never go dead.

Real processes (tests/faults/crash_loop_child.py), on a SQLite file and on PostgreSQL: boot 0
starts 1 poison run and 8 innocent runs (about a second each: 4 phases x 2 iterations x
0.1 s) as live runs; the poison SIGKILLs the process while the innocents are mid-run. Every
later boot is a fresh process calling ``recover_interrupted(max_attempts=3, concurrency=8)``;
the poison's dispatch SIGKILLs the process again, each innocent's resumes from
``resume_state()`` and runs to completion. Boots repeat until no active run remains (at most
10). The figures (boots, poison dispatches, time) are printed (``pytest -s``).

In-process: a healthy run interrupted by graceful shutdowns (cancelled mid-phase, before any
new boundary), each time right after recovery re-dispatched it, never goes dead: a release is
progress, not a failed attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from executus_ckpt import (
    CheckpointStatus,
    ResumeState,
    RunCheckpoint,
    RunCheckpointState,
    RunInfo,
    SQLCheckpointStore,
    StoreCheckpointerFactory,
    checkpointed_run,
    recover_interrupted,
)
from executus_ckpt.protocols import CheckpointStore
from tests.faults.crash_loop_child import INNOCENTS, MAX_ATTEMPTS, innocent_ids

REPO = Path(__file__).resolve().parents[2]
MAX_BOOTS = 10
"""Boots after boot 0 within which every run must be settled."""
BOOT_TIMEOUT = 60.0


@dataclass
class Boot:
    returncode: int
    dispatched: Counter[str] = field(default_factory=Counter)
    finished: dict[str, str] = field(default_factory=dict)
    report: dict[str, Any] | None = None


async def _boot(url: str, mode: str) -> Boot:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.faults.crash_loop_child",
        url,
        mode,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONASYNCIODEBUG": "0"},
    )
    try:
        async with asyncio.timeout(BOOT_TIMEOUT):
            output, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    boot = Boot(proc.returncode)
    for line in output.decode().splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "DISPATCH":
            boot.dispatched[rest] += 1
        elif kind == "FINISHED":
            run_id, _, verdict = rest.partition(" ")
            boot.finished[run_id] = verdict
        elif kind == "REPORT":
            boot.report = json.loads(rest)
        else:
            raise AssertionError(f"unexpected line from the child: {line!r}")
    return boot


async def _active(url: str) -> int:
    async with SQLCheckpointStore.open(url) as store:
        return await store.count(status=CheckpointStatus.ACTIVE)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_poison_run_dead_within_budget_innocents_all_finish(sql_url: str) -> None:
    backend = "postgres" if sql_url.startswith("postgresql") else "sqlite"
    started = time.monotonic()
    boot0 = await _boot(sql_url, "start")
    assert boot0.returncode == -signal.SIGKILL, "the poison did not kill boot 0"
    assert set(boot0.finished) == set(), "an innocent finished before the poison struck"
    assert await _active(sql_url) == INNOCENTS + 1

    boots: list[Boot] = []
    while await _active(sql_url) > 0 and len(boots) < MAX_BOOTS:
        boots.append(await _boot(sql_url, "recover"))
    elapsed = time.monotonic() - started

    finished: dict[str, str] = {}
    for boot in boots:
        assert boot.returncode in (0, -signal.SIGKILL), boot
        if boot.returncode == 0:
            assert boot.report is not None and not boot.report["failed"], boot.report
        for run_id, verdict in boot.finished.items():
            assert run_id not in finished, f"{run_id} finished twice"
            finished[run_id] = verdict
    poison_dispatches = boot0.dispatched["poison"] + sum(b.dispatched["poison"] for b in boots)
    kills = sum(1 for b in boots if b.returncode == -signal.SIGKILL)
    per_boot = [
        f"{'killed' if b.returncode else 'clean'}:{sum(b.dispatched.values())}d/{len(b.finished)}f"
        for b in boots
    ]
    print(
        f"\ncrash loop [{backend}]: {len(boots)} recovery boots after boot 0 ({kills} killed by "
        f"the poison), poison dispatched {poison_dispatches} times (boot 0 included), "
        f"{len(finished)}/{INNOCENTS} innocents finished, {elapsed:.1f} s in all; "
        f"per boot (dispatches/finished): {' '.join(per_boot)}"
    )

    async with SQLCheckpointStore.open(sql_url) as store:
        poison = await store.load("poison")
        assert poison is not None
        assert poison.status is CheckpointStatus.DEAD, (len(boots), poison)
        assert poison.last_error is not None and "no progress" in poison.last_error
        dead = [s.run_id async for s in store.iter_summaries(status=CheckpointStatus.DEAD)]
        assert dead == ["poison"], f"innocent runs went dead: {dead}"
        for run_id in innocent_ids():
            assert await store.load(run_id) is None, f"{run_id}: checkpoint not deleted"
        assert await store.count() == 1
    assert len(boots) <= MAX_BOOTS
    assert finished == dict.fromkeys(innocent_ids(), "ok"), finished
    # Within its budget: at most max_attempts recovery dispatches after boot 0.
    assert poison_dispatches - boot0.dispatched["poison"] <= MAX_ATTEMPTS


# -- graceful shutdowns are progress -----------------------------------------------------------

PHASES = ("plan", "research", "write")
SHUTDOWNS = 4


async def _agent(
    factory: StoreCheckpointerFactory,
    info: RunInfo,
    resume: ResumeState,
    mid_phase: asyncio.Event | None,
) -> list[Any]:
    """Two saves per phase then its boundary. With ``mid_phase``, sets it after the first
    save of "research" and waits there to be cancelled."""
    skipper = resume.skipper()
    messages: list[Any] = list(resume.messages) or [{"role": "user", "content": "go"}]
    completed = list(resume.completed_phases)
    iteration = resume.iteration
    async with checkpointed_run(factory, info) as cp:
        for phase in PHASES:
            if skipper.should_skip(phase):
                continue
            for step in range(2):
                iteration += 1
                messages.append({"phase": phase, "step": step})
                await cp.save(RunCheckpointState(messages, iteration, completed))
                if mid_phase is not None and phase == "research":
                    mid_phase.set()
                    await asyncio.sleep(30)  # cancelled here, mid-phase
            completed.append(phase)
            await cp.save(RunCheckpointState(messages, iteration, completed))
    return messages


async def _run_until_shutdown(
    factory: StoreCheckpointerFactory, info: RunInfo, resume: ResumeState
) -> None:
    mid_phase = asyncio.Event()
    task = asyncio.create_task(_agent(factory, info, resume, mid_phase))
    await mid_phase.wait()
    task.cancel()  # a graceful shutdown: checkpointed_run flushes and releases the run
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()


@pytest.mark.timeout(60)
async def test_graceful_shutdowns_never_make_a_healthy_run_dead(store: CheckpointStore) -> None:
    factory = StoreCheckpointerFactory(store)
    info = RunInfo("healthy", inputs={"prompt": "go"})
    # The live run completes "plan", then is shut down mid "research".
    await _run_until_shutdown(factory, info, ResumeState())

    seen: list[RunCheckpoint] = []

    async def interrupted_again(cp: RunCheckpoint) -> None:
        seen.append(cp)
        await _run_until_shutdown(factory, cp.run_info(), cp.resume_state())

    for n in range(SHUTDOWNS):
        report = await recover_interrupted(
            store, interrupted_again, max_attempts=MAX_ATTEMPTS, concurrency=8
        )
        assert report.dispatched == ("healthy",), (n, report)
        assert report.dead == (), (n, report)
        cp = seen[-1]
        resume = cp.resume_state()
        assert list(resume.completed_phases) == ["plan"]
        assert resume.interrupted_tail == [{"phase": "research", "step": 0}]
        assert cp.attempts <= 1, (n, cp.attempts)
        stored = await store.load("healthy")
        assert stored is not None and stored.status is CheckpointStatus.ACTIVE, (n, stored)

    results: list[list[Any]] = []

    async def to_completion(cp: RunCheckpoint) -> None:
        results.append(await _agent(factory, cp.run_info(), cp.resume_state(), None))

    report = await recover_interrupted(
        store, to_completion, max_attempts=MAX_ATTEMPTS, concurrency=8
    )
    assert report.dispatched == ("healthy",) and report.dead == (), report
    assert results == [
        [{"role": "user", "content": "go"}]
        + [{"phase": p, "step": s} for p in PHASES for s in range(2)]
    ]
    assert await store.load("healthy") is None
