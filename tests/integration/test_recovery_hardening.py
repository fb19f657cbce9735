"""recover_interrupted under failure (issue 10, items 7 and 17)."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from executus_ckpt import (
    InMemoryCheckpointStore,
    RunCheckpoint,
    RunCheckpointMeta,
    SchemaOutOfDateError,
    SQLCheckpointStore,
    StoreUnavailableError,
    recover_interrupted,
)


def _cp(run_id: str, messages: list[Any] | None = None) -> RunCheckpoint:
    return RunCheckpoint(meta=RunCheckpointMeta(run_id), messages=messages or [{"i": 0}])


async def _nothing(cp: RunCheckpoint) -> None:
    return None


async def test_unmigrated_database_raises_the_typed_error(tmp_path: Path) -> None:
    async with SQLCheckpointStore.from_url(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}") as store:
        with pytest.raises(SchemaOutOfDateError):
            await recover_interrupted(store, _nothing)


async def test_unreachable_database_raises_the_typed_error() -> None:
    url = "postgresql+asyncpg://postgres@127.0.0.1:1/none"
    async with SQLCheckpointStore.from_url(url, connect_timeout=2.0) as store:
        with pytest.raises(StoreUnavailableError):
            await recover_interrupted(store, _nothing)


class ListingFailsAfter(InMemoryCheckpointStore):
    """Lists ``good`` runs, then the listing fails (the database went away mid-pass)."""

    def __init__(self, good: int) -> None:
        super().__init__()
        self.good = good

    async def iter_summaries(self, **kwargs: Any) -> AsyncIterator[Any]:  # type: ignore[override]
        count = 0
        async for summary in super().iter_summaries(**kwargs):
            if count == self.good:
                raise StoreUnavailableError("listing failed mid-pass")
            count += 1
            yield summary


async def test_a_listing_failure_never_cancels_dispatched_runs() -> None:
    store = ListingFailsAfter(good=2)
    for i in range(4):
        await store.save(_cp(f"r{i}"))
    finished: list[str] = []
    release = asyncio.Event()

    async def dispatch(cp: RunCheckpoint) -> None:
        await release.wait()  # still running when the listing fails
        finished.append(cp.run_id)

    task = asyncio.create_task(recover_interrupted(store, dispatch, concurrency=4))
    for _ in range(50):
        await asyncio.sleep(0)
    assert not task.done(), "the pass must wait for the runs it dispatched"
    release.set()
    with pytest.raises(StoreUnavailableError, match="mid-pass"):
        await task
    assert sorted(finished) == ["r0", "r1"]


async def test_cancelling_the_pass_cancels_and_awaits_its_dispatches() -> None:
    store = InMemoryCheckpointStore()
    await store.save(_cp("r0"))
    cancelled = asyncio.Event()

    async def dispatch(cp: RunCheckpoint) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task = asyncio.create_task(recover_interrupted(store, dispatch))
    for _ in range(20):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()


async def test_failed_dispatches_do_not_keep_their_transcripts() -> None:
    store = InMemoryCheckpointStore()
    runs, size = 60, 100_000
    for i in range(runs):
        await store.save(_cp(f"r{i}", [{"blob": "x" * size}]))

    async def dispatch(cp: RunCheckpoint) -> None:
        messages = cp.messages  # a frame local holding the transcript
        raise RuntimeError(f"boom after {len(messages)} messages")

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        report = await recover_interrupted(store, dispatch, concurrency=4)
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(report.failed) == runs
    assert all(exc.__traceback__ is None for exc in report.failed.values())
    # Bounded by `concurrency` transcripts, not `runs` of them (60 x 100 KB = 6 MB before).
    assert retained < 4 * size * 2, f"report retains {retained} bytes"
