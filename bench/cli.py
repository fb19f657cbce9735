"""``python -m bench``: run everything, print the tables and the targets, write RESULTS.md."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench import report
from bench.engines import (
    ENGINE_TYPES,
    FAMILIES,
    POSTGRES,
    SQLITE,
    Database,
    Engine,
    PostgresDatabase,
    SQLiteDatabase,
    label,
    langgraph_available,
    pg_dsn,
    sqlite_version,
)
from bench.runner import (
    RunResult,
    concurrent_run,
    diagnostic_run,
    lockstep_runs,
    log,
    measured_run,
    memory_run,
    profiled_run,
)
from bench.workload import encoded_sizes, make_iterations

HERE = Path(__file__).resolve().parent
DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
PG_URL_ENV = "EXECUTUS_CKPT_TEST_PG_URL"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="executus_ckpt vs LangGraph's savers vs the raw drivers (issues 5, 9).",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, every engine, < 60 s")
    p.add_argument("--reps", type=int, help="repetitions (default 3; quick 1)")
    p.add_argument("--iterations", type=int, help="iterations per run (default 200; quick 20)")
    p.add_argument(
        "--sizes", help="tool-result sizes in bytes, comma-separated (default 1024,16384)"
    )
    p.add_argument("--concurrent-runs", type=int, help="runs saving at once (default 50; quick 5)")
    p.add_argument(
        "--concurrent-iterations", type=int, help="saves per concurrent run (default 40; quick 5)"
    )
    p.add_argument(
        "--langgraph-concurrent",
        choices=("first", "all", "none"),
        default="first",
        help="run LangGraph in the concurrent test in the first repetition (default), all, none",
    )
    p.add_argument(
        "--near-pairs",
        type=int,
        help="extra back-to-back (ours, near floor) run pairs per repetition for issue 9's "
        "near-floor verdicts (default 3; quick 0)",
    )
    p.add_argument("--backends", default="sqlite,postgresql", help="comma-separated")
    p.add_argument(
        "--engines",
        default=",".join(FAMILIES),
        help=f"comma-separated engine families (default {','.join(FAMILIES)})",
    )
    p.add_argument(
        "--pg-url",
        help=f"PostgreSQL URL (default ${PG_URL_ENV}, else {DEFAULT_PG_URL}); "
        "the bench creates and drops its own databases there",
    )
    p.add_argument("--tmpdir", help="where SQLite files go (default: the system temp dir)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also cProfile our saves and write the reports to bench/out/",
    )
    p.add_argument(
        "--output",
        help="markdown report path (default bench/RESULTS.md; quick: bench/out/RESULTS-quick.md)",
    )
    p.add_argument("--no-write", action="store_true", help="print only, write no report file")
    args = p.parse_args(argv)
    quick = args.quick
    args.reps = args.reps or (1 if quick else 3)
    args.iterations = args.iterations or (20 if quick else 200)
    if args.near_pairs is None:
        args.near_pairs = 0 if quick else 3
    args.sizes = [int(s) for s in (args.sizes or "1024,16384").split(",")]
    args.concurrent_runs = args.concurrent_runs or (5 if quick else 50)
    args.concurrent_iterations = args.concurrent_iterations or (5 if quick else 40)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in args.backends:
        if b not in (SQLITE, POSTGRES):
            p.error(f"unknown backend {b!r}")
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in args.engines:
        if e not in FAMILIES:
            p.error(f"unknown engine {e!r} (one of {', '.join(FAMILIES)})")
    if args.iterations < 6:
        p.error("--iterations must be at least 6")
    return args


def _p50_last10_ms(r: RunResult) -> float:
    """The run's p50 over its last 10 saves, in ms (the progress lines)."""
    return report.percentile(r.latencies[-10:], 50) * 1000


async def _connect_pg(url: str, explicit: bool) -> tuple[PostgresDatabase | None, str]:
    db = PostgresDatabase(pg_dsn(url), prefix=f"bench_{os.getpid()}")
    try:
        await db.connect()
    except Exception as exc:
        why = f"PostgreSQL at {url} unreachable ({type(exc).__name__}: {exc})"
        if explicit:
            log(f"WARNING: {why}; PostgreSQL engines skipped")
        return None, why
    return db, ""


async def run_bench(args: argparse.Namespace) -> tuple[report.Results, str]:
    started = time.perf_counter()
    res = report.Results(args.iterations, args.sizes, args.reps)
    res.notes["load_start"] = _loadavg()
    tmp_parent = args.tmpdir or tempfile.gettempdir()
    tmpdir = Path(tempfile.mkdtemp(prefix="executus-bench-", dir=tmp_parent))
    dbs: dict[str, Database] = {}
    pg: PostgresDatabase | None = None
    pg_info: dict[str, str] | None = None
    engines: list[Engine] = []
    try:
        if SQLITE in args.backends:
            dbs[SQLITE] = SQLiteDatabase(tmpdir)
        if POSTGRES in args.backends:
            explicit = bool(args.pg_url or os.environ.get(PG_URL_ENV))
            url = args.pg_url or os.environ.get(PG_URL_ENV) or DEFAULT_PG_URL
            pg, why = await _connect_pg(url, explicit)
            if pg is None:
                res.skipped[POSTGRES] = why
            else:
                dbs[POSTGRES] = pg
                pg_info = await pg.server_info()
        for backend, db in dbs.items():
            for family in FAMILIES:
                if family not in args.engines:
                    continue
                if family == "langgraph":
                    why = langgraph_available(backend)
                    if why:
                        res.skipped[f"langgraph/{backend}"] = f"LangGraph not installed: {why}"
                        log(f"skipping LangGraph on {backend}: {why}")
                        continue
                engine = ENGINE_TYPES[family](db)
                try:
                    await engine.setup()
                except Exception as exc:
                    res.skipped[engine.key] = f"setup failed: {type(exc).__name__}: {exc}"
                    log(f"skipping {engine.key}: setup failed: {exc!r}")
                    continue
                engines.append(engine)
        if not engines:
            raise SystemExit("no engine to run: " + "; ".join(res.skipped.values()))
        log(f"engines: {', '.join(e.key for e in engines)}; SQLite files in {tmpdir}")

        data = {s: make_iterations(args.iterations, s) for s in args.sizes}
        conc_size = 16384 if 16384 in args.sizes else max(args.sizes)
        conc_data = make_iterations(args.concurrent_iterations, conc_size)
        for s in args.sizes:
            call, result, answer = encoded_sizes(data[s])
            res.notes[f"sizes/{s}"] = f"{call} B + {result} B + {answer} B"

        for rep in range(args.reps):
            for k, size in enumerate(args.sizes):
                shift = (rep * len(args.sizes) + k) % len(engines)
                order = engines[shift:] + engines[:shift]
                for engine in order:
                    gc.collect()
                    run_id = f"r{rep}-s{size}-{engine.family}"
                    r = await measured_run(engine, data[size], size, rep, run_id)
                    res.runs.append(r)
                    log(
                        f"rep {rep + 1}/{args.reps} S={size:>5} {engine.key:<20} "
                        f"wall {r.wall:7.3f} s  p50 last10 "
                        f"{_p50_last10_ms(r):8.2f} ms  "
                        f"written {r.written / 2**20:9.2f} MiB  size {r.db_size / 2**20:8.2f} MiB"
                    )
            # Issue 9's near-floor verdicts: more (ours, near floor) pairs at the largest S,
            # each pair back to back, the first of the two alternating.
            for backend in dbs:
                pair = [
                    e
                    for family in ("ours", report.NEAR_FLOOR[backend])
                    for e in engines
                    if e.backend == backend and e.family == family
                ]
                if len(pair) < 2:
                    continue
                for k in range(args.near_pairs):
                    index = len({r.rep for r in res.near if r.backend == backend})
                    order = pair if index % 2 else pair[::-1]
                    for engine in order:
                        gc.collect()
                        run_id = f"pair{index}-{engine.family}"
                        r = await measured_run(engine, data[conc_size], conc_size, index, run_id)
                        res.near.append(r)
                    log(
                        f"rep {rep + 1}/{args.reps} S={conc_size:>5} near-floor pair "
                        f"{k + 1}/{args.near_pairs} {backend}: "
                        + ", ".join(
                            f"{r.family} p50 last10 {_p50_last10_ms(r):.2f} ms"
                            for r in res.near[-2:]
                        )
                    )
            # The near-floor ratios of issue 9 are also measured in lockstep
            # (runner.lockstep_runs).
            for backend in dbs:
                group = [e for e in engines if e.backend == backend and e.family != "langgraph"]
                if len(group) > 1:
                    gc.collect()
                    step = await lockstep_runs(group, data[conc_size], conc_size, rep)
                    res.lockstep.extend(step)
                    log(
                        f"rep {rep + 1}/{args.reps} S={conc_size:>5} lockstep {backend}: "
                        + ", ".join(
                            f"{r.family} p50 last10 {_p50_last10_ms(r):.2f} ms" for r in step
                        )
                    )
            for engine in engines:
                if engine.family == "langgraph" and (
                    args.langgraph_concurrent == "none"
                    or (args.langgraph_concurrent == "first" and rep > 0)
                ):
                    continue
                gc.collect()
                c = await concurrent_run(engine, conc_data, args.concurrent_runs, rep)
                res.concurrent.append(c)
                log(
                    f"rep {rep + 1}/{args.reps} concurrent {engine.key:<20} "
                    f"{c.runs}x{c.iterations}: {c.saves_per_s:9,.0f} saves/s  "
                    f"errors {sum(c.errors.values())}"
                )

        mem_size = conc_size
        last_window = res.windows[2]
        for engine in engines:
            if engine.family == "langgraph":
                continue
            gc.collect()
            res.memory.append(await memory_run(engine, data[mem_size], mem_size))
            res.diagnostics.append(
                await diagnostic_run(
                    engine, data[mem_size], mem_size, (last_window[1], last_window[2])
                )
            )
        res.notes["orjson_peak"] = _orjson_peak(data[mem_size][-1].tool_result)
        for d in res.diagnostics:
            if d.family == "ours":
                res.notes[f"statements/{d.backend}"] = "\n".join(d.last_statements)
            res.notes[f"calls/{d.family}/{d.backend}"] = "\n".join(d.last_calls)
        if args.profile:
            out_dir = HERE / "out"
            out_dir.mkdir(exist_ok=True)
            for engine in engines:
                if engine.family != "ours":
                    continue
                text = await profiled_run(engine, data[mem_size], mem_size)
                path = out_dir / f"profile-ours-{engine.backend}.txt"
                path.write_text(text, encoding="utf-8")
                log(f"wrote {path}")
        for engine in engines:
            for k, v in engine.notes.items():
                res.notes[f"{k}/{engine.key}"] = v
    finally:
        for engine in engines:
            try:
                await engine.teardown()
            except Exception as exc:  # pragma: no cover - best effort
                log(f"teardown of {engine.key} failed: {exc!r}")
        if pg is not None:
            await pg.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    res.notes["elapsed"] = f"{elapsed:.0f} s"
    res.notes["load_end"] = _loadavg()
    machine = report.machine_info(tmpdir, pg_info, sqlite_version())
    return res, render(res, args, machine)


def _orjson_peak(message: dict[str, object]) -> str:
    """tracemalloc's peak for encoding one message with orjson (its output buffer)."""
    import tracemalloc

    import orjson

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        encoded = orjson.dumps(message)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    return (
        f"encoding one {report.fmt_bytes(len(encoded))} tool result with orjson alone peaks "
        f"at {report.fmt_bytes(peak)}"
    )


def _loadavg() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def render(res: report.Results, args: argparse.Namespace, machine: list[str]) -> str:
    wins = res.windows
    mode = "quick smoke mode (tiny sizes: not a measurement)" if args.quick else "full run"
    out: list[str] = []
    out.append("# executus_ckpt save benchmark (`make bench`)\n")
    out.append(
        f"{mode}: {args.iterations} iterations per run, S = "
        + ", ".join(report.fmt_size(s) for s in args.sizes)
        + f", {args.reps} repetition(s), engines interleaved in one process; "
        f"took {res.notes.get('elapsed', '?')}.\n"
    )
    out.append("## Machine\n")
    out.extend(machine)
    out.append(
        f"- Load average (1/5/15 min) at start {res.notes.get('load_start')}, at end "
        f"{res.notes.get('load_end')}: other work on the machine shares its cores and disk"
    )
    out.append("")
    if res.skipped:
        out.append("Not measured:\n")
        out.extend(f"- {k}: {v}" for k, v in res.skipped.items())
        out.append("")
    out.append("## Sequential runs: per-save latency, wall time, bytes written, database size\n")
    out.append(
        "Each cell: the value, and in parentheses its ratio to the raw-driver floor of the same "
        "backend (the median over repetitions of the ratio within one repetition). Latency "
        "windows: "
        + ", ".join(f"{label} = iterations {lo}-{hi}" for label, lo, hi in wins)
        + "; p50/p99 over those iterations' saves of every repetition pooled. wall/run, "
        "written/run and DB size/run: median over repetitions.\n"
    )
    out.append(report.main_table(res))
    out.append("")
    out.append(
        "written/run: SQLite = bytes the process passed to write()/pwrite() "
        "(`/proc/self/io` wchar) from before `begin` to after the connections closed (so the "
        "WAL checkpoint into the database file counts); PostgreSQL = WAL bytes "
        "(`pg_current_wal_lsn()` difference, whole cluster). DB size/run: SQLite = database "
        "file (+ WAL, if left) after close, minus the empty schema; PostgreSQL = "
        "`pg_total_relation_size` of the engine's tables (with TOAST and indexes) after the run, "
        "minus before (the tables are truncated before every run).\n"
    )
    sizes = "; ".join(
        f"S={report.fmt_size(int(k.split('/')[1]))}: {v}"
        for k, v in res.notes.items()
        if k.startswith("sizes/")
    )
    out.append(
        f"Messages per iteration (compact JSON: tool call + tool result + answer): {sizes}.\n"
    )
    out.append(
        f"## {args.concurrent_runs} runs saving at once "
        f"(S = {report.fmt_size(16384 if 16384 in args.sizes else max(args.sizes))})\n"
    )
    out.append(
        "Each run: `begin`, then (all starting together) one save per iteration; "
        "saves/s = all saves / wall time from the start signal to the last save; "
        "x floor = median over repetitions of ours / floor in the same repetition.\n"
    )
    out.append(report.concurrent_table(res))
    out.append("")
    out.append("## Allocation per save (tracemalloc)\n")
    out.append(
        "tracemalloc's peak above the allocated memory before the save, while the save runs "
        "(every thread), median over the window's iterations; retained = still allocated after "
        "the save returned. One unrepeated, untimed run per engine. For scale: "
        + res.notes.get("orjson_peak", "")
        + " (orjson reserves its output buffer generously), so most of the peak is the new "
        "messages' encoding, paid by the floor too.\n"
    )
    out.append(report.memory_table(res))
    out.append("")
    out.append("## Round trips per save\n")
    _, lo, hi = wins[2]
    out.append(
        f"Mean over iterations {lo}-{hi} of one run. SQL statements = SQLAlchemy "
        "`before_cursor_execute` events (ours); driver round trips = calls into aiosqlite's "
        "worker thread (SQLite) or writes to the server socket (PostgreSQL; asyncio transports). "
        "event-loop CPU = `time.thread_time()` of the event-loop thread during the save (the "
        "Python cost: library, SQLAlchemy, driver; not SQLite's worker thread nor the server); "
        "wall/save is of this instrumented run.\n"
    )
    out.append(report.diagnostics_table(res))
    out.append("")
    for backend in (SQLITE, POSTGRES):
        stmts = res.notes.get(f"statements/{backend}")
        if stmts:
            out.append(f"SQL of ours' last save on {report.BACKEND_LABEL[backend]}:\n")
            out.append("```sql\n" + stmts + "\n```\n")
        what = "aiosqlite calls" if backend == SQLITE else "Socket writes (frontend messages)"
        for family in ("ours", "floor", "lean"):
            calls = res.notes.get(f"calls/{family}/{backend}")
            if calls:
                out.append(
                    f"{what} of {label(family, backend)}'s last save on "
                    f"{report.BACKEND_LABEL[backend]}, in order:\n"
                )
                out.append("```\n" + calls + "\n```\n")
    quick_note = "(quick mode: too few iterations for these to mean anything)\n"
    out.append("## Targets (issue 9)\n")
    out.append(
        "Ratios within this run. p50 at the last iterations: against the floor the issue "
        "names for each backend, the raw aiosqlite floor on SQLite and the one-statement "
        "floor on PostgreSQL. First save (the first `save` after `begin`) and 50 runs at once: "
        "against the raw floor, the floor of every table here (the lean floor's ratio "
        "follows).\n"
    )
    if args.quick:
        out.append(quick_note)
    out.extend(t.line() for t in report.targets_issue9(res))
    out.append("")
    out.append("## Targets (issue 5)\n")
    if args.quick:
        out.append(quick_note)
    out.extend(t.line() for t in report.targets_issue5(res))
    out.append("")
    out.append("## Notes\n")
    for key, value in sorted(res.notes.items()):
        if key.startswith("sqlite_pragmas/"):
            family = key.split("/")[1]
            out.append(f"- SQLite pragmas of {label(family, SQLITE)}'s connection: {value}")
    out.extend(
        [
            "- LangGraph is driven through `aput` only, as the Pregel loop calls it once per "
            "superstep for a graph whose state is a `messages` channel (a new checkpoint whose "
            "`channel_values['messages']` is the whole list, the channel's version bumped with "
            "the saver's `get_next_version`, `new_versions`, metadata `{source: loop, step}`, "
            "the parent checkpoint id from the previous `aput`); the nodes' `aput_writes` calls "
            "are not made, which only flatters LangGraph. Messages are plain dicts (what ours "
            "stores), not LangChain message objects. Its savers keep every checkpoint of a "
            "thread: that is what LangGraph does by default.",
            "- LangGraph's AsyncSqliteSaver sets only `journal_mode=WAL`; its `synchronous` is "
            "SQLite's compiled default, reported above. AsyncPostgresSaver uses one autocommit "
            "psycopg connection (`from_conn_string`) with a pipeline per `aput`; its calls are "
            "serialized by the saver's lock, whatever the connection or pool.",
            "- Raw floor: SQLite = one aiosqlite connection (WAL, synchronous=FULL, autocommit "
            "mode), per save `BEGIN IMMEDIATE`, `executemany` INSERT of the new messages, "
            "header UPSERT, `COMMIT`, serialized by an asyncio.Lock; PostgreSQL = asyncpg pool "
            "(max 15 connections, the cap of SQLAlchemy's default pool; no reset query on "
            "release), per save acquire, `BEGIN`, `executemany` INSERT, header UPSERT, `COMMIT`. "
            "Each message is encoded with orjson, as ours does.",
            "- One-hop floor (SQLite): the raw floor's connection and writes, but each save's "
            "whole transaction (`BEGIN IMMEDIATE`, `executemany`, UPSERT, `COMMIT`) is one "
            "function run in aiosqlite's worker thread on its `sqlite3` connection (aiosqlite's "
            "private `Connection._execute`), so no lock. One-statement floor (PostgreSQL): the "
            "raw floor's pool, one statement per save: the messages' INSERT in a CTE of the "
            "header UPSERT (one round trip, atomic on its own, autocommit).",
            "- ours: `SQLCheckpointStore.from_url(url)` after `migrate(url)`, "
            "`StoreCheckpointerFactory(store, throttle=0)`, `begin(RunInfo(...))` (writes the "
            "initial row; counted in wall/run), then `save(RunCheckpointState(messages=transcript, "
            "iteration=i, completed_phases=...))` with the same growing list.",
            "- In lockstep (issue 9's near-floor lines): per repetition, one more run of ours "
            "and of each floor at the largest S, side by side: every iteration saves once on "
            "each, in an order rotating by iteration. The ratio is then taken over the same "
            "moments of the machine, and each save follows the other engines' code (colder "
            "caches, as a service's own work between saves leaves them). The verdict stays on "
            "sequential runs, as in earlier reports.",
            "- Near-floor pairs (issue 9's near-floor verdicts): per repetition, "
            f"{args.near_pairs} more pairs of sequential runs at the largest S, ours and the "
            "floor the issue names back to back (which of the two goes first alternates), "
            "each measured like the table's runs. The verdict is the median of ours / floor "
            "over these pairs and the repetitions' own runs: the p50 of one run's last 10 "
            "saves is a small sample (the saves of one run share the machine's moment), and "
            "over 3-5 repetitions alone the same code's verdict moved by about 0.2x between "
            "bench runs.",
            "- PostgreSQL WAL bytes and latencies are the whole server's: anything else using the "
            "server during the run (another test suite) shows up in them.",
        ]
    )
    out.append("")
    out.append(
        "Reproduce: `make bench` (installs the `bench` extra, starts the local PostgreSQL if "
        "needed), or `.venv/bin/python -m bench [--quick] [--profile] [--reps N]`; "
        "`python -m bench --help` for the knobs.\n"
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res, text = asyncio.run(run_bench(args))
    print(text)
    if not args.no_write:
        if args.output:
            path = Path(args.output)
        elif args.quick:
            path = HERE / "out" / "RESULTS-quick.md"
        else:
            path = HERE / "RESULTS.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
        log(f"wrote {path}")
    if not res.runs:
        log("nothing was measured")
        return 1
    return 0
