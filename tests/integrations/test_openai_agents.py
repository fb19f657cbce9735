"""executus_ckpt.integrations.openai_agents: the Session contract on every store, the SDK's
Runner on a canned offline model, and the example service killed with SIGKILL and recovered.

The SDK's wheel ships no tests, so the Session conformance below mirrors, test by test, the
behaviour ``SQLAlchemySession``'s own suite checks (ordering, limits, pop, clear, isolation,
exact round trip, concurrent mutations, settled cancellation, session settings).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any, cast

import pytest

pytest.importorskip("agents")

from agents import (
    Agent,
    ModelResponse,
    RunConfig,
    Runner,
    TResponseInputItem,
    Usage,
    function_tool,
    set_tracing_disabled,
)
from agents.memory import Session, SessionSettings
from agents.models.interface import Model
from agents.testing import assistant_message, function_call

from executus_ckpt import (
    CheckpointError,
    CheckpointFencedError,
    CheckpointNotFoundError,
    CheckpointSerializationError,
    InMemoryCheckpointStore,
    NoopCheckpointer,
    RunCheckpoint,
    RunCheckpointMeta,
    RunInfo,
    SQLCheckpointStore,
    StoreCheckpointerFactory,
    StoreUnavailableError,
)
from executus_ckpt.integrations.openai_agents import (
    ExecutusSession,
    checkpointed_session,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "openai_agents_service.py"
Item = dict[str, Any]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the network: a fake key, no trace export."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-offline")
    set_tracing_disabled(True)


def info(run_id: str = "run-1", prompt: str = "topic") -> RunInfo:
    return RunInfo(run_id, subject_id="researcher", inputs={"prompt": prompt})


async def stored(store: Any, run_id: str = "run-1") -> list[Any] | None:
    checkpoint = await store.load(run_id)
    return None if checkpoint is None else list(checkpoint.messages)


@contextmanager
def patched(store: Any, **methods: Callable[..., Awaitable[Any]]) -> Iterator[None]:
    """Replace some of ``store``'s methods for the block."""
    for name, method in methods.items():
        setattr(store, name, method)
    try:
        yield
    finally:
        for name in methods:
            delattr(store, name)


def msg(content: str, role: str = "user") -> TResponseInputItem:
    return cast(TResponseInputItem, {"role": role, "content": content})


def contents(items: list[TResponseInputItem]) -> list[Any]:
    return [cast(Item, item).get("content") for item in items]


class ResearchModel(Model):
    """Canned: one ``research`` call per turn until it has ``steps`` findings, then a report
    of them all. ``on_call(input)`` runs at each call; ``inputs`` records what it was given."""

    def __init__(
        self, steps: int, on_call: Callable[[list[Item]], Awaitable[None]] | None = None
    ) -> None:
        self.steps = steps
        self.on_call = on_call
        self.inputs: list[list[Item]] = []

    async def get_response(self, system_instructions: Any, input: Any, *a: Any, **k: Any) -> Any:
        history = [{"role": "user", "content": input}] if isinstance(input, str) else list(input)
        self.inputs.append(history)
        if self.on_call is not None:
            await self.on_call(history)
        findings = [i["output"] for i in history if i.get("type") == "function_call_output"]
        if len(findings) < self.steps:
            step = len(findings)
            output = [function_call("research", {"step": step}, call_id=f"call-{step}")]
        else:
            output = [assistant_message("report: " + "; ".join(findings), item_id="report")]
        return ModelResponse(output=output, usage=Usage(), response_id=None)

    def stream_response(self, *a: Any, **k: Any) -> AsyncIterator[Any]:
        raise NotImplementedError


def research_agent(model: Model, steps_run: list[int], gate: asyncio.Event | None = None) -> Agent:
    @function_tool
    async def research(step: int) -> str:
        """Research one step."""
        if gate is not None and step == 2:
            await gate.wait()
        steps_run.append(step)
        return f"finding {step}"

    return Agent(name="Researcher", instructions="Research.", model=model, tools=[research])


def report(steps: int) -> str:
    return "report: " + "; ".join(f"finding {i}" for i in range(steps))


# -- Session conformance (mirrors SQLAlchemySession's suite), on every store ---------------


async def test_direct_ops(store: Any) -> None:
    factory = StoreCheckpointerFactory(store)
    async with checkpointed_session(factory, info()) as session:
        await session.add_items([msg("Hello"), msg("Hi there!", "assistant")])
        assert contents(await session.get_items()) == ["Hello", "Hi there!"]
        assert contents(cast(Any, await stored(store))) == ["Hello", "Hi there!"]

        popped = await session.pop_item()
        assert popped is not None and cast(Item, popped)["content"] == "Hi there!"
        assert contents(await session.get_items()) == ["Hello"]
        assert contents(cast(Any, await stored(store))) == ["Hello"]

        await session.clear_session()
        assert await session.get_items() == []
        assert await stored(store) == []
        assert await session.pop_item() is None
    assert await store.load("run-1") is None, "a completed run deletes its checkpoint"


async def test_items_round_trip_exactly(store: Any) -> None:
    items: list[Any] = [
        {"role": "user", "content": "café ☕ 日本語 \u0000 end"},
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "x", "annotations": [], "logprobs": []}],
        },
        {"id": "rs_1", "type": "reasoning", "summary": [{"type": "summary_text", "text": "..."}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a":1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"},
        {"role": "user", "content": "numbers", "n": [1, 1.0, -0.0, True, None, 2**53]},
    ]
    async with checkpointed_session(StoreCheckpointerFactory(store), info()) as session:
        await session.add_items(items[:2])
        await session.add_items(items[2:])
        got = await session.get_items()
        assert got == items
        # JSON-distinct values stay distinct: 1 / 1.0 / True, 0.0 / -0.0.
        numbers = cast(Item, got[-1])["n"]
        assert [type(v) for v in numbers] == [int, float, float, bool, type(None), int]
        assert str(numbers[2]) == "-0.0"
        assert await session.get_items(limit=3) == items[-3:]
        assert await stored(store) == items


async def test_get_items_with_limit(store: Any) -> None:
    async with checkpointed_session(StoreCheckpointerFactory(store), info()) as session:
        assert await session.get_items(limit=3) == []
        await session.add_items([msg("1"), msg("2", "assistant"), msg("3"), msg("4", "assistant")])
        assert contents(await session.get_items(limit=2)) == ["3", "4"]
        assert contents(await session.get_items()) == ["1", "2", "3", "4"]
        assert contents(await session.get_items(limit=10)) == ["1", "2", "3", "4"]
        assert contents(await session.get_items(limit=4)) == ["1", "2", "3", "4"]
        assert await session.get_items(limit=0) == []
        with pytest.raises(ValueError, match="limit"):
            await session.get_items(limit=-1)


async def test_get_items_with_limit_reads_only_the_tail(store: Any) -> None:
    """A limited read is a tail read: it never loads the whole transcript."""
    tails: list[int] = []
    load_tail = store.load_tail

    async def spy_tail(run_id: str, limit: int) -> Any:
        tails.append(limit)
        return await load_tail(run_id, limit)

    async def no_full_load(run_id: str) -> Any:
        raise AssertionError("get_items(limit) loaded the whole transcript")

    async with checkpointed_session(StoreCheckpointerFactory(store), info()) as session:
        await session.add_items([msg(str(i)) for i in range(50)])
        with patched(store, load_tail=spy_tail, load=no_full_load):
            assert contents(await session.get_items(limit=3)) == ["47", "48", "49"]
        assert tails == [3]


async def test_session_settings_limit(store: Any) -> None:
    factory = StoreCheckpointerFactory(store)
    async with checkpointed_session(factory, info(), session_settings={"limit": 3}) as session:
        assert isinstance(session.session_settings, SessionSettings)
        assert session.session_settings.limit == 3
        await session.add_items([msg(f"Message {i}") for i in range(10)])
        assert contents(await session.get_items()) == ["Message 7", "Message 8", "Message 9"]
        assert contents(await session.get_items(limit=2)) == ["Message 8", "Message 9"]


async def test_pop_from_empty_session(store: Any) -> None:
    async with checkpointed_session(StoreCheckpointerFactory(store), info()) as session:
        assert await session.pop_item() is None
        assert await stored(store) == []


async def test_add_empty_items_list_writes_nothing(store: Any) -> None:
    async with checkpointed_session(StoreCheckpointerFactory(store), info()) as session:
        before = await store.load("run-1")
        await session.add_items([])
        after = await store.load("run-1")
        assert await session.get_items() == []
        assert (after.iteration, after.updated_at) == (before.iteration, before.updated_at)


async def test_sessions_are_isolated(store: Any) -> None:
    """Different runs keep separate histories; ids are case- and space-sensitive."""
    factory = StoreCheckpointerFactory(store)
    ids = ["Foo", "foo", "tenant", "tenant "]
    async with (
        checkpointed_session(factory, info(ids[0])) as a,
        checkpointed_session(factory, info(ids[1])) as b,
        checkpointed_session(factory, info(ids[2])) as c,
        checkpointed_session(factory, info(ids[3])) as d,
    ):
        for session in (a, b, c, d):
            await session.add_items([msg(session.session_id)])
        for session in (a, b, c, d):
            assert contents(await session.get_items()) == [session.session_id]
            assert contents(await session.get_items(limit=1)) == [session.session_id]
        assert await a.pop_item() == msg("Foo")
        assert contents(await b.get_items()) == ["foo"]


async def test_concurrent_add_items_store_every_item_once(store: Any) -> None:
    submitted = [f"msg-{i}" for i in range(25)]
    async with checkpointed_session(StoreCheckpointerFactory(store), info()) as session:
        await asyncio.gather(*(session.add_items([msg(c)]) for c in submitted))
        got = contents(await session.get_items())
        assert sorted(got) == sorted(submitted)
        assert contents(cast(Any, await stored(store))) == got


async def test_concurrent_pops_return_each_item_once(store: Any) -> None:
    async with checkpointed_session(StoreCheckpointerFactory(store), info()) as session:
        await session.add_items([msg("first"), msg("second", "assistant")])
        popped = await asyncio.gather(session.pop_item(), session.pop_item(), session.pop_item())
        assert sorted(cast(Item, p)["content"] for p in popped if p is not None) == [
            "first",
            "second",
        ]
        assert popped.count(None) == 1
        assert await stored(store) == []


@pytest.mark.parametrize("operation", ["add", "pop", "clear"])
async def test_cancelled_mutation_settles_before_cancelling(store: Any, operation: str) -> None:
    """A cancelled add/pop/clear waits for its write, then raises CancelledError; the store
    and the session agree afterwards."""
    async with checkpointed_session(StoreCheckpointerFactory(store), info()) as session:
        await session.add_items([msg("a"), msg("b")])
        entered, release = asyncio.Event(), asyncio.Event()
        names = [n for n in ("append", "save") if hasattr(store, n)]
        originals = {n: getattr(store, n) for n in names}

        def gated(name: str) -> Callable[..., Awaitable[None]]:
            async def write(*args: Any, **kwargs: Any) -> None:
                entered.set()
                await release.wait()
                await originals[name](*args, **kwargs)

            return write

        with patched(store, **{name: gated(name) for name in names}):
            call: Awaitable[Any] = {
                "add": lambda: session.add_items([msg("c")]),
                "pop": session.pop_item,
                "clear": session.clear_session,
            }[operation]()
            task = asyncio.ensure_future(call)
            try:
                await entered.wait()
                task.cancel()
                await asyncio.sleep(0)
                task.cancel()
                await asyncio.sleep(0.01)
                assert not task.done(), "the cancelled mutation returned before its write"
            finally:
                release.set()
            with pytest.raises(asyncio.CancelledError):
                await task
        expected = {"add": ["a", "b", "c"], "pop": ["a"], "clear": []}[operation]
        assert contents(cast(Any, await stored(store))) == expected
        assert contents(await session.get_items()) == expected


async def test_unserializable_item_is_refused_and_nothing_changes(store: Any) -> None:
    async with checkpointed_session(StoreCheckpointerFactory(store), info()) as session:
        await session.add_items([msg("kept")])
        for bad in ({"content": float("nan")}, {"content": object()}, {1: "int key"}):
            with pytest.raises(CheckpointSerializationError, match="item 1"):
                await session.add_items([msg("ok"), cast(Any, bad)])
        assert contents(await session.get_items()) == ["kept"]
        assert contents(cast(Any, await stored(store))) == ["kept"]
        await session.add_items([msg("after")])
        assert contents(cast(Any, await stored(store))) == ["kept", "after"]


async def test_mutating_an_added_item_changes_nothing_stored(store: Any) -> None:
    async with checkpointed_session(StoreCheckpointerFactory(store), info()) as session:
        item: Item = {"role": "user", "content": "original", "tags": ["a"]}
        await session.add_items([cast(Any, item)])
        item["content"] = "mutated"
        item["tags"].append("b")
        await session.add_items([msg("next")])
        got = await session.get_items()
        got[0]["content"] = "mutated by a reader"  # type: ignore[index]
        expected = [{"role": "user", "content": "original", "tags": ["a"]}, msg("next")]
        assert await stored(store) == expected
        assert await session.get_items() == expected


async def test_failed_write_keeps_items_for_the_next_write(store: Any) -> None:
    async with checkpointed_session(StoreCheckpointerFactory(store), info()) as session:
        await session.add_items([msg("1")])

        async def down(*args: Any, **kwargs: Any) -> None:
            raise StoreUnavailableError("database down", run_id="run-1")

        with patched(store, append=down, save=down), pytest.raises(StoreUnavailableError):
            await session.add_items([msg("2")])
        assert contents(cast(Any, await stored(store))) == ["1"]
        await session.add_items([msg("3")])
        assert contents(cast(Any, await stored(store))) == ["1", "2", "3"]


async def test_refused_write_is_undone(store_url: str | None) -> None:
    """A write the store refuses (over its size cap) leaves the session and the store as
    they were, and does not poison the next write."""
    async with AsyncExitStack() as stack:
        if store_url is None:
            store: Any = InMemoryCheckpointStore(max_checkpoint_bytes=2000)
        else:
            opened = SQLCheckpointStore.open(store_url, max_checkpoint_bytes=2000)
            store = await stack.enter_async_context(opened)
        session = await stack.enter_async_context(
            checkpointed_session(StoreCheckpointerFactory(store), info())
        )
        await session.add_items([msg("small")])
        for refused in (
            lambda: session.add_items([msg("x" * 5000)]),
            lambda: session.end_phase("lone surrogate \ud800"),
        ):
            with pytest.raises(CheckpointError):
                await refused()
            assert contents(await session.get_items()) == ["small"]
            assert contents(cast(Any, await stored(store))) == ["small"]
            assert session.completed_phases == ()
        await session.add_items([msg("next")])
        assert contents(cast(Any, await stored(store))) == ["small", "next"]
        assert await session.pop_item() == msg("next")
        assert contents(cast(Any, await stored(store))) == ["small"]


async def test_a_run_taken_over_fences_the_old_session(store: Any) -> None:
    factory = StoreCheckpointerFactory(store)
    async with checkpointed_session(factory, info()) as old:
        await old.add_items([msg("old")])
        async with checkpointed_session(factory, info()) as new:
            assert new.resumed and contents(await new.get_items()) == ["old"]
            with pytest.raises(CheckpointFencedError):
                await old.add_items([msg("zombie")])
            await new.add_items([msg("new")])
            assert contents(cast(Any, await stored(store))) == ["old", "new"]
        assert await store.load("run-1") is None
        with pytest.raises(CheckpointFencedError):
            await old.add_items([msg("zombie")])
        with pytest.raises(CheckpointFencedError):
            await old.get_items(limit=1)
    async with checkpointed_session(factory, info("run-2")) as session:
        await session.add_items([msg("x")])
        await store.delete("run-2")  # an operator deleted it
        for limit in (None, 1):
            with pytest.raises(CheckpointNotFoundError):
                await session.get_items(limit)


async def test_not_durable_add_items_follows_the_throttle(store: Any) -> None:
    """durable=False: add_items may return before the write (throttle); get_items still
    reads every item added (it flushes first)."""
    factory = StoreCheckpointerFactory(store, throttle=3600)
    async with checkpointed_session(factory, info(), durable=False) as session:
        await session.add_items([msg("1")])  # opens the throttle window
        await session.add_items([msg("2")])  # inside it: kept for the trailing flush
        assert contents(cast(Any, await stored(store))) == ["1"]
        assert contents(await session.get_items(limit=5)) == ["1", "2"]
        assert contents(cast(Any, await stored(store))) == ["1", "2"]
    factory = StoreCheckpointerFactory(store, throttle=3600)
    async with checkpointed_session(factory, info("run-2")) as durable:
        await durable.add_items([msg("1")])
        await durable.add_items([msg("2")])
        assert contents(cast(Any, await stored(store, "run-2"))) == ["1", "2"]


# -- the run lifecycle ---------------------------------------------------------------------


async def test_exit_completes_fails_or_keeps_the_run(store: Any) -> None:
    factory = StoreCheckpointerFactory(store)
    with pytest.raises(RuntimeError, match="boom"):
        async with checkpointed_session(factory, info("failed")) as session:
            await session.add_items([msg("x")])
            raise RuntimeError("boom")
    assert await store.load("failed") is None, "a failed run deletes its checkpoint"

    async def cut_off() -> None:
        async with checkpointed_session(factory, info("cut")) as session:
            await session.add_items([msg("x")])
            await asyncio.Event().wait()

    task = asyncio.create_task(cut_off())
    for _ in range(100):
        if await stored(store, "cut"):
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await stored(store, "cut") == [msg("x")], "a shutdown keeps the checkpoint"

    async with checkpointed_session(factory, info("done")) as session:
        pass
    for call in (session.get_items, session.pop_item, session.clear_session):
        with pytest.raises(RuntimeError, match="closed"):
            await call()
    with pytest.raises(RuntimeError, match="closed"):
        await session.add_items([msg("late")])


async def test_session_protocol_without_a_store() -> None:
    """The SDK's Session protocol; a run without a store is served from memory."""
    async with checkpointed_session(StoreCheckpointerFactory(None), info("mem")) as session:
        assert isinstance(session, Session)
        assert session.session_id == session.run_id == "mem"
        assert isinstance(session.session_settings, SessionSettings)
        assert session.session_settings.limit is None
        assert not session.resumed
        await session.add_items([msg("1"), msg("2")])
        got = await session.get_items(limit=1)
        assert contents(got) == ["2"]
        got[0]["content"] = "changed"  # type: ignore[index]
        assert contents(await session.get_items()) == ["1", "2"]
        assert await session.pop_item() == msg("2")
        await session.clear_session()
        assert await session.get_items() == []
    other = RunCheckpoint(meta=RunCheckpointMeta("other"))
    with pytest.raises(ValueError, match="checkpoint of run 'other'"):
        ExecutusSession(NoopCheckpointer(), run_id="mem", checkpoint=other)


async def test_phases_skip_completed_ones_on_resume(store: Any) -> None:
    factory = StoreCheckpointerFactory(store)

    async def interrupted() -> None:
        async with checkpointed_session(factory, info()) as session:
            assert session.input_for("plan it") == "plan it"
            await session.add_items([msg("plan it"), msg("the plan", "assistant")])
            await session.end_phase("plan")
            assert session.input_for("write it") == "write it"
            await session.add_items([msg("write it")])
            assert session.input_for("write it") == []
            raise asyncio.CancelledError  # cut off mid-phase: kept

    with pytest.raises(asyncio.CancelledError):
        await interrupted()
    checkpoint = await store.load("run-1")
    assert list(checkpoint.completed_phases) == ["plan"]
    assert checkpoint.boundary_message_count == 2

    async with checkpointed_session(factory, info()) as session:
        assert session.resumed and session.completed_phases == ("plan",)
        assert session.should_skip("plan") and not session.should_skip("write")
        assert session.input_for("write it") == [], "the phase's prompt is already stored"
        assert contents(await session.get_items()) == ["plan it", "the plan", "write it"]


# -- the SDK's Runner ----------------------------------------------------------------------


async def test_runner_stores_every_turn_before_the_next(store: Any) -> None:
    """Runner.run(..., session=...) checkpoints each turn: at every model call the store
    holds exactly the history the model is given."""
    seen: list[int] = []

    async def check(history: list[Item]) -> None:
        assert await stored(store) == history
        seen.append(len(history))

    model, steps_run = ResearchModel(4, check), []
    agent = research_agent(model, steps_run)
    async with checkpointed_session(StoreCheckpointerFactory(store), info()) as session:
        result = await Runner.run(agent, session.input_for("topic"), session=session)
        assert result.final_output == report(4)
        assert seen == [1, 3, 5, 7, 9]
        assert len(await session.get_items()) == 10
    assert steps_run == [0, 1, 2, 3]
    assert await store.load("run-1") is None


async def test_runner_conversation_and_run_config_limit(store: Any) -> None:
    """Two Runner.run calls share the history; RunConfig's session limit is a tail read."""
    model = ResearchModel(0)
    agent = Agent(name="Chat", instructions="Chat.", model=model)
    async with checkpointed_session(StoreCheckpointerFactory(store), info()) as session:
        await Runner.run(agent, "What city is the Golden Gate Bridge in?", session=session)
        await Runner.run(agent, "What state is it in?", session=session)
        assert "Golden Gate" in json.dumps(model.inputs[-1])
        await session.add_items([msg(f"Turn {i}") for i in range(10)])
        config = RunConfig(session_settings=SessionSettings(limit=2))
        await Runner.run(agent, "New question", session=session, run_config=config)
        assert contents(cast(Any, model.inputs[-1])) == ["Turn 8", "Turn 9", "New question"]


async def test_killed_run_resumes_from_its_stored_turns(store: Any) -> None:
    """A run cut off mid-way (its process gone) resumes in a new session: same history,
    prompt not repeated, finished steps not redone, finished exactly once."""
    factory = StoreCheckpointerFactory(store)
    gate, first_steps = asyncio.Event(), []
    first = research_agent(ResearchModel(5), first_steps, gate)

    async def doomed() -> None:
        async with checkpointed_session(factory, info()) as session:
            await Runner.run(first, session.input_for("topic"), session=session)

    task = asyncio.create_task(doomed())
    for _ in range(500):
        if first_steps == [0, 1] and len(await stored(store) or []) == 5:
            break
        await asyncio.sleep(0.01)
    # Cut off (a shutdown keeps the checkpoint; SIGKILL is the example service's test).
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    at_crash = await stored(store)
    assert at_crash is not None and len(at_crash) == 5

    model, steps_run = ResearchModel(5), []
    async with checkpointed_session(factory, info()) as session:
        assert session.resumed
        prompt = session.input_for("topic")
        assert prompt == []
        result = await Runner.run(research_agent(model, steps_run), prompt, session=session)
    assert model.inputs[0] == at_crash, "the resumed run starts from its stored turns"
    assert steps_run == [2, 3, 4], "steps stored before the crash are not redone"
    assert result.final_output == report(5)
    assert [i for i in model.inputs[-1] if i.get("content") == "topic"] != []
    assert sum(1 for i in model.inputs[-1] if i.get("content") == "topic") == 1
    assert await store.load("run-1") is None


# -- the example service, killed with SIGKILL and restarted --------------------------------


async def _read_events(
    proc: asyncio.subprocess.Process, events: list[dict[str, Any]], until: Callable[[], bool]
) -> None:
    assert proc.stdout is not None
    while not until():
        line = await proc.stdout.readline()
        if not line:
            return
        events.append(json.loads(line))


async def _service(url: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "--url",
        url,
        "--steps",
        "6",
        "--latency",
        "0.1",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(EXAMPLE.parents[1])},
    )


async def test_example_service_killed_and_recovered(sql_url: str) -> None:
    runs = ("run-1", "run-2")
    proc = await _service(sql_url, "--runs", "2")
    first: list[dict[str, Any]] = []

    def two_steps_stored() -> bool:
        # A model call that got 5 history items: the prompt and 2 turns are durable.
        done = {e["run"] for e in first if e["event"] == "model_call" and e["history"] >= 5}
        return done == set(runs)

    try:
        await asyncio.wait_for(_read_events(proc, first, two_steps_stored), 30)
        assert two_steps_stored(), f"service ended early: {first}"
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = await proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()
    assert not [e for e in first if e["event"] == "finished"], "killed before any run finished"

    async with SQLCheckpointStore.open(sql_url) as store:
        at_crash = {run: await stored(store, run) for run in runs}
    for run, messages in at_crash.items():
        assert messages is not None and len(messages) >= 5 and len(messages) % 2 == 1, run

    proc = await _service(sql_url)  # no new runs: recover only
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    second = [json.loads(line) for line in out.decode().splitlines()]
    recovered = next(e for e in second if e["event"] == "recovered")
    assert recovered["runs"] == list(runs) and recovered["failed"] == []

    finished = Counter(e["run"] for e in first + second if e["event"] == "finished")
    assert finished == Counter(runs), "every run finished exactly once"
    for run in runs:
        messages = cast(list[Any], at_crash[run])
        calls = [e for e in second if e["run"] == run and e["event"] == "model_call"]
        assert calls[0]["history"] == len(messages), "resumed from every stored turn"
        durable_steps = (len(messages) - 1) // 2
        steps = [e["step"] for e in second if e["run"] == run and e["event"] == "tool"]
        assert steps == list(range(durable_steps, 6)), "stored steps are not redone"
        done = next(e for e in second if e["run"] == run and e["event"] == "finished")
        assert done["resumed"] is True
        assert done["output"] == report(6)
    async with SQLCheckpointStore.open(sql_url) as store:
        for run in runs:
            assert await store.load(run) is None, "no checkpoint left"
