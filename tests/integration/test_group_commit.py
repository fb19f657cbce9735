"""SQLite group commit: saves of many runs that arrive together share one transaction."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from sqlalchemy import event

from executus_ckpt import (
    CheckpointFencedError,
    CheckpointSerializationError,
    RunCheckpoint,
    RunCheckpointMeta,
    SQLCheckpointStore,
    StoreCheckpointerFactory,
    StoreUnavailableError,
    migrate,
)
from executus_ckpt.stores import _sqlite
from executus_ckpt.types import RunCheckpointState, RunInfo


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> Any:
    url = f"sqlite+aiosqlite:///{tmp_path / 'g.db'}"
    await migrate(url)
    async with SQLCheckpointStore.open(url) as store:
        yield store


def cp(run_id: str, n: int, epoch: int = 0) -> RunCheckpoint:
    return RunCheckpoint(
        RunCheckpointMeta(run_id), messages=[{"n": k} for k in range(n)], iteration=n, epoch=epoch
    )


def count_commits(store: SQLCheckpointStore) -> list[int]:
    commits: list[int] = []
    event.listen(store.engine.sync_engine, "commit", lambda conn: commits.append(1))
    return commits


async def test_concurrent_saves_share_commits(sqlite_store: SQLCheckpointStore) -> None:
    await sqlite_store.check_schema()
    commits = count_commits(sqlite_store)
    await asyncio.gather(*(sqlite_store.save(cp(f"run-{i}", 5)) for i in range(100)))
    assert len(commits) < 50, f"100 saves took {len(commits)} commits: not grouped"
    for i in range(100):
        loaded = await sqlite_store.load(f"run-{i}")
        assert loaded is not None and loaded.iteration == 5


async def test_a_rejected_write_does_not_fail_its_batch(sqlite_store: SQLCheckpointStore) -> None:
    await sqlite_store.save(cp("fenced", 1))
    await sqlite_store.register(cp("fenced", 0))  # epoch 1: epoch-0 writers are now stale
    results = await asyncio.gather(
        sqlite_store.save(cp("a", 2)),
        sqlite_store.save(cp("fenced", 3, epoch=0)),
        sqlite_store.save(cp("b", 4)),
        return_exceptions=True,
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], CheckpointFencedError)
    assert (await sqlite_store.load("a")).iteration == 2
    assert (await sqlite_store.load("b")).iteration == 4
    assert (await sqlite_store.load("fenced")).iteration == 1


async def test_bad_input_is_rejected_before_queueing(sqlite_store: SQLCheckpointStore) -> None:
    bad = RunCheckpoint(RunCheckpointMeta("bad"), messages=[float("nan")])
    results = await asyncio.gather(
        sqlite_store.save(cp("ok", 1)), sqlite_store.save(bad), return_exceptions=True
    )
    assert results[0] is None and isinstance(results[1], CheckpointSerializationError)
    assert await sqlite_store.load("bad") is None


async def test_a_failed_batch_reaches_every_caller(sqlite_store: SQLCheckpointStore) -> None:
    await sqlite_store.check_schema()

    def explode(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        if "run_checkpoint_messages" in statement and statement.startswith("INSERT"):
            raise OSError("disk full (injected)")

    event.listen(sqlite_store.engine.sync_engine, "before_cursor_execute", explode)
    results = await asyncio.gather(
        *(sqlite_store.save(cp(f"r{i}", 2)) for i in range(5)), return_exceptions=True
    )
    event.remove(sqlite_store.engine.sync_engine, "before_cursor_execute", explode)
    assert all(isinstance(r, StoreUnavailableError) for r in results), results
    assert await sqlite_store.count() == 0, "the failed batch was rolled back whole"
    await sqlite_store.save(cp("after", 1))  # the committer recovers
    assert (await sqlite_store.load("after")).iteration == 1


async def test_cancelled_caller_still_commits(sqlite_store: SQLCheckpointStore) -> None:
    await sqlite_store.check_schema()
    task = asyncio.ensure_future(sqlite_store.save(cp("c", 3)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await sqlite_store.aclose()  # waits for queued writes
    async with SQLCheckpointStore.open(str(sqlite_store.engine.url)) as again:
        loaded = await again.load("c")
    assert loaded is not None and loaded.iteration == 3


# -- SQLite: the save hot path is one call into aiosqlite's worker thread ----------------------


def count_thread_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the functions every aiosqlite connection sends to its worker thread."""
    calls: list[str] = []
    original = aiosqlite.Connection._execute

    async def counted(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(getattr(fn, "__name__", type(fn).__name__))
        return await original(self, fn, *args, **kwargs)

    monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
    return calls


async def test_sqlite_append_is_one_call_into_the_driver_thread(
    sqlite_store: SQLCheckpointStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The one-hop path uses aiosqlite's private Connection._execute: if an upgrade removes it
    # or the backend stops using it, saves would silently take four calls instead.
    assert _sqlite.one_hop_class() is aiosqlite.Connection, "no _execute/_conn: 4 hops a save"
    factory = StoreCheckpointerFactory(sqlite_store, throttle=0)
    run = await factory.begin(RunInfo("hop"))
    transcript: list[Any] = [{"n": 0}]
    await run.save(RunCheckpointState(messages=transcript, iteration=0))
    calls = count_thread_calls(monkeypatch)
    for step in range(1, 4):
        transcript.append({"n": step})
        calls.clear()
        await run.save(RunCheckpointState(messages=transcript, iteration=step))
        assert calls == ["_apply"], calls
    loaded = await sqlite_store.load("hop")
    assert loaded is not None and loaded.messages == transcript and loaded.iteration == 3


async def test_sqlite_appends_without_the_private_api(
    sqlite_store: SQLCheckpointStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_sqlite, "one_hop_class", lambda: None)
    calls = count_thread_calls(monkeypatch)
    await asyncio.gather(*(sqlite_store.save(cp(f"f{i}", 2)) for i in range(3)))
    calls.clear()
    await asyncio.gather(*(sqlite_store.append(cp(f"f{i}", 4), base_count=2) for i in range(3)))
    assert "_apply" not in calls and len(calls) > 1, calls
    for i in range(3):
        loaded = await sqlite_store.load(f"f{i}")
        assert loaded is not None and loaded.messages == [{"n": k} for k in range(4)]


async def test_sqlite_appends_and_core_writes_share_a_batch(
    sqlite_store: SQLCheckpointStore,
) -> None:
    await asyncio.gather(*(sqlite_store.save(cp(f"m{i}", 2)) for i in range(4)))
    commits = count_commits(sqlite_store)
    results = await asyncio.gather(
        sqlite_store.append(cp("m0", 4), base_count=2),
        sqlite_store.save(cp("m1", 3)),  # a Core write in the same batch
        sqlite_store.append(cp("m2", 5), base_count=3),  # stale base: rewritten in full
        sqlite_store.append(cp("m3", 3), base_count=2),
        sqlite_store.register(cp("m4", 0)),
    )
    assert results[:4] == [None] * 4 and results[4] == 0
    assert len(commits) <= 3, f"{len(commits)} commits for one batch and one rewrite"
    expected = {"m0": 4, "m1": 3, "m2": 5, "m3": 3}
    for run_id, n in expected.items():
        loaded = await sqlite_store.load(run_id)
        assert loaded is not None and loaded.messages == [{"n": k} for k in range(n)], run_id


# -- PostgreSQL: concurrent appends of different runs share one statement ---------------------


@pytest.fixture
async def pg_store(pg_url: str) -> Any:
    async with SQLCheckpointStore.open(pg_url) as store:
        yield store


def log_appends(store: SQLCheckpointStore) -> list[str]:
    """Append statements the asyncpg connections run (the fast path bypasses SQLAlchemy)."""
    seen: list[str] = []
    logged: set[int] = set()

    def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        driver = dbapi_connection.driver_connection
        if id(driver) not in logged:
            logged.add(id(driver))
            driver.add_query_logger(
                lambda q: seen.append(q.query) if "run_checkpoint_messages" in q.query else None
            )

    event.listen(store.engine.sync_engine, "checkout", on_checkout)
    return seen


async def test_pg_concurrent_appends_share_statements(pg_store: SQLCheckpointStore) -> None:
    from executus_ckpt import StoreCheckpointerFactory
    from executus_ckpt.types import RunCheckpointState, RunInfo

    factory = StoreCheckpointerFactory(pg_store)
    cps = [await factory.begin(RunInfo(f"run-{i}")) for i in range(40)]
    transcripts: list[list[Any]] = [[{"n": 0}] for _ in cps]
    await asyncio.gather(
        *(
            cp.save(RunCheckpointState(messages=t, iteration=0))
            for cp, t in zip(cps, transcripts, strict=True)
        )
    )  # first saves: full writes
    seen = log_appends(pg_store)
    for step in range(1, 4):
        for t in transcripts:
            t.append({"n": step, "pad": "x" * 1000})
        await asyncio.gather(
            *(
                cp.save(RunCheckpointState(messages=t, iteration=step))
                for cp, t in zip(cps, transcripts, strict=True)
            )
        )
    appends = [q for q in seen if q.lstrip().upper().startswith("WITH")]
    assert 3 <= len(appends) < 60, f"120 appends took {len(appends)} statements"
    for i in range(40):
        loaded = await pg_store.load(f"run-{i}")
        assert loaded is not None and loaded.iteration == 3
        assert loaded.messages == transcripts[i]


async def test_pg_batches_write_or_keep_each_runs_identity(pg_store: SQLCheckpointStore) -> None:
    """In a multi-run statement each append keeps its run's stored identity or writes a new
    one: checkpointer appends leave a large prompt as stored (not sent again), direct appends
    with another meta in the same batches store it."""
    big = "q" * 20_000
    factory = StoreCheckpointerFactory(pg_store)
    cps = [await factory.begin(RunInfo(f"kept-{i}", inputs={"prompt": big})) for i in range(12)]
    transcripts: list[list[Any]] = [[{"n": 0}] for _ in cps]
    for c, t in zip(cps, transcripts, strict=True):
        await c.save(RunCheckpointState(messages=t, iteration=0))
    await asyncio.gather(*(pg_store.save(cp(f"moved-{i}", 1)) for i in range(12)))
    args: list[Any] = []

    def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        dbapi_connection.driver_connection.add_query_logger(lambda q: args.append(q.args))

    event.listen(pg_store.engine.sync_engine, "checkout", on_checkout)
    moved = [
        RunCheckpoint(
            RunCheckpointMeta(f"moved-{i}", prompt=f"new prompt {i}"),
            messages=[{"n": k} for k in range(2)],
            iteration=2,
        )
        for i in range(12)
    ]
    for t in transcripts:
        t.append({"n": 1})
    await asyncio.gather(
        *(
            c.save(RunCheckpointState(messages=t, iteration=1))
            for c, t in zip(cps, transcripts, strict=True)
        ),
        *(pg_store.append(m, base_count=1) for m in moved),
    )
    for _ in range(3):
        await asyncio.sleep(0)  # asyncpg runs query loggers as tasks
    event.remove(pg_store.engine.sync_engine, "checkout", on_checkout)
    assert args and all(big not in repr(a) for a in args), "an append re-sent the prompt"
    for c, t in zip(cps, transcripts, strict=True):
        loaded = await pg_store.load(c.run_id)
        assert loaded is not None and loaded.meta == c.meta and loaded.messages == t
    for m in moved:
        loaded = await pg_store.load(m.run_id)
        assert loaded is not None and loaded.meta == m.meta and loaded.messages == m.messages


async def test_pg_batch_member_with_a_stale_base_falls_back(pg_store: SQLCheckpointStore) -> None:
    await asyncio.gather(*(pg_store.save(cp(f"r{i}", 2)) for i in range(5)))
    # r2's writer believes 3 messages are stored; there are 2: it must be rewritten in full,
    # while the others append within the same batch.
    results = await asyncio.gather(
        *(pg_store.append(cp(f"r{i}", 4), base_count=3 if i == 2 else 2) for i in range(5))
    )
    assert results == [None] * 5
    for i in range(5):
        loaded = await pg_store.load(f"r{i}")
        assert loaded.messages == [{"n": k} for k in range(4)], i


async def test_pg_saves_update_the_header_in_place(pg_url: str) -> None:
    """No index holds a column that a save changes (migration 0006): PostgreSQL updates the
    run's row in place (HOT) instead of writing an entry in each of its indexes."""
    import asyncpg

    async with SQLCheckpointStore.open(pg_url) as store:
        factory = StoreCheckpointerFactory(store)
        run = await factory.begin(RunInfo("hot", inputs={"prompt": "p"}))
        transcript: list[Any] = []
        for i in range(1, 41):
            transcript.append({"n": i, "pad": "x" * 300})
            phases = ["plan"] if i > 20 else []  # one boundary on the way
            await run.save(RunCheckpointState(transcript, i, phases))
    # The store's connections are closed: their backends report their statistics as they
    # exit (asynchronously: poll, bounded).
    dsn = pg_url.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(100):
            updated, hot = await conn.fetchrow(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                "WHERE relname = 'run_checkpoints'"
            )
            if updated >= 40:
                break
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    assert updated >= 40, f"statistics not reported: {updated} updates"
    assert hot >= 0.9 * updated, f"only {hot} of {updated} header updates were HOT"


@pytest.mark.parametrize("added", [0, 1, 3, 16, 17, 40])
async def test_pg_append_of_any_length(pg_store: SQLCheckpointStore, added: int) -> None:
    # Up to VALUES_MAX messages are listed as parameters (no array types for asyncpg to
    # introspect on a fresh connection); more go as arrays. Both append the same rows.
    await pg_store.save(cp("len", 2))
    await pg_store.append(cp("len", 2 + added), base_count=2)
    loaded = await pg_store.load("len")
    assert loaded is not None and loaded.messages == [{"n": k} for k in range(2 + added)]
    assert loaded.iteration == 2 + added


def staged(run_id: str, n: int, phases: list[str], extra: Any = None) -> RunCheckpoint:
    return RunCheckpoint(
        RunCheckpointMeta(run_id),
        messages=[{"n": k} for k in range(n)],
        iteration=n,
        completed_phases=phases,
        extra=extra,
    )


async def _appends_record_boundaries(
    store: SQLCheckpointStore, runs: int, calls: list[str] | None = None
) -> None:
    await asyncio.gather(*(store.save(staged(f"b{i}", 2, [])) for i in range(runs)))
    if calls is not None:
        calls.clear()
    await asyncio.gather(  # a boundary (a phase gained), appended
        *(store.append(staged(f"b{i}", 4, ["plan"], {"k": i}), base_count=2) for i in range(runs))
    )
    assert calls is None or calls == ["_apply"], calls  # not declined to the Core path
    await asyncio.gather(  # mid-phase: the boundary stays
        *(store.append(staged(f"b{i}", 5, ["plan"]), base_count=4) for i in range(runs))
    )
    for i in range(runs):
        loaded = await store.load(f"b{i}")
        assert loaded is not None
        resume = loaded.resume_state()
        assert list(resume.messages) == [{"n": k} for k in range(4)]
        assert resume.iteration == 4 and resume.extra == {"k": i}
        assert list(resume.interrupted_tail) == [{"n": 4}]


async def test_sqlite_boundary_append_is_one_call(
    sqlite_store: SQLCheckpointStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A save that completes a phase records the boundary in the same raw statement.
    await _appends_record_boundaries(sqlite_store, 1, count_thread_calls(monkeypatch))


async def test_pg_boundary_appends_share_a_batch(pg_store: SQLCheckpointStore) -> None:
    await _appends_record_boundaries(pg_store, 1)  # one statement alone
    await _appends_record_boundaries(pg_store, 12)  # in batches


async def test_pg_append_queued_while_every_drainer_gives_back_its_connection(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append that arrives while both drainers are returning their connections to the
    pool (idle after LINGER) is still sent at once: found in CI, where every run of a replica
    waited for the operation timeout (30 s) and then failed with StoreUnavailableError.
    Returning a connection is slowed here so that the window is wide enough to hit."""
    from sqlalchemy.ext.asyncio import AsyncConnection

    real_close = AsyncConnection.close
    closing = 0

    async def slow_close(self: AsyncConnection) -> None:
        nonlocal closing
        closing += 1
        try:
            await asyncio.sleep(0.3)
            await real_close(self)
        finally:
            closing -= 1

    async with SQLCheckpointStore.open(pg_url, operation_timeout=3.0) as store:
        await asyncio.gather(store.save(cp("a", 1)), store.save(cp("b", 1)))
        monkeypatch.setattr(AsyncConnection, "close", slow_close)
        # Two appends at once start both drainers (one statement each).
        await asyncio.gather(
            store.append(cp("a", 2), base_count=1), store.append(cp("b", 2), base_count=1)
        )
        for _ in range(100):  # both idle past LINGER and returning their connections
            if closing == 2:
                break
            await asyncio.sleep(0.005)
        assert closing == 2
        await store.append(cp("a", 3), base_count=2)  # StoreUnavailableError after 3 s if stalled
        loaded = await store.load("a")
        assert loaded is not None and loaded.messages == [{"n": k} for k in range(3)]


async def test_pg_drainers_under_random_interleavings(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seeded stress of the append drainers: 24 runs append with pauses around LINGER (so
    drainers keep going idle, lingering, being woken and returning connections, whose return
    is slowed at random), and some appends are cancelled mid-way. Every append that is not
    cancelled returns within the operation timeout, and each run ends holding exactly its
    last acknowledged state."""
    import random

    from sqlalchemy.ext.asyncio import AsyncConnection

    from executus_ckpt.stores import _postgres

    rng = random.Random(20261207)
    real_close = AsyncConnection.close

    async def jittery_close(self: AsyncConnection) -> None:
        await asyncio.sleep(rng.uniform(0, 0.02))
        await real_close(self)

    monkeypatch.setattr(AsyncConnection, "close", jittery_close)
    linger = _postgres.LINGER

    async with SQLCheckpointStore.open(pg_url, operation_timeout=10.0) as store:

        async def run(i: int) -> tuple[str, set[int]]:
            run_id = f"s{i}"
            await store.save(cp(run_id, 1))
            acknowledged, cancelled = 1, []
            for n in range(2, 17):
                await asyncio.sleep(rng.uniform(0, 3 * linger))
                attempt = asyncio.create_task(store.append(cp(run_id, n), base_count=acknowledged))
                if rng.random() < 0.1:
                    await asyncio.sleep(rng.uniform(0, 0.002))
                    attempt.cancel()
                try:
                    await attempt
                except asyncio.CancelledError:
                    cancelled.append(n)  # applied or not: the next append's guard finds out
                    continue
                acknowledged, cancelled = n, []
            # what may be stored: the last acknowledged state, or a cancelled one after it
            return run_id, {acknowledged, *cancelled}

        async with asyncio.timeout(60):
            results = await asyncio.gather(*(run(i) for i in range(24)))
        for run_id, possible in results:
            loaded = await store.load(run_id)
            assert loaded is not None and len(loaded.messages) in possible, (run_id, possible)
            assert loaded.messages == [{"n": k} for k in range(len(loaded.messages))], run_id


async def test_pg_close_waits_for_an_append_its_caller_is_sending(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone append is sent by its caller on a kept connection (no task of the store's):
    closing the store while that statement is in flight still waits for it, as it waits for
    queued appends, and the append is stored."""
    from executus_ckpt.stores import _postgres

    real = _postgres._append_one
    sent = asyncio.Event()

    async def slow(connection: Any, append: Any, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        sent.set()
        await asyncio.sleep(0.3)
        return await real(connection, append, timeout)

    store = SQLCheckpointStore.from_url(pg_url)  # its own engine: aclose disposes it
    await store.save(cp("a", 1))
    await store.append(cp("a", 2), base_count=1)  # leaves a kept connection behind
    monkeypatch.setattr(_postgres, "_append_one", slow)
    sending = asyncio.create_task(store.append(cp("a", 3), base_count=2))
    await sent.wait()
    await store.aclose()
    assert sending.done(), "aclose returned while an append was still being sent"
    await sending
    async with SQLCheckpointStore.open(pg_url) as again:
        loaded = await again.load("a")
    assert loaded is not None and loaded.messages == [{"n": k} for k in range(3)]
