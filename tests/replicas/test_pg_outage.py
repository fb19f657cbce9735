"""A 20 s PostgreSQL outage under two live replicas (issue 12).

The test's own throwaway server (:class:`TempCluster`) is stopped for 20 s while two replicas
run live runs (their saves fail meanwhile and the runs go on). When it comes back every
executor looks stale by the database's clock until it beats again: no replica may rescue a
live peer's runs then (a replica trusts its view of peers only after its own heartbeats have
succeeded again for stale_after). Every run finishes exactly once, by the replica that
started it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from executus_ckpt import migrate
from tests.pgcluster import TempCluster, find_bindir
from tests.replicas import SMALL, Fleet, assert_each_finished_once, report, rows_left

pytestmark = pytest.mark.slow

STALE, SWEEP = SMALL["stale"], SMALL["sweep"]
OUTAGE = 20.0


@pytest.fixture
def cluster() -> Iterator[TempCluster]:
    if find_bindir() is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed")
    c = TempCluster().init().start()
    try:
        yield c
    finally:
        c.destroy()


@pytest.mark.timeout(240)
async def test_pg_outage_rescues_no_live_peer(cluster: TempCluster, tmp_path: Path) -> None:
    url = cluster.url()
    await migrate(url)
    opts = {
        "runs": 5,
        "start_runs": True,
        "phases": 3,
        "iters": 30,
        "iter_sleep": 0.4,
        "tolerate_outage": True,
    }
    a_runs = [f"a-{i}" for i in range(5)]
    b_runs = [f"b-{i}" for i in range(5)]
    async with Fleet(url, tmp_path) as fleet:
        a = await fleet.spawn("A", run_prefix="a", **opts)
        b = await fleet.spawn("B", run_prefix="b", **opts)
        await a.ready()
        await b.ready()
        ready_at = time.time()
        await fleet.wait_for(lambda: time.time() > ready_at + STALE + 1.0, 10, "warm-up")
        assert fleet.of("saved", name="A") and fleet.of("saved", name="B")
        await asyncio.to_thread(cluster.stop, "fast")
        down_at = time.time()
        await asyncio.sleep(OUTAGE)
        await asyncio.to_thread(cluster.start)
        up_at = time.time()
        save_errors = len(fleet.of("save_error"))
        assert save_errors > 0, "the outage was not seen by the runs"
        # the replicas beat again and go on; the runs were still under way for a while
        await fleet.wait_for(
            lambda: len(fleet.finished()) == 10, 90, "every run to finish after the outage"
        )
        first_finish = min(e["t"] for e in fleet.of("finished")) - up_at
        assert first_finish > STALE + 2 * SWEEP, (
            f"runs ended {first_finish:.1f} s after the outage: too soon to show anything"
        )
        dispatched = fleet.of("dispatched")
        assert dispatched == [], f"live runs rescued after the outage: {dispatched}"
        assert_each_finished_once(fleet, a_runs + b_runs)
        assert {e["run"] for e in fleet.of("finished", name="A")} == set(a_runs)
        assert {e["run"] for e in fleet.of("finished", name="B")} == set(b_runs)
        assert fleet.problems() == []
        assert fleet.of("fenced") == []
        lib = [e["action"] for e in fleet.of("lib")]
        for r in (a, b):
            r.close_stdin()
            assert await r.wait(30) == 0, r.stderr_tail()
        failures = {e["name"]: e["stats"]["heartbeat_failures"] for e in fleet.of("drained")}
    assert await rows_left(url) == []
    assert "heartbeat_crashed" not in lib
    report(
        f"postgres outage {up_at - down_at:.1f} s (TempCluster stopped): 0 live runs rescued "
        f"when it came back; {save_errors} failed saves, heartbeat failures {failures}; "
        f"10/10 runs finished once by their own replica"
    )
