"""Clock skew: a replica whose host clock is 10 minutes off (issue 12).

The skewed child shifts its own ``time.time`` and the library's ``utcnow`` by
``EXECUTUS_CKPT_TEST_CLOCK_SKEW`` seconds (see ``replica_child``); the database's clock is
untouched. Liveness is judged by the database's clock only, so while both replicas live,
neither takes the other's runs; when one is SIGKILLed, the other takes its runs within
stale_after + 2 sweeps + slack, whichever of them has the skewed clock.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.replicas import (
    SMALL,
    Fleet,
    assert_each_finished_once,
    backend_of,
    report,
    rows_left,
)
from tests.replicas.replica_child import SKEW_ENV

pytestmark = pytest.mark.slow

HB, STALE, SWEEP = SMALL["hb"], SMALL["stale"], SMALL["sweep"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", ["skewed", "normal"])
@pytest.mark.parametrize("skew", [600, -600])
async def test_skewed_replica(sql_url: str, tmp_path: Path, skew: int, victim: str) -> None:
    opts = {"runs": 10, "start_runs": True, "phases": 3, "iters": 8, "iter_sleep": 0.4}
    n_runs = [f"n-{i}" for i in range(10)]
    s_runs = [f"s-{i}" for i in range(10)]
    async with Fleet(sql_url, tmp_path) as fleet:
        normal = await fleet.spawn("N", run_prefix="n", **opts)
        skewed = await fleet.spawn("S", run_prefix="s", env={SKEW_ENV: str(skew)}, **opts)
        await normal.ready()
        await skewed.ready()
        both_ready = time.time()
        # both alive for stale_after + several sweeps: neither takes the other's runs
        await fleet.wait_for(lambda: time.time() > both_ready + STALE + 4 * SWEEP, 20, "an overlap")
        assert fleet.of("dispatched") == [], "a live peer's runs were taken"
        warned = [e for e in fleet.of("lib", name="S") if e.get("action") == "clock_skew"]
        assert warned, "the skewed replica did not warn about its clock"
        dead, survivor = (skewed, normal) if victim == "skewed" else (normal, skewed)
        dead_runs = s_runs if victim == "skewed" else n_runs
        assert not fleet.finished(), "runs too short for this test"
        killed_at = time.time()
        await dead.kill()
        await fleet.wait_for(
            lambda: set(fleet.finished()) >= set(n_runs + s_runs) - set(dead_runs),
            30,
            "the survivor's own runs to finish",
        )
        await fleet.wait_for(
            lambda: {e["run"] for e in fleet.of("dispatched")} >= set(dead_runs),
            STALE + 2 * SWEEP + 10,
            f"the survivor to take the runs of the SIGKILLed {victim} replica",
        )
        taken = fleet.of("dispatched")
        assert {e["run"] for e in taken} == set(dead_runs), "the survivor took its own runs"
        assert {e["name"] for e in taken} == {survivor.name}
        last = max(e["t"] for e in taken) - killed_at
        first = min(e["t"] for e in taken) - killed_at
        await fleet.wait_for(lambda: len(fleet.finished()) == 20, 40, "every run to finish")
        assert_each_finished_once(fleet, n_runs + s_runs)
        assert fleet.problems() == []
        assert first >= STALE - HB - 0.25, f"taken {first:.2f} s after the kill"
        assert last <= STALE + 2 * SWEEP + 1.0, f"taken {last:.2f} s after the kill"
        if survivor is skewed:
            survivor.close_stdin()
            assert await survivor.wait(30) == 0
            stats = fleet.of("drained", name="S")[0]["stats"]
            assert abs(stats["clock_skew"] - skew) < 5, stats
    assert await rows_left(sql_url) == []
    report(
        f"{backend_of(sql_url)} clock skew {skew:+d} s: no live run taken either way; "
        f"SIGKILLed {victim} replica's runs taken {first:.2f}-{last:.2f} s after the kill"
    )
