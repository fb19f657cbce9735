"""The CheckpointStore contract, run on every backend (memory, SQLite, PostgreSQL).

``InMemoryCheckpointStore`` is the reference semantics: every test here must hold for each
store the ``store`` fixture yields. Times in the past are given explicitly (no sleeps).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

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
)

# -- helpers -----------------------------------------------------------------------------------

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


def exact(value: Any) -> Any:
    """A type-tagged form of a JSON value: ``1``, ``1.0`` and ``True`` compare unequal, key order
    counts, and a tuple is expected back as a list."""
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


def encoded_size(messages: Sequence[Any]) -> int:
    """Compact UTF-8 JSON length (what the store reports as ``size_bytes``)."""
    return len(
        json.dumps(list(messages), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    )


async def summaries(store: Any, **kwargs: Any) -> list[CheckpointSummary]:
    return [s async for s in store.iter_summaries(**kwargs)]


@asynccontextmanager
async def capped_store(store_url: str | None, max_bytes: int) -> AsyncIterator[Any]:
    if store_url is None:
        yield InMemoryCheckpointStore(max_checkpoint_bytes=max_bytes)
        return
    async with SQLCheckpointStore.open(store_url, max_checkpoint_bytes=max_bytes) as sql:
        yield sql


def transcript(n: int = 3, tag: str = "") -> list[dict[str, Any]]:
    return [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"{tag}message {i}", "n": i}
        for i in range(n)
    ]


# -- the protocol ------------------------------------------------------------------------------


async def test_store_satisfies_protocol(store: Any) -> None:
    assert isinstance(store, CheckpointStore)


# -- save / load -------------------------------------------------------------------------------


async def test_round_trip_of_every_field(store: Any) -> None:
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
    assert loaded.attempts == 0
    assert loaded.last_error is None
    # What a recovered run is re-dispatched with.
    info = loaded.run_info()
    assert info.subject_id == "agent-7" and info.name == "Researcher"
    assert info.inputs == {"prompt": FULL_META["prompt"]}
    resume = loaded.resume_state()
    assert resume.iteration == 7 and resume.completed_phases == ["plan", "research", "plan"]
    assert_exact(resume.messages, messages)


async def test_round_trip_with_only_run_id(store: Any) -> None:
    cp = make("bare")
    await store.save(cp)
    loaded = await store.load("bare")
    assert_same_state(loaded, cp)
    assert loaded is not None
    assert loaded.meta == RunCheckpointMeta(run_id="bare")
    assert loaded.messages == [] and loaded.completed_phases == []
    assert loaded.app_version is None and loaded.owner is None


async def test_load_unknown_run_is_none(store: Any) -> None:
    assert await store.load("nope") is None
    await store.save(make("other"))
    assert await store.load("nope") is None
    assert await store.load("x" * 300) is None


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
    assert_utc(listed.created_at)
    assert_utc(listed.updated_at)
    (summary,) = await summaries(store)
    assert_utc(summary.created_at)
    assert_utc(summary.updated_at)
    claimed = await store.claim("tz", epoch=0, owner="x")
    assert claimed is not None
    assert_utc(claimed.created_at)
    assert_utc(claimed.updated_at)
    await store.register(make("tz2"))
    await store.register(make("tz2"))
    taken = await store.load("tz2")
    assert taken is not None
    assert_utc(taken.created_at)
    assert_utc(taken.updated_at)


async def test_default_timestamps_are_now(store: Any) -> None:
    before = datetime.now(UTC)
    await store.save(RunCheckpoint(meta=RunCheckpointMeta("now")))
    after = datetime.now(UTC)
    loaded = await store.load("now")
    assert loaded is not None
    assert before <= loaded.created_at <= after
    assert before <= loaded.updated_at <= after


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


async def test_save_may_shrink_the_transcript(store: Any) -> None:
    await store.save(make("shrink", messages=transcript(10), iteration=3))
    compacted = make("shrink", messages=[{"role": "system", "content": "summary"}], iteration=4)
    await store.save(compacted)
    assert_same_state(await store.load("shrink"), compacted)
    (summary,) = await summaries(store)
    assert summary.message_count == 1
    assert summary.size_bytes == encoded_size(compacted.messages)


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


async def test_save_after_mark_dead_keeps_it_dead(store: Any) -> None:
    await store.save(make("dead-save", messages=transcript(1)))
    assert await store.mark_dead("dead-save", reason="quarantined") is True
    await store.save(make("dead-save", messages=transcript(2), iteration=1))
    loaded = await store.load("dead-save")
    assert loaded is not None
    assert loaded.status == CheckpointStatus.DEAD
    assert loaded.last_error == "quarantined"
    assert loaded.iteration == 1
    assert await store.list_interrupted() == []


# -- delete ------------------------------------------------------------------------------------


async def test_delete_returns_true_then_false(store: Any) -> None:
    await store.save(make("del", messages=transcript(2)))
    await store.save(make("other"))
    assert await store.delete("del") is True
    assert await store.load("del") is None
    assert await store.delete("del") is False
    assert await store.delete("never-existed") is False
    assert await store.load("other") is not None
    assert await store.count() == 1


async def test_delete_with_stale_epoch_keeps_the_row(store: Any) -> None:
    await store.save(make("fenced-del", messages=transcript(2), iteration=1))
    assert await store.register(make("fenced-del")) == 1
    assert await store.delete("fenced-del", epoch=0) is False
    loaded = await store.load("fenced-del")
    assert loaded is not None and loaded.iteration == 1 and loaded.epoch == 1
    assert await store.delete("fenced-del", epoch=1) is True
    assert await store.load("fenced-del") is None


async def test_delete_with_newer_epoch_deletes(store: Any) -> None:
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
    assert [c.run_id for c in await store.list_interrupted(limit=0)] == []


async def test_list_interrupted_ties_are_stable_by_run_id(store: Any) -> None:
    for run_id in ["z", "m", "a"]:
        await store.save(make(run_id, updated_at=T0))
    assert [c.run_id for c in await store.list_interrupted()] == ["a", "m", "z"]


async def test_list_interrupted_agent_filter(store: Any) -> None:
    await store.save(make("r1", agent_id="alpha", updated_at=T0))
    await store.save(make("r2", agent_id="beta", updated_at=T0 + timedelta(seconds=1)))
    await store.save(make("r3", agent_id="alpha", updated_at=T0 + timedelta(seconds=2)))
    await store.save(make("r4", updated_at=T0 + timedelta(seconds=3)))
    assert [c.run_id for c in await store.list_interrupted(agent_id="alpha")] == ["r1", "r3"]
    assert [c.run_id for c in await store.list_interrupted(agent_id="beta")] == ["r2"]
    assert await store.list_interrupted(agent_id="gamma") == []
    assert len(await store.list_interrupted()) == 4


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
    assert [
        c.run_id for c in await store.list_interrupted(older_than=600, limit=1, agent_id=None)
    ] == ["old"]


async def test_list_interrupted_excludes_dead_runs(store: Any) -> None:
    await store.save(make("alive", updated_at=T0))
    await store.save(make("gone", updated_at=T0 - timedelta(hours=1)))
    assert await store.mark_dead("gone", reason="too many attempts") is True
    assert [c.run_id for c in await store.list_interrupted()] == ["alive"]


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
    (summary,) = await summaries(store)
    assert isinstance(summary, CheckpointSummary)
    assert not hasattr(summary, "messages")
    assert summary.run_id == "sum"
    assert summary.meta == cp.meta
    assert summary.iteration == 3
    assert list(summary.completed_phases) == ["plan"]
    assert summary.message_count == 2
    assert summary.size_bytes == encoded_size(messages)
    assert summary.created_at == T0
    assert summary.updated_at == T0 + timedelta(seconds=1)
    assert summary.status == CheckpointStatus.ACTIVE
    assert summary.attempts == 0 and summary.last_error is None
    assert summary.app_version == "v1" and summary.owner == "exec" and summary.epoch == 0


async def test_iter_summaries_empty_transcript(store: Any) -> None:
    await store.save(make("empty"))
    (summary,) = await summaries(store)
    assert summary.message_count == 0
    assert summary.size_bytes == len(b"[]")


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

    ids = [s.run_id async for s in store.iter_summaries()]
    assert ids == ["r0", "r2", "r3", "r4"]
    assert [s.run_id for s in await summaries(store, newest_first=True)] == [
        "r4",
        "r3",
        "r2",
        "r0",
    ]
    assert [s.run_id for s in await summaries(store, status=None)] == [
        "r0",
        "r1",
        "r2",
        "r3",
        "r4",
    ]
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
    assert [
        s.run_id for s in await summaries(store, older_than=1.5 * 3600, newest_first=True)
    ] == ["r3", "r2", "r0"]


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
    listed = await store.list_interrupted()
    assert [c.run_id for c in listed] == [r for _, r in expected if r not in dead]


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

    assert await store.register(make("take")) == 3
    reloaded = await store.load("take")
    assert reloaded is not None and reloaded.epoch == 3 and reloaded.iteration == 5


async def test_concurrent_registers_get_distinct_epochs(store: Any) -> None:
    epochs = await asyncio.gather(*(store.register(make("race", owner=f"e{i}")) for i in range(8)))
    assert sorted(epochs) == list(range(8))
    loaded = await store.load("race")
    assert loaded is not None and loaded.epoch == 7


# -- fencing -----------------------------------------------------------------------------------


async def test_stale_writer_is_fenced_after_register(store: Any) -> None:
    good = make("fence", messages=transcript(3), iteration=2, completed_phases=["plan"])
    await store.save(good)
    new_epoch = await store.register(make("fence", owner="exec-new"))
    assert new_epoch == 1
    before = await store.load("fence")
    assert before is not None

    stale = make("fence", messages=transcript(9, "zombie "), iteration=8, epoch=0, owner="z")
    with pytest.raises(CheckpointFencedError) as info:
        await store.save(stale)
    assert isinstance(info.value, CheckpointError)
    assert info.value.run_id == "fence"

    after = await store.load("fence")
    assert after is not None
    assert_same_state(after, before)
    assert after.iteration == 2 and after.owner == "exec-new"

    current = make("fence", messages=transcript(4, "new "), iteration=3, epoch=new_epoch)
    await store.save(current)
    assert_same_state(await store.load("fence"), current)


async def test_stale_writer_is_fenced_after_claim(store: Any) -> None:
    await store.save(make("fc", messages=transcript(1), iteration=1))
    assert await store.claim("fc", epoch=0, owner="rec") is not None
    with pytest.raises(CheckpointFencedError):
        await store.save(make("fc", messages=transcript(2), iteration=2, epoch=0))
    loaded = await store.load("fc")
    assert loaded is not None and loaded.iteration == 1 and loaded.epoch == 1


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


async def test_claim_unknown_or_dead_run_is_none(store: Any) -> None:
    assert await store.claim("ghost", epoch=0) is None
    await store.save(make("dead"))
    assert await store.mark_dead("dead", reason="r") is True
    assert await store.claim("dead", epoch=0, owner="x") is None
    loaded = await store.load("dead")
    assert loaded is not None and loaded.attempts == 0 and loaded.epoch == 0


async def test_claim_after_take_over_is_lost(store: Any) -> None:
    await store.save(make("to"))
    (listed,) = await store.list_interrupted()
    assert await store.register(make("to", owner="live")) == 1
    assert await store.claim("to", epoch=listed.epoch, owner="rec") is None
    loaded = await store.load("to")
    assert loaded is not None and loaded.attempts == 0 and loaded.owner == "live"


async def test_concurrent_claims_exactly_one_wins(store: Any) -> None:
    await store.save(make("hot", messages=transcript(2)))
    results = await asyncio.gather(
        *(store.claim("hot", epoch=0, owner=f"exec-{i}") for i in range(10))
    )
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
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


async def test_mark_dead_with_stale_epoch_is_refused(store: Any) -> None:
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


async def test_error_text_round_trips(store: Any) -> None:
    text = "ValueError: bad byte \x00 in 'ü漢字🙂' \u202eRTL\n" + "x" * 10_000
    await store.save(make("et"))
    assert await store.record_error("et", text) is True
    loaded = await store.load("et")
    assert loaded is not None and loaded.last_error == text
    assert await store.mark_dead("et", reason=text + " (dead)") is True
    loaded = await store.load("et")
    assert loaded is not None and loaded.last_error == text + " (dead)"


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


# -- bad input ---------------------------------------------------------------------------------


class Opaque:
    pass


GOOD_MESSAGES = [{"role": "user", "content": "good"}, {"role": "assistant", "content": "ok"}]


def _bad(**changes: Any) -> Callable[[RunCheckpoint], RunCheckpoint]:
    return lambda good: replace(good, **changes)


def _bad_meta(**changes: Any) -> Callable[[RunCheckpoint], RunCheckpoint]:
    return lambda good: replace(good, meta=replace(good.meta, **changes))


BAD_INPUTS: list[Any] = [
    pytest.param(
        _bad(messages=[{"x": float("nan")}]), CheckpointSerializationError, id="nan"
    ),
    pytest.param(
        _bad(messages=[{"x": [1, float("inf")]}]), CheckpointSerializationError, id="infinity"
    ),
    pytest.param(
        _bad(messages=[{"x": None, "y": -float("inf")}]),
        CheckpointSerializationError,
        id="neg-infinity",
    ),
    pytest.param(_bad(messages=[{1: "a"}]), CheckpointSerializationError, id="int-key"),
    pytest.param(
        _bad(messages=[{"ok": {None: "a"}}]), CheckpointSerializationError, id="none-key"
    ),
    pytest.param(_bad(messages=["\ud800"]), CheckpointSerializationError, id="lone-surrogate"),
    pytest.param(
        _bad(messages=[{"\udfff": 1}]), CheckpointSerializationError, id="surrogate-key"
    ),
    pytest.param(
        _bad(messages=[{"at": datetime.now(UTC)}]), CheckpointSerializationError, id="datetime"
    ),
    pytest.param(_bad(messages=[{1, 2}]), CheckpointSerializationError, id="set"),
    pytest.param(_bad(messages=[b"bytes"]), CheckpointSerializationError, id="bytes"),
    pytest.param(_bad(messages=[2**64]), CheckpointSerializationError, id="int-over-64-bits"),
    pytest.param(
        _bad(messages=[CheckpointStatus.ACTIVE]), CheckpointSerializationError, id="enum"
    ),
    pytest.param(_bad(messages=[Opaque()]), CheckpointSerializationError, id="object"),
    pytest.param(_bad(messages="not a list"), CheckpointError, id="messages-str"),
    pytest.param(_bad(messages={"role": "user"}), CheckpointError, id="messages-dict"),
    pytest.param(_bad(iteration="3"), CheckpointError, id="iteration-str"),
    pytest.param(_bad(iteration=1.5), CheckpointError, id="iteration-float"),
    pytest.param(_bad(iteration=True), CheckpointError, id="iteration-bool"),
    pytest.param(_bad(iteration=2**31), CheckpointError, id="iteration-over-int32"),
    pytest.param(_bad(iteration=2**63), CheckpointError, id="iteration-over-int64"),
    pytest.param(_bad(completed_phases="plan"), CheckpointError, id="phases-str"),
    pytest.param(_bad(completed_phases=["plan", 3]), CheckpointError, id="phases-int"),
    pytest.param(
        _bad(completed_phases=["\ud800"]), CheckpointSerializationError, id="phases-surrogate"
    ),
    pytest.param(_bad_meta(agent_id="a" * 256), CheckpointError, id="agent-id-too-long"),
    pytest.param(_bad_meta(caller_id=123), CheckpointError, id="caller-id-int"),
    pytest.param(_bad_meta(agent_name="\ud800"), CheckpointError, id="meta-surrogate"),
    pytest.param(_bad_meta(prompt="\udc00 prompt"), CheckpointError, id="prompt-surrogate"),
    pytest.param(_bad_meta(prompt=["not", "a", "str"]), CheckpointError, id="prompt-list"),
    pytest.param(_bad(app_version="v" * 256), CheckpointError, id="app-version-too-long"),
    pytest.param(_bad(owner="o" * 256), CheckpointError, id="owner-too-long"),
]


@pytest.mark.parametrize(("corrupt", "error"), BAD_INPUTS)
async def test_bad_input_is_rejected_and_state_kept(
    store: Any, corrupt: Callable[[RunCheckpoint], RunCheckpoint], error: type[Exception]
) -> None:
    good = make(
        "victim",
        messages=GOOD_MESSAGES,
        iteration=3,
        completed_phases=["plan"],
        app_version="v1",
        owner="exec",
        updated_at=T0,
        **FULL_META,
    )
    await store.save(good)
    bad = corrupt(replace(good, updated_at=T0 + timedelta(hours=1)))
    with pytest.raises(error):
        await store.save(bad)
    assert_same_state(await store.load("victim"), good)
    assert await store.count() == 1
    # Same for a run that had no row yet: nothing is inserted.
    with pytest.raises(error):
        await store.save(replace(bad, meta=replace(bad.meta, run_id="fresh")))
    assert await store.load("fresh") is None
    assert await store.count() == 1


@pytest.mark.parametrize(
    "run_id",
    [
        pytest.param("", id="empty"),
        pytest.param("r" * 256, id="256-chars"),
        pytest.param("é" * 256, id="256-multibyte-chars"),
        pytest.param("run-\ud800", id="surrogate"),
    ],
)
async def test_bad_run_id_is_rejected(store: Any, run_id: str) -> None:
    good = make("victim", messages=GOOD_MESSAGES, iteration=1, updated_at=T0)
    await store.save(good)
    with pytest.raises(CheckpointError):
        await store.save(make(run_id, messages=GOOD_MESSAGES))
    with pytest.raises(CheckpointError):
        await store.register(make(run_id))
    assert await store.count() == 1
    assert_same_state(await store.load("victim"), good)
    assert [s.run_id for s in await summaries(store, status=None)] == ["victim"]


async def test_every_meta_field_over_255_chars_is_rejected(store: Any) -> None:
    good = make("victim", messages=GOOD_MESSAGES, iteration=1, updated_at=T0, **FULL_META)
    await store.save(good)
    for name in META_ID_FIELDS:
        bad = replace(good, meta=replace(good.meta, **{name: "m" * 256}), iteration=2)
        with pytest.raises(CheckpointError):
            await store.save(bad)
        assert_same_state(await store.load("victim"), good)


async def test_bad_input_to_register_take_over_keeps_state(store: Any) -> None:
    good = make("victim", messages=GOOD_MESSAGES, iteration=2, owner="exec", **FULL_META)
    await store.save(good)
    for bad_meta in (
        replace(good.meta, agent_id="a" * 256),
        replace(good.meta, agent_name="\ud800"),
    ):
        with pytest.raises(CheckpointError):
            await store.register(RunCheckpoint(meta=bad_meta, owner="intruder"))
        assert_same_state(await store.load("victim"), good)
    with pytest.raises(CheckpointError):
        await store.register(replace(good, owner="o" * 256))
    assert_same_state(await store.load("victim"), good)


async def test_limits_are_inclusive_at_255_chars(store: Any) -> None:
    run_id = "é" * 255
    meta = {name: "ü" * 255 for name in META_ID_FIELDS}
    cp = make(run_id, messages=GOOD_MESSAGES, app_version="v" * 255, owner="ö" * 255, **meta)
    await store.save(cp)
    assert_same_state(await store.load(run_id), cp)
    assert await store.claim(run_id, epoch=0, owner="o" * 255) is not None
    assert await store.delete(run_id) is True


async def test_size_cap(store_url: str | None) -> None:
    cap = 1000
    async with capped_store(store_url, cap) as store:
        good = make("capped", messages=["x" * (cap - 4)], iteration=1)  # ["xxx…"] is n + 4 bytes
        await store.save(good)  # exactly at the cap: accepted
        assert_same_state(await store.load("capped"), good)

        too_big = make("capped", messages=["x" * (cap - 3)], iteration=2)
        with pytest.raises(CheckpointTooLargeError) as info:
            await store.save(too_big)
        assert isinstance(info.value, CheckpointError)
        assert info.value.size_bytes == cap + 1
        assert info.value.max_bytes == cap
        assert info.value.run_id == "capped"
        assert_same_state(await store.load("capped"), good)

        with pytest.raises(CheckpointTooLargeError):
            await store.save(make("other", messages=[{"content": "é" * cap}]))
        assert await store.load("other") is None
        assert await store.count() == 1


# -- values that must round-trip exactly --------------------------------------------------------


async def test_nul_character_round_trips(store: Any) -> None:
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
        prompt="שלום e\u0301 漢字 \x00 end",
    )
    await store.save(cp)
    loaded = await store.load("unicode")
    assert_same_state(loaded, cp)
    assert loaded is not None
    assert loaded.messages[3]["content"] == "combining e\u0301 vs \u00e9, A\u030a"
    assert loaded.meta.prompt == "שלום e\u0301 漢字 \x00 end"
    (summary,) = await summaries(store)
    assert summary.size_bytes == encoded_size(messages)


async def test_unicode_run_id_round_trips(store: Any) -> None:
    run_id = "run-漢字-🙂-e\u0301"
    await store.save(make(run_id, iteration=1))
    loaded = await store.load(run_id)
    assert loaded is not None and loaded.run_id == run_id
    assert await store.load("run-漢字-🙂-\u00e9") is None  # no normalization
    assert await store.delete(run_id) is True


async def test_numbers_round_trip(store: Any) -> None:
    messages = [
        0,
        -1,
        2**63 - 1,
        -(2**63),
        2**64 - 1,
        0.1,
        -0.0,
        1e-300,
        1.7976931348623157e308,
        5e-324,
        1.0,
        True,
        False,
        None,
    ]
    cp = make("nums", messages=messages)
    await store.save(cp)
    assert_same_state(await store.load("nums"), cp)


async def test_tuples_come_back_as_lists(store: Any) -> None:
    cp = make(
        "tup",
        messages=({"role": "user", "pair": (1, (2, 3))}, ("a", "b")),
        completed_phases=("plan", "act"),
    )
    await store.save(cp)
    loaded = await store.load("tup")
    assert loaded is not None
    assert type(loaded.messages) is list
    assert loaded.messages == [{"role": "user", "pair": [1, [2, 3]]}, ["a", "b"]]
    assert type(loaded.messages[0]["pair"]) is list
    assert type(loaded.messages[1]) is list
    assert list(loaded.completed_phases) == ["plan", "act"]


async def test_dict_key_order_is_kept(store: Any) -> None:
    message = {"z": 1, "a": 2, "m": {"y": 1, "b": 2}}
    await store.save(make("order", messages=[message]))
    loaded = await store.load("order")
    assert loaded is not None
    assert list(loaded.messages[0]) == ["z", "a", "m"]
    assert list(loaded.messages[0]["m"]) == ["y", "b"]


async def test_large_transcript_round_trips(store: Any) -> None:
    rng = random.Random(7)
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,é漢🙂\n\x00"
    messages = [
        {
            "role": "tool" if i % 3 else "assistant",
            "n": i,
            "content": "".join(rng.choice(alphabet) for _ in range(4096)) * 4,
        }
        for i in range(300)
    ]
    cp = make("big", messages=messages, iteration=300, completed_phases=["plan"] * 10)
    await store.save(cp)
    loaded = await store.load("big")
    assert_same_state(loaded, cp)
    (summary,) = await summaries(store)
    assert summary.message_count == 300
    assert summary.size_bytes == encoded_size(messages)
    assert summary.size_bytes > 5_000_000
    (listed,) = await store.list_interrupted()
    assert_exact(listed.messages, messages)


# -- concurrency -------------------------------------------------------------------------------


async def test_two_hundred_concurrent_runs(store: Any) -> None:
    runs = 200
    saves = 4

    async def run(i: int) -> None:
        run_id = f"conc-{i:03d}"
        messages: list[dict[str, Any]] = []
        for it in range(1, saves + 1):
            messages.append({"role": "assistant", "content": f"run {i} step {it}", "i": it})
            await store.save(
                make(
                    run_id,
                    messages=list(messages),
                    iteration=it,
                    completed_phases=[f"p{k}" for k in range(it)],
                    agent_id=f"agent-{i % 5}",
                )
            )
            await asyncio.sleep(0)  # interleave the runs

    await asyncio.gather(*(run(i) for i in range(runs)))
    assert await store.count() == runs
    loaded = await asyncio.gather(*(store.load(f"conc-{i:03d}") for i in range(runs)))
    for i, cp in enumerate(loaded):
        assert cp is not None
        assert cp.iteration == saves
        assert cp.meta.agent_id == f"agent-{i % 5}"
        assert cp.completed_phases == [f"p{k}" for k in range(saves)]
        assert cp.messages == [
            {"role": "assistant", "content": f"run {i} step {it}", "i": it}
            for it in range(1, saves + 1)
        ]
    assert len(await store.list_interrupted()) == runs
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
                await store.save(make(run_id, messages=transcript(5), iteration=2))
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
