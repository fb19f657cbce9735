"""Issue 11 on every store (memory, SQLite, PostgreSQL): what a resumed run gets.

Phase boundaries, ``extra``, ``interrupted_tail``, exact storage of what was handed at the
last save, ``RunInfo.inputs`` round-trips, ``keep_failed``, and release by a graceful
shutdown. Each rule is exercised through the checkpointer (the append fast path) and, where
it is the store's own rule, through ``store.save`` directly.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest

from executus_ckpt import (
    CheckpointStatus,
    RunCheckpoint,
    RunCheckpointMeta,
    RunCheckpointState,
    RunInfo,
    StoreCheckpointerFactory,
    checkpointed_run,
    new_checkpointer,
    recover_interrupted,
)
from executus_ckpt.testing import ManualClock


def _state(messages: list[Any], iteration: int, phases: list[str], **extra: Any) -> Any:
    return RunCheckpointState(
        messages=messages, iteration=iteration, completed_phases=phases, extra=extra or None
    )


def _exact(value: Any) -> bytes:
    return orjson.dumps(value)


# -- boundaries ---------------------------------------------------------------------------


async def test_resume_is_the_state_at_the_last_boundary(store: Any) -> None:
    cp = await StoreCheckpointerFactory(store).begin(RunInfo("r", inputs={"prompt": "go"}))
    msgs: list[Any] = [{"role": "user", "content": "go"}]
    msgs.append({"plan": 1})
    await cp.save(_state(msgs, 1, [], tokens=10))
    msgs.append({"plan": 2})
    await cp.save(_state(msgs, 2, ["plan"], tokens=20))  # boundary of "plan"
    msgs += [{"tool_call": "search"}, {"partial": True}]
    await cp.save(_state(msgs, 3, ["plan"], tokens=30))
    await cp.save(_state(msgs, 4, ["plan"], tokens=40))
    stored = await store.load("r")
    assert stored is not None and list(stored.messages) == msgs, "the whole transcript is kept"
    resume = stored.resume_state()
    assert list(resume.messages) == msgs[:3]
    assert list(resume.interrupted_tail) == msgs[3:]
    assert resume.iteration == 2 and resume.extra == {"tokens": 20}
    assert list(resume.completed_phases) == ["plan"]
    assert stored.extra == {"tokens": 40} and stored.iteration == 4

    msgs.append({"act": "done"})
    await cp.save(_state(msgs, 5, ["plan", "act"], tokens=50))  # boundary of "act"
    resume = (await store.load("r")).resume_state()
    assert list(resume.messages) == msgs and list(resume.interrupted_tail) == []
    assert resume.iteration == 5 and resume.extra == {"tokens": 50}
    await cp.complete()


async def test_a_repeated_phase_is_a_new_boundary(store: Any) -> None:
    cp = new_checkpointer(store, RunCheckpointMeta("r"))
    msgs: list[Any] = [{"m": 0}]
    await cp.save(_state(msgs, 1, ["act"]))
    msgs.append({"m": 1})
    await cp.save(_state(msgs, 2, ["act"]))
    msgs.append({"m": 2})
    await cp.save(_state(msgs, 3, ["act", "act"]))  # "act" appears a second time
    resume = (await store.load("r")).resume_state()
    assert len(resume.messages) == 3 and resume.iteration == 3


async def test_no_completed_phase_resumes_from_an_empty_transcript(store: Any) -> None:
    cp = await StoreCheckpointerFactory(store).begin(RunInfo("r"))
    msgs = [{"m": 0}, {"m": 1}]
    await cp.save(_state(msgs, 2, [], tokens=1))
    resume = (await store.load("r")).resume_state()
    assert list(resume.messages) == [] and list(resume.interrupted_tail) == msgs
    assert resume.iteration == 0 and resume.extra is None
    assert list(resume.completed_phases) == []


async def test_store_save_records_boundaries_itself(store: Any) -> None:
    meta = RunCheckpointMeta("direct")
    await store.save(RunCheckpoint(meta=meta, messages=[{"a": 1}], iteration=1))
    await store.save(
        RunCheckpoint(
            meta=meta,
            messages=[{"a": 1}, {"b": 2}],
            iteration=2,
            completed_phases=["plan"],
            extra={"k": 1},
        )
    )
    await store.save(
        RunCheckpoint(
            meta=meta,
            messages=[{"a": 1}, {"b": 2}, {"c": 3}],
            iteration=3,
            completed_phases=["plan"],
        )
    )
    resume = (await store.load("direct")).resume_state()
    assert list(resume.messages) == [{"a": 1}, {"b": 2}]
    assert resume.iteration == 2 and resume.extra == {"k": 1}
    assert list(resume.interrupted_tail) == [{"c": 3}]


async def test_compaction_keeps_the_resumed_transcript_a_prefix(store: Any) -> None:
    cp = new_checkpointer(store, RunCheckpointMeta("r"))
    long = [{"m": i} for i in range(10)]
    await cp.save(_state(long, 1, ["plan"]))  # boundary at 10 messages
    compacted = [{"summary": "first ten"}, {"m": 10}]
    await cp.save(_state(compacted, 2, ["plan"]))  # mid-phase compaction
    stored = await store.load("r")
    resume = stored.resume_state()
    assert list(stored.messages) == compacted
    assert list(resume.messages) == compacted[: len(resume.messages)]
    assert len(resume.messages) <= len(compacted)


async def test_a_boundary_inside_the_throttle_window_is_written_at_once(store: Any) -> None:
    clock = ManualClock()
    cp = new_checkpointer(store, RunCheckpointMeta("r"), throttle=60, clock=clock)
    msgs: list[Any] = [{"m": 0}]
    await cp.save(_state(msgs, 1, []))
    msgs.append({"m": 1})
    await cp.save(_state(msgs, 2, []))  # throttled
    assert (await store.load("r")).iteration == 1
    msgs.append({"m": 2})
    await cp.save(_state(msgs, 3, ["plan"]))  # a boundary: not throttled
    stored = await store.load("r")
    assert stored.iteration == 3 and len(stored.resume_state().messages) == 3
    await cp.aclose()


# -- exact storage --------------------------------------------------------------------------

EDITS = [
    ("int-to-true", {"ok": 1}, {"ok": True}),
    ("int-to-float", {"n": 1}, {"n": 1.0}),
    ("zero-to-negative-zero", {"x": 0.0}, {"x": -0.0}),
    ("true-to-int", {"ok": True}, {"ok": 1}),
]


@pytest.mark.parametrize(("old", "new"), [e[1:] for e in EDITS], ids=[e[0] for e in EDITS])
async def test_equal_comparing_replacements_are_stored(store: Any, old: Any, new: Any) -> None:
    cp = new_checkpointer(store, RunCheckpointMeta("r"))
    msgs: list[Any] = [{"first": 0}, old, {"third": 2}]
    await cp.save(_state(msgs, 1, []))
    msgs[1] = new  # Python says old == new; JSON does not
    await cp.save(_state(msgs, 2, []))
    stored = await store.load("r")
    assert _exact(list(stored.messages)) == _exact(msgs)


async def test_an_in_place_edit_of_the_last_message_is_stored(store: Any) -> None:
    cp = new_checkpointer(store, RunCheckpointMeta("r"))
    streaming = {"role": "assistant", "content": "Hel"}
    msgs: list[Any] = [{"role": "user", "content": "hi"}, streaming]
    await cp.save(_state(msgs, 1, []))
    streaming["content"] += "lo, world"  # the host streams into the same dict
    await cp.save(_state(msgs, 2, []))
    assert _exact(list((await store.load("r")).messages)) == _exact(msgs)
    streaming["content"] += "!"
    msgs.append({"role": "user", "content": "next"})  # edit plus append
    await cp.save(_state(msgs, 3, []))
    assert _exact(list((await store.load("r")).messages)) == _exact(msgs)


async def test_verify_catches_an_edit_of_an_older_message(store: Any) -> None:
    msgs: list[Any] = [{"m": i} for i in range(6)]
    plain = new_checkpointer(store, RunCheckpointMeta("plain"))
    verified = new_checkpointer(store, RunCheckpointMeta("verified"), verify=True)
    for cp in (plain, verified):
        await cp.save(_state(msgs, 1, []))
    msgs[0]["m"] = "edited in place"  # an old message, not among the last ones
    for cp in (plain, verified):
        await cp.save(_state(msgs, 2, []))
    assert list((await store.load("verified")).messages) == msgs
    # Without verify, only the last messages are re-checked (documented): the old text stays.
    assert (await store.load("plain")).messages[0] == {"m": 0}


# -- inputs ---------------------------------------------------------------------------------


async def test_inputs_round_trip_and_non_json_ones_are_left_out(
    store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="executus_ckpt.checkpointer")
    inputs = {
        "prompt": "summarise",
        "audience": "exec",
        "limits": {"words": 200, "tone": ["dry", "brief"]},
        "callback": print,
        "when": object(),
    }
    cp = await StoreCheckpointerFactory(store).begin(RunInfo("r", inputs=inputs))
    info = (await store.load("r")).run_info()
    assert dict(info.inputs) == {
        "prompt": "summarise",
        "audience": "exec",
        "limits": {"words": 200, "tone": ["dry", "brief"]},
    }
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "callback" in warnings[0].getMessage() and "when" in warnings[0].getMessage()
    await cp.complete()


# -- keep_failed ------------------------------------------------------------------------------


async def test_keep_failed_keeps_the_run_as_failed(store: Any) -> None:
    factory = StoreCheckpointerFactory(store, keep_failed=True)
    cp = await factory.begin(RunInfo("bad"))
    await cp.save(_state([{"m": 0}], 1, []))
    await cp.fail(ValueError("the tool exploded"))
    row = await store.load("bad")
    assert row is not None and row.status == CheckpointStatus.FAILED
    assert row.last_error is not None
    assert "ValueError" in row.last_error and "the tool exploded" in row.last_error
    assert await store.list_interrupted() == []
    assert (await store.stats()).by_status.get("failed") == 1
    assert await cp.save(_state([{"m": 0}, {"m": 1}], 2, [])) is None  # no-op after fail
    assert (await store.load("bad")).iteration == 1

    assert await store.requeue("bad")
    assert [c.run_id for c in await store.list_interrupted()] == ["bad"]
    assert await store.mark_failed("bad", error="again")
    assert await store.purge(older_than=0, status=CheckpointStatus.FAILED) == 1
    assert await store.load("bad") is None


async def test_without_keep_failed_fail_deletes(store: Any) -> None:
    cp = await StoreCheckpointerFactory(store).begin(RunInfo("bad"))
    await cp.fail(ValueError("boom"))
    assert await store.load("bad") is None


# -- graceful shutdown releases ----------------------------------------------------------------


async def test_graceful_shutdowns_never_count_as_failed_attempts(store: Any) -> None:
    factory = StoreCheckpointerFactory(store)
    info = RunInfo("deployed")
    with pytest.raises(Exception, match="deploy"):
        async with checkpointed_run(factory, info, shutdown_exceptions=(RuntimeError,)) as cp:
            await cp.save(_state([{"m": 0}], 1, []))
            raise RuntimeError("deploy")
    row = await store.load("deployed")
    assert row is not None and row.owner is None, "released: no owner"

    async def interrupted_again(checkpoint: RunCheckpoint) -> None:
        with pytest.raises(RuntimeError):
            async with checkpointed_run(
                factory, checkpoint.run_info(), shutdown_exceptions=(RuntimeError,)
            ) as again:
                await again.save(_state([{"m": 0}, {"m": 1}], 2, []))  # mid-phase, no boundary
                raise RuntimeError("deploy")

    for _ in range(5):  # five deploys in a row, max_attempts=3
        report = await recover_interrupted(store, interrupted_again, max_attempts=3)
        assert report.dispatched == ("deployed",) and not report.dead
    row = await store.load("deployed")
    assert row.status == CheckpointStatus.ACTIVE and row.attempts == 1


async def test_a_release_without_progress_counts_as_a_failed_attempt(store: Any) -> None:
    """``release(progress=False)`` (a dispatch that ended without finishing its run) hands
    the run back like a release, but the next claim counts as a failed attempt."""
    await StoreCheckpointerFactory(store).begin(RunInfo("r"))
    claimed = await store.claim("r", epoch=(await store.load("r")).epoch, owner=None)
    assert claimed is not None and claimed.attempts == 1
    assert await store.release("r", epoch=claimed.epoch, progress=False)
    row = await store.load("r")
    assert row.owner is None and row.epoch == claimed.epoch + 1
    again = await store.claim("r", epoch=row.epoch, owner=None)
    assert again is not None and again.attempts == 2, "no progress since the previous claim"
    assert await store.release("r", epoch=again.epoch)  # a graceful release is progress
    third = await store.claim("r", epoch=again.epoch + 1, owner=None)
    assert third is not None and third.attempts == 1
    assert not await store.release("r", epoch=again.epoch, progress=False), "fenced"
