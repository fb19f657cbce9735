"""A full interrupt-then-recover cycle on every store (memory, SQLite, PostgreSQL): a run cut
off in its third phase resumes at that phase's start and finishes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from executus_ckpt import (
    PhaseSkipper,
    ResumeState,
    RunCheckpoint,
    RunCheckpointState,
    RunInfo,
    StoreCheckpointerFactory,
)
from executus_ckpt.lifecycle import checkpointed_run
from executus_ckpt.recovery import recover_interrupted

PHASES = ("p1", "p2", "p3", "p4")
ITERATIONS = 2


class AgentRun:
    """A run loop: phases of iterations, a save after each iteration and at each phase end."""

    def __init__(self, *, block_in: str | None = None) -> None:
        self.events: list[tuple[str, ...]] = []
        self.messages: list[Any] = []
        self.block_in = block_in
        self.blocked = asyncio.Event()
        self.unblock = asyncio.Event()  # never set: the run is cut off while it waits

    async def __call__(
        self, factory: StoreCheckpointerFactory, info: RunInfo, resume: ResumeState | None
    ) -> list[Any]:
        skipper = resume.skipper() if resume is not None else PhaseSkipper()
        messages: list[Any] = list(resume.messages) if resume is not None else []
        if not messages:
            messages.append({"role": "user", "content": info.inputs.get("prompt")})
        completed = list(resume.completed_phases) if resume is not None else []
        iteration = resume.iteration if resume is not None else 0
        self.messages = messages
        async with checkpointed_run(factory, info) as cp:
            for phase in PHASES:
                if skipper.should_skip(phase):
                    self.events.append(("skip", phase))
                    continue
                for step in range(ITERATIONS):
                    iteration += 1
                    self.events.append(("iter", phase, str(step)))
                    messages.append({"phase": phase, "step": step, "iteration": iteration})
                    await cp.save(
                        RunCheckpointState(
                            messages=messages, iteration=iteration, completed_phases=completed
                        )
                    )
                    if phase == self.block_in and step == 0:
                        self.blocked.set()
                        await self.unblock.wait()
                completed.append(phase)
                await cp.save(
                    RunCheckpointState(
                        messages=messages, iteration=iteration, completed_phases=completed
                    )
                )
        self.events.append(("finished",))
        return messages


async def test_interrupted_run_resumes_at_its_phase_boundary(store: Any) -> None:
    info = RunInfo("run-1", subject_id="agent", name="Writer", inputs={"prompt": "write it"})

    # Boot 1: the run is cut off (task cancelled) in the middle of its third phase.
    first = AgentRun(block_in="p3")
    boot1 = StoreCheckpointerFactory(store, executor_id="boot-1")
    task = asyncio.create_task(first(boot1, info, None))
    await first.blocked.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert first.events == [
        ("iter", "p1", "0"),
        ("iter", "p1", "1"),
        ("iter", "p2", "0"),
        ("iter", "p2", "1"),
        ("iter", "p3", "0"),
    ]
    stored = await store.load("run-1")
    assert stored is not None, "a cancelled run keeps its checkpoint"
    assert list(stored.completed_phases) == ["p1", "p2"]
    assert stored.iteration == 5
    pre_crash = list(stored.messages)
    assert len(pre_crash) == 1 + 5 and pre_crash[-1] == {"phase": "p3", "step": 0, "iteration": 5}

    # Boot 2: recovery re-dispatches the same run function from the checkpoint.
    second = AgentRun()
    boot2 = StoreCheckpointerFactory(store, executor_id="boot-2")
    seen: list[RunCheckpoint] = []

    async def dispatch(cp: RunCheckpoint) -> None:
        seen.append(cp)
        await second(boot2, cp.run_info(), cp.resume_state())

    report = await recover_interrupted(store, dispatch, owner="boot-2")
    assert report.dispatched == ("run-1",)
    assert not report.failed and not report.dead and not report.lost
    assert len(seen) == 1 and seen[0].attempts == 1
    assert seen[0].run_info().inputs == {"prompt": "write it"}
    assert seen[0].run_info().subject_id == "agent" and seen[0].run_info().name == "Writer"

    assert second.events == [
        ("skip", "p1"),
        ("skip", "p2"),
        ("iter", "p3", "0"),  # the interrupted phase re-runs from its start
        ("iter", "p3", "1"),
        ("iter", "p4", "0"),
        ("iter", "p4", "1"),
        ("finished",),
    ]
    # The resumed run got the state at the p2 boundary: the interrupted p3's partial work is
    # the tail, not part of the transcript it continues from.
    resume = seen[0].resume_state()
    assert list(resume.messages) == pre_crash[:5] and resume.iteration == 4
    assert list(resume.interrupted_tail) == [{"phase": "p3", "step": 0, "iteration": 5}]
    final = second.messages
    assert final[:5] == pre_crash[:5], "the transcript continues from the boundary"
    assert final[5:] == [
        {"phase": "p3", "step": 0, "iteration": 5},
        {"phase": "p3", "step": 1, "iteration": 6},
        {"phase": "p4", "step": 0, "iteration": 7},
        {"phase": "p4", "step": 1, "iteration": 8},
    ]
    assert await store.load("run-1") is None, "the finished run deleted its checkpoint"
    assert await store.list_interrupted() == []
