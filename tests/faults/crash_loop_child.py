"""Child process for the crash-loop test: one boot of a service with a poison run.

Usage: python -m tests.faults.crash_loop_child URL start|recover

``start`` (boot 0) begins the poison run and :data:`INNOCENTS` innocent runs as live runs; the
poison kills the process (SIGKILL, itself) :data:`POISON_DELAY_LIVE` s after its ``begin``,
while the innocents are mid-run. ``recover`` (every later boot) calls ``recover_interrupted``
with a dispatch that resumes each run from ``cp.resume_state()`` and runs it to completion;
the poison run's dispatch kills the process right after its ``begin``.

Prints (flushed) ``DISPATCH <run>`` when a run is dispatched, ``FINISHED <run> <ok|BAD ...>``
once a run's checkpointed block returned (its checkpoint deleted), and at the end of a boot
that was not killed ``REPORT <json>``. ``ok`` means the finished transcript is exactly the
run's expected one: every phase's messages once, none re-run twice, none lost.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

from executus_ckpt import (
    ResumeState,
    RunCheckpoint,
    RunCheckpointState,
    RunInfo,
    SQLCheckpointStore,
    StoreCheckpointerFactory,
    checkpointed_run,
    recover_interrupted,
)

INNOCENTS = 8
PHASES = ("plan", "research", "draft", "review")
STEPS = 2
"""Iterations per phase (one save each, then the boundary save)."""
STEP_SECONDS = 0.1
"""One iteration's "model call": 4 phases x 2 steps x 0.1 s, about a second per run."""
POISON_DELAY_LIVE = 0.45
"""Seconds after its begin at which the live poison run kills boot 0 (innocents mid-run)."""
MAX_ATTEMPTS = 3
CONCURRENCY = 8
LIFETIME = 60.0
"""Seconds before a boot gives up by itself (a hung boot fails the parent's check)."""


def innocent_ids() -> list[str]:
    return [f"innocent-{i}" for i in range(INNOCENTS)]


def prompt_of(run_id: str) -> dict[str, Any]:
    return {"role": "user", "content": f"task of {run_id}"}


def step_message(run_id: str, phase: str, step: int) -> dict[str, Any]:
    return {"role": "assistant", "run": run_id, "phase": phase, "step": step}


def expected_transcript(run_id: str) -> list[dict[str, Any]]:
    return [prompt_of(run_id)] + [
        step_message(run_id, phase, step) for phase in PHASES for step in range(STEPS)
    ]


def say(line: str) -> None:
    print(line, flush=True)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


async def innocent(factory: StoreCheckpointerFactory, info: RunInfo, resume: ResumeState) -> None:
    """A run of a few phases, resumed at its last boundary (fresh: the empty ResumeState)."""
    run_id = info.run_id
    skipper = resume.skipper()
    messages: list[Any] = list(resume.messages) or [prompt_of(run_id)]
    completed = list(resume.completed_phases)
    iteration = resume.iteration
    # Host state kept in ``extra``: the steps run on the way to the resumed boundary (the
    # re-run interrupted phases are not counted: the boundary's extra comes back, not the
    # last save's).
    steps_run = resume.extra["steps_run"] if resume.extra else 0
    assert isinstance(steps_run, int)
    async with checkpointed_run(factory, info) as cp:
        for phase in PHASES:
            if skipper.should_skip(phase):
                continue
            for step in range(STEPS):
                await asyncio.sleep(STEP_SECONDS)
                iteration += 1
                messages.append(step_message(run_id, phase, step))
                steps_run += 1
                extra = {"steps_run": steps_run}
                await cp.save(RunCheckpointState(messages, iteration, completed, extra))
            completed.append(phase)  # the boundary save of this phase
            extra = {"steps_run": steps_run}
            await cp.save(RunCheckpointState(messages, iteration, completed, extra))
    if messages != expected_transcript(run_id):
        verdict = f"BAD transcript {json.dumps(messages)}"
    elif (iteration, steps_run) != (len(PHASES) * STEPS,) * 2:
        verdict = f"BAD iteration {iteration} steps_run {steps_run}"
    else:
        verdict = "ok"
    say(f"FINISHED {run_id} {verdict}")


async def poison(factory: StoreCheckpointerFactory, info: RunInfo, delay: float) -> None:
    async with checkpointed_run(factory, info):
        if delay:
            await asyncio.sleep(delay)
        kill_self()  # a tool that takes the process down
        await asyncio.sleep(LIFETIME)  # never reached


async def start(store: SQLCheckpointStore) -> None:
    factory = StoreCheckpointerFactory(store)
    async with asyncio.TaskGroup() as group:
        info = RunInfo("poison", inputs={"prompt": "task of poison", "poison": True})
        say("DISPATCH poison")
        group.create_task(poison(factory, info, POISON_DELAY_LIVE))
        for run_id in innocent_ids():
            info = RunInfo(run_id, inputs={"prompt": f"task of {run_id}", "poison": False})
            say(f"DISPATCH {run_id}")
            group.create_task(innocent(factory, info, ResumeState()))


async def recover(store: SQLCheckpointStore) -> None:
    factory = StoreCheckpointerFactory(store)

    async def dispatch(cp: RunCheckpoint) -> None:
        info = cp.run_info()
        say(f"DISPATCH {cp.run_id}")
        if info.inputs.get("poison"):
            await poison(factory, info, 0.0)
        else:
            await innocent(factory, info, cp.resume_state())

    report = await recover_interrupted(
        store, dispatch, max_attempts=MAX_ATTEMPTS, concurrency=CONCURRENCY
    )
    say(
        "REPORT "
        + json.dumps(
            {
                "dispatched": list(report.dispatched),
                "dead": list(report.dead),
                "quarantined": list(report.quarantined),
                "failed": {k: repr(v) for k, v in report.failed.items()},
                "lost": list(report.lost),
            }
        )
    )


async def main(url: str, mode: str) -> None:
    async with SQLCheckpointStore.open(url) as store, asyncio.timeout(LIFETIME):
        await (start(store) if mode == "start" else recover(store))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
