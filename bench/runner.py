"""Measured runs: sequential runs, 50 runs at once, allocation per save, round trips per save."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import cProfile
import io
import pstats
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.engines import SQLITE, Engine, Ours
from bench.workload import Iteration, completed_phases


@dataclass
class RunResult:
    family: str
    backend: str
    size: int
    rep: int
    latencies: list[float]  # seconds, index i-1 is iteration i
    wall: float  # seconds: begin + every save
    written: int  # bytes (SQLite: wchar; PostgreSQL: WAL)
    db_size: int  # bytes


@dataclass
class ConcurrentResult:
    family: str
    backend: str
    rep: int
    runs: int
    iterations: int
    saves: int
    wall: float
    latencies: list[float]
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def saves_per_s(self) -> float:
        return self.saves / self.wall if self.wall > 0 else 0.0


@dataclass
class MemoryResult:
    family: str
    backend: str
    size: int
    peaks: list[int]  # bytes: tracemalloc peak above the start, per save
    retained: list[int]  # bytes still allocated after the save, per save


@dataclass
class DiagnosticResult:
    family: str
    backend: str
    size: int
    statements: float  # SQL statements per save (SQLAlchemy cursor executes), ours only
    hops: float  # aiosqlite thread hops / socket writes per save
    hop_kind: str
    loop_cpu: float  # seconds of event-loop-thread CPU per save
    wall: float  # seconds per save, in this (instrumented) run
    last_statements: list[str]
    last_calls: list[str]  # the driver calls / wire messages of the last save


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _messages(it: Iteration) -> tuple[dict[str, Any], ...]:
    return (it.tool_call, it.tool_result, it.answer)


async def measured_run(
    engine: Engine, data: Sequence[Iteration], size: int, rep: int, run_id: str
) -> RunResult:
    """One run on a fresh database: begin, then one save per iteration."""
    db = engine.db
    location = await db.fresh(engine, run_id)
    n = len(data)
    latencies: list[float] = []
    await db.settle()
    await engine.open(location)
    try:
        size0 = await db.size(location)
        mark0 = await db.bytes_mark()
        t0 = time.perf_counter()
        run = await engine.begin(run_id)
        transcript: list[dict[str, Any]] = []
        for i, it in enumerate(data, 1):
            new = _messages(it)
            transcript.extend(new)
            phases = completed_phases(i, n)
            s = time.perf_counter()
            await run.save(transcript, i, new, phases)
            latencies.append(time.perf_counter() - s)
        wall = time.perf_counter() - t0
        if db.backend != SQLITE:
            written = await db.bytes_mark() - mark0
            grown = await db.size(location) - size0
    finally:
        await engine.close()
    if db.backend == SQLITE:
        # after close: the WAL has been checkpointed into the file (its writes are counted)
        written = await db.bytes_mark() - mark0
        grown = await db.size(location) - size0
    await db.discard(location)
    return RunResult(engine.family, engine.backend, size, rep, latencies, wall, written, grown)


async def lockstep_runs(
    engines: Sequence[Engine], data: Sequence[Iteration], size: int, rep: int
) -> list[RunResult]:
    """One run per engine, in lockstep: at each iteration every engine saves once, in an
    order that rotates by iteration.

    A second view of the near-floor ratios: measured over the same moments, the machine's
    drift (other tenants, the server's background work) weighs on both sides alike, which
    sequential runs seconds apart do not ensure; and each save runs after the other
    engines' code, with colder caches, as a service's own work between saves leaves them.
    Sizes and WAL bytes are not measured here (``written``/``db_size`` = 0)."""
    n = len(data)
    opened: list[tuple[Engine, str]] = []
    try:
        for engine in engines:
            opened.append((engine, await engine.db.fresh(engine, f"lockstep-{rep}")))
        for db in {id(e.db): e.db for e in engines}.values():
            await db.settle()
        for engine, location in opened:
            await engine.open(location)
        runs = [await engine.begin(f"lockstep-{rep}") for engine in engines]
        latencies: list[list[float]] = [[] for _ in engines]
        transcript: list[dict[str, Any]] = []
        for i, it in enumerate(data, 1):
            new = _messages(it)
            transcript.extend(new)
            phases = completed_phases(i, n)
            for k in range(len(runs)):
                j = (i + k) % len(runs)
                s = time.perf_counter()
                await runs[j].save(transcript, i, new, phases)
                latencies[j].append(time.perf_counter() - s)
    finally:
        for engine, location in opened:
            await engine.close()
            await engine.db.discard(location)
    return [
        RunResult(engine.family, engine.backend, size, rep, lat, sum(lat), 0, 0)
        for engine, lat in zip(engines, latencies, strict=True)
    ]


async def concurrent_run(
    engine: Engine, data: Sequence[Iteration], runs: int, rep: int
) -> ConcurrentResult:
    """``runs`` runs saving at once, each ``len(data)`` iterations; throughput = saves / wall."""
    db = engine.db
    location = await db.fresh(engine, f"concurrent-{rep}")
    n = len(data)
    errors: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    go = asyncio.Event()
    ready = 0
    all_ready = asyncio.Event()

    async def one(k: int) -> None:
        nonlocal ready
        try:
            run = await engine.begin(f"concurrent-{rep}-{k:03d}")
        finally:
            ready += 1
            if ready == runs:
                all_ready.set()
        await go.wait()
        transcript: list[dict[str, Any]] = []
        for i, it in enumerate(data, 1):
            new = _messages(it)
            transcript.extend(new)
            s = time.perf_counter()
            try:
                await run.save(transcript, i, new, completed_phases(i, n))
            except Exception as exc:
                errors[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
                continue
            latencies.append(time.perf_counter() - s)

    await db.settle()
    await engine.open(location)
    try:
        tasks = [asyncio.create_task(one(k)) for k in range(runs)]
        await all_ready.wait()
        t0 = time.perf_counter()
        go.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        wall = time.perf_counter() - t0
        for r in results:
            if isinstance(r, BaseException):
                errors[f"{type(r).__name__}: {str(r)[:80]}"] += 1
    finally:
        await engine.close()
    await db.discard(location)
    return ConcurrentResult(
        engine.family,
        engine.backend,
        rep,
        runs,
        n,
        len(latencies),
        wall,
        latencies,
        dict(errors),
    )


async def memory_run(engine: Engine, data: Sequence[Iteration], size: int) -> MemoryResult:
    """tracemalloc around each save: the peak it allocates above what was allocated before."""
    db = engine.db
    location = await db.fresh(engine, "memory")
    n = len(data)
    peaks: list[int] = []
    retained: list[int] = []
    await engine.open(location)
    try:
        run = await engine.begin("memory")
        transcript: list[dict[str, Any]] = []
        tracemalloc.start()
        try:
            for i, it in enumerate(data, 1):
                new = _messages(it)
                transcript.extend(new)
                phases = completed_phases(i, n)
                tracemalloc.reset_peak()
                before = tracemalloc.get_traced_memory()[0]
                await run.save(transcript, i, new, phases)
                after, peak = tracemalloc.get_traced_memory()
                peaks.append(peak - before)
                retained.append(after - before)
        finally:
            tracemalloc.stop()
    finally:
        await engine.close()
    await db.discard(location)
    return MemoryResult(engine.family, engine.backend, size, peaks, retained)


class _Counters:
    """Counts aiosqlite thread hops and asyncio socket writes while active."""

    def __init__(self) -> None:
        self.hops = 0
        self.socket_writes = 0
        self.statements: list[str] = []
        self.calls: list[str] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        import asyncio.selector_events as se

        import aiosqlite.core

        counters = self
        original_execute = aiosqlite.core.Connection._execute
        transport = se._SelectorSocketTransport  # type: ignore[attr-defined]
        original_write = transport.write

        async def _execute(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
            counters.hops += 1
            name = getattr(fn, "__qualname__", type(fn).__name__)
            if args and isinstance(args[0], str):
                name += f" {' '.join(args[0].split())[:40]}"
            counters.calls.append(name)
            return await original_execute(self, fn, *args, **kwargs)

        def write(self: Any, data: Any) -> None:
            counters.socket_writes += 1
            counters.calls.append(_frontend_messages(bytes(data)))
            original_write(self, data)

        aiosqlite.core.Connection._execute = _execute  # type: ignore[method-assign]
        transport.write = write
        try:
            yield
        finally:
            aiosqlite.core.Connection._execute = original_execute  # type: ignore[method-assign]
            transport.write = original_write


def _frontend_messages(data: bytes) -> str:
    """PostgreSQL frontend message types in one socket write (Q with its SQL, P B E S...)."""
    out: list[str] = []
    i = 0
    while i + 5 <= len(data):
        kind = chr(data[i])
        length = int.from_bytes(data[i + 1 : i + 5], "big")
        body = data[i + 5 : i + 1 + length]
        if kind == "Q":
            out.append(f"Q({body[:40].rstrip(bytes(1)).decode(errors='replace').strip()})")
        elif kind == "P":
            sql = body.split(bytes(1))[1] if body.count(bytes(1)) >= 2 else b""
            out.append(f"P({' '.join(sql.decode(errors='replace').split())[:40]})")
        else:
            out.append(kind)
        i += 1 + length
    return " ".join(out)


async def diagnostic_run(
    engine: Engine, data: Sequence[Iteration], size: int, window: tuple[int, int]
) -> DiagnosticResult:
    """Statements and driver round trips per save over the iterations in ``window``."""
    db = engine.db
    location = await db.fresh(engine, "diagnostics")
    n = len(data)
    counters = _Counters()
    lo, hi = window
    statements = 0
    hops = 0
    saves = 0
    cpu = 0.0
    wall = 0.0
    listener: Callable[..., None] | None = None
    with counters.installed():
        await engine.open(location)
        try:
            if isinstance(engine, Ours):
                from sqlalchemy import event

                def listener(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
                    counters.statements.append(" ".join(statement.split())[:160])

                event.listen(engine.store.engine.sync_engine, "before_cursor_execute", listener)
            run = await engine.begin("diagnostics")
            transcript: list[dict[str, Any]] = []
            for i, it in enumerate(data, 1):
                new = _messages(it)
                transcript.extend(new)
                counters.statements.clear()
                counters.calls.clear()
                h0 = counters.hops + counters.socket_writes
                c0 = time.thread_time()
                w0 = time.perf_counter()
                await run.save(transcript, i, new, completed_phases(i, n))
                if lo <= i <= hi:
                    cpu += time.thread_time() - c0
                    wall += time.perf_counter() - w0
                    saves += 1
                    statements += len(counters.statements)
                    hops += counters.hops + counters.socket_writes - h0
            last = list(counters.statements)
            last_calls = list(counters.calls)
        finally:
            await engine.close()
    await db.discard(location)
    kind = "aiosqlite thread hops" if engine.backend == SQLITE else "socket writes"
    return DiagnosticResult(
        engine.family,
        engine.backend,
        size,
        statements / max(1, saves) if isinstance(engine, Ours) else float("nan"),
        hops / max(1, saves),
        kind,
        cpu / max(1, saves),
        wall / max(1, saves),
        last,
        last_calls,
    )


def _group_of(filename: str, func: str) -> str:
    if filename == "~":
        if "poll" in func or "select" in func:
            return "waiting in epoll (I/O, the SQLite thread, the server)"
        if "send" in func or "recv" in func:
            return "socket send/recv"
        if "orjson" in func or "dumps" in func:
            return "orjson"
        return "builtins"
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/", 1)[0]
    if "/executus_ckpt/" in filename:
        return "executus_ckpt/" + filename.split("/executus_ckpt/", 1)[1]
    if "/bench/" in filename:
        return "bench"
    if "/asyncio/" in filename:
        return "asyncio (stdlib)"
    return "stdlib (other)"


def by_package(stats: pstats.Stats) -> list[tuple[str, float]]:
    """tottime summed per package (or per executus_ckpt module), largest first."""
    totals: dict[str, float] = collections.defaultdict(float)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, func), (_cc, _nc, tt, _ct, _callers) in raw.items():
        totals[_group_of(filename, func)] += tt
    return sorted(totals.items(), key=lambda kv: -kv[1])


async def profiled_run(engine: Engine, data: Sequence[Iteration], size: int) -> str:
    """cProfile (event-loop thread) of one run's saves; returns the top of the report."""
    db = engine.db
    location = await db.fresh(engine, "profile")
    n = len(data)
    prof = cProfile.Profile()
    await engine.open(location)
    try:
        run = await engine.begin("profile")
        transcript: list[dict[str, Any]] = []
        t_total = 0.0
        for i, it in enumerate(data, 1):
            new = _messages(it)
            transcript.extend(new)
            phases = completed_phases(i, n)
            s = time.perf_counter()
            prof.enable()
            await run.save(transcript, i, new, phases)
            prof.disable()
            t_total += time.perf_counter() - s
    finally:
        await engine.close()
    await db.discard(location)
    out = io.StringIO()
    out.write(
        f"# cProfile of {engine.key}, S={size}, {n} saves, {t_total * 1000 / n:.3f} ms/save "
        "wall (profiled, event-loop thread only)\n\n"
    )
    stats = pstats.Stats(prof, stream=out)
    out.write("Own time (tottime) per save by package, profiler overhead included:\n\n")
    for group, seconds in by_package(stats):
        out.write(f"  {seconds * 1000 / n:8.3f} ms  {group}\n")
    out.write("\n")
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(45)
    return out.getvalue()
