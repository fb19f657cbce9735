"""Boot recovery on every backend: claim before dispatch, oldest first, dead-lettering of
poison runs, quarantine by ``accept``, the concurrency cap, concurrent passes, and memory that
does not grow with the backlog."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from executus_ckpt import (
    CheckpointStatus,
    CheckpointSummary,
    InMemoryCheckpointStore,
    RunCheckpoint,
    RunCheckpointMeta,
    RunCheckpointState,
    RunInfo,
    SQLCheckpointStore,
    StoreCheckpointerFactory,
)
from executus_ckpt.lifecycle import checkpointed_run
from executus_ckpt.recovery import RecoveryReport, recover_interrupted
from executus_ckpt.types import utcnow

RECOVERY_LOGGER = "executus_ckpt.recovery"


def interrupted(
    run_id: str,
    *,
    age: float = 60.0,
    agent_id: str = "agent",
    messages: list[Any] | None = None,
    app_version: str | None = None,
) -> RunCheckpoint:
    """An interrupted run's row, last written ``age`` seconds ago."""
    at = utcnow() - timedelta(seconds=age)
    return RunCheckpoint(
        meta=RunCheckpointMeta(run_id, agent_id=agent_id, prompt=f"prompt of {run_id}"),
        messages=messages if messages is not None else [{"role": "user", "content": run_id}],
        iteration=1,
        completed_phases=["plan"],
        created_at=at,
        updated_at=at,
        app_version=app_version,
    )


async def save_all(store: Any, checkpoints: list[RunCheckpoint], batch: int = 100) -> None:
    for start in range(0, len(checkpoints), batch):
        await asyncio.gather(*(store.save(cp) for cp in checkpoints[start : start + batch]))


def paged(store: Any, page_size: int) -> Any:
    """The same database seen through a store that lists ``page_size`` rows per round trip."""
    if isinstance(store, SQLCheckpointStore):
        return SQLCheckpointStore(store.engine, page_size=page_size)
    return store


async def noop(cp: RunCheckpoint) -> None:
    return None


# -- claim, order, report ---------------------------------------------------------------------


async def test_dispatch_gets_claimed_checkpoints_oldest_first(store: Any) -> None:
    # Written in an order that is neither the age order nor the name order.
    await save_all(
        store,
        [
            interrupted("r-b", age=100),
            interrupted("r-c", age=300, messages=[{"m": 1}, {"m": 2}]),
            interrupted("r-a", age=200),
        ],
    )
    seen: list[RunCheckpoint] = []
    stored_during_dispatch: list[int] = []

    async def dispatch(cp: RunCheckpoint) -> None:
        seen.append(cp)
        row = await store.load(cp.run_id)
        stored_during_dispatch.append(row.attempts)

    report = await recover_interrupted(store, dispatch, concurrency=1, owner="boot-2")
    assert isinstance(report, RecoveryReport)
    assert [cp.run_id for cp in seen] == ["r-c", "r-a", "r-b"], "oldest first"
    assert report.dispatched == ("r-c", "r-a", "r-b")
    assert report.total == 3
    assert not (report.dead or report.quarantined or report.failed or report.lost)
    for cp in seen:
        assert cp.attempts == 1, "claimed (attempt counted) before dispatch"
        assert cp.status == CheckpointStatus.ACTIVE
        assert cp.owner == "boot-2"
        assert cp.epoch >= 1, "the claim raised the epoch"
        assert cp.meta.prompt == f"prompt of {cp.run_id}"
        assert list(cp.completed_phases) == ["plan"]
    assert list(seen[0].messages) == [{"m": 1}, {"m": 2}], "the full transcript is handed over"
    assert stored_during_dispatch == [1, 1, 1], "the attempt is stored before dispatch runs"


async def test_batch_claiming_passes_race_for_no_run(store: Any) -> None:
    """``batch_claims`` (what an Executor's sweeps use): two passes racing over one backlog
    claim runs several at a time (SKIP LOCKED on PostgreSQL, one write transaction on
    SQLite): every run is dispatched exactly once and no claim is lost to the other pass.
    Suspects are still claimed alone, after the others."""
    runs = [interrupted(f"r-{i:03d}", age=1000 - i) for i in range(150)]
    await save_all(store, runs)
    # r-000 is a suspect: claimed before, no progress since
    first = await store.claim("r-000", epoch=0, owner="earlier-boot")
    assert first is not None
    for executor_id in ("A", "B"):  # batch claims are an Executor's: its runs are then owned
        await store.register_executor(
            executor_id,
            name=executor_id,
            host=None,
            pid=None,
            app_version=None,
            stale_after=30.0,
            heartbeat_interval=1.0,
        )
    dispatched: dict[str, list[str]] = {"A": [], "B": []}

    def dispatcher(owner: str) -> Any:
        async def dispatch(cp: RunCheckpoint) -> None:
            dispatched[owner].append(cp.run_id)
            await asyncio.sleep(0)

        return dispatch

    reports = await asyncio.gather(
        *(
            recover_interrupted(store, dispatcher(o), owner=o, concurrency=8, batch_claims=True)
            for o in ("A", "B")
        )
    )
    everything = dispatched["A"] + dispatched["B"]
    twice = sorted(r for r, n in Counter(everything).items() if n > 1)
    assert twice == [], twice[:10]
    assert sorted(everything) == [cp.run_id for cp in runs], "each run exactly once"
    assert sum(len(r.lost) for r in reports) <= 1  # at most the suspect, listed by both
    taker = "A" if "r-000" in dispatched["A"] else "B"
    assert dispatched[taker][-1] == "r-000", "the suspect is dispatched after the others"
    for cp in runs:
        row = await store.load(cp.run_id)
        assert row is not None and row.owner in ("A", "B") and row.attempts >= 1


async def test_empty_store_and_bad_arguments(store: Any) -> None:
    report = await recover_interrupted(store, noop)
    assert report == RecoveryReport() and report.total == 0
    with pytest.raises(ValueError):
        await recover_interrupted(store, noop, max_attempts=0)
    with pytest.raises(ValueError):
        await recover_interrupted(store, noop, concurrency=0)


# -- poison runs ------------------------------------------------------------------------------


async def test_run_that_dies_every_boot_is_marked_dead_after_max_attempts(
    store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=RECOVERY_LOGGER)
    first = await StoreCheckpointerFactory(store).begin(RunInfo("poison", inputs={"prompt": "x"}))
    await first.save(RunCheckpointState(messages=[{"m": 0}], iteration=1))
    dispatches: list[int] = []

    async def dispatch_then_die(cp: RunCheckpoint) -> None:
        # The recovered run starts, saves, and the process dies (the checkpointer is abandoned:
        # no complete, no fail), exactly like a crash of the whole service.
        dispatches.append(cp.attempts)
        cp_ = await StoreCheckpointerFactory(store).begin(cp.run_info())
        await cp_.save(RunCheckpointState(messages=[{"m": 0}, {"m": 1}], iteration=2))

    for boot in (1, 2, 3):
        report = await recover_interrupted(store, dispatch_then_die, max_attempts=3)
        assert report.dispatched == ("poison",), f"boot {boot}"
        assert (await store.load("poison")).attempts == boot
    assert dispatches == [1, 2, 3]

    # Boot 4: over the budget -> dead, not dispatched; a healthy run in the same pass goes on.
    await store.save(interrupted("healthy"))
    caplog.clear()
    report = await recover_interrupted(store, dispatch_then_die, max_attempts=3)
    assert report.dead == ("poison",)
    assert "poison" not in report.dispatched and report.dispatched == ("healthy",)
    assert dispatches == [1, 2, 3, 1], "the poison run was not dispatched a fourth time"
    row = await store.load("poison")
    assert row is not None, "a dead run is kept for the operator"
    assert row.status == CheckpointStatus.DEAD
    assert row.last_error is not None and "max_attempts" in row.last_error
    assert row.iteration == 2, "its last state is kept"
    assert "poison" not in [cp.run_id for cp in await store.list_interrupted()]
    errors = [r for r in caplog.records if r.name == RECOVERY_LOGGER and r.levelno == logging.ERROR]
    assert len(errors) == 1 and "poison" in errors[0].getMessage()

    # Boot 5: a dead run stays dead.
    report = await recover_interrupted(store, dispatch_then_die, max_attempts=3)
    assert "poison" not in report.dispatched and "poison" not in report.dead
    assert dispatches == [1, 2, 3, 1, 2]
    assert (await store.load("poison")).status == CheckpointStatus.DEAD


async def test_max_attempts_one(store: Any) -> None:
    await store.save(interrupted("r"))
    calls: list[str] = []

    async def dispatch(cp: RunCheckpoint) -> None:
        calls.append(cp.run_id)

    assert (await recover_interrupted(store, dispatch, max_attempts=1)).dispatched == ("r",)
    assert (await recover_interrupted(store, dispatch, max_attempts=1)).dead == ("r",)
    assert calls == ["r"]


# -- dispatch errors --------------------------------------------------------------------------


async def test_dispatch_error_is_reported_and_the_run_stays_recoverable(
    store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    await save_all(store, [interrupted("bad", age=20), interrupted("good", age=10)])
    error = ValueError("dispatch blew up")

    async def dispatch(cp: RunCheckpoint) -> None:
        if cp.run_id == "bad":
            raise error

    report = await recover_interrupted(store, dispatch)
    assert dict(report.failed) == {"bad": error}
    assert report.failed["bad"] is error
    assert report.dispatched == ("good",)
    row = await store.load("bad")
    assert row.status == CheckpointStatus.ACTIVE
    assert row.last_error is not None
    assert "ValueError" in row.last_error and "dispatch blew up" in row.last_error
    assert "bad" in [cp.run_id for cp in await store.list_interrupted()]

    # The next boot tries it again, with its last error on the checkpoint.
    retried: list[RunCheckpoint] = []

    async def record(cp: RunCheckpoint) -> None:
        retried.append(cp)

    report = await recover_interrupted(store, record)
    bad = next(cp for cp in retried if cp.run_id == "bad")
    assert bad.attempts == 2 and "dispatch blew up" in (bad.last_error or "")
    assert "bad" in report.dispatched


# -- concurrency ------------------------------------------------------------------------------


class ClaimCounter:
    """Wraps a store and tracks runs between the start of their claim and their dispatch end."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.active = 0
        self.max_active = 0

    async def claim(
        self, run_id: str, *, epoch: int, owner: str | None = None, stale_owners: bool = True
    ) -> Any:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        return await self.inner.claim(run_id, epoch=epoch, owner=owner, stale_owners=stale_owners)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_concurrency_caps_runs_in_flight(store: Any) -> None:
    await save_all(store, [interrupted(f"r{i:02d}", age=100 - i) for i in range(20)])
    counter = ClaimCounter(store)
    in_flight = 0
    max_in_flight = 0
    done: list[str] = []
    three_in_flight = asyncio.Event()

    async def dispatch(cp: RunCheckpoint) -> None:
        nonlocal in_flight, max_in_flight
        in_flight += 1
        max_in_flight = max(max_in_flight, in_flight)
        if in_flight >= 3:
            three_in_flight.set()
        try:
            # The first dispatches wait until three are in flight at once (proof of real
            # concurrency, without timing); every dispatch then yields so that an uncapped
            # recovery would pile more on.
            async with asyncio.timeout(10):
                await three_in_flight.wait()
            for _ in range(5):
                await asyncio.sleep(0)
        finally:
            in_flight -= 1
            counter.active -= 1
            done.append(cp.run_id)

    report = await recover_interrupted(counter, dispatch, concurrency=3)
    assert not report.failed
    assert sorted(report.dispatched) == sorted(done) and len(done) == 20
    assert max_in_flight == 3, "dispatches ran concurrently, never more than 3"
    assert counter.max_active == 3, "claims count against the cap too"


# -- accept: deploy-aware quarantine ----------------------------------------------------------


async def test_accept_quarantines_runs_of_another_app_version(
    store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    old = StoreCheckpointerFactory(store, app_version="v1")
    new = StoreCheckpointerFactory(store, app_version="v2")
    for i in range(2):
        await old.begin(RunInfo(f"old-{i}", inputs={"prompt": "p"}))
        await new.begin(RunInfo(f"new-{i}", inputs={"prompt": "p"}))
    judged: list[tuple[str, str | None, int]] = []

    def accept(cp: RunCheckpoint) -> bool:
        judged.append((cp.run_id, cp.app_version, cp.attempts))
        return cp.app_version == "v2"

    dispatched: list[str] = []

    async def dispatch(cp: RunCheckpoint) -> None:
        dispatched.append(cp.run_id)

    report = await recover_interrupted(store, dispatch, accept=accept)
    assert sorted(report.quarantined) == ["old-0", "old-1"]
    assert sorted(report.dispatched) == ["new-0", "new-1"]
    assert sorted(dispatched) == ["new-0", "new-1"], "a rejected run is never dispatched"
    assert sorted(judged) == [
        ("new-0", "v2", 1),
        ("new-1", "v2", 1),
        ("old-0", "v1", 1),
        ("old-1", "v1", 1),
    ]
    for run_id in ("old-0", "old-1"):
        row = await store.load(run_id)
        assert row is not None and row.status == CheckpointStatus.DEAD
        assert row.last_error is not None
        assert "quarantine" in row.last_error and "v1" in row.last_error
    assert sorted(cp.run_id for cp in await store.list_interrupted()) == ["new-0", "new-1"]
    # A later pass without accept does not resurrect quarantined runs.
    later = await recover_interrupted(store, dispatch)
    assert not set(later.dispatched) & {"old-0", "old-1"}


# -- concurrent passes and re-registration ----------------------------------------------------


@pytest.mark.parametrize("style", ["inline", "background", "queued"])
@pytest.mark.parametrize("page_size", [None, 4], ids=["default-pages", "small-pages"])
async def test_two_concurrent_passes_dispatch_each_run_once(
    store: Any, page_size: int | None, style: str
) -> None:
    # Two replicas boot at once over one database. Each run must be dispatched by one of them
    # only; the other reports it as lost (claimed elsewhere) or never sees it.
    view = store if page_size is None else paged(store, page_size)
    run_ids = [f"r{i:02d}" for i in range(20)]
    await save_all(store, [interrupted(r, age=100 - i) for i, r in enumerate(run_ids)])
    factory = StoreCheckpointerFactory(store)
    dispatched: Counter[str] = Counter()
    background: set[asyncio.Task[None]] = set()
    queued: list[RunCheckpoint] = []

    async def run(cp: RunCheckpoint) -> None:
        # A real re-dispatched run: it takes its row over, works a little and finishes.
        async with checkpointed_run(factory, cp.run_info()) as ckpt:
            await asyncio.sleep(0)
            await ckpt.save(RunCheckpointState(messages=[{"m": 1}], iteration=2))
            await asyncio.sleep(0)

    async def dispatch(cp: RunCheckpoint) -> None:
        dispatched[cp.run_id] += 1
        if style == "inline":
            await run(cp)
        elif style == "background":  # launch the run and return
            background.add(asyncio.create_task(run(cp)))
        else:  # hand the run to a worker pool that starts it later
            queued.append(cp)

    a, b = await asyncio.gather(
        recover_interrupted(view, dispatch, concurrency=4, owner="replica-a"),
        recover_interrupted(view, dispatch, concurrency=4, owner="replica-b"),
    )
    if background:
        await asyncio.gather(*background)
    for cp in queued:
        await run(cp)
    doubles = sorted(r for r, n in dispatched.items() if n > 1)
    assert doubles == [], f"dispatched more than once: {doubles}"
    assert sorted(dispatched) == run_ids, "every run was dispatched"
    assert sorted(a.dispatched + b.dispatched) == run_ids
    assert not set(a.dispatched) & set(b.dispatched)
    assert not (a.failed or b.failed)
    assert await store.list_interrupted() == []


class _ListsLate:
    """``store`` seen by a replica whose listing starts ``delay`` seconds late."""

    def __init__(self, store: Any, delay: float) -> None:
        self._store = store
        self._delay = delay

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def iter_summaries(self, **kw: Any) -> AsyncIterator[CheckpointSummary]:
        await asyncio.sleep(self._delay)
        async for summary in self._store.iter_summaries(**kw):
            yield summary


@pytest.mark.parametrize("b_lists", ["at-once", "late"])
@pytest.mark.parametrize("page_size", [None, 2], ids=["default-pages", "small-pages"])
async def test_slower_concurrent_pass_does_not_reclaim_runs_claimed_by_the_other(
    store: Any, page_size: int | None, b_lists: str
) -> None:
    # Both replicas start their pass at the same moment; B is slow (its first dispatch only
    # returns once A's whole pass is over). Runs A claimed meanwhile are A's: B must report
    # them lost or not list them, never claim them a second time, whether B lists them
    # before A's claims or after ("late": the interleaving a full run once hit).
    # Both are registered, live executors: a run whose owner never registered counts as
    # interrupted (DESIGN.md), and the other replica would rightly take it.
    view = store if page_size is None else paged(store, page_size)
    view_b = view if b_lists == "at-once" else _ListsLate(view, 0.2)
    for executor_id in ("a", "b"):
        await store.register_executor(
            executor_id, name=executor_id, host=None, pid=None, app_version=None, stale_after=30.0
        )
    run_ids = [f"r{i:02d}" for i in range(10)]
    await save_all(store, [interrupted(r, age=100 - i) for i, r in enumerate(run_ids)])
    a_done = asyncio.Event()
    by: dict[str, list[str]] = {"a": [], "b": []}

    async def dispatch_a(cp: RunCheckpoint) -> None:
        by["a"].append(cp.run_id)  # queued for a worker; the row stays until it starts

    async def dispatch_b(cp: RunCheckpoint) -> None:
        by["b"].append(cp.run_id)
        await a_done.wait()

    async def pass_a() -> RecoveryReport:
        try:
            return await recover_interrupted(view, dispatch_a, concurrency=4, owner="a")
        finally:
            a_done.set()

    a, b = await asyncio.gather(
        pass_a(), recover_interrupted(view_b, dispatch_b, concurrency=1, owner="b")
    )
    both = sorted(set(by["a"]) & set(by["b"]))
    assert both == [], f"claimed and dispatched by both replicas: {both}"
    assert sorted(by["a"] + by["b"]) == run_ids
    assert sorted(a.dispatched + b.dispatched) == run_ids
    assert set(b.lost) <= set(a.dispatched) and set(a.lost) <= set(b.dispatched)
    rows = [await store.load(r) for r in run_ids]
    assert [row.attempts for row in rows] == [1] * len(run_ids), "one claim per run"


@pytest.mark.parametrize("page_size", [None, 2], ids=["default-pages", "small-pages"])
async def test_run_re_registered_during_the_pass_is_not_dispatched_again(
    store: Any, page_size: int | None
) -> None:
    view = store if page_size is None else paged(store, page_size)
    run_ids = [f"r{i}" for i in range(6)]
    await save_all(store, [interrupted(r, age=100 - i) for i, r in enumerate(run_ids)])
    factory = StoreCheckpointerFactory(store)
    dispatched: Counter[str] = Counter()

    async def dispatch(cp: RunCheckpoint) -> None:
        # The recovered run registers again (updated_at and epoch move on) and keeps running
        # in the background: its row stays active during the rest of the pass.
        dispatched[cp.run_id] += 1
        await factory.begin(cp.run_info())

    report = await recover_interrupted(view, dispatch, concurrency=1)
    assert dict(dispatched) == dict.fromkeys(run_ids, 1)
    assert report.dispatched == tuple(run_ids)
    assert not (report.lost or report.failed or report.dead)
    rows = [await store.load(r) for r in run_ids]
    assert all(row.attempts == 1 for row in rows)


# -- memory stays flat whatever the backlog ---------------------------------------------------

# Runs per transcript size: 2,000 on the in-memory store. SQLite pays ~7 ms of aiosqlite thread
# hand-offs per claim under tracemalloc (2 x 2,000 claims and 4,000 saves take 45-75 s on a
# 2-CPU box), so it recovers 300 runs with transcripts twice as large; set
# EXECUTUS_CKPT_TEST_BULK_RUNS=2000 to run the full size there too.
_BULK_OVERRIDE = os.environ.get("EXECUTUS_CKPT_TEST_BULK_RUNS")
BULK: dict[str, tuple[int, int]] = {  # backend -> (runs, bytes per message in the small set)
    "memory": (int(_BULK_OVERRIDE or 2000), 500),
    "sqlite": (int(_BULK_OVERRIDE or 300), 1000),
}


def transcript(size: int, run: int) -> list[Any]:
    return [
        {"role": "user", "content": f"{run:05d}" + "u" * (size - 5)},
        {"role": "assistant", "content": f"{run:05d}" + "a" * (size - 5)},
    ]


async def _recovery_peak(store: Any, agent_id: str) -> tuple[int, RecoveryReport]:
    """Peak bytes allocated while recovering ``agent_id``'s runs (dispatch keeps nothing)."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        report = await recover_interrupted(store, noop, concurrency=8, agent_id=agent_id)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before, report


@pytest.fixture(params=["memory", "sqlite"])
def bulk_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def bulk_url(bulk_backend: str, request: pytest.FixtureRequest) -> str | None:
    """``None`` for the in-memory store, else a migrated SQLite URL."""
    if bulk_backend == "memory":
        return None
    return str(request.getfixturevalue("sqlite_url"))


@pytest.fixture
async def bulk_store(bulk_url: str | None) -> AsyncIterator[Any]:
    """A store for the bulk test: in memory, or SQLite with ``synchronous=NORMAL``.

    The test is about memory; NORMAL (the documented speed option) only skips the per-commit
    fsync. PostgreSQL is left out: the same claims under tracemalloc take over a minute there.
    """
    if bulk_url is None:
        yield InMemoryCheckpointStore()
        return
    async with SQLCheckpointStore.open(bulk_url, sqlite_synchronous="NORMAL") as sql:
        yield sql


@pytest.mark.slow
async def test_recovery_memory_does_not_grow_with_the_backlog_data(
    bulk_store: Any, bulk_backend: str
) -> None:
    store = bulk_store
    runs, small_size = BULK[bulk_backend]
    large_size = 10 * small_size  # 10x more data in the large set, same number of runs
    rows: list[RunCheckpoint] = []
    for i in range(20):
        rows.append(interrupted(f"warm-{i:02d}", agent_id="warm", messages=transcript(100, i)))
    for i in range(runs):
        rows.append(interrupted(f"s-{i:05d}", agent_id="small", messages=transcript(small_size, i)))
        rows.append(interrupted(f"l-{i:05d}", agent_id="large", messages=transcript(large_size, i)))
    await save_all(store, rows)
    del rows

    # Warm the code paths (statement caches, imports) so that both measurements compare like
    # with like.
    _, warm = await _recovery_peak(store, "warm")
    assert len(warm.dispatched) == 20

    peak_small, small = await _recovery_peak(store, "small")
    peak_large, large = await _recovery_peak(store, "large")
    assert len(small.dispatched) == runs and len(large.dispatched) == runs

    grown_data = runs * 2 * (large_size - small_size)
    assert peak_large < 3 * peak_small, (
        f"recovery memory grows with the data: small {peak_small} B, large {peak_large} B"
    )
    assert peak_large - peak_small < grown_data / 5, (
        f"the transcripts grew by {grown_data} B and the recovery peak by "
        f"{peak_large - peak_small} B ({peak_small} -> {peak_large})"
    )
