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
import contextlib
import json
import os
import signal
import sys
import time
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


# -- the replicas: three processes share one SQLite file; one killed, one drained ----------

DEFAULT_REPLICAS_DB = "executus_ckpt_demo_replicas.db"
REPLICAS = ("replica-1", "replica-2", "replica-3")  # 1 is SIGKILLed, 2 SIGTERMed, 3 survives


@dataclass
class ReplicasSummary:
    """The figures the replicas part of the demo ends with (asserted by the test suite)."""

    db_path: str
    stale_after: float
    sweep_interval: float
    heartbeat_interval: float
    grace: float
    runs: int = 0
    killed_runs: list[str] = field(default_factory=list)
    drained_runs: list[str] = field(default_factory=list)
    killed_resumed: int = 0
    drained_resumed: int = 0
    kill_handoff: float | None = None
    drain_handoff: float | None = None
    heartbeat_age_at_kill: float | None = None
    finished_once: int = 0
    fenced: int = 0
    checkpoints_left: int = -1
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            not self.problems
            and bool(self.killed_runs)
            and bool(self.drained_runs)
            and self.killed_resumed == len(self.killed_runs)
            and self.drained_resumed == len(self.drained_runs)
            and self.finished_once == self.runs > 0
            and self.fenced == 0
            and self.checkpoints_left == 0
            and self.kill_handoff is not None
            and self.drain_handoff is not None
        )


def replicas_db_for(db_path: str | os.PathLike[str]) -> Path:
    """The replicas part's database: a sibling of the crash part's (``<stem>_replicas.db``)."""
    path = Path(db_path)
    return path.with_name(f"{path.stem}_replicas{path.suffix or '.db'}")


async def run_replicas_demo(
    db_path: str | os.PathLike[str] = DEFAULT_REPLICAS_DB,
    *,
    runs_per_replica: int = 4,
    heartbeat_interval: float = 0.3,
    stale_after: float = 2.0,
    sweep_interval: float = 0.3,
    grace: float = 0.5,
    step: float = 0.2,
    time_limit: float = 60.0,
    out: Callable[[str], None] = print,
) -> ReplicasSummary:
    """Three replica processes share runs on one SQLite file; SIGKILL one, SIGTERM another.

    The survivor resumes both sets: the drained runs at its next sweep, the killed replica's
    after ``stale_after``. Every run must finish exactly once (``finished`` events counted
    across all processes) and leave no checkpoint. The whole part is bounded by ``time_limit`` s.
    """
    path = fresh_database(db_path)
    url = f"sqlite+aiosqlite:///{path}"
    summary = ReplicasSummary(
        db_path=str(path),
        stale_after=stale_after,
        sweep_interval=sweep_interval,
        heartbeat_interval=heartbeat_interval,
        grace=grace,
        runs=len(REPLICAS) * runs_per_replica,
    )
    killed, drained, survivor = REPLICAS
    out(f"\n== replicas: {len(REPLICAS)} processes share runs on one SQLite file ==")
    out(f"  database: {path}")
    out(
        f"  heartbeat every {heartbeat_interval} s, stale_after {stale_after} s, sweep every "
        f"{sweep_interval} s, drain grace {grace} s; {runs_per_replica} live runs each"
    )
    await migrate(url)

    procs: dict[str, asyncio.subprocess.Process] = {}
    events: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
    readers: list[asyncio.Task[None]] = []
    finished: dict[str, list[str]] = {}  # run -> replicas that finished it
    dispatched: dict[str, list[tuple[str, float]]] = {}  # run -> (replica, time)
    owned_by: dict[str, str] = {}
    phases_done: dict[str, int] = {}
    executor_ids: dict[str, str] = {}
    exited: set[str] = set()
    kill_at: float | None = None
    waiting_for: list[str] = ["the replicas to start"]
    term_at: float | None = None

    def note(name: str, event: dict[str, Any]) -> None:
        kind, run = event.get("event"), str(event.get("run", ""))
        if kind == "ready":
            executor_ids[name] = str(event.get("executor"))
            out(f"  [{name}] ready (pid {event.get('pid')})")
        elif kind == "started":
            owned_by[run] = name
            out(f"  [{name}] {run} started")
        elif kind == "phase_done":
            phases_done[run] = phases_done.get(run, 0) + 1
        elif kind == "dispatched":
            dispatched.setdefault(run, []).append((name, float(event["t"])))
            out(
                f"  [{name}] ↻ {run} dispatched (attempt {event.get('attempts')}, "
                f"phases done {event.get('phases_done')})"
            )
        elif kind == "finished":
            finished.setdefault(run, []).append(name)
            out(f"  [{name}] {run} finished, checkpoint deleted")
        elif kind == "fenced":
            summary.fenced += 1
            out(f"  [{name}] {run} FENCED ({event.get('where')})")
        elif kind in ("draining", "drained", "exit"):
            detail = {k: v for k, v in event.items() if k not in ("event", "replica", "pid", "t")}
            out(f"  [{name}] {kind} {detail if detail else ''}".rstrip())
        elif kind == "eof":
            exited.add(name)

    async def until(condition: Callable[[], bool], what: str) -> None:
        waiting_for[:] = [what]
        while not condition():
            note(*await events.get())

    async def read(name: str, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            with contextlib.suppress(ValueError):
                await events.put((name, json.loads(line)))
        await events.put((name, {"event": "eof"}))

    def runs_of(name: str) -> list[str]:
        return sorted(run for run, owner in owned_by.items() if owner == name)

    try:
        async with asyncio.timeout(time_limit), SQLCheckpointStore.open(url) as store:
            for name in REPLICAS:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "executus_ckpt._replica_service",
                    *("--url", url, "--name", name, "--runs", str(runs_per_replica)),
                    *("--hb", str(heartbeat_interval), "--stale", str(stale_after)),
                    *("--sweep", str(sweep_interval), "--grace", str(grace), "--step", str(step)),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
                procs[name] = proc
                assert proc.stdout is not None
                readers.append(asyncio.create_task(read(name, proc.stdout)))

            # Mid-way: every run of the two doomed replicas has finished a phase, none is done.
            def midway() -> bool:
                if exited:
                    raise RuntimeError(f"{sorted(exited)} exited before the signals")
                doomed = runs_of(killed) + runs_of(drained)
                return len(doomed) == 2 * runs_per_replica and all(
                    phases_done.get(run, 0) >= 1 for run in doomed
                )

            await until(midway, "the runs to be mid-way")
            # Kill just after a heartbeat, so that the hand-off shows stale_after itself.
            age = await _heartbeat_age(store, executor_ids[killed])
            polled = time.time()
            deadline = asyncio.get_running_loop().time() + heartbeat_interval * 2
            while age is not None and age > 0.05 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
                age = await _heartbeat_age(store, executor_ids[killed])
                polled = time.time()
            kill_at = time.time()
            procs[killed].send_signal(signal.SIGKILL)
            term_at = time.time()
            procs[drained].send_signal(signal.SIGTERM)
            if age is not None:
                summary.heartbeat_age_at_kill = age + (kill_at - polled)
            summary.killed_runs = [run for run in runs_of(killed) if run not in finished]
            out(
                f"  !! kill -9 {procs[killed].pid} ({killed}: {len(summary.killed_runs)} runs "
                f"mid-way; its last heartbeat {summary.heartbeat_age_at_kill or 0:.2f} s ago)"
            )
            out(f"  !! kill -TERM {procs[drained].pid} ({drained}: drains, grace {grace} s)")

            all_runs = runs_of(killed) + runs_of(drained) + runs_of(survivor)
            await until(lambda: {drained, killed} <= exited, "the signalled replicas to exit")
            summary.drained_runs = [
                run for run in runs_of(drained) if drained not in finished.get(run, [])
            ]
            await until(lambda: all(run in finished for run in all_runs), "every run to finish")
            procs[survivor].send_signal(signal.SIGTERM)
            await until(lambda: survivor in exited, f"{survivor} to exit")
            # A last look: an extra finish (a double run) would have been printed by now.
            for name, proc in procs.items():
                summary.exit_codes[name] = await proc.wait()
            while not events.empty():
                note(*events.get_nowait())
            summary.checkpoints_left = await store.count()
    except TimeoutError:
        summary.problems.append(f"timed out ({time_limit} s) waiting for {waiting_for[0]}")
    except RuntimeError as exc:
        summary.problems.append(str(exc))
    finally:
        for proc in procs.values():  # only the processes started here, by their PID
            if proc.returncode is None:
                proc.kill()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await proc.wait()
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

    _check_replicas(summary, finished, dispatched, kill_at, term_at, survivor)
    _print_replicas_summary(summary, out)
    return summary


async def _heartbeat_age(store: SQLCheckpointStore, executor_id: str) -> float | None:
    """Seconds since the executor's last heartbeat, by the database's clock."""
    for info in await store.list_executors():
        if info.id == executor_id:
            return info.heartbeat_age
    return None


def _check_replicas(
    summary: ReplicasSummary,
    finished: dict[str, list[str]],
    dispatched: dict[str, list[tuple[str, float]]],
    kill_at: float | None,
    term_at: float | None,
    survivor: str,
) -> None:
    problems = summary.problems
    summary.finished_once = sum(1 for who in finished.values() if len(who) == 1)
    for run, who in sorted(finished.items()):
        if len(who) > 1:
            problems.append(f"{run} finished {len(who)} times ({', '.join(who)})")

    def resumed(runs: list[str], since: float | None, what: str) -> tuple[int, float | None]:
        count, first = 0, None
        for run in runs:
            elsewhere = [(n, t) for n, t in dispatched.get(run, []) if n == survivor]
            if len(dispatched.get(run, [])) != 1 or not elsewhere:
                problems.append(f"{run} ({what}): dispatched {dispatched.get(run, [])}")
                continue
            count += 1
            if since is not None:
                handoff = elsewhere[0][1] - since
                first = handoff if first is None else min(first, handoff)
        return count, first

    summary.killed_resumed, summary.kill_handoff = resumed(summary.killed_runs, kill_at, "killed")
    summary.drained_resumed, summary.drain_handoff = resumed(
        summary.drained_runs, term_at, "drained"
    )
    if summary.drain_handoff is not None and summary.drain_handoff >= summary.stale_after:
        problems.append(
            f"drained runs waited {summary.drain_handoff:.2f} s: not before stale_after "
            f"({summary.stale_after} s)"
        )
    if summary.kill_handoff is not None:
        since_beat = summary.kill_handoff + (summary.heartbeat_age_at_kill or 0.0)
        if since_beat < summary.stale_after - 0.05:
            problems.append(
                f"a killed run was taken {since_beat:.2f} s after its owner's last heartbeat: "
                f"before stale_after ({summary.stale_after} s)"
            )
        if summary.kill_handoff > summary.stale_after + summary.sweep_interval + 1.5:
            problems.append(f"the killed runs waited {summary.kill_handoff:.2f} s")
    expected = {REPLICAS[0]: -signal.SIGKILL, REPLICAS[1]: 0, REPLICAS[2]: 0}
    if summary.exit_codes and summary.exit_codes != expected:
        problems.append(f"exit codes {summary.exit_codes}, expected {expected}")


def _print_replicas_summary(summary: ReplicasSummary, out: Callable[[str], None]) -> None:
    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    killed, drained, survivor = REPLICAS
    out("\n== replicas: summary ==")
    out(f"  runs started (3 replicas):  {summary.runs}")
    out(
        f"  {killed + ' SIGKILLed:':<28}{len(summary.killed_runs)} runs mid-way; "
        f"resumed by {survivor}: {summary.killed_resumed}"
    )
    out(
        f"  {drained + ' drained:':<28}{len(summary.drained_runs)} runs released; "
        f"resumed by {survivor}: {summary.drained_resumed}"
    )
    out(
        f"  hand-off after SIGKILL:     {secs(summary.kill_handoff)} (stale_after "
        f"{summary.stale_after} s; last heartbeat {secs(summary.heartbeat_age_at_kill)} "
        "before the kill)"
    )
    out(
        f"  hand-off after SIGTERM:     {secs(summary.drain_handoff)} (drain grace "
        f"{summary.grace} s + at most one sweep of {summary.sweep_interval} s)"
    )
    out(f"  runs finished exactly once: {summary.finished_once} of {summary.runs}")
    out(f"  fenced writes:              {summary.fenced}")
    out(f"  checkpoints left:           {summary.checkpoints_left}")
    for problem in summary.problems:
        out(f"  PROBLEM: {problem}")
    # Not "result:": the crash part above already prints the demo's one "result:" line.
    out(f"  result (replicas):          {'OK' if summary.ok else 'FAILED'}")
