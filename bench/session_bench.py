"""Agents SDK session write cost: ``ExecutusSession`` vs ``SQLAlchemySession``.

``python -m bench.session_bench [--pg-url URL] [--turns 300] [--reps 3] [--output-bytes 1024]``

Each session gets the add_items calls of an agent run: one per turn, each a tool call and
its output (``--output-bytes`` of text), as ``Runner.run`` makes them. It times every
``add_items`` and reports the median over the turns around ``--turns`` (the last 21 of
``turns + 10``), pooled over ``--reps`` runs whose order alternates, and the ratio
SQLAlchemySession / ExecutusSession; also ``get_items(limit=20)`` at that length.

Both are at their defaults, both durable when ``add_items`` returns: ``ExecutusSession`` via
``checkpointed_session`` over ``StoreCheckpointerFactory(store)`` (throttle 0, ``durable=True``;
SQLite in WAL mode, ``synchronous=FULL``); ``SQLAlchemySession(create_tables=True)`` over
``create_async_engine(url)`` (SQLite in WAL mode at SQLite's default ``synchronous=FULL``).
SQLite: a fresh file per side and repetition, in a temporary directory. PostgreSQL
(``--pg-url``, default ``$EXECUTUS_CKPT_TEST_PG_URL``; its database is only used to create
and drop a throwaway one): both sides in that throwaway database, each in its own tables.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
from agents.extensions.memory.sqlalchemy_session import SQLAlchemySession
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from executus_ckpt import RunInfo, SQLCheckpointStore, StoreCheckpointerFactory
from executus_ckpt.integrations.openai_agents import checkpointed_session

WINDOW = 21
TAIL = 20
Timings = tuple[list[float], list[float]]  # add_items around the turn, get_items(limit)


def turn_items(turn: int, output_bytes: int) -> list[Any]:
    """The two items ``Runner.run`` adds for a turn with one tool call."""
    call_id = f"call-{turn}"
    return [
        {
            "type": "function_call",
            "id": call_id,
            "call_id": call_id,
            "name": "research",
            "arguments": f'{{"step": {turn}}}',
        },
        {
            "type": "function_call_output",
            "call_id": call_id,
            "output": (f"finding {turn} " * (output_bytes // 10 + 1))[:output_bytes],
        },
    ]


async def drive(session: Any, turns: int, output_bytes: int) -> Timings:
    """Add ``turns + 10`` turns; time the adds around ``turns`` and tail reads after them."""
    adds: list[float] = []
    await session.add_items([{"role": "user", "content": "research the topic"}])
    for turn in range(turns + 10):
        items = turn_items(turn, output_bytes)
        started = time.perf_counter()
        await session.add_items(items)
        elapsed = time.perf_counter() - started
        if turn >= turns + 10 - WINDOW:
            adds.append(elapsed)
    reads: list[float] = []
    for _ in range(WINDOW):
        started = time.perf_counter()
        got = await session.get_items(limit=TAIL)
        reads.append(time.perf_counter() - started)
        assert len(got) == TAIL
    return adds, reads


async def executus(url: str, run_id: str, turns: int, output_bytes: int) -> Timings:
    async with SQLCheckpointStore.open(url, migrate=True) as store:
        factory = StoreCheckpointerFactory(store)
        async with checkpointed_session(factory, RunInfo(run_id)) as session:
            return await drive(session, turns, output_bytes)


async def sqlalchemy(url: str, run_id: str, turns: int, output_bytes: int) -> Timings:
    engine = create_async_engine(url)
    try:
        session = SQLAlchemySession(run_id, engine=engine, create_tables=True)
        timings = await drive(session, turns, output_bytes)
        await session.clear_session()  # as ours deletes a completed run
        return timings
    finally:
        await engine.dispose()


Side = Callable[[str, str, int, int], Awaitable[Timings]]
SIDES: dict[str, Side] = {"ExecutusSession": executus, "SQLAlchemySession": sqlalchemy}


async def measure(
    url_for: Callable[[str, int], str], args: argparse.Namespace
) -> dict[str, Timings]:
    """Every side ``--reps`` times, alternating which goes first; timings pooled per side."""
    pooled: dict[str, Timings] = {name: ([], []) for name in SIDES}
    for rep in range(args.reps):
        order = list(SIDES) if rep % 2 == 0 else list(reversed(SIDES))
        for name in order:
            side = SIDES[name]
            adds, reads = await side(
                url_for(name, rep), f"run-{rep}", args.turns, args.output_bytes
            )
            pooled[name][0].extend(adds)
            pooled[name][1].extend(reads)
    return pooled


def report(backend: str, pooled: dict[str, Timings], turns: int) -> None:
    ms = {
        name: (statistics.median(a) * 1e3, statistics.median(r) * 1e3)
        for name, (a, r) in pooled.items()
    }
    ours, theirs = ms["ExecutusSession"], ms["SQLAlchemySession"]
    print(
        f"{backend}: add_items p50 at turn ~{turns}: ExecutusSession {ours[0]:.2f} ms, "
        f"SQLAlchemySession {theirs[0]:.2f} ms -> {theirs[0] / ours[0]:.1f}x"
    )
    print(
        f"{backend}: get_items(limit={TAIL}) p50: ExecutusSession {ours[1]:.2f} ms, "
        f"SQLAlchemySession {theirs[1]:.2f} ms -> {theirs[1] / ours[1]:.1f}x"
    )


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="session_bench_") as tmp:

        def sqlite_url(name: str, rep: int) -> str:
            return f"sqlite+aiosqlite:///{Path(tmp) / f'{name}-{rep}.db'}"  # a fresh file

        report("SQLite", await measure(sqlite_url, args), args.turns)
    if args.pg_url:
        server = make_url(args.pg_url)
        dsn = server.set(drivername="postgresql").render_as_string(hide_password=False)
        database = f"executus_session_bench_{os.getpid()}"
        url = server.set(database=database).render_as_string(hide_password=False)
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}"')
            await admin.execute(f'CREATE DATABASE "{database}"')
            report("PostgreSQL", await measure(lambda _name, _rep: url, args), args.turns)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("EXECUTUS_CKPT_TEST_PG_URL"),
        help="PostgreSQL server URL (default: $EXECUTUS_CKPT_TEST_PG_URL)",
    )
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--output-bytes", type=int, default=1024)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
