"""Rolling deploy, SIGKILL and drain hand-offs between replica processes (issue 12).

Real OS processes (``replica_child``) on one database, with the small settings (heartbeat
0.5 s, stale_after 3 s, sweep 0.5 s). Completions are counted from the processes' event logs
(each run finishes exactly once) and the database is checked too (no row left).
"""

from __future__ import annotations

import signal
import statistics
import time
from pathlib import Path

import pytest

from tests.replicas import (
    SMALL,
    Fleet,
    Replica,
    assert_each_finished_once,
    backend_of,
    report,
    rows_left,
)

pytestmark = pytest.mark.slow

HB, STALE, SWEEP = SMALL["hb"], SMALL["stale"], SMALL["sweep"]


def runs_of(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


def saved_at_least(fleet: Fleet, replica: Replica, runs: list[str], k: int) -> bool:
    """Every run in ``runs`` has ``k`` saves by ``replica``."""
    counts: dict[str, int] = {}
    for e in fleet.of("saved", name=replica.name, runs=runs):
        counts[e["run"]] = counts.get(e["run"], 0) + 1
    return all(counts.get(r, 0) >= k for r in runs)


@pytest.mark.timeout(90)
async def test_rolling_deploy_takes_no_live_run(sql_url: str, tmp_path: Path) -> None:
    """B boots while A runs 10 live runs: B dispatches none of them; each finishes once."""
    runs = runs_of("a", 10)
    async with Fleet(sql_url, tmp_path) as fleet:
        a = await fleet.spawn(
            "A", runs=10, run_prefix="a", start_runs=True, phases=3, iters=5, iter_sleep=0.4
        )
        await a.ready()
        await fleet.wait_for(lambda: saved_at_least(fleet, a, runs, 1), 20, "A's first saves")
        b = await fleet.spawn("B")
        await b.ready()
        booted = time.time()
        await fleet.wait_for(lambda: len(fleet.finished()) == 10, 40, "A's runs to finish")
        # B swept several times while A's runs were alive
        sweeps_seen = (max(e["t"] for e in fleet.of("finished")) - booted) / SWEEP
        assert sweeps_seen >= 4, f"B overlapped A's runs for only {sweeps_seen:.1f} sweeps"
        dispatched = fleet.of("dispatched")
        assert dispatched == [], f"live runs dispatched by a booting replica: {dispatched}"
        assert_each_finished_once(fleet, runs)
        assert {e["name"] for e in fleet.of("finished")} == {"A"}
        assert fleet.problems() == []
        assert fleet.of("fenced") == []
    assert await rows_left(sql_url) == []
    report(f"{backend_of(sql_url)} rolling deploy: 0 of 10 live runs dispatched by B")


@pytest.mark.timeout(120)
async def test_sigkill_one_of_three(sql_url: str, tmp_path: Path) -> None:
    """3 replicas share 30 runs; one is SIGKILLed: the survivors claim its runs after
    stale_after and within stale_after + 2 sweeps + slack; every run completes once."""
    opts = {"runs": 10, "start_runs": True, "phases": 3, "iters": 6, "iter_sleep": 0.3}
    async with Fleet(sql_url, tmp_path) as fleet:
        replicas = [await fleet.spawn(n, run_prefix=n.lower(), **opts) for n in ("A", "B", "C")]
        for r in replicas:
            await r.ready()
        ready_at = time.time()
        victim = replicas[2]
        victim_runs = runs_of("c", 10)
        await fleet.wait_for(
            lambda: saved_at_least(fleet, victim, victim_runs, 2), 20, "C's runs saving"
        )
        # the survivors trust their own view of peers only after stale_after of heartbeats
        await fleet.wait_for(lambda: time.time() > ready_at + STALE + 0.5, 10, "warm-up")
        killed_at = time.time()
        await victim.kill()
        assert victim.proc.returncode == -signal.SIGKILL
        await fleet.wait_for(
            lambda: len(fleet.finished()) == 30, 60, "every run to finish after the kill"
        )
        taken = fleet.of("dispatched", runs=victim_runs)
        assert {e["run"] for e in taken} == set(victim_runs)
        assert {e["name"] for e in taken} <= {"A", "B"}
        first = min(e["t"] for e in taken) - killed_at
        last = max(e["t"] for e in taken) - killed_at
        # not before the victim's last heartbeat (at most one interval before the kill) expired
        assert first >= STALE - HB - 0.25, f"runs taken {first:.2f} s after the kill"
        assert last <= STALE + 2 * SWEEP + 1.0, f"last run taken {last:.2f} s after the kill"
        others = fleet.of("dispatched", runs=runs_of("a", 10) + runs_of("b", 10))
        assert others == [], f"live runs of survivors dispatched: {others}"
        assert_each_finished_once(fleet, runs_of("a", 10) + runs_of("b", 10) + victim_runs)
        assert fleet.problems() == []
        assert fleet.of("fenced") == []
    assert await rows_left(sql_url) == []
    report(
        f"{backend_of(sql_url)} SIGKILL hand-off (stale_after {STALE} s, sweep {SWEEP} s): "
        f"first run taken {first:.2f} s, all 10 taken {last:.2f} s after the kill"
    )


@pytest.mark.timeout(120)
async def test_drain_hands_runs_to_a_peer_at_once(sql_url: str, tmp_path: Path) -> None:
    """SIGTERM → drain(grace) with runs still going: the peer has every released run within
    2 sweeps (stale_after is 60 s: it was the release, not staleness)."""
    runs = runs_of("a", 10)
    async with Fleet(sql_url, tmp_path, stale=60.0) as fleet:
        a = await fleet.spawn(
            "A",
            runs=10,
            run_prefix="a",
            start_runs=True,
            phases=3,
            iters=8,
            iter_sleep=0.3,
            grace=1.0,
        )
        b = await fleet.spawn("B")
        await a.ready()
        await b.ready()
        await fleet.wait_for(lambda: saved_at_least(fleet, a, runs, 3), 20, "A's runs saving")
        termed_at = time.time()
        a.signal(signal.SIGTERM)
        assert await a.wait(30) == 0, a.stderr_tail()
        interrupted = {e["run"]: e["t"] for e in fleet.of("interrupted", name="A")}
        assert interrupted, "grace was long enough for every run: nothing was released"
        await fleet.wait_for(
            lambda: {e["run"] for e in fleet.of("dispatched", name="B")} >= set(interrupted),
            10,
            "B to take the released runs",
        )
        handoffs = []
        for e in fleet.of("dispatched", name="B"):
            assert e["run"] in interrupted, f"B dispatched a run A did not release: {e}"
            handoffs.append(e["t"] - interrupted[e["run"]])
        assert len(handoffs) == len(interrupted), "a released run was dispatched twice"
        assert max(handoffs) <= 2 * SWEEP + 0.5, f"hand-offs {sorted(handoffs)}"
        from_term = max(e["t"] for e in fleet.of("dispatched", name="B")) - termed_at
        await fleet.wait_for(lambda: len(fleet.finished()) == 10, 40, "every run to finish")
        assert_each_finished_once(fleet, runs)
        assert fleet.problems() == []
        # taken because released (no rescue of a stale owner), and no run went dead
        bad = [e for e in fleet.of("lib") if e.get("action") in ("mark_dead", "rescue_run")]
        assert bad == [], bad
    assert await rows_left(sql_url) == []
    report(
        f"{backend_of(sql_url)} drain hand-off (grace 1 s, sweep {SWEEP} s, stale_after 60 s): "
        f"{len(interrupted)} released runs taken {statistics.median(handoffs):.2f} s median, "
        f"{max(handoffs):.2f} s max after their release; {from_term:.2f} s after SIGTERM"
    )


@pytest.mark.timeout(150)
async def test_four_drains_in_a_row_kill_no_run(sql_url: str, tmp_path: Path) -> None:
    """Runs handed from replica to replica by 4 drains with max_attempts=3 never go dead."""
    runs = runs_of("r", 10)
    opts = {"stale": 60.0, "grace": 0.5, "max_attempts": 3, "phases": 3, "iters": 6}
    handoffs: list[float] = []
    async with Fleet(sql_url, tmp_path, iter_sleep=0.3, **opts) as fleet:
        current = await fleet.spawn("R0", runs=10, run_prefix="r", start_runs=True)
        await current.ready()
        await fleet.wait_for(lambda: saved_at_least(fleet, current, runs, 2), 20, "R0 saving")
        for stage in range(1, 5):
            nxt = await fleet.spawn(f"R{stage}")
            await nxt.ready()
            left = set(runs) - set(fleet.finished())
            # the current owner has every unfinished run under way (a save since it took it)
            await fleet.wait_for(
                lambda cur=current, left=left: saved_at_least(  # type: ignore[misc]
                    fleet, cur, sorted(left - set(fleet.finished())), 1
                ),
                20,
                f"{current.name} saving",
            )
            current.signal(signal.SIGTERM)
            assert await current.wait(30) == 0, current.stderr_tail()
            released = {e["run"]: e["t"] for e in fleet.of("interrupted", name=current.name)}
            await fleet.wait_for(
                lambda n=nxt, rel=released: (
                    {  # type: ignore[misc]
                        e["run"] for e in fleet.of("dispatched", name=n.name)
                    }
                    >= set(rel)
                ),
                10,
                f"{nxt.name} to take {current.name}'s runs",
            )
            handoffs += [e["t"] - released[e["run"]] for e in fleet.of("dispatched", name=nxt.name)]
            current = nxt
        await fleet.wait_for(lambda: len(fleet.finished()) == 10, 40, "every run to finish")
        assert_each_finished_once(fleet, runs)
        dead = [e for e in fleet.of("lib") if e.get("action") in ("mark_dead", "quarantine")]
        assert dead == [], dead
        attempts = [e["attempts"] for e in fleet.of("dispatched")]
        assert max(attempts) <= 1, f"a release was counted as a failed attempt: {attempts}"
        assert fleet.problems() == []
        assert fleet.of("fenced") == []
    assert await rows_left(sql_url) == []
    report(
        f"{backend_of(sql_url)} 4 drains in a row (max_attempts=3): 0 dead, "
        f"{len(handoffs)} hand-offs, max {max(handoffs):.2f} s"
    )
