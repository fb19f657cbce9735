"""Where a PostgreSQL save's time goes, layer by layer (issue 9's near-floor gap).

Five ways to store the same agent-shaped iteration (S = 16 KB, 3 messages per save), each on
its own run in one database, interleaved in one process: at every iteration each saves once,
in a shuffled order, so the machine's drift weighs on all of them alike. p50 over the last 100
iterations of every run:

- ``ours``: ``StoreCheckpointer.save`` (validation, transcript tracking, the write task,
  then the store);
- ``store.append``: the store's append given a ready ``RunCheckpoint`` and encoded tail
  (its checks, header values, timeout, error mapping, kept connection);
- ``our statement``: the store's append statement alone on a plain asyncpg connection;
- ``lean statement``: the one-statement floor's statement on the same kind of connection;
- ``lean floor``: the one-statement floor as the bench runs it (pool checkout, encoding).

Differences between neighbours are the cost of a layer. ``--no-io`` instead runs only the
save path with the store's database calls replaced by no-ops (no server): a deterministic
loop to count instructions, e.g. ``R=1`` and ``R=4`` under ``valgrind --tool=callgrind`` and
divide the difference by 600 saves.

Run: ``.venv/bin/python -m bench.layers [--runs N] [--no-io]`` (PostgreSQL from
``EXECUTUS_CKPT_TEST_PG_URL`` or the local default; creates and drops its own database).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from datetime import UTC, datetime
from typing import Any

import orjson

from bench.engines import _FLOOR_PG_SCHEMA, _lean_pg_save, _no_reset, pg_dsn
from bench.workload import completed_phases, make_iterations

ITERATIONS = 200
SIZE = 16384
DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
NAMES = ("ours", "store.append", "our statement", "lean statement", "lean floor")


async def interleaved(url: str, runs: int) -> dict[str, float]:
    """p50 seconds per save of each way (see the module docstring)."""
    import asyncpg

    from executus_ckpt import (
        RunCheckpoint,
        RunCheckpointState,
        RunInfo,
        SQLCheckpointStore,
        StoreCheckpointerFactory,
        migrate,
    )
    from executus_ckpt.stores import _postgres, _rows
    from executus_ckpt.stores._backend import Append

    admin_dsn = pg_dsn(url)
    name = "executus_ckpt_layers"
    dsn = admin_dsn.rpartition("/")[0] + "/" + name
    db_url = "postgresql+asyncpg://" + dsn.partition("://")[2]
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
        await migrate(db_url)
        raw = await asyncpg.connect(dsn)
        await raw.execute(_FLOOR_PG_SCHEMA)
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=15, reset=_no_reset)
        store = SQLCheckpointStore.from_url(db_url)
        factory = StoreCheckpointerFactory(store, throttle=0)
        data = make_iterations(ITERATIONS, SIZE)
        samples: dict[str, list[float]] = {n: [] for n in NAMES}
        rng = random.Random(3)

        def checkpoint_of(row: RunCheckpoint, i: int, **fields: Any) -> RunCheckpoint:
            return RunCheckpoint(
                meta=row.meta,
                iteration=i,
                updated_at=datetime.now(UTC),
                epoch=row.epoch,
                owner=row.owner,
                app_version=row.app_version,
                **fields,
            )

        async def one_run(r: int) -> None:
            ours = await factory.begin(RunInfo(run_id=f"A{r}", name="bench"))
            for run_id in (f"B{r}", f"C{r}"):
                await (await factory.begin(RunInfo(run_id=run_id, name="bench"))).aclose()
            b = await store.load(f"B{r}")
            c = await store.load(f"C{r}")
            assert b is not None and c is not None
            transcript: list[dict[str, Any]] = []

            # Each way saves iteration i (phases, new messages, stored count ``base``);
            # what it prepares before ``start`` is not timed.
            async def save_ours(i: int, phases: list[str], rows: list[bytes], base: int) -> float:
                state = RunCheckpointState(
                    messages=transcript, iteration=i, completed_phases=phases
                )
                start = time.perf_counter()
                await ours.save(state)
                return start

            async def save_store(i: int, phases: list[str], rows: list[bytes], base: int) -> float:
                checkpoint = checkpoint_of(
                    b, i, messages=tuple(transcript), completed_phases=tuple(phases)
                )
                start = time.perf_counter()
                await store.append(checkpoint, base_count=base, encoded_tail=rows)
                return start

            async def save_ours_statement(
                i: int, phases: list[str], rows: list[bytes], base: int
            ) -> float:
                values = _rows.appended_values(
                    checkpoint_of(c, i), orjson.dumps(phases), base + len(rows), identity=False
                )
                append = Append(
                    run_id=f"C{r}",
                    base=base,
                    rows=rows,
                    size=sum(map(len, rows)),
                    max_bytes=1 << 40,
                    epoch=c.epoch,
                    values=values,
                    identity=False,  # as the store sends it: C's identity is stored
                    # as the store sends it: the boundary's CASEs only when a phase completes
                    boundary=phases != completed_phases(i - 1, ITERATIONS),
                )
                start = time.perf_counter()
                assert await _postgres._append_one(raw, append)
                return start

            async def save_lean_statement(
                i: int, phases: list[str], rows: list[bytes], base: int
            ) -> float:
                args = (f"D{r}", i, orjson.dumps(phases), base + len(rows), *rows)
                start = time.perf_counter()
                await raw.execute(_lean_pg_save(len(rows)), *args)
                return start

            async def save_lean_floor(
                i: int, phases: list[str], rows: list[bytes], base: int
            ) -> float:
                start = time.perf_counter()  # encoding included, as the bench's floor
                encoded = [orjson.dumps(m) for m in transcript[-len(rows) :]]
                async with pool.acquire() as conn:
                    await conn.execute(
                        _lean_pg_save(len(encoded)),
                        f"E{r}",
                        i,
                        orjson.dumps(phases),
                        base + len(encoded),
                        *encoded,
                    )
                return start

            ways = dict(
                zip(
                    NAMES,
                    (
                        save_ours,
                        save_store,
                        save_ours_statement,
                        save_lean_statement,
                        save_lean_floor,
                    ),
                    strict=True,
                )
            )
            counts = dict.fromkeys(NAMES, 0)
            for i, it in enumerate(data, 1):
                new = (it.tool_call, it.tool_result, it.answer)
                transcript.extend(new)
                phases = completed_phases(i, ITERATIONS)
                rows = [orjson.dumps(m) for m in new]
                order = list(NAMES)
                rng.shuffle(order)
                for way in order:
                    start = await ways[way](i, phases, rows, counts[way])
                    elapsed = time.perf_counter() - start
                    counts[way] += len(new)
                    if i > ITERATIONS - 100:
                        samples[way].append(elapsed)
            await ours.complete()

        try:
            for r in range(runs):
                await one_run(r)
        finally:
            await store.aclose()
            await pool.close()
            await raw.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return {way: statistics.median(xs) for way, xs in samples.items()}


async def no_io(runs: int) -> float:
    """Seconds per save of the save path alone: the store's registration and append are
    no-ops, no server is contacted."""
    from executus_ckpt import (
        RunCheckpoint,
        RunCheckpointState,
        RunInfo,
        SQLCheckpointStore,
        StoreCheckpointerFactory,
    )
    from executus_ckpt.stores._backend import Append

    store = SQLCheckpointStore.from_url("postgresql+asyncpg://nobody@127.0.0.1:1/none")
    store._schema_checked = True  # a measurement harness

    async def register(checkpoint: RunCheckpoint, *, expect_epoch: int | None = None) -> int:
        return 1

    async def append(append: Append, timeout: float) -> bool:  # noqa: ASYNC109
        return True

    store.register = register  # type: ignore[method-assign]
    store._backend.append = append  # type: ignore[method-assign]
    factory = StoreCheckpointerFactory(store, throttle=0)
    data = make_iterations(ITERATIONS, SIZE)
    started = time.perf_counter()
    for r in range(runs):
        cp = await factory.begin(RunInfo(run_id=f"r{r}", name="bench"))
        transcript: list[dict[str, Any]] = []
        for i, it in enumerate(data, 1):
            transcript.extend((it.tool_call, it.tool_result, it.answer))
            phases = completed_phases(i, ITERATIONS)
            await cp.save(
                RunCheckpointState(messages=transcript, iteration=i, completed_phases=phases)
            )
    return (time.perf_counter() - started) / (runs * ITERATIONS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=int(os.environ.get("R", "10")))
    parser.add_argument("--no-io", action="store_true", help="the save path alone, no server")
    args = parser.parse_args(argv)
    if args.no_io:
        per_save = asyncio.run(no_io(args.runs))
        print(f"save path without I/O: {per_save * 1e6:.1f} us per save (wall, mean)")
        return 0
    url = os.environ.get("EXECUTUS_CKPT_TEST_PG_URL") or DEFAULT_URL
    p50 = asyncio.run(interleaved(url, args.runs))
    floor = p50["lean floor"]
    for way in NAMES:
        print(f"{way:16s} {p50[way] * 1e3:7.3f} ms  {p50[way] / floor:5.2f}x the lean floor")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
