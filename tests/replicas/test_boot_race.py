"""Boot race: 4 replicas start at once over 5,000 interrupted runs (issue 12).

The runs are inserted beforehand in bulk, as ``store.save`` writes them (half with no owner,
half owned by an executor that never registered: both are interrupted). Each replica's
dispatch completes a run at once (begin + complete through ``checkpointed_run``, no save).
Every run must be claimed (dispatched) exactly once and finished exactly once, none lost;
the claim throughput is reported.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from executus_ckpt import SQLCheckpointStore, codec
from executus_ckpt.schema import run_checkpoint_messages, run_checkpoints
from executus_ckpt.types import utcnow
from tests.replicas import Fleet, assert_each_finished_once, backend_of, report, rows_left

pytestmark = pytest.mark.slow

RUNS = 5000
REPLICAS = 4


async def _insert(url: str, runs: list[str]) -> float:
    """The backlog as one bulk insert, rows as ``store.save`` writes them (the setup, not
    what is measured: 5,000 saves one by one took about 30 s of a 100 s test)."""
    ghost = f"ghost-{uuid.uuid4().hex}"  # an owner that never registered
    started = time.monotonic()
    now = utcnow()
    headers, transcripts = [], []
    for i, run in enumerate(runs):
        message = codec.encode({"role": "user", "content": run})
        headers.append(
            {
                "run_id": run,
                "prompt": f"do {run}",
                "inputs": codec.encode({}),
                "message_count": 1,
                "size_bytes": len(message),
                "iteration": 1,
                "completed_phases": codec.encode([]),
                "status": "active",
                "attempts": 0,
                "owner": None if i % 2 else ghost,
                "epoch": 0,
                "created_at": now,
                "updated_at": now,
                "boundary_message_count": 0,
                "boundary_iteration": 0,
            }
        )
        transcripts.append({"run_id": run, "seq": 0, "data": message})
    async with SQLCheckpointStore.open(url) as store:
        async with store.engine.begin() as conn:
            await conn.execute(run_checkpoints.insert(), headers)
            await conn.execute(run_checkpoint_messages.insert(), transcripts)
        assert await store.count() == len(runs)
        loaded = await store.load(runs[0])  # read back like any saved run
        assert loaded is not None and loaded.messages == [{"role": "user", "content": runs[0]}]
        assert loaded.owner == ghost and (await store.load(runs[1])).owner is None  # type: ignore[union-attr]
    return time.monotonic() - started


@pytest.mark.timeout(400)
async def test_boot_race_claims_each_run_once(sql_url: str, tmp_path: Path) -> None:
    runs = [f"boot-{i:05d}" for i in range(RUNS)]
    insert_s = await _insert(sql_url, runs)
    async with Fleet(sql_url, tmp_path) as fleet:
        replicas = [
            await fleet.spawn(
                f"R{i}", dispatch="noop", concurrency=16, dispatch_limit=32, quiet_saves=True
            )
            for i in range(REPLICAS)
        ]
        for r in replicas:
            await r.ready(60)
        await fleet.wait_for(lambda: len(fleet.finished()) >= RUNS, 240, "every run finished")
        await asyncio.sleep(1.0)  # late duplicates, if any, would show up now
        dispatched = fleet.of("dispatched")
        per_run = Counter(e["run"] for e in dispatched)
        twice = {r: n for r, n in per_run.items() if n > 1}
        assert twice == {}, f"claimed more than once: {list(twice.items())[:10]} ({len(twice)})"
        assert set(per_run) == set(runs), f"never claimed: {len(set(runs) - set(per_run))}"
        assert_each_finished_once(fleet, runs)
        assert fleet.problems() == []
        first = min(e["t"] for e in fleet.of("recovering"))
        last = max(e["t"] for e in dispatched)
        done = max(e["t"] for e in fleet.of("finished"))
        shares = Counter(e["name"] for e in dispatched)
        lost = sum(1 for e in fleet.of("lib") if e.get("action") == "claim_lost")
    assert await rows_left(sql_url) == []
    claim_s = last - first
    report(
        f"{backend_of(sql_url)} boot race: {REPLICAS} replicas over {RUNS} interrupted runs: "
        f"each claimed once; claimed in {claim_s:.2f} s ({RUNS / claim_s:.0f} runs/s), "
        f"all finished in {done - first:.2f} s; per replica {dict(sorted(shares.items()))}; "
        f"{lost} lost claim races; (setup: {RUNS} rows inserted in {insert_s:.1f} s)"
    )
