"""executus_ckpt.integrations.pydantic_ai on the real pydantic-ai (offline models) and real
stores: memory, SQLite and PostgreSQL; the example service SIGKILLed and recovered on both SQL
backends."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, TypedDict

import pytest
from pydantic import BaseModel
from pydantic_ai import Agent, BinaryContent, UserError
from pydantic_ai.messages import (
    ModelMessage,
    ModelMessagesTypeAdapter,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.test import TestModel

from executus_ckpt import (
    CheckpointSerializationError,
    Executor,
    InMemoryCheckpointStore,
    RunCheckpoint,
    RunCheckpointState,
    RunInfo,
    SQLCheckpointStore,
    StoreCheckpointerFactory,
    recover_interrupted,
)
from executus_ckpt.integrations.pydantic_ai import (
    MESSAGE_CODEC,
    CheckpointedAgentRun,
    checkpointed_agent_run,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pydantic_ai_service.py"
INFO = RunInfo("run-1", inputs={"prompt": "solar"})
STAGES = (("research", "Research solar"), ("write", "Write the report"))


class Fast(TypedDict):
    heartbeat_interval: float
    stale_after: float
    sweep_interval: float


FAST = Fast(heartbeat_interval=0.2, stale_after=1.0, sweep_interval=0.1)


def as_json(messages: list[ModelMessage]) -> list[Any]:
    return list(ModelMessagesTypeAdapter.dump_python(messages, mode="json"))


def prompt_of(messages: list[ModelMessage]) -> str:
    for message in reversed(messages):
        for part in message.parts:
            if isinstance(part, UserPromptPart) and isinstance(part.content, str):
                return part.content
    raise AssertionError("no user prompt")


def ends_in_tool_call(messages: list[ModelMessage]) -> bool:
    return isinstance(messages[-1], ModelResponse) and bool(messages[-1].tool_calls)


class Service:
    """A two-stage agent on a FunctionModel: each stage calls the ``work`` tool once, then
    answers. ``block`` makes the tool of that stage wait until the test cancels the run (a
    shutdown mid-tool-call). ``probe`` is awaited inside the tool (the save that precedes
    the tool call is already stored)."""

    def __init__(self) -> None:
        self.model_calls: Counter[str] = Counter()
        self.tool_calls: Counter[str] = Counter()
        self.block: str | None = None
        self.blocked = asyncio.Event()
        self.probes: dict[str, Any] = {}
        self.probe: Any = None
        self.agent = Agent(FunctionModel(self.model))
        self.agent.tool_plain(self.work)

    def model(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        prompt = prompt_of(messages)
        self.model_calls[prompt] += 1
        if any(isinstance(p, ToolReturnPart) for p in messages[-1].parts):
            return ModelResponse(parts=[TextPart(f"{prompt}: done")])
        return ModelResponse(parts=[ToolCallPart("work", {"task": prompt})])

    async def work(self, task: str) -> str:
        """Do the stage's work."""
        self.tool_calls[task] += 1
        if self.probe is not None:
            self.probes[task] = await self.probe()
        if task == self.block:
            self.blocked.set()
            await asyncio.Event().wait()  # until cancelled
        return f"notes on {task}"

    async def run(
        self, factory: StoreCheckpointerFactory, cp: RunCheckpoint | None = None
    ) -> CheckpointedAgentRun:
        async with checkpointed_agent_run(factory, INFO, self.agent, resume=cp) as run:
            for name, prompt in STAGES:
                await run.stage(name, prompt)
        return run


async def interrupt(run: Any, started: asyncio.Event) -> None:
    """Cancel ``run`` (a coroutine) once ``started`` is set: a shutdown mid-tool-call."""
    task = asyncio.create_task(run)
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait([task, waiter], timeout=10, return_when=asyncio.FIRST_COMPLETED)
    assert not task.done(), f"the run ended before it was interrupted: {task.result()}"
    assert waiter.done(), "the run never reached the blocking tool"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def codec_factory(store: Any) -> StoreCheckpointerFactory:
    return StoreCheckpointerFactory(store, throttle=0, message_codec=MESSAGE_CODEC)


async def test_each_step_is_saved_and_each_stage_end_is_a_boundary(store: Any) -> None:
    service = Service()
    factory = codec_factory(store)

    async def probe() -> RunCheckpoint:
        cp: RunCheckpoint | None = await store.load(INFO.run_id)
        assert cp is not None
        return cp

    service.probe = probe
    run = await service.run(factory)

    # Inside the research tool: the step that produced the tool call was already saved.
    first = service.probes["Research solar"]
    stored = MESSAGE_CODEC.load_all(first.messages)
    assert [type(m) for m in stored] == [ModelRequest, ModelResponse] and ends_in_tool_call(stored)
    assert list(first.completed_phases) == []
    assert factory.resume_state(first).messages == []  # no boundary yet: start over
    # Inside the write tool: research ended at a boundary with its usage and output.
    second = service.probes["Write the report"]
    research = run.messages[:4]
    assert list(second.completed_phases) == ["research"]
    assert second.boundary_message_count == 4
    assert as_json(MESSAGE_CODEC.load_all(second.messages[:4])) == as_json(research)
    assert ends_in_tool_call(MESSAGE_CODEC.load_all(second.messages))
    assert second.boundary_extra["usage"]["requests"] == 2
    assert second.boundary_extra["stage_outputs"] == [["research", "Research solar: done"]]
    resumed = factory.resume_state(second)
    assert all(isinstance(m, ModelRequest | ModelResponse) for m in resumed.messages)
    assert as_json(list(resumed.messages)) == as_json(research)
    assert not ends_in_tool_call(list(resumed.messages))

    assert [r.name for r in run.results] == ["research", "write"]
    assert [r.skipped for r in run.results] == [False, False]
    assert run.output == "Write the report: done"
    assert run.completed_phases == ["research", "write"]
    assert run.usage.requests == 4 and run.usage.tool_calls == 2
    research_usage, write_usage = (r.usage for r in run.results)
    assert research_usage is not None and write_usage is not None
    assert run.usage == research_usage + write_usage
    assert run.iteration == 10  # 5 graph nodes per stage
    assert await store.load(INFO.run_id) is None  # completed: nothing left to recover


async def test_resume_mid_tool_call_skips_done_stages_where_the_raw_transcript_fails(
    store: Any,
) -> None:
    service = Service()
    factory = codec_factory(store)
    service.block = "Write the report"
    await interrupt(service.run(factory), service.blocked)

    cp = await store.load(INFO.run_id)
    assert cp is not None and list(cp.completed_phases) == ["research"]
    raw = MESSAGE_CODEC.load_all(cp.messages)
    assert ends_in_tool_call(raw)
    # Handing pydantic-ai the whole stored transcript fails: it ends in an unanswered call.
    with pytest.raises(UserError, match="unprocessed tool calls"):
        async with service.agent.iter("Write the report", message_history=raw) as agent_run:
            async for _ in agent_run:
                pass
    boundary = as_json(list(factory.resume_state(cp).messages))
    assert len(boundary) == 4

    service.block = None
    runs: list[CheckpointedAgentRun] = []

    async def dispatch(checkpoint: RunCheckpoint) -> None:
        runs.append(await service.run(factory, checkpoint))

    report = await recover_interrupted(store, dispatch)
    assert report.dispatched == (INFO.run_id,) and not report.failed
    (run,) = runs
    assert [(r.name, r.skipped) for r in run.results] == [("research", True), ("write", False)]
    assert run.results[0].output == "Research solar: done"  # the stored output
    assert run.results[0].usage is None
    assert service.model_calls["Research solar"] == 2, "research was not re-run"
    assert service.tool_calls == Counter({"Research solar": 1, "Write the report": 2})
    assert as_json(run.messages[:4]) == boundary, "the boundary transcript is kept as stored"
    assert len(run.messages) == 8 and not ends_in_tool_call(run.messages)
    assert prompt_of(run.messages) == "Write the report"
    # research (2 requests) + the interrupted write (1) + the re-run write (2)
    assert run.usage.requests == 5 and run.usage.tool_calls == 2
    assert run.iteration == 10  # the boundary's 5 + the re-run stage's 5
    assert run.output == "Write the report: done"
    assert await store.load(INFO.run_id) is None


async def test_a_crash_before_the_first_boundary_starts_over(store: Any) -> None:
    service = Service()
    factory = codec_factory(store)
    service.block = "Research solar"
    await interrupt(service.run(factory), service.blocked)
    cp = await store.load(INFO.run_id)
    assert cp is not None and list(cp.completed_phases) == []
    assert ends_in_tool_call(MESSAGE_CODEC.load_all(cp.messages))

    service.block = None
    run = await service.run(factory, cp)
    assert [r.skipped for r in run.results] == [False, False]
    prompts = [p for m in run.messages for p in m.parts if isinstance(p, UserPromptPart)]
    assert [p.content for p in prompts] == ["Research solar", "Write the report"]
    assert len(run.messages) == 8
    assert run.usage.requests == 1 + 4  # the lost attempt's request is still counted
    assert await store.load(INFO.run_id) is None


async def test_a_drained_replicas_run_resumes_on_a_peer_executor(store: Any) -> None:
    service = Service()
    service.block = "Write the report"
    async with Executor(store, name="a", **FAST) as a:
        task = asyncio.create_task(service.run(a.factory(throttle=0, message_codec=MESSAGE_CODEC)))
        await asyncio.wait_for(service.blocked.wait(), 10)
        await a.drain(grace=0)  # SIGTERM: the run is cancelled, its state kept and released
        with pytest.raises(asyncio.CancelledError):
            await task
    service.block = None
    finished: list[CheckpointedAgentRun] = []
    async with Executor(store, name="b", **FAST) as b:
        factory = b.factory(throttle=0, message_codec=MESSAGE_CODEC)

        async def dispatch(cp: RunCheckpoint) -> None:
            finished.append(await service.run(factory, cp))

        b.recover(dispatch)
        for _ in range(100):
            if finished:
                break
            await asyncio.sleep(0.05)
    (run,) = finished
    assert [(r.name, r.skipped) for r in run.results] == [("research", True), ("write", False)]
    assert service.model_calls["Research solar"] == 2, "research was not re-run"
    assert not ends_in_tool_call(run.messages) and len(run.messages) == 8
    assert await store.load(INFO.run_id) is None


class Plan(BaseModel):
    title: str
    steps: list[str]


async def test_repeated_stage_names_and_typed_outputs_come_back(store: Any) -> None:
    planner = Agent(TestModel(), output_type=Plan)
    blocked = asyncio.Event()
    block = True

    async def draft() -> str:
        """Draft the text."""
        if block:
            blocked.set()
            await asyncio.Event().wait()
        return "drafted"

    def write(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        returns = [p for p in messages[-1].parts if isinstance(p, ToolReturnPart)]
        if any(p.tool_name == "draft" for p in returns):
            return ModelResponse(parts=[TextPart("text: drafted")])
        return ModelResponse(parts=[ToolCallPart("draft", {})])

    writer = Agent(FunctionModel(write), tools=[draft])
    factory = codec_factory(store)
    plans: list[Any] = []

    async def host(cp: RunCheckpoint | None = None) -> CheckpointedAgentRun:
        async with checkpointed_agent_run(factory, INFO, planner, resume=cp) as run:
            plans.append((await run.stage("step", "plan it")).output)
            await run.stage("step", "write it", agent=writer)
        return run

    await interrupt(host(), blocked)
    cp = await store.load(INFO.run_id)
    assert cp is not None and list(cp.completed_phases) == ["step"]
    block = False
    run = await host(cp)
    assert [r.skipped for r in run.results] == [True, False]
    fresh, restored = plans
    assert isinstance(fresh, Plan) and isinstance(restored, Plan) and restored == fresh
    assert run.completed_phases == ["step", "step"]
    assert run.output == "text: drafted"


async def test_transcripts_with_binary_content_round_trip(store: Any) -> None:
    image = BinaryContent(data=b"\x89PNG\r\n\x1a\n\x00\xff", media_type="image/png")
    agent = Agent(TestModel(custom_output_text="a red square"))
    async with agent.iter(["What is this?", image]) as agent_run:
        async for _ in agent_run:
            pass
    messages = agent_run.all_messages()
    factory = codec_factory(store)
    cp = await factory.begin(INFO)
    await cp.save(RunCheckpointState(messages=messages, iteration=1, completed_phases=["look"]))
    stored = await store.load(INFO.run_id)
    assert stored is not None
    json.dumps(list(stored.messages))  # stored as plain JSON
    resumed = factory.resume_state(stored)
    # exactly what pydantic-ai's own ModelMessagesTypeAdapter round trip gives
    assert list(resumed.messages) == ModelMessagesTypeAdapter.validate_python(as_json(messages))
    assert as_json(list(resumed.messages)) == as_json(messages)
    part = resumed.messages[0].parts[-1]
    assert isinstance(part, UserPromptPart) and not isinstance(part.content, str)
    loaded = part.content[1]
    assert isinstance(loaded, BinaryContent)
    assert (loaded.data, loaded.media_type) == (image.data, image.media_type)


async def test_a_failing_stage_fails_the_run_and_drops_its_checkpoint(store: Any) -> None:
    service = Service()
    factory = codec_factory(store)

    async def boom() -> None:
        raise RuntimeError("tool broke")

    service.probe = boom
    with pytest.raises(RuntimeError, match="tool broke"):
        await service.run(factory)
    assert await store.load(INFO.run_id) is None


async def test_misuse_is_refused_before_anything_is_written() -> None:
    store = InMemoryCheckpointStore()
    agent = Agent(TestModel())
    with pytest.raises(ValueError, match="message_codec=MESSAGE_CODEC"):
        async with checkpointed_agent_run(StoreCheckpointerFactory(store), INFO, agent):
            pass
    assert await store.load(INFO.run_id) is None
    factory = codec_factory(store)
    with pytest.raises(TypeError, match="message_history"):
        async with checkpointed_agent_run(factory, INFO, agent) as run:
            await run.stage("a", "hi", message_history=[])
    # A transcript pydantic-ai cannot load stays stored for the operator: nothing begins.
    bad = RunCheckpointState(messages=[{"kind": "nonsense"}], iteration=1, completed_phases=["a"])
    plain = StoreCheckpointerFactory(store, throttle=0)
    await (await plain.begin(INFO)).save(bad)
    cp = await store.load(INFO.run_id)
    assert cp is not None
    with pytest.raises(CheckpointSerializationError):
        async with checkpointed_agent_run(factory, INFO, agent, resume=cp):
            pass
    assert await store.load(INFO.run_id) is not None


# -- the example service, SIGKILLed mid-run and restarted ------------------------------------


async def spawn(url: str, cwd: Path, runs: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "--db",
        url,
        "--runs",
        str(runs),
        "--latency",
        "0.3",
        "--throttle",
        "0",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
    )


async def kill_inside_write_tool(proc: asyncio.subprocess.Process) -> list[dict[str, Any]]:
    """SIGKILL ``proc`` once run-1 is inside its "write" tool (after its first boundary, with
    a tool call saved); return every event it printed."""
    assert proc.stdout is not None
    events: list[dict[str, Any]] = []
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line, f"the service ended early: {(await proc.communicate())[1].decode()}"
        events.append(json.loads(line))
        if events[-1] == {"event": "tool", "run_id": "run-1", "query": "Write the report"}:
            proc.send_signal(signal.SIGKILL)
            break
    rest, _ = await asyncio.wait_for(proc.communicate(), 30)
    complete_lines = rest.decode().split("\n")[:-1]  # a line cut by the kill is not an event
    return events + [json.loads(line) for line in complete_lines]


async def test_example_service_killed_mid_run_resumes_at_the_boundary(
    sql_url: str, tmp_path: Path
) -> None:
    first = await spawn(sql_url, tmp_path, runs=2)
    try:
        before = await kill_inside_write_tool(first)
    finally:
        if first.returncode is None:
            first.kill()
            await first.wait()
    assert first.returncode == -signal.SIGKILL
    assert not any(e["event"] == "all_done" for e in before)

    async with SQLCheckpointStore.open(sql_url) as store:
        stored = {
            run_id: cp
            for run_id in ("run-1", "run-2")
            if (cp := await store.load(run_id)) is not None
        }
    killed = stored["run-1"]
    assert list(killed.completed_phases) == ["research"]
    assert ends_in_tool_call(MESSAGE_CODEC.load_all(killed.messages)), "killed mid-tool-call"
    boundaries = {r: cp.resume_state().messages for r, cp in stored.items()}

    assert len(boundaries["run-1"]) == 4  # research: prompt, tool call, result, answer

    second = await spawn(sql_url, tmp_path, runs=0)
    try:
        out, err = await asyncio.wait_for(second.communicate(), 30)
    finally:
        if second.returncode is None:
            second.kill()
            await second.wait()
    assert second.returncode == 0, err.decode()
    after = [json.loads(line) for line in out.decode().splitlines()]
    assert after[-1] == {"event": "all_done"}
    recovery = next(e for e in after if e["event"] == "recovery_done")
    assert recovery["run_ids"] == sorted(stored)

    finished = [e for e in before + after if e["event"] == "finished"]
    assert Counter(e["run_id"] for e in finished) == {"run-1": 1, "run-2": 1}
    for run_id, cp in stored.items():
        completed = list(cp.completed_phases)
        done = [
            (e["stage"], e["skipped"])
            for e in after
            if e["event"] == "stage_done" and e["run_id"] == run_id
        ]
        assert done == [(stage, stage in completed) for stage in ("research", "write")]
        n = run_id.removeprefix("run-")
        queries = {"research": f"Research topic {n}", "write": "Write the report"}
        rerun = [e["query"] for e in after if e["event"] == "tool" and e["run_id"] == run_id]
        assert rerun == [q for stage, q in queries.items() if stage not in completed]
        (end,) = [e for e in after if e["event"] == "finished" and e["run_id"] == run_id]
        prefix = list(boundaries[run_id])
        assert end["messages"][: len(prefix)] == prefix, "the boundary transcript was kept"
        assert len(end["messages"]) == 8
    async with SQLCheckpointStore.open(sql_url) as store:
        assert await store.list_interrupted() == []
        assert await store.load("run-1") is None and await store.load("run-2") is None
