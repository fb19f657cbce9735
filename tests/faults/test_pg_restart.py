"""A PostgreSQL that goes away mid-run: typed errors while it is down, recovery once it is back.

Uses its own throwaway server (tests/pgcluster.py) so the shared one is never stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest

from executus_ckpt import (
    RunCheckpointState,
    RunInfo,
    SQLCheckpointStore,
    StoreCheckpointerFactory,
    StoreUnavailableError,
    migrate,
)
from executus_ckpt.testing import ManualClock
from tests.conftest import REQUIRE_PG
from tests.pgcluster import TempCluster, find_bindir


@pytest.fixture(scope="module")
def cluster() -> Iterator[TempCluster]:
    if find_bindir() is None:
        if REQUIRE_PG:
            pytest.fail("EXECUTUS_CKPT_REQUIRE_PG=1 but no PostgreSQL binaries to start a server")
        pytest.skip("PostgreSQL NOT TESTED: no initdb/pg_ctl installed")
    c = TempCluster().init().start()
    yield c
    c.destroy()


async def test_store_reports_outage_and_recovers(cluster: TempCluster) -> None:
    url = cluster.url()
    await migrate(url)
    clock = ManualClock()
    async with SQLCheckpointStore.open(url) as store:
        factory = StoreCheckpointerFactory(store, throttle=10, clock=clock)
        cp = await factory.begin(RunInfo("outage-run"))
        await cp.save(RunCheckpointState(messages=[{"n": 0}], iteration=1))

        # The throwaway server runs with synchronous_commit=off (speed): make what is
        # committed so far durable before crashing it, as a production server would have.
        admin = await asyncpg.connect(url.replace("+asyncpg", ""))
        try:
            await admin.execute("CHECKPOINT")
        finally:
            await admin.close()
        await asyncio.to_thread(cluster.stop, "immediate")
        clock.advance(10)
        with pytest.raises(StoreUnavailableError) as info:
            async with asyncio.timeout(30):
                await cp.save(RunCheckpointState(messages=[{"n": 0}, {"n": 1}], iteration=2))
        assert "outage-run" in str(info.value) and info.value.__cause__ is not None
        with pytest.raises(StoreUnavailableError):
            await store.load("outage-run")

        await asyncio.to_thread(cluster.start)
        # Same clock instant: the failed write did not advance the throttle window.
        await cp.save(RunCheckpointState(messages=[{"n": 0}, {"n": 1}, {"n": 2}], iteration=3))
        loaded = await store.load("outage-run")
        assert loaded is not None and loaded.iteration == 3 and len(loaded.messages) == 3
        await cp.complete()
        assert await store.load("outage-run") is None
