"""Delta storage: a save that extends the stored transcript writes only the new messages.

Statements are counted with SQLAlchemy's ``before_cursor_execute`` hook, so a regression to
full rewrites (or an extra read per save) fails here on both SQL backends.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.util import await_only

from executus_ckpt import (
    CheckpointFencedError,
    RunCheckpoint,
    RunCheckpointMeta,
    RunCheckpointState,
    RunInfo,
    SQLCheckpointStore,
    StoreCheckpointerFactory,
)


@dataclass
class Statements:
    seen: list[tuple[str, Any]] = field(default_factory=list)

    def on_table(self) -> list[tuple[str, Any]]:
        """Statements that touch our tables (BEGIN/COMMIT and pragmas left out)."""
        return [(s, p) for s, p in self.seen if "run_checkpoint" in s]

    def kinds(self) -> list[str]:
        """Statement kinds; a data-modifying CTE counts as each statement inside it."""
        out: list[str] = []
        for s, _ in self.on_table():
            if s.lstrip().upper().startswith("WITH"):
                up = s.upper()
                out += [k for k in ("UPDATE", "INSERT", "DELETE") if f"AS ({k}" in up]
            else:
                out.append(s.split()[0].upper())
        # sqlite3 traces an executemany once per row: count a run of inserts as one batch.
        return [k for i, k in enumerate(out) if i == 0 or k != out[i - 1] or k != "INSERT"]


@asynccontextmanager
async def counting(store: SQLCheckpointStore) -> AsyncIterator[Statements]:
    """Record every statement the *driver* runs (the save fast path bypasses SQLAlchemy).

    SQLite: sqlite3's trace callback (it sees SQLAlchemy's statements too); PostgreSQL:
    asyncpg's query logger for the raw path plus SQLAlchemy's cursor events for the rest
    (asyncpg does not log the prepared statements SQLAlchemy runs). Installed on each pooled
    connection as it is checked out, removed on exit.
    """
    stats = Statements()
    installed: list[Any] = []

    def before(conn: Any, cursor: Any, statement: str, params: Any, ctx: Any, many: bool) -> None:
        stats.seen.append((statement, params))

    def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        driver = dbapi_connection.driver_connection
        if store.dialect == "sqlite":
            await_only(driver.set_trace_callback(lambda sql: stats.seen.append((sql, sql))))
        else:
            logger = lambda q: stats.seen.append((q.query, q.args))  # noqa: E731
            driver.add_query_logger(logger)
            installed.append((driver, logger))

    engine = store.engine.sync_engine
    event.listen(engine, "checkout", on_checkout)
    held = getattr(getattr(store, "_backend", None), "_conn", None)
    if held is not None:  # SQLite's group committer keeps its connection checked out
        raw = await held.get_raw_connection()
        await raw.driver_connection.set_trace_callback(lambda q: stats.seen.append((q, q)))
    if store.dialect == "postgresql":
        event.listen(engine, "before_cursor_execute", before)
    try:
        yield stats
        # asyncpg runs query loggers as tasks: let them run (a save that writes in its
        # caller's task returns right after its statement, before they do).
        for _ in range(3):
            await asyncio.sleep(0)
    finally:
        event.remove(engine, "checkout", on_checkout)
        if store.dialect == "postgresql":
            event.remove(engine, "before_cursor_execute", before)
        for driver, logger in installed:
            driver.remove_query_logger(logger)


def _text(params: Any) -> str:
    """Parameters as text, with binary values decoded (and x'..' literals of a SQLite trace)."""
    if isinstance(params, str):
        return re.sub(r"x'([0-9a-fA-F]*)'", lambda g: bytes.fromhex(g.group(1)).decode(), params)
    if isinstance(params, bytes | bytearray | memoryview):
        return bytes(params).decode()
    if isinstance(params, dict):
        return " ".join(_text(v) for v in params.values())
    if isinstance(params, list | tuple):
        return " ".join(_text(v) for v in params)
    return str(params)


def tool_result(i: int, size: int = 2000) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": f"c{i}", "content": "x" * size}


def iteration_messages(i: int) -> list[dict[str, Any]]:
    return [
        {"role": "assistant", "tool_calls": [{"id": f"c{i}", "name": "search"}]},
        tool_result(i),
        {"role": "assistant", "content": f"answer {i}"},
    ]


async def test_append_writes_only_new_messages_and_header(sql_store: SQLCheckpointStore) -> None:
    factory = StoreCheckpointerFactory(sql_store)
    cp = await factory.begin(RunInfo("r", inputs={"prompt": "go"}))
    transcript: list[Any] = [{"role": "user", "content": "go"}]
    transcript += iteration_messages(0)
    await cp.save(RunCheckpointState(messages=transcript, iteration=1))  # first save: full
    for i in range(1, 30):
        transcript += iteration_messages(i)
        async with counting(sql_store) as stats:
            await cp.save(RunCheckpointState(messages=transcript, iteration=i + 1))
        assert stats.kinds() == ["UPDATE", "INSERT"], stats.on_table()
        flat = " ".join(_text(p) for sql, p in stats.on_table() if "INSERT" in sql.upper())
        # Only the 3 new messages travel: earlier tool results are not in the parameters.
        assert f"c{i}" in flat and f"c{i - 1}" not in flat
        assert len(flat) < 3 * 2000 + 2000, "parameters are O(new messages), not O(transcript)"
    loaded = await sql_store.load("r")
    assert loaded is not None and loaded.messages == transcript
    (summary,) = [s async for s in sql_store.iter_summaries()]
    assert summary.message_count == len(transcript)


async def test_compaction_rewrites_in_full(sql_store: SQLCheckpointStore) -> None:
    factory = StoreCheckpointerFactory(sql_store)
    cp = await factory.begin(RunInfo("r"))
    transcript: list[Any] = []
    for i in range(5):
        transcript += iteration_messages(i)
        await cp.save(RunCheckpointState(messages=transcript, iteration=i))
    compacted: list[Any] = [{"role": "system", "content": "summary of 15 messages"}]
    async with counting(sql_store) as stats:
        await cp.save(RunCheckpointState(messages=compacted, iteration=6))
    assert "DELETE" in stats.kinds(), "a shorter transcript is rewritten"
    loaded = await sql_store.load("r")
    assert loaded.messages == compacted and loaded.iteration == 6
    # ...and appending resumes from the compacted transcript.
    compacted = [*compacted, {"role": "user", "content": "more"}]
    async with counting(sql_store) as stats:
        await cp.save(RunCheckpointState(messages=compacted, iteration=7))
    assert stats.kinds() == ["UPDATE", "INSERT"]
    assert (await sql_store.load("r")).messages == compacted


async def test_edited_prefix_is_detected_and_rewritten(sql_store: SQLCheckpointStore) -> None:
    factory = StoreCheckpointerFactory(sql_store)
    cp = await factory.begin(RunInfo("r"))
    transcript: list[Any] = [{"n": i} for i in range(10)]
    await cp.save(RunCheckpointState(messages=transcript, iteration=1))
    edited = [*transcript[:3], {"n": "edited"}, *transcript[4:], {"n": 10}]
    await cp.save(RunCheckpointState(messages=edited, iteration=2))
    assert (await sql_store.load("r")).messages == edited
    same_values_new_objects = [dict(m) for m in edited] + [{"n": 11}]
    async with counting(sql_store) as stats:
        await cp.save(RunCheckpointState(messages=same_values_new_objects, iteration=3))
    assert stats.kinds() == ["UPDATE", "INSERT"], "equal values still count as a prefix"
    assert (await sql_store.load("r")).messages == same_values_new_objects


async def test_stale_base_count_falls_back_to_full_rewrite(sql_store: SQLCheckpointStore) -> None:
    """A wrong hint (stored transcript not what the writer thinks) never mixes old and new."""
    from executus_ckpt import RunCheckpoint, RunCheckpointMeta

    meta = RunCheckpointMeta("r")
    await sql_store.save(RunCheckpoint(meta, messages=[{"a": 1}, {"a": 2}, {"a": 3}]))
    await sql_store.append(
        RunCheckpoint(meta, messages=[{"b": 1}, {"b": 2}, {"b": 3}, {"b": 4}]), base_count=2
    )
    assert (await sql_store.load("r")).messages == [{"b": 1}, {"b": 2}, {"b": 3}, {"b": 4}]
    await sql_store.append(RunCheckpoint(meta, messages=[{"c": 1}]), base_count=7)
    assert (await sql_store.load("r")).messages == [{"c": 1}]


async def test_take_over_writes_in_full_then_appends(sql_store: SQLCheckpointStore) -> None:
    factory = StoreCheckpointerFactory(sql_store)
    first = await factory.begin(RunInfo("r"))
    transcript: list[Any] = []
    for i in range(3):
        transcript += iteration_messages(i)
        await first.save(RunCheckpointState(messages=transcript, iteration=i))
    stored = await sql_store.load("r")
    second = await factory.begin(stored.run_info())
    resumed = list(stored.resume_state().messages) + iteration_messages(3)
    await second.save(RunCheckpointState(messages=resumed, iteration=4))
    with pytest.raises(CheckpointFencedError):
        await first.save(
            RunCheckpointState(messages=transcript + iteration_messages(9), iteration=9)
        )
    resumed += iteration_messages(4)
    async with counting(sql_store) as stats:
        await second.save(RunCheckpointState(messages=resumed, iteration=5))
    assert stats.kinds() == ["UPDATE", "INSERT"]
    assert (await sql_store.load("r")).messages == resumed


async def test_appends_leave_the_stored_identity_alone(sql_store: SQLCheckpointStore) -> None:
    """begin() writes the run's identity (prompt, inputs...); the appends after it do not
    send it again: a save's parameters stay O(new messages) whatever the inputs' size (on
    PostgreSQL a re-set large value would also be TOASTed anew at every save)."""
    big = "q" * 50_000
    factory = StoreCheckpointerFactory(sql_store)
    cp = await factory.begin(RunInfo("r", name="agent", inputs={"prompt": big, "doc": big}))
    transcript: list[Any] = iteration_messages(0)
    await cp.save(RunCheckpointState(messages=transcript, iteration=1))
    for i in range(1, 4):
        transcript += iteration_messages(i)
        async with counting(sql_store) as stats:
            await cp.save(RunCheckpointState(messages=transcript, iteration=i + 1))
        assert stats.kinds() == ["UPDATE", "INSERT"], stats.on_table()
        sent = " ".join(_text(p) for _, p in stats.on_table())
        assert big not in sent, "an append re-sent the run's prompt/inputs"
        assert len(sent) < 3 * 2000 + 2000, "parameters are O(new messages)"
    loaded = await sql_store.load("r")
    assert loaded is not None and loaded.meta == cp.meta
    assert loaded.meta.prompt == big and loaded.messages == transcript


async def test_an_append_with_another_meta_writes_it(sql_store: SQLCheckpointStore) -> None:
    """The store skips the identity only for the very meta it wrote at that epoch: a direct
    append with a different meta (even an equal, new object) stores it."""
    first = RunCheckpoint(RunCheckpointMeta("r", prompt="first"), messages=[{"n": 0}])
    await sql_store.save(first)
    second = RunCheckpoint(
        RunCheckpointMeta("r", prompt="second", agent_name="b"),
        messages=[{"n": 0}, {"n": 1}],
        iteration=2,
    )
    async with counting(sql_store) as stats:
        await sql_store.append(second, base_count=1)
    assert "second" in " ".join(_text(p) for _, p in stats.on_table())
    loaded = await sql_store.load("r")
    assert loaded is not None and loaded.meta == second.meta and loaded.iteration == 2
    third = RunCheckpoint(
        RunCheckpointMeta("r", prompt="second", agent_name="b"),
        messages=[{"n": 0}, {"n": 1}, {"n": 2}],
        iteration=3,
    )
    await sql_store.append(third, base_count=2)
    loaded = await sql_store.load("r")
    assert loaded is not None and loaded.meta == second.meta and loaded.iteration == 3


async def test_reload_after_restart_returns_exactly_what_was_saved(sql_url: str) -> None:
    transcript: list[Any] = []
    async with SQLCheckpointStore.open(sql_url) as store:
        cp = await StoreCheckpointerFactory(store).begin(RunInfo("r"))
        for i in range(20):
            transcript += iteration_messages(i)
            await cp.save(
                RunCheckpointState(messages=transcript, iteration=i, completed_phases=("p",) * i)
            )
    async with SQLCheckpointStore.open(sql_url) as store:
        loaded = await store.load("r")
        assert loaded.messages == transcript and loaded.iteration == 19
        assert list(loaded.completed_phases) == ["p"] * 19
        listed = await store.list_interrupted()
        assert [c.messages for c in listed] == [transcript]


async def test_delete_removes_messages(sql_store: SQLCheckpointStore) -> None:
    cp = await StoreCheckpointerFactory(sql_store).begin(RunInfo("r"))
    await cp.save(RunCheckpointState(messages=iteration_messages(0), iteration=1))
    await cp.complete()
    async with sql_store.engine.connect() as conn:
        from sqlalchemy import func, select

        from executus_ckpt.schema import run_checkpoint_messages

        left = (
            await conn.execute(select(func.count()).select_from(run_checkpoint_messages))
        ).scalar_one()
    assert left == 0


async def test_appends_within_a_phase_leave_the_boundary_alone(
    sql_store: SQLCheckpointStore,
) -> None:
    """On PostgreSQL an append whose phases are those the store last wrote sends the
    statement without the boundary's CASE expressions; the save that completes a phase
    sends them and records the boundary there."""
    factory = StoreCheckpointerFactory(sql_store)
    cp = await factory.begin(RunInfo("r"))
    transcript: list[Any] = []
    sent: list[str] = []
    for i, phases in enumerate(
        (["plan"], ["plan"], ["plan"], ["plan", "draft"], ["plan", "draft"])
    ):
        transcript += iteration_messages(i)
        async with counting(sql_store) as stats:
            await cp.save(RunCheckpointState(transcript, iteration=i + 1, completed_phases=phases))
        [(statement, _)] = [(s, p) for s, p in stats.on_table() if "UPDATE" in s.upper()]
        sent.append(statement)
    loaded = await sql_store.load("r")
    assert loaded is not None and loaded.messages == transcript
    resume = loaded.resume_state()
    assert list(resume.completed_phases) == ["plan", "draft"] and resume.iteration == 4
    assert resume.messages == transcript[:12]
    if sql_store.dialect == "postgresql":
        # the first save after begin() and the one that completes "draft" may move it
        assert ["CASE" in s.upper() for s in sent] == [True, False, False, True, False]


async def test_an_append_over_phases_changed_elsewhere_records_the_boundary(
    sql_store: SQLCheckpointStore,
) -> None:
    """The store remembers the phases it last wrote for a run; when another writer changed
    them since (here another store object at the same epoch), an append of the remembered
    phases must not skip the boundary: the stored phases are checked, and the save that
    brings a phase back records the boundary there."""
    ours = RunCheckpoint(
        RunCheckpointMeta("r"),
        messages=[{"n": k} for k in range(4)],
        iteration=4,
        completed_phases=["plan"],
    )
    await sql_store.save(ours)  # remembers ["plan"]
    async with SQLCheckpointStore.open(str(sql_store.engine.url)) as other:
        await other.append(
            replace(ours, messages=[{"n": k} for k in range(6)], iteration=6, completed_phases=[]),
            base_count=4,
        )
    assert list((await sql_store.load("r")).completed_phases) == []  # type: ignore[union-attr]
    again = replace(ours, messages=[{"n": k} for k in range(8)], iteration=8)
    await sql_store.append(again, base_count=6)
    loaded = await sql_store.load("r")
    assert loaded is not None and loaded.messages == again.messages
    resume = loaded.resume_state()
    assert (resume.iteration, len(resume.messages)) == (8, 8), "the boundary was not recorded"
