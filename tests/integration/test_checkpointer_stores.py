"""Checkpointer semantics on every store (memory, SQLite, PostgreSQL): persistence, throttle,
ordering, finalize, bad input, the factory, take-over and fencing.

Time is a ManualClock: nothing here sleeps to test timing. Each test runs on every backend
through the ``store`` fixture, wrapped in a ``Recorder`` that counts, gates and fails writes,
over the plain save path and the append path. The store-free semantics are in
``tests/unit/test_checkpointer.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from executus_ckpt import (
    CheckpointError,
    CheckpointFencedError,
    CheckpointSerializationError,
    InMemoryCheckpointStore,
    RunCheckpointMeta,
    RunCheckpointState,
    RunInfo,
    StoreCheckpointer,
    StoreCheckpointerFactory,
    StoreUnavailableError,
    new_checkpointer,
)
from executus_ckpt.testing import ManualClock
from tests._support.helpers import META, drain, settle, state, stored_iteration
from tests._support.wrappers import WRITE_PATHS, Recorder
from tests._support.wrappers import write_path as use_write_path


@pytest.fixture(autouse=True, params=WRITE_PATHS)
def write_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run every test over a plain store and over an appending one."""
    with use_write_path(request.param) as path:
        yield path


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


async def test_failed_write_raises_and_does_not_throttle_the_next_save(store: Any) -> None:
    clock = ManualClock()
    rec = Recorder(store)
    cp = new_checkpointer(rec, META, throttle=60, clock=clock)
    rec.fail_next = 1
    with pytest.raises(StoreUnavailableError):
        await cp.save(state(1))
    # The first write registered the run (the initial row, iteration 0); the save failed.
    assert await stored_iteration(store) == 0
    await cp.save(state(2))  # same instant: the window did not advance on failure
    assert rec.saved == [2]
    assert await stored_iteration(store) == 2
    await cp.save(state(3))  # now the window is open
    assert rec.saved == [2]


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
    if isinstance(store, InMemoryCheckpointStore):
        # Its writes never wait: each save writes in its own task before the next one
        # starts, so none queues behind another.
        assert rec.saved == list(range(1, 201))
    else:
        assert len(rec.saved) < 200, "saves queued behind a write are coalesced"


@pytest.mark.parametrize("turns", [1, 2, 3, 5, 8])
async def test_a_save_cancelled_mid_write_is_still_stored_exactly(store: Any, turns: int) -> None:
    """A save writes in its caller's task: cancelled ``turns`` loop turns after it started
    (waiting for its statement, or after it was applied; on PostgreSQL the statement itself
    is cancelled), its state is still written, by a task the checkpointer owns, and what
    is stored is exactly that state whether or not the interrupted write was applied."""
    cp = new_checkpointer(store, META, throttle=0)
    transcript: list[Any] = [{"i": 0}]
    await cp.save(state(1, transcript))
    await cp.save(state(2, transcript := [*transcript, {"i": 1}]))
    transcript = [*transcript, {"i": 2}, {"i": 3}]
    saving = asyncio.ensure_future(cp.save(state(3, transcript)))
    for _ in range(turns):
        await asyncio.sleep(0)
    saving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await saving
    await cp.aclose()  # waits for the write the cancelled save handed over
    loaded = await store.load("run-1")
    assert loaded is not None and loaded.iteration == 3
    assert list(loaded.messages) == transcript
    again = new_checkpointer(store, META, throttle=0)
    await again.save(state(4, [*transcript, {"i": 4}]))  # the run goes on from there
    loaded = await store.load("run-1")
    assert loaded is not None and list(loaded.messages) == [*transcript, {"i": 4}]


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
        inputs={"other": 1},
    )
    assert row.app_version == "v7" and row.owner == "exec-1"
    assert row.run_info().inputs == {"prompt": "find X", "other": 1}
    await cp.complete()


async def test_factory_prompt_only_when_str(store: Any) -> None:
    factory = StoreCheckpointerFactory(store)
    await factory.begin(RunInfo("r", inputs={"prompt": ["not", "a", "str"]}))
    row = await store.load("r")
    assert row.meta.prompt is None
    # not the checkpoint's prompt, but a JSON-compatible input: it round-trips as given
    assert row.run_info().inputs == {"prompt": ["not", "a", "str"]}


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
    from executus_ckpt._transcript import RECHECKED

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
        # the last messages of the previous save are re-checked (edits in place); no others
        rechecked = transcript[-RECHECKED:]
        transcript += new
        encoded.clear()
        await cp.save(RunCheckpointState(messages=transcript, iteration=i, completed_phases=("p",)))
        # Every encoding that touches a message, whether alone or inside a list.
        touched = [
            m
            for v in encoded
            for m in (v if isinstance(v, list | tuple) else [v])
            if isinstance(m, dict) and m  # {}: the run's (empty) inputs
        ]
        assert touched == rechecked + new, "new messages encoded once, old ones not re-read"
    monkeypatch.undo()
    assert (await store.load("run-1")).messages == transcript
