"""Checkpointer semantics: throttle, trailing flush, ordering, finalize, fencing.

Time is a ManualClock: nothing here sleeps to test timing. Tests that touch the store run on
every backend through the ``store`` fixture, wrapped in a ``Recorder`` that counts, gates and
fails writes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from executus_ckpt import (
    CheckpointError,
    CheckpointFencedError,
    CheckpointSerializationError,
    InMemoryCheckpointStore,
    NoopCheckpointer,
    RunCheckpointMeta,
    RunCheckpointState,
    RunInfo,
    StoreCheckpointer,
    StoreCheckpointerFactory,
    StoreUnavailableError,
    new_checkpointer,
)
from executus_ckpt.protocols import AppendingStore
from executus_ckpt.testing import ManualClock

META = RunCheckpointMeta("run-1", agent_id="agent", prompt="hi")


class Recorder:
    """Wraps a store: records saved iterations, can block (gate) or fail the next writes.

    ``Recorder(store)`` is a plain :class:`CheckpointStore` (whole-transcript saves) or, in the
    ``append`` run of the ``write_path`` parameter, an :class:`AppendingStore` whose appends
    are recorded, gated and failed the same way: every test here runs over both paths.
    """

    path = "save"

    def __new__(cls, inner: Any) -> Recorder:
        kind = AppendingRecorder if cls is Recorder and Recorder.path == "append" else cls
        return object.__new__(kind)

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.saved: list[int] = []
        self.deletes = 0
        self.fail_next = 0
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def save(self, checkpoint: Any) -> None:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise StoreUnavailableError("injected failure", run_id=checkpoint.meta.run_id)
        await self.inner.save(checkpoint)
        self.saved.append(checkpoint.iteration)

    async def delete(self, run_id: str, *, epoch: int | None = None) -> bool:
        self.deletes += 1
        return bool(await self.inner.delete(run_id, epoch=epoch))

    def __getattr__(self, name: str) -> Any:
        if name == "append":  # a plain store: the checkpointer must not find an append
            raise AttributeError(name)
        return getattr(self.inner, name)


class AppendingRecorder(Recorder):
    """A :class:`Recorder` that forwards (and records) the append fast path."""

    appends = 0

    async def append(self, checkpoint: Any, *, base_count: int, encoded_tail: Any = None) -> None:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise StoreUnavailableError("injected failure", run_id=checkpoint.meta.run_id)
        await self.inner.append(checkpoint, base_count=base_count, encoded_tail=encoded_tail)
        self.saved.append(checkpoint.iteration)
        self.appends += 1


@pytest.fixture(autouse=True, params=["save", "append"])
def write_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run every test over a plain store and over an appending one."""
    Recorder.path = request.param
    yield request.param
    Recorder.path = "save"


def test_recorders_take_the_declared_path(write_path: str) -> None:
    rec = Recorder(InMemoryCheckpointStore())
    assert isinstance(rec, AppendingStore) is (write_path == "append")


def state(i: int, messages: list[Any] | None = None, phases: tuple[str, ...] = ()) -> Any:
    msgs = messages if messages is not None else [{"i": k} for k in range(i)]
    return RunCheckpointState(messages=msgs, iteration=i, completed_phases=phases)


async def settle() -> None:
    """Let woken tasks run until they block."""
    for _ in range(20):
        await asyncio.sleep(0)


async def drain() -> None:
    """Let woken tasks run and wait (bounded) for their writes to reach the database.

    Only I/O completion is awaited here; throttle timing is driven by the ManualClock alone.
    """
    await settle()
    for _ in range(50):
        writes = [t for t in asyncio.all_tasks() if t.get_name().startswith("executus_ckpt.write")]
        if not writes:
            return
        await asyncio.wait(writes, timeout=5)
        for _ in range(5):
            await asyncio.sleep(0)


async def stored_iteration(store: Any, run_id: str = "run-1") -> int | None:
    cp = await store.load(run_id)
    return None if cp is None else int(cp.iteration)


# -- persistence and throttle -----------------------------------------------------------------


async def test_no_throttle_persists_every_save(store: Any) -> None:
    rec = Recorder(store)
    cp = new_checkpointer(rec, META, throttle=0)
    for i in range(1, 6):
        await cp.save(state(i))
    assert rec.saved == [1, 2, 3, 4, 5]
    loaded = await store.load("run-1")
    assert loaded.iteration == 5 and loaded.messages == [{"i": k} for k in range(5)]
    assert loaded.meta == META


async def test_save_inside_window_is_flushed_when_window_ends(store: Any) -> None:
    clock = ManualClock()
    rec = Recorder(store)
    cp = new_checkpointer(rec, META, throttle=10, clock=clock)
    await cp.save(state(1))
    assert rec.saved == [1]
    clock.advance(3)
    await cp.save(state(2))
    await cp.save(state(3))
    await settle()
    assert rec.saved == [1], "saves inside the window wait for its end"
    await clock.run_for(6.9)  # t=9.9: still inside
    assert rec.saved == [1]
    await clock.run_for(0.1)  # t=10: window over -> trailing flush of the newest state
    await drain()
    assert rec.saved == [1, 3]
    assert await stored_iteration(store) == 3


async def test_save_after_window_writes_immediately(store: Any) -> None:
    clock = ManualClock()
    rec = Recorder(store)
    cp = new_checkpointer(rec, META, throttle=5, clock=clock)
    await cp.save(state(1))
    clock.advance(5)
    await cp.save(state(2))
    assert rec.saved == [1, 2]


async def test_stored_state_never_more_than_throttle_behind() -> None:
    clock = ManualClock()
    store = InMemoryCheckpointStore()
    rec = Recorder(store)
    cp = new_checkpointer(rec, META, throttle=2, clock=clock)
    # A save every 0.5 s for 20 s: at every instant the store is within 2 s of the newest save.
    newest_at: dict[int, float] = {}
    for i in range(1, 41):
        await cp.save(state(i))
        newest_at[i] = clock()
        await clock.run_for(0.5)
        stored = await stored_iteration(store)
        assert stored is not None
        lag = clock() - newest_at[stored]
        assert lag <= 2.0 + 1e-9, f"stored iteration {stored} is {lag}s old"
    assert len(rec.saved) < 40 / 2 + 2, "throttle bounds the write rate"


async def test_failed_write_raises_and_does_not_throttle_the_next_save(store: Any) -> None:
    clock = ManualClock()
    rec = Recorder(store)
    cp = new_checkpointer(rec, META, throttle=60, clock=clock)
    rec.fail_next = 1
    with pytest.raises(StoreUnavailableError):
        await cp.save(state(1))
    assert await stored_iteration(store) is None
    await cp.save(state(2))  # same instant: the window did not advance on failure
    assert rec.saved == [2]
    assert await stored_iteration(store) == 2
    await cp.save(state(3))  # now the window is open
    assert rec.saved == [2]


async def test_failed_trailing_flush_is_logged_and_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    store = InMemoryCheckpointStore()
    rec = Recorder(store)
    cp = new_checkpointer(rec, META, throttle=10, clock=clock)
    await cp.save(state(1))
    await cp.save(state(2))
    rec.fail_next = 1
    with caplog.at_level(logging.WARNING, logger="executus_ckpt.checkpointer"):
        await clock.run_for(10)
        await drain()
    assert await stored_iteration(store) == 1
    assert any("trailing flush" in r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    await clock.run_for(10)  # retried one window later
    await drain()
    assert await stored_iteration(store) == 2
    await cp.complete()


async def test_flush_writes_pending_state_now_and_is_noop_otherwise(store: Any) -> None:
    clock = ManualClock()
    rec = Recorder(store)
    cp = new_checkpointer(rec, META, throttle=30, clock=clock)
    await cp.flush()
    assert rec.saved == []
    await cp.save(state(1))
    await cp.save(state(2))
    assert rec.saved == [1]
    await cp.flush()
    assert rec.saved == [1, 2]
    await cp.flush()
    assert rec.saved == [1, 2]
    await clock.run_for(30)
    await drain()
    assert rec.saved == [1, 2], "nothing left for the trailing flush"
    await cp.complete()


async def test_throttled_state_is_a_snapshot_of_the_call(store: Any) -> None:
    clock = ManualClock()
    cp = new_checkpointer(store, META, throttle=10, clock=clock)
    transcript: list[Any] = [{"m": 0}]
    await cp.save(RunCheckpointState(messages=transcript, iteration=1))
    transcript.append({"m": 1})
    await cp.save(RunCheckpointState(messages=transcript, iteration=2))
    transcript.append({"m": 2})  # appended after the save: not part of iteration 2
    await clock.run_for(10)
    await drain()
    loaded = await store.load("run-1")
    assert loaded.iteration == 2 and loaded.messages == [{"m": 0}, {"m": 1}]


# -- ordering and concurrency -----------------------------------------------------------------


async def test_200_concurrent_saves_end_with_the_newest_state(store: Any) -> None:
    rec = Recorder(store)
    cp = new_checkpointer(rec, META, throttle=0)
    await asyncio.gather(*(cp.save(state(i, [{"i": i}])) for i in range(1, 201)))
    loaded = await store.load("run-1")
    assert loaded.iteration == 200 and loaded.messages == [{"i": 200}]
    assert rec.saved == sorted(rec.saved), "writes never reorder"
    assert rec.saved[-1] == 200
    assert len(rec.saved) < 200, "saves queued behind a write are coalesced"


async def test_200_concurrent_throttled_saves_end_with_the_newest_state(store: Any) -> None:
    clock = ManualClock()
    rec = Recorder(store)
    cp = new_checkpointer(rec, META, throttle=1, clock=clock)
    await asyncio.gather(*(cp.save(state(i, [{"i": i}])) for i in range(1, 201)))
    await clock.run_for(1)
    await drain()
    assert await stored_iteration(store) == 200
    assert rec.saved == sorted(rec.saved)
    await cp.complete()


async def test_older_snapshot_never_overwrites_newer_when_writes_are_slow() -> None:
    store = InMemoryCheckpointStore()
    rec = Recorder(store)
    rec.gate = asyncio.Event()
    cp = new_checkpointer(rec, META, throttle=0)
    first = asyncio.ensure_future(cp.save(state(1)))
    await rec.entered.wait()
    later = [asyncio.ensure_future(cp.save(state(i))) for i in (2, 3, 4)]
    await settle()
    rec.gate.set()
    await asyncio.gather(first, *later)
    assert rec.saved == [1, 4]
    assert await stored_iteration(store) == 4


async def test_cancelled_save_still_finishes_its_write() -> None:
    store = InMemoryCheckpointStore()
    rec = Recorder(store)
    rec.gate = asyncio.Event()
    cp = new_checkpointer(rec, META, throttle=0)
    task = asyncio.ensure_future(cp.save(state(1)))
    await rec.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    rec.gate.set()
    await cp.complete()  # waits for the in-flight write, then deletes
    assert rec.saved == [1]
    assert await store.load("run-1") is None


# -- finalize ---------------------------------------------------------------------------------


async def test_complete_deletes_and_makes_saves_noops(store: Any) -> None:
    rec = Recorder(store)
    cp = new_checkpointer(rec, META)
    await cp.save(state(1))
    await cp.complete()
    assert await store.load("run-1") is None
    await cp.save(state(2))
    await cp.flush()
    assert await store.load("run-1") is None, "nothing resurrects a finished run"
    await cp.complete()
    await cp.fail(RuntimeError("late"))
    assert rec.deletes == 1, "complete/fail are idempotent"


async def test_fail_deletes(store: Any) -> None:
    cp = new_checkpointer(store, META)
    await cp.save(state(1))
    await cp.fail(ValueError("boom"))
    assert await store.load("run-1") is None


async def test_complete_cancels_pending_trailing_flush(store: Any) -> None:
    clock = ManualClock()
    rec = Recorder(store)
    cp = new_checkpointer(rec, META, throttle=10, clock=clock)
    await cp.save(state(1))
    await cp.save(state(2))  # pending
    await settle()
    assert clock.sleepers == 1
    await cp.complete()
    assert clock.sleepers == 0, "the trailing flush was cancelled"
    await clock.run_for(20)
    await drain()
    assert rec.saved == [1]
    assert await store.load("run-1") is None


async def test_complete_waits_for_in_flight_write() -> None:
    store = InMemoryCheckpointStore()
    rec = Recorder(store)
    rec.gate = asyncio.Event()
    cp = new_checkpointer(rec, META)
    saving = asyncio.ensure_future(cp.save(state(1)))
    await rec.entered.wait()
    completing = asyncio.ensure_future(cp.complete())
    await settle()
    assert not completing.done() and rec.deletes == 0
    rec.gate.set()
    await asyncio.gather(saving, completing)
    assert rec.saved == [1] and rec.deletes == 1
    assert await store.load("run-1") is None, "the in-flight write did not resurrect the run"


async def test_complete_failure_can_be_retried() -> None:
    store = InMemoryCheckpointStore()

    class FailingDelete(Recorder):
        failures = 1

        async def delete(self, run_id: str, *, epoch: int | None = None) -> bool:
            if self.failures:
                self.failures -= 1
                raise StoreUnavailableError("down", run_id=run_id)
            return await super().delete(run_id, epoch=epoch)

    rec = FailingDelete(store)
    cp = new_checkpointer(rec, META)
    await cp.save(state(1))
    with pytest.raises(StoreUnavailableError):
        await cp.complete()
    await cp.save(state(2))
    assert await stored_iteration(store) == 1, "no saves after complete was called"
    await cp.complete()
    assert await store.load("run-1") is None


async def test_aclose_keeps_checkpoint_and_stops_timer(store: Any) -> None:
    clock = ManualClock()
    rec = Recorder(store)
    cp = new_checkpointer(rec, META, throttle=10, clock=clock)
    assert isinstance(cp, StoreCheckpointer)
    await cp.save(state(1))
    await cp.save(state(2))
    await cp.flush()
    await cp.save(state(3))
    await cp.aclose()
    assert clock.sleepers == 0
    await clock.run_for(20)
    assert await stored_iteration(store) == 2


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("throttle", [0, 10])
async def test_bad_message_raises_and_keeps_previous_state(store: Any, throttle: float) -> None:
    clock = ManualClock()
    cp = new_checkpointer(store, META, throttle=throttle, clock=clock)
    await cp.save(state(1, [{"ok": 1}]))
    with pytest.raises(CheckpointSerializationError):
        await cp.save(state(2, [{"ok": 1}, {"bad": float("nan")}]))
    with pytest.raises(CheckpointSerializationError):
        await cp.save(state(2, [{"ok": 1}, {1: "int key"}]))
    with pytest.raises(CheckpointError):
        await cp.save(RunCheckpointState(messages=[], iteration=3, completed_phases="plan"))
    await clock.run_for(10)
    await drain()
    loaded = await store.load("run-1")
    assert loaded.iteration == 1 and loaded.messages == [{"ok": 1}]
    await cp.complete()


# -- factory, take-over, fencing --------------------------------------------------------------


async def test_factory_begin_writes_initial_row_with_prompt(store: Any) -> None:
    factory = StoreCheckpointerFactory(store, executor_id="exec-1", app_version="v7")
    info = RunInfo(
        run_id="r",
        subject_id="agent-9",
        name="Researcher",
        caller_id="u1",
        channel_id="c1",
        guild_id="g1",
        model_tier="large",
        parent_run_id="p0",
        inputs={"prompt": "find X", "other": 1},
    )
    cp = await factory.begin(info)
    row = await store.load("r")
    assert row is not None and row.iteration == 0 and list(row.messages) == []
    assert row.meta == RunCheckpointMeta(
        run_id="r",
        agent_id="agent-9",
        agent_name="Researcher",
        caller_id="u1",
        channel_id="c1",
        guild_id="g1",
        prompt="find X",
        model_tier="large",
        parent_run_id="p0",
    )
    assert row.app_version == "v7" and row.owner == "exec-1"
    assert row.run_info().inputs == {"prompt": "find X"}
    await cp.complete()


async def test_factory_prompt_only_when_str(store: Any) -> None:
    factory = StoreCheckpointerFactory(store)
    await factory.begin(RunInfo("r", inputs={"prompt": ["not", "a", "str"]}))
    row = await store.load("r")
    assert row.meta.prompt is None
    assert row.run_info().inputs == {}


async def test_factory_without_store_is_noop() -> None:
    cp = await StoreCheckpointerFactory(None).begin(RunInfo("r"))
    assert isinstance(cp, NoopCheckpointer)
    await cp.save(state(1))
    await cp.flush()
    await cp.complete()
    await cp.fail(None)
    assert isinstance(new_checkpointer(None, META), NoopCheckpointer)


async def test_factory_write_initial_false_defers_row_to_first_save(store: Any) -> None:
    factory = StoreCheckpointerFactory(store, write_initial=False)
    cp = await factory.begin(RunInfo("r", inputs={"prompt": "p"}))
    assert await store.load("r") is None
    await cp.save(state(1))
    row = await store.load("r")
    assert row.iteration == 1 and row.meta.prompt == "p"
    await cp.complete()
    assert await store.load("r") is None


async def test_begin_on_existing_row_takes_over_and_keeps_attempts(store: Any) -> None:
    factory = StoreCheckpointerFactory(store)
    first = await factory.begin(RunInfo("r", inputs={"prompt": "p"}))
    await first.save(state(3, phases=("plan",)))
    listed = (await store.list_interrupted())[0]
    claimed = await store.claim("r", epoch=listed.epoch, owner="boot-2")
    assert claimed is not None and claimed.attempts == 1
    second = await factory.begin(claimed.run_info())
    row = await store.load("r")
    assert row.attempts == 1, "the recovery-attempt count is kept"
    assert row.iteration == 3 and list(row.completed_phases) == ["plan"], "state kept"
    # The stale writer is fenced out, the new one writes.
    with pytest.raises(CheckpointFencedError):
        await first.save(state(4))
    with pytest.raises(CheckpointFencedError):
        await first.save(state(5))
    await second.save(state(6))
    assert await stored_iteration(store, "r") == 6
    await first.complete()  # a stale writer's finalize leaves the new owner's row alone
    assert await stored_iteration(store, "r") == 6
    await second.complete()
    assert await store.load("r") is None


async def test_each_new_message_is_encoded_once(
    store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from executus_ckpt import codec

    real = codec.encode
    encoded: list[Any] = []

    def counting(value: Any, *, run_id: str | None = None) -> bytes:
        encoded.append(value)
        return real(value, run_id=run_id)

    cp = new_checkpointer(store, META)
    transcript: list[Any] = [{"n": 0}]
    await cp.save(RunCheckpointState(messages=transcript, iteration=0))
    monkeypatch.setattr(codec, "encode", counting)
    for i in range(1, 6):
        new = [{"n": i, "k": k} for k in range(3)]
        transcript += new
        encoded.clear()
        await cp.save(RunCheckpointState(messages=transcript, iteration=i, completed_phases=("p",)))
        # Every encoding that touches a message, whether alone or inside a list.
        touched = [
            m
            for v in encoded
            for m in (v if isinstance(v, list | tuple) else [v])
            if isinstance(m, dict)
        ]
        assert touched == new, "each new message encoded exactly once, old ones never"
    monkeypatch.undo()
    assert (await store.load("run-1")).messages == transcript
