"""Resuming a run: PhaseSkipper's multiset rule, RunCheckpoint.run_info()/resume_state(), and
a full interrupt-then-recover cycle on every backend."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from executus_ckpt import (
    PhaseSkipper,
    ResumeState,
    RunCheckpoint,
    RunCheckpointMeta,
    RunCheckpointState,
    RunInfo,
    StoreCheckpointerFactory,
)
from executus_ckpt.lifecycle import checkpointed_run
from executus_ckpt.recovery import recover_interrupted


def decisions(skipper: PhaseSkipper, phases: list[str]) -> list[str]:
    return ["skip" if skipper.should_skip(p) else "run" for p in phases]


# -- PhaseSkipper -----------------------------------------------------------------------------


def test_completed_phases_are_consumed_as_a_multiset() -> None:
    skipper = ResumeState(completed_phases=["plan", "act"]).skipper()
    assert decisions(skipper, ["plan", "act", "act"]) == ["skip", "skip", "run"]


def test_order_of_completed_phases_does_not_matter() -> None:
    skipper = PhaseSkipper(["act", "plan"])
    assert decisions(skipper, ["plan", "act", "act"]) == ["skip", "skip", "run"]


def test_fresh_run_skips_nothing_even_with_duplicate_names() -> None:
    assert decisions(ResumeState().skipper(), ["plan", "plan", "act"]) == ["run"] * 3
    assert decisions(PhaseSkipper(), ["plan", "plan"]) == ["run", "run"]


def test_repeated_phase_is_skipped_as_often_as_it_completed() -> None:
    skipper = ResumeState(completed_phases=["act", "act"]).skipper()
    assert decisions(skipper, ["act", "act", "act"]) == ["skip", "skip", "run"]


def test_live_outputs_do_not_feed_the_skipper() -> None:
    # A resumed run appends to its own completed list as it goes; the skipper was built from
    # the checkpoint's list and is not affected (it took a copy).
    completed = ["plan"]
    skipper = ResumeState(completed_phases=completed).skipper()
    assert skipper.should_skip("plan")
    completed.append("plan")  # the live run completed plan again
    assert not skipper.should_skip("plan")


def test_unknown_phase_is_run() -> None:
    skipper = PhaseSkipper(["plan"])
    assert decisions(skipper, ["research", "plan", "plan"]) == ["run", "skip", "run"]


def test_each_skipper_call_is_fresh_and_independent() -> None:
    resume = ResumeState(completed_phases=["plan"])
    first = resume.skipper()
    second = resume.skipper()
    assert first is not second
    assert first.should_skip("plan")
    assert not first.should_skip("plan"), "consumed"
    assert second.should_skip("plan"), "the other skipper was not consumed"
    assert resume.skipper().should_skip("plan"), "a new skipper starts over"
    assert list(resume.completed_phases) == ["plan"], "the resume state is not consumed"


# -- RunCheckpoint -> RunInfo / ResumeState ---------------------------------------------------


def test_run_info_rebuilds_the_run() -> None:
    meta = RunCheckpointMeta(
        run_id="r1",
        agent_id="agent-9",
        agent_name="Researcher",
        caller_id="u1",
        channel_id="c1",
        guild_id="g1",
        prompt="find X",
        model_tier="large",
        parent_run_id="p0",
    )
    info = RunCheckpoint(meta=meta).run_info()
    assert info == RunInfo(
        run_id="r1",
        subject_id="agent-9",
        name="Researcher",
        caller_id="u1",
        channel_id="c1",
        guild_id="g1",
        model_tier="large",
        parent_run_id="p0",
        inputs={"prompt": "find X"},
    )
    assert dict(info.inputs) == {"prompt": "find X"}
    # Round trip: the meta derived from the rebuilt info is the stored meta.
    assert RunCheckpointMeta.from_run_info(info) == meta


def test_run_info_without_prompt_has_empty_inputs() -> None:
    info = RunCheckpoint(meta=RunCheckpointMeta("r2")).run_info()
    assert info.run_id == "r2"
    assert dict(info.inputs) == {}
    assert info.subject_id is None and info.name is None


def test_empty_prompt_is_kept() -> None:
    info = RunCheckpoint(meta=RunCheckpointMeta("r3", prompt="")).run_info()
    assert dict(info.inputs) == {"prompt": ""}


def test_resume_state_carries_the_progress() -> None:
    cp = RunCheckpoint(
        meta=RunCheckpointMeta("r"),
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        iteration=7,
        completed_phases=["plan", "act"],
        updated_at=datetime(2024, 1, 1, tzinfo=UTC),
    )
    resume = cp.resume_state()
    assert isinstance(resume, ResumeState)
    assert list(resume.messages) == list(cp.messages)
    assert resume.iteration == 7
    assert list(resume.completed_phases) == ["plan", "act"]
    assert decisions(resume.skipper(), ["plan", "act", "act"]) == ["skip", "skip", "run"]


# -- a full cycle: interrupted in phase 3, recovered, finished --------------------------------

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
    final = second.messages
    assert final[: len(pre_crash)] == pre_crash, "the transcript continues from the checkpoint"
    assert final[len(pre_crash) :] == [
        {"phase": "p3", "step": 0, "iteration": 6},
        {"phase": "p3", "step": 1, "iteration": 7},
        {"phase": "p4", "step": 0, "iteration": 8},
        {"phase": "p4", "step": 1, "iteration": 9},
    ]
    assert await store.load("run-1") is None, "the finished run deleted its checkpoint"
    assert await store.list_interrupted() == []
