"""The CheckpointStore contract, run on every backend (memory, SQLite, PostgreSQL).

``InMemoryCheckpointStore`` is the reference semantics: every test here must hold for each
store the ``store`` fixture yields (one fresh, migrated database per test). Times in the past
are given explicitly; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, TypeVar

import orjson

from executus_ckpt import (
    CheckpointError,
    CheckpointFencedError,
    CheckpointSerializationError,
    CheckpointStatus,
    CheckpointStore,
    CheckpointSummary,
    CheckpointTooLargeError,
    InMemoryCheckpointStore,
    RunCheckpoint,
    RunCheckpointMeta,
    SQLCheckpointStore,
    StoreUnavailableError,
)

# -- helpers -----------------------------------------------------------------------------------

E = TypeVar("E", bound=Exception)

T0 = datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
"""A fixed instant with microseconds (every backend keeps microsecond precision)."""

FULL_META: dict[str, str] = {
    "agent_id": "agent-7",
    "agent_name": "Researcher",
    "caller_id": "user-42",
    "channel_id": "chan-9",
    "guild_id": "guild-3",
    "prompt": "Summarise the quarterly report, please.",
    "model_tier": "large",
    "parent_run_id": "run-parent",
}

META_ID_FIELDS = (
    "agent_id",
    "agent_name",
    "caller_id",
    "channel_id",
    "guild_id",
    "model_tier",
    "parent_run_id",
)


def make(
    run_id: str = "run-1",
    *,
    messages: Sequence[Any] = (),
    iteration: int = 0,
    completed_phases: Sequence[str] = (),
    epoch: int = 0,
    updated_at: datetime | None = None,
    created_at: datetime | None = None,
    app_version: str | None = None,
    owner: str | None = None,
    **meta: Any,
) -> RunCheckpoint:
    now = datetime.now(UTC)
    return RunCheckpoint(
        meta=RunCheckpointMeta(run_id=run_id, **meta),
        messages=messages,
        iteration=iteration,
        completed_phases=completed_phases,
        created_at=created_at or updated_at or now,
        updated_at=updated_at or now,
        app_version=app_version,
        owner=owner,
        epoch=epoch,
    )


def transcript(n: int = 3, tag: str = "") -> list[dict[str, Any]]:
    return [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"{tag}message {i}", "n": i}
        for i in range(n)
    ]


def exact(value: Any) -> Any:
    """A type-tagged form of a JSON value: ``1``, ``1.0`` and ``True`` differ, key order counts,
    and a tuple is expected back as a list."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float", repr(value))
    if isinstance(value, str):
        return ("str", value)
    if value is None:
        return ("null",)
    if isinstance(value, dict):
        return ("object", [(k, exact(v)) for k, v in value.items()])
    if isinstance(value, list | tuple):
        return ("array", [exact(v) for v in value])
    raise AssertionError(f"not a JSON value: {value!r}")


def assert_exact(loaded: Any, expected: Any) -> None:
    assert isinstance(loaded, list), f"messages came back as {type(loaded).__name__}"
    assert exact(loaded) == exact(list(expected))


def assert_utc(value: datetime) -> None:
    assert isinstance(value, datetime)
    assert value.tzinfo is not None, "naive datetime from the store"
    assert value.utcoffset() == timedelta(0)


def assert_same_state(loaded: RunCheckpoint | None, expected: RunCheckpoint) -> None:
    """The stored state equals ``expected`` (meta, transcript, progress, owner, version)."""
    assert loaded is not None, f"run {expected.run_id!r} disappeared"
    assert loaded.meta == expected.meta
    assert_exact(loaded.messages, expected.messages)
    assert loaded.iteration == expected.iteration
    assert list(loaded.completed_phases) == list(expected.completed_phases)
    assert loaded.app_version == expected.app_version
    assert loaded.owner == expected.owner
    assert loaded.epoch == expected.epoch
    assert loaded.updated_at == expected.updated_at


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def assert_size(size_bytes: int, messages: Sequence[Any]) -> None:
    """``size_bytes`` is the compact UTF-8 JSON size of the transcript: either of the whole
    array or the sum of its messages (the two framings a store may keep)."""
    whole = len(_compact(list(messages)))
    per_message = sum(len(_compact(m)) for m in messages)
    assert size_bytes in (whole, per_message), (size_bytes, whole, per_message)


async def summaries(store: Any, **kwargs: Any) -> list[CheckpointSummary]:
    return [s async for s in store.iter_summaries(**kwargs)]


@asynccontextmanager
async def capped_store(store_url: str | None, max_bytes: int) -> AsyncIterator[Any]:
    if store_url is None:
        yield InMemoryCheckpointStore(max_checkpoint_bytes=max_bytes)
        return
    async with SQLCheckpointStore.open(store_url, max_checkpoint_bytes=max_bytes) as sql:
        yield sql


async def raises(call: Awaitable[object], error: type[E]) -> E:
    """Await ``call``; it must raise ``error`` (returned)."""
    try:
        await call
    except error as exc:
        return exc
    raise AssertionError(f"did not raise {error.__name__}")


# -- save / load -------------------------------------------------------------------------------


async def test_round_trip_of_every_field(store: Any) -> None:
    assert isinstance(store, CheckpointStore)
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "hi", "attachments": []},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "args": {"q": "x", "k": 3, "p": 0.25, "ok": True}}],
        },
        "a bare string",
        42,
        -1.5,
        None,
        [1, [2, [3, {}]]],
    ]
    cp = make(
        "run-full",
        messages=messages,
        iteration=7,
        completed_phases=["plan", "research", "plan"],
        app_version="release-2024.03",
        owner="executor-a",
        created_at=T0,
        updated_at=T0 + timedelta(minutes=5),
        **FULL_META,
    )
    await store.save(cp)
    loaded = await store.load("run-full")
    assert_same_state(loaded, cp)
    assert loaded is not None
    assert loaded.run_id == "run-full"
    assert loaded.meta == RunCheckpointMeta(run_id="run-full", **FULL_META)
    assert loaded.completed_phases == ["plan", "research", "plan"]
    assert loaded.created_at == T0
    assert loaded.updated_at == T0 + timedelta(minutes=5)
    assert loaded.status == CheckpointStatus.ACTIVE
    assert loaded.attempts == 0 and loaded.last_error is None and loaded.epoch == 0
    # What a recovered run is re-dispatched with.
    info = loaded.run_info()
    assert info.subject_id == "agent-7" and info.name == "Researcher"
    assert info.inputs == {"prompt": FULL_META["prompt"]}
    resume = loaded.resume_state()
    assert resume.iteration == 7 and resume.completed_phases == ["plan", "research", "plan"]
    assert_exact(resume.messages, messages)


async def test_minimal_round_trip_and_unknown_run(store: Any) -> None:
    cp = make("bare")
    await store.save(cp)
    loaded = await store.load("bare")
    assert_same_state(loaded, cp)
    assert loaded is not None
    assert loaded.meta == RunCheckpointMeta(run_id="bare")
    assert loaded.messages == [] and loaded.completed_phases == []
    assert loaded.app_version is None and loaded.owner is None

    # Unknown runs load as None.
    assert await store.load("nope") is None
    await store.save(make("other"))
    assert await store.load("nope") is None
    assert await store.load("x" * 300) is None
    assert await store.load("") is None


async def test_lookups_of_impossible_run_ids_find_nothing(store: Any) -> None:
    # No run can have these ids (save refuses them), so every lookup answers "not found", as
    # for any unknown run: a caller passing through an id it was given must not crash.
    await store.save(make("victim", iteration=1))
    problems: list[str] = []
    for run_id in ("r\ud800", "r\x00", "x" * 300, ""):
        for what, call, expected in [
            ("load", lambda r=run_id: store.load(r), None),
            ("delete", lambda r=run_id: store.delete(r), False),
            ("claim", lambda r=run_id: store.claim(r, epoch=0, owner="o"), None),
            ("mark_dead", lambda r=run_id: store.mark_dead(r, reason="x"), False),
            ("record_error", lambda r=run_id: store.record_error(r, "x"), False),
        ]:
            try:
                got = await call()
            except Exception as exc:  # reported below
                problems.append(f"{what}({run_id!r:.20}): raised {type(exc).__name__}: {exc}")
                continue
            if got != expected:
                problems.append(f"{what}({run_id!r:.20}): returned {got!r}, not {expected!r}")
    assert not problems, "\n".join(["lookups by impossible ids failed:", *problems])
    loaded = await store.load("victim")
    assert loaded is not None and loaded.iteration == 1 and loaded.attempts == 0


async def test_timestamps_are_aware_utc_everywhere(store: Any) -> None:
    plus5 = timezone(timedelta(hours=5))
    local = datetime(2024, 3, 1, 17, 0, 0, 500, tzinfo=plus5)
    await store.save(make("tz", created_at=local, updated_at=local))
    loaded = await store.load("tz")
    assert loaded is not None
    for value in (loaded.created_at, loaded.updated_at):
        assert_utc(value)
        assert value == datetime(2024, 3, 1, 12, 0, 0, 500, tzinfo=UTC)

    (listed,) = await store.list_interrupted()
    (summary,) = await summaries(store)
    claimed = await store.claim("tz", epoch=0, owner="x")
    assert claimed is not None
    before = datetime.now(UTC)
    await store.save(RunCheckpoint(meta=RunCheckpointMeta("now")))  # default timestamps
    after = datetime.now(UTC)
    await store.register(make("tz2"))
    await store.register(make("tz2"))
    now_row, taken = await store.load("now"), await store.load("tz2")
    assert now_row is not None and taken is not None
    assert before <= now_row.created_at <= after
    assert before <= now_row.updated_at <= after
    for value in (
        listed.created_at,
        listed.updated_at,
        summary.created_at,
        summary.updated_at,
        claimed.created_at,
        claimed.updated_at,
        now_row.created_at,
        now_row.updated_at,
        taken.created_at,
        taken.updated_at,
    ):
        assert_utc(value)


# -- upsert ------------------------------------------------------------------------------------


async def test_second_save_replaces_state_and_keeps_created_at(store: Any) -> None:
    await store.save(
        make("up", messages=transcript(2), iteration=1, created_at=T0, updated_at=T0, **FULL_META)
    )
    second = make(
        "up",
        messages=transcript(5, "v2 "),
        iteration=4,
        completed_phases=["plan"],
        created_at=T0 + timedelta(days=1),
        updated_at=T0 + timedelta(hours=1),
        app_version="v2",
        owner="exec-2",
        agent_id="agent-other",
        prompt="new prompt",
    )
    await store.save(second)
    loaded = await store.load("up")
    assert_same_state(loaded, second)
    assert loaded is not None
    assert loaded.created_at == T0
    assert await store.count() == 1


async def test_save_may_shrink_or_edit_the_transcript(store: Any) -> None:
    await store.save(make("shrink", messages=transcript(10), iteration=3))
    compacted = make("shrink", messages=[{"role": "system", "content": "summary"}], iteration=4)
    await store.save(compacted)
    assert_same_state(await store.load("shrink"), compacted)
    (summary,) = await summaries(store)
    assert summary.message_count == 1
    assert_size(summary.size_bytes, compacted.messages)
    edited = make("shrink", messages=[{"role": "system", "content": "other"}], iteration=5)
    await store.save(edited)
    assert_same_state(await store.load("shrink"), edited)
    emptied = make("shrink", iteration=6)
    await store.save(emptied)
    assert_same_state(await store.load("shrink"), emptied)


async def test_save_keeps_attempts_status_and_last_error(store: Any) -> None:
    await store.save(make("keep", messages=transcript(1)))
    claimed = await store.claim("keep", epoch=0, owner="exec-a")
    assert claimed is not None and claimed.epoch == 1
    assert await store.record_error("keep", "boom") is True

    resave = replace(
        make("keep", messages=transcript(4), iteration=2, epoch=1, owner="exec-a"),
        attempts=99,
        status=CheckpointStatus.DEAD,
        last_error="ignored",
    )
    await store.save(resave)
    loaded = await store.load("keep")
    assert loaded is not None
    assert_exact(loaded.messages, transcript(4))
    assert loaded.iteration == 2
    assert loaded.attempts == 1
    assert loaded.status == CheckpointStatus.ACTIVE
    assert loaded.last_error == "boom"


# -- append (save with base_count) -------------------------------------------------------------


async def test_append_with_base_count(store: Any) -> None:
    msgs = transcript(3)
    await store.save(make("app", messages=msgs, iteration=1, created_at=T0))
    for step in range(2, 6):
        base = len(msgs)
        msgs = [*msgs, *transcript(step, f"step {step} ")]
        cp = make("app", messages=msgs, iteration=step, completed_phases=[f"p{step}"])
        await store.append(cp, base_count=base)
        assert_same_state(await store.load("app"), cp)
    loaded = await store.load("app")
    assert loaded is not None and loaded.created_at == T0
    (summary,) = await summaries(store)
    assert summary.message_count == len(msgs)
    assert_size(summary.size_bytes, msgs)
    # Nothing new: only the header changes.
    same = make("app", messages=msgs, iteration=99, completed_phases=["x"])
    await store.append(same, base_count=len(msgs))
    assert_same_state(await store.load("app"), same)
    # Tuples in the appended tail come back as lists too.
    await store.append(
        make("app", messages=(*msgs, ("a", (1,))), iteration=100), base_count=len(msgs)
    )
    loaded = await store.load("app")
    assert loaded is not None and loaded.messages[-1] == ["a", [1]]


async def test_wrong_base_count_still_stores_exactly_the_given_transcript(store: Any) -> None:
    await store.save(make("wb", messages=transcript(4), iteration=1))
    cases = [
        ("hint past the stored length", transcript(6, "a "), 5),
        ("hint short of the stored length", transcript(8, "b "), 3),
        ("hint longer than the transcript", transcript(2, "c "), 7),
        ("zero hint", transcript(3, "d "), 0),
        ("negative hint", transcript(5, "e "), -2),
    ]
    for i, (what, msgs, hint) in enumerate(cases, start=2):
        cp = make("wb", messages=msgs, iteration=i)
        await store.append(cp, base_count=hint)
        loaded = await store.load("wb")
        assert loaded is not None, what
        assert exact(loaded.messages) == exact(msgs), what
        assert loaded.iteration == i, what
        (summary,) = await summaries(store)
        assert summary.message_count == len(msgs), what
        assert_size(summary.size_bytes, msgs)
    # An append never creates a run: one deleted meanwhile is fenced, not resurrected.
    assert await store.delete("wb") is True
    fresh = make("wb", messages=transcript(4, "f "), iteration=9)
    await raises(store.append(fresh, base_count=3), CheckpointFencedError)
    assert await store.load("wb") is None


async def test_append_stores_a_changed_identity(store: Any) -> None:
    """An append whose meta or app version differ from what is stored writes them, whether
    the meta is a new object or the same one."""
    first = make("ident", messages=[{"m": 0}], agent_name="a", app_version="v1")
    await store.save(first)
    second = make("ident", messages=[{"m": 0}, {"m": 1}], agent_name="a", app_version="v1")
    await store.append(second, base_count=1)  # a new but equal meta object
    third = make("ident", messages=[{"m": k} for k in range(3)], agent_name="b", app_version="v1")
    await store.append(third, base_count=2)
    loaded = await store.load("ident")
    assert loaded is not None and loaded.meta.agent_name == "b" and loaded.app_version == "v1"
    same = RunCheckpoint(
        meta=third.meta, messages=[{"m": k} for k in range(4)], iteration=4, app_version="v2"
    )
    await store.append(same, base_count=3)  # the same meta object, a new app version
    loaded = await store.load("ident")
    assert loaded is not None and loaded.app_version == "v2" and loaded.iteration == 4
    again = RunCheckpoint(
        meta=third.meta, messages=[{"m": k} for k in range(5)], iteration=5, app_version="v2"
    )
    await store.append(again, base_count=4)  # identity unchanged: progress only
    loaded = await store.load("ident")
    assert loaded is not None and loaded.meta == third.meta and loaded.app_version == "v2"
    assert loaded.messages == [{"m": k} for k in range(5)] and loaded.iteration == 5


async def test_append_after_take_over_and_fencing(store: Any) -> None:
    msgs = transcript(3)
    await store.save(make("ap", messages=msgs, iteration=1))
    epoch = await store.register(make("ap", owner="exec-b"))
    assert epoch == 1
    # The stale writer appends from the count it knew: fenced, nothing written.
    stale = make("ap", messages=[*msgs, {"zombie": True}], iteration=2, epoch=0)
    await raises(store.append(stale, base_count=3), CheckpointFencedError)
    loaded = await store.load("ap")
    assert loaded is not None
    assert_exact(loaded.messages, msgs)
    assert loaded.iteration == 1 and loaded.owner == "exec-b" and loaded.epoch == 1
    # The new owner continues from the kept transcript.
    cp = make("ap", messages=[*msgs, {"new": True}], iteration=2, epoch=1, owner="exec-b")
    await store.append(cp, base_count=3)
    assert_same_state(await store.load("ap"), cp)


# -- delete ------------------------------------------------------------------------------------


async def test_delete(store: Any) -> None:
    await store.save(make("del", messages=transcript(2)))
    await store.save(make("other", messages=transcript(1)))
    assert await store.delete("del") is True
    assert await store.load("del") is None
    assert await store.delete("del") is False
    assert await store.delete("never-existed") is False
    other = await store.load("other")
    assert other is not None and other.messages == transcript(1)
    assert await store.count() == 1
    # The run id can be reused from scratch: nothing of the old transcript is left.
    await store.save(make("del", messages=transcript(1, "new ")))
    reused = await store.load("del")
    assert reused is not None and reused.messages == transcript(1, "new ")

    # With an epoch, a row taken over by a newer writer is left alone.
    await store.save(make("fenced-del", messages=transcript(2), iteration=1))
    assert await store.register(make("fenced-del")) == 1
    assert await store.delete("fenced-del", epoch=0) is False
    loaded = await store.load("fenced-del")
    assert loaded is not None and loaded.iteration == 1 and loaded.epoch == 1
    assert_exact(loaded.messages, transcript(2))
    assert await store.delete("fenced-del", epoch=1) is True
    assert await store.load("fenced-del") is None

    await store.save(make("newer-del"))
    assert await store.delete("newer-del", epoch=5) is True
    assert await store.load("newer-del") is None


# -- list_interrupted --------------------------------------------------------------------------


async def test_list_interrupted_oldest_first_with_full_messages(store: Any) -> None:
    now = datetime.now(UTC)
    ages = {"b": 30, "a": 10, "d": 50, "c": 20}
    for run_id, minutes in ages.items():
        await store.save(
            make(
                run_id,
                messages=transcript(3, run_id),
                iteration=minutes,
                updated_at=now - timedelta(minutes=minutes),
            )
        )
    listed = await store.list_interrupted()
    assert [c.run_id for c in listed] == ["d", "b", "c", "a"]
    for c in listed:
        assert isinstance(c, RunCheckpoint)
        assert_exact(c.messages, transcript(3, c.run_id))
        assert c.iteration == ages[c.run_id]
    assert [c.run_id for c in await store.list_interrupted(limit=2)] == ["d", "b"]
    assert await store.list_interrupted(limit=0) == []
    # Ties on updated_at come back in run_id order.
    for run_id in ["z", "m", "e"]:
        await store.save(make(run_id, updated_at=now - timedelta(hours=1)))
    assert [c.run_id for c in await store.list_interrupted(limit=3)] == ["e", "m", "z"]


async def test_list_interrupted_agent_filter_and_dead_runs(store: Any) -> None:
    await store.save(make("r1", agent_id="alpha", updated_at=T0))
    await store.save(make("r2", agent_id="beta", updated_at=T0 + timedelta(seconds=1)))
    await store.save(make("r3", agent_id="alpha", updated_at=T0 + timedelta(seconds=2)))
    await store.save(make("r4", updated_at=T0 + timedelta(seconds=3)))
    assert [c.run_id for c in await store.list_interrupted(agent_id="alpha")] == ["r1", "r3"]
    assert [c.run_id for c in await store.list_interrupted(agent_id="beta")] == ["r2"]
    assert await store.list_interrupted(agent_id="gamma") == []
    assert [c.run_id for c in await store.list_interrupted(agent_id="alpha", limit=1)] == ["r1"]
    assert len(await store.list_interrupted()) == 4
    # Dead runs are never listed, whatever the filters.
    assert await store.mark_dead("r1", reason="too many attempts") is True
    assert [c.run_id for c in await store.list_interrupted()] == ["r2", "r3", "r4"]
    assert [c.run_id for c in await store.list_interrupted(agent_id="alpha")] == ["r3"]
    assert [c.run_id for c in await store.list_interrupted(older_than=0, limit=1)] == ["r2"]


async def test_list_interrupted_older_than(store: Any) -> None:
    now = datetime.now(UTC)
    await store.save(make("old", updated_at=now - timedelta(hours=2)))
    await store.save(make("mid", updated_at=now - timedelta(minutes=30)))
    await store.save(make("fresh", updated_at=now))
    assert [c.run_id for c in await store.list_interrupted(older_than=3600)] == ["old"]
    assert [c.run_id for c in await store.list_interrupted(older_than=600)] == ["old", "mid"]
    assert [c.run_id for c in await store.list_interrupted(older_than=0.0)] == [
        "old",
        "mid",
        "fresh",
    ]
    assert await store.list_interrupted(older_than=3 * 3600) == []
    assert [c.run_id for c in await store.list_interrupted(older_than=600, limit=1)] == ["old"]


# -- iter_summaries ----------------------------------------------------------------------------


async def test_iter_summaries_fields_without_messages(store: Any) -> None:
    messages = [{"role": "user", "content": "héllo wörld 漢字"}, {"k": [1, 2.5, None, True]}]
    cp = make(
        "sum",
        messages=messages,
        iteration=3,
        completed_phases=["plan"],
        app_version="v1",
        owner="exec",
        created_at=T0,
        updated_at=T0 + timedelta(seconds=1),
        **FULL_META,
    )
    await store.save(cp)
    await store.save(make("empty", updated_at=T0 + timedelta(seconds=2)))
    summary, empty = await summaries(store)
    assert isinstance(summary, CheckpointSummary)
    assert not hasattr(summary, "messages")
    assert summary.run_id == "sum"
    assert summary.meta == cp.meta
    assert summary.iteration == 3
    assert list(summary.completed_phases) == ["plan"]
    assert summary.message_count == 2
    assert_size(summary.size_bytes, messages)
    assert summary.size_bytes > 0
    assert summary.created_at == T0
    assert summary.updated_at == T0 + timedelta(seconds=1)
    assert summary.status == CheckpointStatus.ACTIVE
    assert summary.attempts == 0 and summary.last_error is None
    assert summary.app_version == "v1" and summary.owner == "exec" and summary.epoch == 0
    assert empty.run_id == "empty" and empty.message_count == 0
    assert_size(empty.size_bytes, [])


async def test_iter_summaries_order_status_filters_and_limit(store: Any) -> None:
    now = datetime.now(UTC)
    for i, run_id in enumerate(["r0", "r1", "r2", "r3", "r4"]):
        await store.save(
            make(
                run_id,
                agent_id="even" if i % 2 == 0 else "odd",
                updated_at=now - timedelta(hours=5 - i),
            )
        )
    assert await store.mark_dead("r1", reason="dead one") is True

    assert [s.run_id async for s in store.iter_summaries()] == ["r0", "r2", "r3", "r4"]
    newest = await summaries(store, newest_first=True)
    assert [s.run_id for s in newest] == ["r4", "r3", "r2", "r0"]
    every = await summaries(store, status=None)
    assert [s.run_id for s in every] == ["r0", "r1", "r2", "r3", "r4"]
    dead = await summaries(store, status=CheckpointStatus.DEAD)
    assert [s.run_id for s in dead] == ["r1"]
    assert dead[0].status == CheckpointStatus.DEAD and dead[0].last_error == "dead one"
    assert [s.run_id for s in await summaries(store, status=None, limit=2)] == ["r0", "r1"]
    assert [s.run_id for s in await summaries(store, newest_first=True, limit=2)] == ["r4", "r3"]
    assert await summaries(store, limit=0) == []
    assert [s.run_id for s in await summaries(store, agent_id="even")] == ["r0", "r2", "r4"]
    assert [s.run_id for s in await summaries(store, agent_id="odd", status=None)] == ["r1", "r3"]
    # r0 is 5 h old, r1 4 h, r2 3 h, r3 2 h, r4 1 h.
    assert [s.run_id for s in await summaries(store, older_than=2.5 * 3600)] == ["r0", "r2"]
    older_desc = await summaries(store, older_than=1.5 * 3600, newest_first=True)
    assert [s.run_id for s in older_desc] == ["r3", "r2", "r0"]


async def test_iter_summaries_paginates_every_row_once_in_order(store: Any) -> None:
    n = 250  # more than two default pages (100), with ties on updated_at across page edges
    rng = random.Random(1234)
    run_ids = [f"p-{i:03d}" for i in range(n)]
    rng.shuffle(run_ids)
    rows = [(T0 + timedelta(seconds=i // 7), run_id) for i, run_id in enumerate(run_ids)]
    order = list(range(n))
    rng.shuffle(order)  # insertion order unrelated to updated_at order

    async def put(k: int) -> None:
        updated_at, run_id = rows[k]
        await store.save(make(run_id, messages=[{"k": k}], iteration=k, updated_at=updated_at))

    await asyncio.gather(*(put(k) for k in order))
    expected = sorted(rows)
    dead = {expected[i][1] for i in (0, 99, 100, 101, 200, 249)}
    for run_id in sorted(dead):
        assert await store.mark_dead(run_id, reason="x") is True

    every = await summaries(store, status=None)
    assert [(s.updated_at, s.run_id) for s in every] == expected
    newest = await summaries(store, status=None, newest_first=True)
    assert [(s.updated_at, s.run_id) for s in newest] == expected[::-1]
    active = await summaries(store)
    assert [s.run_id for s in active] == [r for _, r in expected if r not in dead]
    limited = await summaries(store, status=None, limit=150)
    assert [(s.updated_at, s.run_id) for s in limited] == expected[:150]
    limited_desc = await summaries(store, status=None, limit=201, newest_first=True)
    assert [(s.updated_at, s.run_id) for s in limited_desc] == expected[::-1][:201]
    exactly_two_pages = await summaries(store, status=None, limit=200)
    assert [(s.updated_at, s.run_id) for s in exactly_two_pages] == expected[:200]
    listed = await store.list_interrupted()
    assert [c.run_id for c in listed] == [r for _, r in expected if r not in dead]
    assert all(c.messages == [{"k": c.iteration}] for c in listed)


# -- register ----------------------------------------------------------------------------------


async def test_register_new_run_inserts_initial_row(store: Any) -> None:
    epoch = await store.register(
        make("reg", app_version="v1", owner="exec-a", created_at=T0, updated_at=T0, **FULL_META)
    )
    assert epoch == 0
    loaded = await store.load("reg")
    assert loaded is not None
    assert loaded.iteration == 0
    assert loaded.messages == [] and loaded.completed_phases == []
    assert loaded.meta.prompt == FULL_META["prompt"]
    assert loaded.meta == RunCheckpointMeta(run_id="reg", **FULL_META)
    assert loaded.app_version == "v1" and loaded.owner == "exec-a"
    assert loaded.epoch == 0 and loaded.attempts == 0
    assert loaded.status == CheckpointStatus.ACTIVE
    assert [c.run_id for c in await store.list_interrupted()] == ["reg"]
    (summary,) = await summaries(store)
    assert summary.message_count == 0
    # The first save after register writes the transcript (from scratch or as an append).
    cp = make("reg", messages=transcript(2), iteration=1, **FULL_META)
    await store.append(cp, base_count=0)
    assert_same_state(await store.load("reg"), cp)


async def test_register_existing_run_takes_it_over(store: Any) -> None:
    old = datetime.now(UTC) - timedelta(hours=2)
    await store.save(
        make(
            "take",
            messages=transcript(6),
            iteration=5,
            completed_phases=["plan", "act"],
            app_version="v1",
            owner="exec-a",
            created_at=old,
            updated_at=old,
            agent_id="agent-1",
            prompt="original prompt",
        )
    )
    claimed = await store.claim("take", epoch=0, owner="recovery")
    assert claimed is not None and claimed.attempts == 1 and claimed.epoch == 1

    epoch = await store.register(
        make("take", app_version="v2", owner="exec-b", agent_id="agent-2", prompt="new prompt")
    )
    assert epoch == 2
    loaded = await store.load("take")
    assert loaded is not None
    assert loaded.epoch == 2
    assert_exact(loaded.messages, transcript(6))
    assert loaded.iteration == 5
    assert loaded.completed_phases == ["plan", "act"]
    assert loaded.attempts == 1
    assert loaded.created_at == old
    assert loaded.updated_at > old
    assert loaded.meta == RunCheckpointMeta(run_id="take", agent_id="agent-2", prompt="new prompt")
    assert loaded.app_version == "v2"
    assert loaded.owner == "exec-b"
    assert loaded.status == CheckpointStatus.ACTIVE
    # A fresh take-over is not "older than" an hour any more.
    assert await store.list_interrupted(older_than=3600) == []

    assert await store.register(make("take", messages=transcript(1, "ignored "))) == 3
    reloaded = await store.load("take")
    assert reloaded is not None and reloaded.epoch == 3 and reloaded.iteration == 5
    assert_exact(reloaded.messages, transcript(6))


async def test_concurrent_registers_get_distinct_epochs(store: Any) -> None:
    epochs = await asyncio.gather(*(store.register(make("race", owner=f"e{i}")) for i in range(8)))
    assert sorted(epochs) == list(range(8))
    loaded = await store.load("race")
    assert loaded is not None and loaded.epoch == 7


# -- fencing -----------------------------------------------------------------------------------


async def test_stale_writer_is_fenced(store: Any) -> None:
    good = make("fence", messages=transcript(3), iteration=2, completed_phases=["plan"])
    await store.save(good)
    new_epoch = await store.register(make("fence", owner="exec-new"))
    assert new_epoch == 1
    before = await store.load("fence")
    assert before is not None

    stale = make("fence", messages=transcript(9, "zombie "), iteration=8, epoch=0, owner="z")
    exc = await raises(store.save(stale), CheckpointFencedError)
    assert isinstance(exc, CheckpointError)
    assert exc.run_id == "fence"
    after = await store.load("fence")
    assert after is not None
    assert_same_state(after, before)
    assert after.iteration == 2 and after.owner == "exec-new"

    current = make("fence", messages=transcript(4, "new "), iteration=3, epoch=new_epoch)
    await store.save(current)
    assert_same_state(await store.load("fence"), current)

    # A claim fences the writer that held the run before it, too.
    assert await store.claim("fence", epoch=1, owner="rec") is not None
    await raises(store.save(replace(current, iteration=4)), CheckpointFencedError)
    loaded = await store.load("fence")
    assert loaded is not None and loaded.iteration == 3 and loaded.epoch == 2


# -- claim -------------------------------------------------------------------------------------


async def test_claim_with_listed_epoch(store: Any) -> None:
    await store.save(
        make("cl", messages=transcript(3), iteration=2, completed_phases=["plan"], **FULL_META)
    )
    (listed,) = await store.list_interrupted()
    claimed = await store.claim("cl", epoch=listed.epoch, owner="recoverer")
    assert claimed is not None
    assert claimed.attempts == 1
    assert claimed.epoch == listed.epoch + 1
    assert claimed.owner == "recoverer"
    assert_exact(claimed.messages, transcript(3))
    assert claimed.iteration == 2 and claimed.completed_phases == ["plan"]
    assert claimed.meta == listed.meta
    loaded = await store.load("cl")
    assert loaded is not None
    assert loaded.attempts == 1 and loaded.epoch == 1 and loaded.owner == "recoverer"

    assert await store.claim("cl", epoch=listed.epoch, owner="late") is None
    again = await store.load("cl")
    assert again is not None and again.attempts == 1 and again.owner == "recoverer"

    second = await store.claim("cl", epoch=1, owner="next-boot")
    assert second is not None and second.attempts == 2 and second.epoch == 2


async def test_claim_lost_for_unknown_dead_or_taken_over_runs(store: Any) -> None:
    assert await store.claim("ghost", epoch=0) is None
    assert await store.load("ghost") is None

    await store.save(make("dead"))
    assert await store.mark_dead("dead", reason="r") is True
    assert await store.claim("dead", epoch=0, owner="x") is None
    loaded = await store.load("dead")
    assert loaded is not None and loaded.attempts == 0 and loaded.epoch == 0

    await store.save(make("to"))
    (listed,) = await store.list_interrupted()
    assert await store.register(make("to", owner="live")) == 1
    assert await store.claim("to", epoch=listed.epoch, owner="rec") is None
    loaded = await store.load("to")
    assert loaded is not None and loaded.attempts == 0 and loaded.owner == "live"


async def test_claim_with_unstorable_owner_is_rejected(store: Any) -> None:
    await store.save(make("own", messages=transcript(1)))
    problems: list[str] = []
    for case_id, owner in [("256-chars", "o" * 256), ("nul", "exec\x00"), ("surrogate", "\udc80")]:
        problems += await _attempt(
            case_id, store.claim("own", epoch=0, owner=owner), CheckpointError
        )
        loaded = await store.load("own")
        assert loaded is not None
        if (loaded.attempts, loaded.epoch, loaded.owner) != (0, 0, None):
            problems.append(
                f"{case_id}: claim took effect (attempts {loaded.attempts}, epoch {loaded.epoch})"
            )
            await store.delete("own")
            await store.save(make("own", messages=transcript(1)))
    assert not problems, "\n".join(["claim with a bad owner mishandled:", *problems])
    claimed = await store.claim("own", epoch=0, owner="o" * 255)
    assert claimed is not None and claimed.owner == "o" * 255


async def test_concurrent_claims_exactly_one_wins(store: Any) -> None:
    await store.save(make("hot", messages=transcript(2)))
    results = await asyncio.gather(
        *(store.claim("hot", epoch=0, owner=f"exec-{i}") for i in range(10))
    )
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert_exact(winners[0].messages, transcript(2))
    loaded = await store.load("hot")
    assert loaded is not None
    assert loaded.attempts == 1 and loaded.epoch == 1
    assert loaded.owner == winners[0].owner


# -- mark_dead / record_error / count ----------------------------------------------------------


async def test_mark_dead(store: Any) -> None:
    await store.save(make("md", messages=transcript(2), iteration=4))
    await store.save(make("other"))
    assert await store.mark_dead("md", reason="over max_attempts (3)") is True
    loaded = await store.load("md")
    assert loaded is not None
    assert loaded.status == CheckpointStatus.DEAD
    assert loaded.last_error == "over max_attempts (3)"
    assert_exact(loaded.messages, transcript(2))
    assert loaded.iteration == 4
    assert [c.run_id for c in await store.list_interrupted()] == ["other"]
    assert await store.mark_dead("ghost", reason="x") is False
    assert await store.load("ghost") is None
    # A later save (a zombie writer at the same epoch) does not bring it back.
    await store.save(make("md", messages=transcript(3), iteration=5))
    loaded = await store.load("md")
    assert loaded is not None
    assert loaded.status == CheckpointStatus.DEAD
    assert loaded.last_error == "over max_attempts (3)"
    assert loaded.iteration == 5
    assert [c.run_id for c in await store.list_interrupted()] == ["other"]

    # With an epoch, a run taken over since is left alone.
    await store.save(make("mds"))
    assert await store.register(make("mds")) == 1
    assert await store.mark_dead("mds", reason="stale", epoch=0) is False
    loaded = await store.load("mds")
    assert loaded is not None
    assert loaded.status == CheckpointStatus.ACTIVE and loaded.last_error is None
    assert await store.mark_dead("mds", reason="current", epoch=1) is True
    loaded = await store.load("mds")
    assert loaded is not None
    assert loaded.status == CheckpointStatus.DEAD and loaded.last_error == "current"


async def test_record_error_with_an_epoch_spares_a_run_taken_over_since(store: Any) -> None:
    await store.save(make("rf", iteration=1))
    await store.register(make("rf"))  # taken over: epoch 1
    assert await store.record_error("rf", "a zombie's error", epoch=0) is False
    loaded = await store.load("rf")
    assert loaded is not None and loaded.last_error is None
    assert await store.record_error("rf", "the owner's error", epoch=1) is True
    loaded = await store.load("rf")
    assert loaded is not None and loaded.last_error == "the owner's error"


async def test_record_error_keeps_status(store: Any) -> None:
    await store.save(make("re", iteration=2))
    assert await store.record_error("re", "TimeoutError: model call") is True
    loaded = await store.load("re")
    assert loaded is not None
    assert loaded.last_error == "TimeoutError: model call"
    assert loaded.status == CheckpointStatus.ACTIVE
    assert loaded.iteration == 2
    assert [c.run_id for c in await store.list_interrupted()] == ["re"]
    assert await store.record_error("re", "second error") is True
    loaded = await store.load("re")
    assert loaded is not None and loaded.last_error == "second error"

    assert await store.mark_dead("re", reason="dead") is True
    assert await store.record_error("re", "after death") is True
    loaded = await store.load("re")
    assert loaded is not None
    assert loaded.status == CheckpointStatus.DEAD and loaded.last_error == "after death"
    assert await store.record_error("ghost", "x") is False

    text = "ValueError: bad value in 'ü漢字🙂' \u202eRTL\n\t" + "x" * 10_000
    assert await store.record_error("re", text) is True
    loaded = await store.load("re")
    assert loaded is not None and loaded.last_error == text


async def test_count(store: Any) -> None:
    assert await store.count() == 0
    for i in range(5):
        await store.save(make(f"c{i}"))
    assert await store.mark_dead("c1", reason="x") is True
    assert await store.mark_dead("c3", reason="x") is True
    assert await store.count() == 5
    assert await store.count(status=None) == 5
    assert await store.count(status=CheckpointStatus.ACTIVE) == 3
    assert await store.count(status=CheckpointStatus.DEAD) == 2
    assert await store.delete("c0") is True
    assert await store.count(status=CheckpointStatus.ACTIVE) == 2
    assert await store.count() == 4


# -- bad input ---------------------------------------------------------------------------------
#
# Each case: save a good state, try the bad one (on that run, then on a run with no row yet),
# and check that the right typed error came back and nothing changed. A bad input must not be
# reported as StoreUnavailableError: that error means "retry later", and retrying cannot help.
# Cases are looped inside a few tests (a fresh database per test is the costly part on
# PostgreSQL); the assertion message lists every case that misbehaved.


class Opaque:
    pass


Corrupt = Callable[[RunCheckpoint], RunCheckpoint]


def _bad(**changes: Any) -> Corrupt:
    return lambda good: replace(good, **changes)


def _bad_meta(**changes: Any) -> Corrupt:
    return lambda good: replace(good, meta=replace(good.meta, **changes))


def _victim() -> RunCheckpoint:
    return make(
        "victim",
        messages=[{"role": "user", "content": "good"}, {"role": "assistant", "content": "ok"}],
        iteration=3,
        completed_phases=["plan"],
        app_version="v1",
        owner="exec",
        updated_at=T0,
        **FULL_META,
    )


async def _attempt(what: str, call: Awaitable[object], error: type[Exception]) -> list[str]:
    try:
        await call
    except error as exc:
        if isinstance(exc, StoreUnavailableError):
            return [f"{what}: bad input reported as StoreUnavailableError (retryable): {exc}"]
        return []
    except Exception as exc:  # any other error is what the test reports
        return [f"{what}: raised {type(exc).__name__} ({exc}) instead of {error.__name__}"]
    return [f"{what}: accepted, expected {error.__name__}"]


async def check_rejected(store: Any, cases: list[tuple[str, Corrupt, type[Exception]]]) -> None:
    good = _victim()
    problems: list[str] = []
    for case_id, corrupt, error in cases:
        for run_id in ("victim", "fresh"):  # reset: an earlier case may have got through
            await store.delete(run_id)
        await store.save(good)
        bad = corrupt(replace(good, updated_at=T0 + timedelta(hours=1)))
        problems += await _attempt(f"{case_id} (save, existing run)", store.save(bad), error)
        if isinstance(bad.messages, list) and len(bad.messages) > 2:  # the bad part is appended
            appended = store.append(bad, base_count=2)
            problems += await _attempt(f"{case_id} (append)", appended, error)
        fresh = replace(bad, meta=replace(bad.meta, run_id="fresh"))
        problems += await _attempt(f"{case_id} (save, new run)", store.save(fresh), error)
        try:
            assert_same_state(await store.load("victim"), good)
        except AssertionError as exc:
            problems.append(f"{case_id}: stored state changed: {exc}")
        if await store.load("fresh") is not None:
            problems.append(f"{case_id}: a row was inserted for the new run")
    assert not problems, "\n".join(["bad input mishandled:", *problems])


def _tail(*extra: Any) -> Corrupt:
    """The good transcript with ``extra`` appended (so the append path is tried too)."""
    return lambda good: replace(good, messages=[*good.messages, *extra])


async def test_non_json_transcripts_are_rejected(store: Any) -> None:
    err = CheckpointSerializationError
    await check_rejected(
        store,
        [
            ("nan", _tail({"x": float("nan")}), err),
            ("infinity", _tail({"x": [1, float("inf")]}), err),
            ("neg-infinity", _tail({"x": None, "y": -float("inf")}), err),
            ("int-key", _tail({1: "a"}), err),
            ("none-key", _tail({"ok": {None: "a"}}), err),
            ("lone-surrogate", _tail("\ud800"), err),
            ("surrogate-key", _tail({"\udfff": 1}), err),
            ("datetime", _tail({"at": datetime.now(UTC)}), err),
            ("set", _tail({1, 2}), err),
            ("bytes", _tail(b"bytes"), err),
            ("int-over-64-bits", _tail(2**64), err),
            ("object", _tail(Opaque()), err),
            # codec.py: enums are rejected, not coerced (a StrEnum would come back a plain str)
            ("enum", _tail({"status": CheckpointStatus.ACTIVE}), err),
            # issue 10 item 14: orjson would write these, as something else or as raw bytes
            ("uuid", _tail({"id": uuid.uuid4()}), err),
            ("fragment-invalid", _tail({"raw": orjson.Fragment(b"{not json")}), err),
            ("fragment-valid", _tail(orjson.Fragment(b"{}")), err),
            ("decimal", _tail({"price": Decimal("1.50")}), err),
            ("dict-subclass", _tail(OrderedDict(a=1)), err),
            ("nan-first", _bad(messages=[float("nan")]), err),
            ("phases-surrogate", _bad(completed_phases=["\ud800"]), err),
        ],
    )


async def test_bad_header_fields_are_rejected(store: Any) -> None:
    err = CheckpointError
    await check_rejected(
        store,
        [
            # wrong shapes and types
            ("messages-str", _bad(messages="not a list"), err),
            ("messages-dict", _bad(messages={"role": "user"}), err),
            ("iteration-str", _bad(iteration="3"), err),
            ("iteration-float", _bad(iteration=1.5), err),
            ("iteration-bool", _bad(iteration=True), err),
            ("phases-str", _bad(completed_phases="plan"), err),
            ("phases-int", _bad(completed_phases=["plan", 3]), err),
            ("caller-id-int", _bad_meta(caller_id=123), err),
            ("prompt-list", _bad_meta(prompt=["not", "a", "str"]), err),
            # beyond the columns: 255 characters for ids and versions, a 32-bit iteration
            *((f"{f}-256-chars", _bad_meta(**{f: "m" * 256}), err) for f in META_ID_FIELDS),
            ("app-version-256-chars", _bad(app_version="v" * 256), err),
            ("owner-256-chars", _bad(owner="o" * 256), err),
            ("iteration-2**31", _bad(iteration=2**31), err),
            ("iteration-2**63", _bad(iteration=2**63), err),
            # text SQL cannot hold: lone surrogates (not Unicode) and U+0000 (the transcript,
            # stored as JSON, does round-trip NUL)
            ("agent-name-surrogate", _bad_meta(agent_name="\ud800"), err),
            ("prompt-surrogate", _bad_meta(prompt="\udc00 prompt"), err),
            ("app-version-surrogate", _bad(app_version="v\udfff"), err),
            ("prompt-nul", _bad_meta(prompt="pasted binary: PK\x03\x04\x00\x00"), err),
            ("agent-id-nul", _bad_meta(agent_id="agent\x00"), err),
            ("owner-nul", _bad(owner="\x00"), err),
        ],
    )


async def test_bad_run_id_is_rejected(store: Any) -> None:
    good = make("victim", messages=[{"content": "good"}], iteration=1, updated_at=T0)
    await store.save(good)
    problems: list[str] = []
    for case_id, run_id in [
        ("empty", ""),
        ("256-chars", "r" * 256),
        ("256-multibyte-chars", "é" * 256),
        ("surrogate", "run-\ud800"),
        ("nul", "run-\x00"),
    ]:
        bad = make(run_id, messages=[{"content": "bad"}])
        problems += await _attempt(f"save {case_id}", store.save(bad), CheckpointError)
        problems += await _attempt(
            f"register {case_id}", store.register(make(run_id)), CheckpointError
        )
        ids = [s.run_id for s in await summaries(store, status=None)]
        if ids != ["victim"]:
            problems.append(f"{case_id}: stored runs are now {ids!r}")
            for extra in ids:
                if extra != "victim":
                    await store.delete(extra)
    assert not problems, "\n".join(["bad run ids mishandled:", *problems])
    assert_same_state(await store.load("victim"), good)
    assert await store.count() == 1


async def test_bad_input_to_register_take_over_keeps_state(store: Any) -> None:
    good = _victim()
    await store.save(good)
    problems: list[str] = []
    for case_id, bad in [
        ("agent-id-256-chars", RunCheckpoint(meta=replace(good.meta, agent_id="a" * 256))),
        ("iteration-str", replace(good, iteration="3")),
        ("agent-name-surrogate", RunCheckpoint(meta=replace(good.meta, agent_name="\ud800"))),
        ("owner-256-chars", replace(good, owner="o" * 256)),
        ("app-version-256-chars", replace(good, app_version="v" * 256)),
    ]:
        problems += await _attempt(case_id, store.register(bad), CheckpointError)
        try:
            assert_same_state(await store.load("victim"), good)
        except AssertionError as exc:
            problems.append(f"{case_id}: stored state changed: {exc}")
            await store.delete("victim")
            await store.save(good)
    assert not problems, "\n".join(["bad take-over mishandled:", *problems])


async def test_limits_are_inclusive_at_255_chars(store: Any) -> None:
    run_id = "é" * 255
    meta = {name: "ü" * 255 for name in META_ID_FIELDS}
    cp = make(run_id, messages=transcript(2), app_version="v" * 255, owner="ö" * 255, **meta)
    await store.save(cp)
    assert_same_state(await store.load(run_id), cp)
    assert await store.register(replace(cp, owner="ä" * 255)) == 1
    claimed = await store.claim(run_id, epoch=1, owner="o" * 255)
    assert claimed is not None and claimed.owner == "o" * 255
    assert await store.delete(run_id) is True


async def test_size_cap(store_url: str | None) -> None:
    cap = 1000
    async with capped_store(store_url, cap) as store:
        good = make("capped", messages=["x" * 400], iteration=1)
        await store.save(good)
        assert_same_state(await store.load("capped"), good)

        too_big = make("capped", messages=["x" * 1100], iteration=2)
        exc = await raises(store.save(too_big), CheckpointTooLargeError)
        assert isinstance(exc, CheckpointError)
        assert exc.size_bytes > cap
        assert exc.max_bytes == cap
        assert exc.run_id == "capped"
        assert_same_state(await store.load("capped"), good)

        # The cap is on the whole transcript, not on one message...
        many = make("other", messages=["y" * 120] * 10)
        await raises(store.save(many), CheckpointTooLargeError)
        assert await store.load("other") is None
        # ...also when it grows by appends.
        grown = make("capped", messages=["x" * 400, "z" * 700], iteration=3)
        await raises(store.append(grown, base_count=1), CheckpointTooLargeError)
        assert_same_state(await store.load("capped"), good)
        ok = make("capped", messages=["x" * 400, "w" * 100], iteration=4)
        await store.append(ok, base_count=1)
        assert_same_state(await store.load("capped"), ok)
        assert await store.count() == 1


# -- values that must round-trip exactly --------------------------------------------------------


async def test_nul_in_error_text_is_stored_escaped(store: Any) -> None:
    # Error text comes from exceptions and may hold U+0000, which SQL text columns cannot; the
    # store keeps it readable (NUL as the two characters "\\0") rather than failing the call
    # that quarantines a run, identically on every backend. The rest is kept exactly.
    await store.save(make("nul-text"))
    error = "UnicodeDecodeError: byte 0x00 at \x00 in 'ü漢字🙂'"
    stored = "UnicodeDecodeError: byte 0x00 at \\0 in 'ü漢字🙂'"
    assert await store.record_error("nul-text", error) is True
    loaded = await store.load("nul-text")
    assert loaded is not None and loaded.last_error == stored
    assert await store.mark_dead("nul-text", reason=error + "!") is True
    loaded = await store.load("nul-text")
    assert loaded is not None and loaded.last_error == stored + "!"
    assert loaded.status == CheckpointStatus.DEAD


async def test_error_text_with_lone_surrogate_is_stored(store: Any) -> None:
    # Exception text can hold lone surrogates (a file name decoded with surrogateescape); the
    # call that records or quarantines a run must not fail over it, on any backend. What is
    # kept must be valid Unicode and keep the readable rest.
    await store.save(make("sur-text"))
    error = "FileNotFoundError: '/data/caf\udce9.txt' is missing"
    problems: list[str] = []
    for what, call in [
        ("record_error", lambda: store.record_error("sur-text", error)),
        ("mark_dead", lambda: store.mark_dead("sur-text", reason=error)),
    ]:
        try:
            assert await call() is True
        except Exception as exc:  # reported below
            problems.append(f"{what}: raised {type(exc).__name__}: {exc}")
            continue
        loaded = await store.load("sur-text")
        assert loaded is not None and loaded.last_error is not None
        assert loaded.last_error.startswith("FileNotFoundError: '/data/caf")
        assert loaded.last_error.endswith(".txt' is missing")
        try:
            loaded.last_error.encode("utf-8")
        except UnicodeEncodeError:
            problems.append(
                f"{what}: kept {loaded.last_error!r}, not valid Unicode (no SQL backend can store"
                " it, and a JSON log line or an HTTP response with it fails)"
            )
    assert not problems, "\n".join(["error text with a surrogate not stored:", *problems])
    loaded = await store.load("sur-text")
    assert loaded is not None and loaded.status == CheckpointStatus.DEAD


async def test_unicode_round_trips(store: Any) -> None:
    texts = [
        "emoji 👩‍👩‍👧‍👦 🙂 🏳️‍🌈",
        "CJK 漢字かなカナ 한국어",
        "RTL שלום مرحبا \u200f\u202e",
        "combining e\u0301 vs \u00e9, A\u030a",  # must not be normalized
        "zero-width \u200b\u200c\u200d\ufeff",
        "astral \U0001d11e \U0010ffff",
        "controls \t\n\r\x01\x1f\x7f \\ \" '",
    ]
    messages = [{"role": "user", "content": t, t: [t]} for t in texts]
    cp = make(
        "unicode",
        messages=messages,
        completed_phases=["計画", "🔎"],
        agent_name="Ассистент 🙂",
        prompt="שלום e\u0301 漢字 🙂 end",
    )
    await store.save(cp)
    loaded = await store.load("unicode")
    assert_same_state(loaded, cp)
    assert loaded is not None
    assert loaded.messages[3]["content"] == "combining e\u0301 vs \u00e9, A\u030a"
    assert loaded.meta.prompt == "שלום e\u0301 漢字 🙂 end"
    (summary,) = await summaries(store)
    assert_size(summary.size_bytes, messages)

    run_id = "run-漢字-🙂-e\u0301"
    await store.save(make(run_id, iteration=1))
    assert (await store.load(run_id)) is not None
    assert await store.load("run-漢字-🙂-\u00e9") is None  # no normalization
    assert await store.delete(run_id) is True


async def test_json_values_round_trip_exactly(store: Any) -> None:
    # U+0000 inside strings, keys and phase names round-trips exactly.
    messages = [
        "\x00",
        "a\x00b",
        {"content": "before\u0000after", "k\x00ey": "\x00\x00"},
        ["\x00", {"\x00": "\x00"}],
    ]
    cp = make("nul", messages=messages, completed_phases=["ph\x00ase"])
    await store.save(cp)
    loaded = await store.load("nul")
    assert_same_state(loaded, cp)
    assert loaded is not None
    assert loaded.messages[1] == "a\x00b" and len(loaded.messages[1]) == 3
    (summary,) = await summaries(store)
    assert summary.message_count == 4

    # Numbers at the edges, empties, key order, tuples.
    numbers = [0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 0.1, -0.0, 1e-300, 1.7976931348623157e308]
    messages = [
        *numbers,
        5e-324,
        1.0,
        True,
        False,
        None,
        "",
        [],
        {},
        {"": ""},
        {"z": 1, "a": 2, "m": {"y": 1, "b": 2}},  # key order is kept
        ({"role": "user", "pair": (1, (2, 3))}, ("a", "b")),  # tuples come back as lists
    ]
    cp = make("json", messages=tuple(messages), completed_phases=("plan", "act"))
    await store.save(cp)
    loaded = await store.load("json")
    assert_same_state(loaded, cp)
    assert loaded is not None
    assert type(loaded.messages) is list
    assert list(loaded.messages[-2]) == ["z", "a", "m"]
    assert list(loaded.messages[-2]["m"]) == ["y", "b"]
    assert loaded.messages[-1] == [{"role": "user", "pair": [1, [2, 3]]}, ["a", "b"]]
    assert type(loaded.messages[-1][0]["pair"]) is list
    assert list(loaded.completed_phases) == ["plan", "act"]


@functools.cache
def big_transcript() -> tuple[dict[str, Any], ...]:
    """300 messages of ~16 KB each (~5 MB), with multibyte and NUL characters."""
    rng = random.Random(7)
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,é漢🙂\n\x00"
    chunks = ["".join(rng.choices(alphabet, k=4096)) for _ in range(16)]
    return tuple(
        {
            "role": "tool" if i % 3 else "assistant",
            "n": i,
            "content": "".join(chunks[(i + k) % 16] for k in range(4)),
        }
        for i in range(300)
    )


async def test_large_transcript_round_trips(store: Any) -> None:
    messages = list(big_transcript())
    cp = make("big", messages=messages, iteration=300, completed_phases=["plan"] * 10)
    await store.save(cp)
    loaded = await store.load("big")
    assert_same_state(loaded, cp)
    (summary,) = await summaries(store)
    assert summary.message_count == 300
    assert_size(summary.size_bytes, messages)
    assert summary.size_bytes > 5_000_000
    (listed,) = await store.list_interrupted()
    assert_exact(listed.messages, messages)


# -- concurrency -------------------------------------------------------------------------------


async def test_two_hundred_concurrent_runs(store: Any) -> None:
    runs = 200
    saves = 3

    def message(i: int, step: int) -> dict[str, Any]:
        return {"role": "assistant", "content": f"run {i} step {step}", "i": step}

    async def run(i: int) -> None:
        run_id = f"conc-{i:03d}"
        messages: list[dict[str, Any]] = []
        for step in range(1, saves + 1):
            base = len(messages)
            messages.append(message(i, step))
            cp = make(
                run_id,
                messages=list(messages),
                iteration=step,
                completed_phases=[f"p{k}" for k in range(step)],
                agent_id=f"agent-{i % 5}",
            )
            # Odd runs append (after their first save created them), even runs rewrite:
            # both paths run side by side.
            await (store.append(cp, base_count=base) if i % 2 and base else store.save(cp))

    await asyncio.gather(*(run(i) for i in range(runs)))
    assert await store.count() == runs
    listed = await store.list_interrupted()
    assert sorted(cp.run_id for cp in listed) == [f"conc-{i:03d}" for i in range(runs)]
    loaded = [*listed, *await asyncio.gather(*(store.load(f"conc-{i:03d}") for i in (0, 1, 199)))]
    for cp in loaded:
        assert cp is not None
        i = int(cp.run_id.removeprefix("conc-"))
        assert cp.iteration == saves
        assert cp.meta.agent_id == f"agent-{i % 5}"
        assert cp.completed_phases == [f"p{k}" for k in range(saves)]
        assert cp.messages == [message(i, step) for step in range(1, saves + 1)]
    assert len(await store.list_interrupted(agent_id="agent-3")) == runs // 5


async def test_concurrent_mixed_operations_on_many_runs(store: Any) -> None:
    n = 60
    for i in range(n):
        await store.save(make(f"mix-{i:02d}", messages=transcript(2), iteration=1))

    async def op(i: int) -> object:
        run_id = f"mix-{i:02d}"
        match i % 4:
            case 0:
                return await store.claim(run_id, epoch=0, owner="rec")
            case 1:
                return await store.mark_dead(run_id, reason="quarantine")
            case 2:
                return await store.delete(run_id)
            case _:
                cp = make(run_id, messages=transcript(5), iteration=2)
                await store.append(cp, base_count=2)
                return await store.load(run_id)

    results = await asyncio.gather(*(op(i) for i in range(n)))
    for i, result in enumerate(results):
        assert result is not None and result is not False, f"op {i % 4} on run {i} failed"
    assert await store.count() == n - n // 4
    assert await store.count(status=CheckpointStatus.DEAD) == n // 4
    claimed = await store.load("mix-00")
    assert claimed is not None and claimed.attempts == 1 and claimed.epoch == 1
    resaved = await store.load("mix-03")
    assert resaved is not None and resaved.iteration == 2
    assert_exact(resaved.messages, transcript(5))


async def test_reads_never_see_a_torn_state(store: Any) -> None:
    """While a run appends, every load/list/claim sees one consistent save: the transcript,
    the iteration and the completed phases of the same save, never a mix of two."""
    steps = 60
    await store.save(make("torn"))
    problems: list[str] = []
    done = asyncio.Event()

    def check(where: str, cp: RunCheckpoint | None) -> None:
        if cp is None:
            problems.append(f"{where}: run vanished")
            return
        n = cp.iteration
        if [m["i"] for m in cp.messages] != list(range(1, n + 1)) or list(cp.completed_phases) != [
            f"p{n}"
        ] * min(n, 1):
            problems.append(
                f"{where}: iteration {n}, phases {list(cp.completed_phases)}, "
                f"message ids {[m['i'] for m in cp.messages]}"
            )

    async def writer() -> None:
        messages: list[dict[str, Any]] = []
        try:
            for i in range(1, steps + 1):
                base = len(messages)
                messages.append({"i": i, "pad": "p" * 300})
                cp = make("torn", messages=list(messages), iteration=i, completed_phases=[f"p{i}"])
                await store.append(cp, base_count=base)
                await asyncio.sleep(0)  # let the readers in (the memory store never suspends)
        finally:
            done.set()

    async def reader() -> int:
        reads = 0
        while not done.is_set():
            check("load", await store.load("torn"))
            listed = await store.list_interrupted()
            check("list_interrupted", listed[0] if listed else None)
            reads += 1
            await asyncio.sleep(0)
        return reads

    _, reads_a, reads_b = await asyncio.gather(writer(), reader(), reader())
    assert reads_a + reads_b > 0
    assert not problems, "\n".join([f"torn reads ({len(problems)}):", *problems[:10]])
    final = await store.load("torn")
    check("final", final)
    assert final is not None and final.iteration == steps
