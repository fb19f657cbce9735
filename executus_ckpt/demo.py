"""The main job, end to end: runs crash with SIGKILL, the service boots again, runs resume.

A small simulated agent service runs several runs through named phases with a growing
transcript in a child process (:mod:`._demo_service`), checkpointing into SQLite. The parent
kills the child with SIGKILL mid-run (a real crash), then "boots" again: lists the interrupted
runs, recovers them with :func:`recover_interrupted`, and the runs resume at their phase
boundary (completed phases skipped, the interrupted phase re-run from its start), finish, and
leave no checkpoint behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpointer import StoreCheckpointerFactory
from .lifecycle import checkpointed_run
from .migrate import migrate
from .recovery import recover_interrupted
from .stores.sql import SQLCheckpointStore
from .types import JSONValue, PhaseSkipper, ResumeState, RunCheckpoint, RunCheckpointState, RunInfo

PHASES = ("plan", "research", "draft", "review")
ITERATIONS_PER_PHASE = 3
DEFAULT_DB = "executus_ckpt_demo.db"
APP_VERSION = "demo-graph-v1"

Emit = Callable[[dict[str, Any]], None]


@dataclass
class RunTrace:
    """What one (simulated) run did; the demo's checks read it."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    resumed_from: int = 0


async def simulated_run(
    factory: StoreCheckpointerFactory,
    info: RunInfo,
    *,
    resume: ResumeState | None,
    latency: float,
    emit: Emit,
) -> RunTrace:
    """One agent run: phases of model/tool iterations, a checkpoint after every iteration."""
    trace = RunTrace()
    skipper = resume.skipper() if resume is not None else PhaseSkipper()
    messages: list[JSONValue] = list(resume.messages) if resume is not None else []
    if not messages:
        messages.append({"role": "user", "content": str(info.inputs.get("prompt", ""))})
    completed: list[str] = list(resume.completed_phases) if resume is not None else []
    iteration = resume.iteration if resume is not None else 0
    trace.resumed_from = len(messages) if resume is not None else 0
    async with checkpointed_run(factory, info) as checkpointer:
        for phase in PHASES:
            if skipper.should_skip(phase):
                trace.skipped.append(phase)
                emit({"run": info.run_id, "event": "skip", "phase": phase})
                continue
            emit({"run": info.run_id, "event": "phase", "phase": phase, "iteration": iteration})
            for step in range(ITERATIONS_PER_PHASE):
                iteration += 1
                await asyncio.sleep(latency)  # the model and the tool take their time
                messages.extend(_iteration_messages(phase, step, iteration))
                await checkpointer.save(
                    RunCheckpointState(
                        messages=messages, iteration=iteration, completed_phases=completed
                    )
                )
                emit(
                    {
                        "run": info.run_id,
                        "event": "saved",
                        "phase": phase,
                        "iteration": iteration,
                        "messages": len(messages),
                    }
                )
            completed.append(phase)
            trace.ran.append(phase)
            await checkpointer.save(
                RunCheckpointState(
                    messages=messages, iteration=iteration, completed_phases=completed
                )
            )
            emit({"run": info.run_id, "event": "phase_done", "phase": phase})
    emit({"run": info.run_id, "event": "finished", "messages": len(messages)})
    return trace


def _iteration_messages(phase: str, step: int, iteration: int) -> list[JSONValue]:
    call_id = f"call-{iteration}"
    return [
        {
            "role": "assistant",
            "tool_calls": [{"id": call_id, "name": f"{phase}_tool", "args": {"step": step}}],
        },
        {"role": "tool", "tool_call_id": call_id, "content": f"{phase} result {step} " * 40},
        {"role": "assistant", "content": f"{phase}: step {step} done (iteration {iteration})"},
    ]


def run_infos(count: int) -> list[RunInfo]:
    """The demo's runs: ``run-1`` ... ``run-<count>``, one agent, one prompt each."""
    return [
        RunInfo(
            run_id=f"run-{i + 1}",
            subject_id="demo-agent",
            name="Researcher",
            caller_id="user-42",
            channel_id="chan-7",
            inputs={"prompt": f"Write report #{i + 1}"},
        )
        for i in range(count)
    ]


# -- the parent: crash, boot, recover ------------------------------------------------------


@dataclass
class DemoSummary:
    """The figures the demo ends with (asserted by the test suite)."""

    db_path: str
    started: int = 0
    finished_before_crash: int = 0
    killed: int = 0
    interrupted_listed: int = 0
    recovered: int = 0
    phases_skipped: int = 0
    phases_rerun: int = 0
    finished: int = 0
    checkpoints_left: int = -1
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            not self.problems
            and self.killed > 0
            and self.recovered == self.interrupted_listed == self.killed
            and self.finished == self.started
            and self.checkpoints_left == 0
        )


def fresh_database(db_path: str | os.PathLike[str]) -> Path:
    """Remove a previous demo database (and its WAL files); returns the absolute path."""
    path = Path(db_path).resolve()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return path


async def run_demo(
    db_path: str | os.PathLike[str] = DEFAULT_DB,
    *,
    runs: int = 4,
    latency: float = 0.05,
    out: Callable[[str], None] = print,
    crash_only: bool = False,
) -> DemoSummary:
    """Run the whole demo; returns its summary. The database file is recreated each time.

    With ``crash_only`` it stops after the crash, leaving the interrupted runs in the file.
    """
    path = fresh_database(db_path)
    url = f"sqlite+aiosqlite:///{path}"
    summary = DemoSummary(db_path=str(path), started=runs)
    out(f"executus_ckpt demo - database: {path}")
    await migrate(url)

    # 1. The service runs, then crashes hard.
    out(f"\n== boot 1: the service starts {runs} runs (phases: {', '.join(PHASES)}) ==")
    finished_before = await _crash_child(url, runs, latency, out)
    summary.finished_before_crash = len(finished_before)
    summary.killed = runs - len(finished_before)
    if crash_only:
        out(f"\nleft {summary.killed} interrupted run(s) in {path}; try:")
        out(f"  executus-ckpt --url sqlite+aiosqlite:///{path} list")
        return summary

    # 2. The service boots again and recovers what was in flight.
    out("\n== boot 2: the service restarts and looks for interrupted runs ==")
    async with SQLCheckpointStore.open(url) as store:
        interrupted = await store.list_interrupted()
        summary.interrupted_listed = len(interrupted)
        for cp in interrupted:
            out(
                f"  interrupted {cp.run_id}: iteration {cp.iteration}, "
                f"{len(cp.messages)} messages, completed phases {list(cp.completed_phases)}"
            )
        factory = StoreCheckpointerFactory(store, executor_id="boot-2", app_version=APP_VERSION)
        traces: dict[str, RunTrace] = {}
        before: dict[str, RunCheckpoint] = {cp.run_id: cp for cp in interrupted}

        def emit(event: dict[str, Any]) -> None:
            _print_event(event, out, resumed=True)

        async def dispatch(cp: RunCheckpoint) -> None:
            resume = cp.resume_state()
            out(
                f"  resuming {cp.run_id} (attempt {cp.attempts}) from its last phase boundary: "
                f"{len(resume.completed_phases)} phases done, iteration {resume.iteration}, "
                f"{len(resume.messages)} of {len(cp.messages)} messages "
                f"({len(resume.interrupted_tail)} of the interrupted phase set aside)"
            )
            traces[cp.run_id] = await simulated_run(
                factory, cp.run_info(), resume=cp.resume_state(), latency=latency / 5, emit=emit
            )

        report = await recover_interrupted(
            store,
            dispatch,
            max_attempts=3,
            concurrency=4,
            owner="boot-2",
            accept=lambda cp: cp.app_version == APP_VERSION,
        )
        summary.recovered = len(report.dispatched)
        for run_id, error in report.failed.items():
            summary.problems.append(f"{run_id}: recovery failed: {error!r}")
        for run_id, trace in traces.items():
            summary.phases_skipped += len(trace.skipped)
            summary.phases_rerun += len(trace.ran)
            expected_skip = list(before[run_id].completed_phases)
            if trace.skipped != expected_skip:
                summary.problems.append(
                    f"{run_id}: skipped {trace.skipped}, expected {expected_skip}"
                )
            boundary = before[run_id].resume_state()
            if trace.resumed_from != len(boundary.messages):
                summary.problems.append(f"{run_id}: did not continue from its phase boundary")
        summary.finished = summary.finished_before_crash + len(
            [t for t in traces.values() if len(t.skipped) + len(t.ran) == len(PHASES)]
        )
        summary.checkpoints_left = await store.count()

    out("\n== summary ==")
    out(f"  runs started:               {summary.started}")
    out(f"  finished before the crash:  {summary.finished_before_crash}")
    out(f"  killed mid-run (SIGKILL):   {summary.killed}")
    out(f"  listed as interrupted:      {summary.interrupted_listed}")
    out(f"  recovered and resumed:      {summary.recovered}")
    out(f"  phases skipped on resume:   {summary.phases_skipped}")
    out(f"  phases (re)run on resume:   {summary.phases_rerun}")
    out(f"  runs finished:              {summary.finished}")
    out(f"  checkpoints left:           {summary.checkpoints_left}")
    for problem in summary.problems:
        out(f"  PROBLEM: {problem}")
    out(f"  result:                     {'OK' if summary.ok else 'FAILED'}")
    return summary


async def _crash_child(url: str, runs: int, latency: float, out: Callable[[str], None]) -> set[str]:
    """Start the service in a child process and SIGKILL it mid-run; returns runs it finished."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "executus_ckpt._demo_service",
        "--url",
        url,
        "--runs",
        str(runs),
        "--latency",
        str(latency),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    finished: set[str] = set()
    phases_done: dict[str, int] = {}
    slowest = f"run-{runs}"
    try:
        async with asyncio.timeout(120):
            while line := await proc.stdout.readline():
                event = json.loads(line)
                _print_event(event, out, resumed=False)
                if event.get("event") == "finished":
                    finished.add(event["run"])
                if event.get("event") == "phase_done":
                    phases_done[event["run"]] = phases_done.get(event["run"], 0) + 1
                # Crash once the fast run is done and the slowest has finished its first phase
                # and is in the middle of its second: every kind of state is on disk.
                if (
                    "run-1" in finished
                    and phases_done.get(slowest, 0) >= 1
                    and event.get("run") == slowest
                    and event.get("event") == "saved"
                ):
                    out(f"  !! kill -9 {proc.pid} (the service crashes mid-run)")
                    proc.send_signal(signal.SIGKILL)
                    break
                if event.get("event") == "all_done":
                    raise RuntimeError("the child finished before it could be killed")
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    out(f"  child exited with {proc.returncode} (SIGKILL = -9)")
    return finished


def _print_event(event: dict[str, Any], out: Callable[[str], None], *, resumed: bool) -> None:
    kind = event.get("event")
    run = event.get("run", "")
    prefix = "  " + ("↻ " if resumed else "")
    if kind == "phase":
        out(f"{prefix}{run}: phase {event['phase']} starts")
    elif kind == "skip":
        out(f"{prefix}{run}: phase {event['phase']} skipped (completed before the crash)")
    elif kind == "phase_done":
        out(f"{prefix}{run}: phase {event['phase']} done")
    elif kind == "finished":
        out(f"{prefix}{run}: finished with {event['messages']} messages, checkpoint deleted")
