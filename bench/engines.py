"""The engines under test, and the databases they run on.

Every engine has the same shape: ``open`` on a fresh database (a new SQLite file, or a freshly
truncated PostgreSQL database of its own), ``begin(run_id)`` a run, then ``save`` once per
iteration with the whole (append-only) transcript plus the 3 messages that are new, ``close``.

- ``ours``: executus_ckpt, ``SQLCheckpointStore.from_url(url)`` after ``migrate(url)``,
  ``StoreCheckpointerFactory(store, throttle=0)``: every save persists, library defaults.
- ``langgraph``: LangGraph's ``AsyncSqliteSaver`` / ``AsyncPostgresSaver`` driven through
  ``aput`` as the Pregel loop drives them for a graph whose state is a ``messages`` channel.
- ``floor``: the raw drivers (aiosqlite / asyncpg), appending only the new messages as rows plus
  a header UPSERT, one transaction per save, in their own tables.
- ``lean``: the same writes with the fewest round trips a driver allows: on SQLite the whole
  transaction as one call into aiosqlite's thread (``sqlite3`` there), on PostgreSQL one
  statement (the INSERT in a CTE of the UPSERT) per save.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import orjson

from bench.workload import Message

SQLITE = "sqlite"
POSTGRES = "postgresql"

FAMILIES = ("ours", "langgraph", "floor", "lean")
FAMILY_LABEL = {
    "ours": "executus_ckpt",
    "langgraph": "LangGraph saver",
    "floor": "raw floor",
    "lean": "lean floor",
}
_BACKEND_LABEL = {
    ("lean", "sqlite"): "one-hop floor",
    ("lean", "postgresql"): "one-statement floor",
}


def label(family: str, backend: str) -> str:
    """The engine's name in the report (the lean floor is named by what it saves)."""
    return _BACKEND_LABEL.get((family, backend), FAMILY_LABEL[family])


# The pool cap every PostgreSQL engine that has a pool gets: SQLAlchemy's default QueuePool
# (pool_size 5 + max_overflow 10), so that the floor and ours have the same connections.
PG_POOL_MAX = 15


class Run(ABC):
    """One run's saver."""

    @abstractmethod
    async def save(
        self,
        transcript: list[Message],
        iteration: int,
        new: Sequence[Message],
        phases: list[str],
    ) -> None:
        """Persist the state after ``iteration`` (``new`` are its 3 messages)."""


class Engine(ABC):
    """An engine bound to a backend; ``open`` it on a fresh database per measured run."""

    family: ClassVar[str]

    def __init__(self, db: Database) -> None:
        self.db = db
        self.notes: dict[str, str] = {}

    @property
    def backend(self) -> str:
        return self.db.backend

    @property
    def key(self) -> str:
        return f"{self.family}/{self.backend}"

    async def setup(self) -> None:  # noqa: B027
        """Once per bench (e.g. create the engine's PostgreSQL database and schema)."""

    async def teardown(self) -> None:  # noqa: B027
        """Once per bench."""

    async def prepare_file(self, path: Path) -> None:  # noqa: B027
        """SQLite: lay down the run's database file before ``open`` (default: nothing)."""

    @abstractmethod
    async def open(self, location: str) -> None:
        """Connect to the fresh database at ``location`` (a path or a DSN)."""

    @abstractmethod
    async def begin(self, run_id: str) -> Run:
        """Start a run (what a host does when the run starts)."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect (SQLite: the last close checkpoints the WAL into the database)."""


# -- databases: fresh per run, with the counters the report needs ------------------------------


class Database(ABC):
    backend: ClassVar[str]

    @abstractmethod
    async def fresh(self, engine: Engine, name: str) -> str:
        """A fresh, empty database for ``engine``'s run ``name``; returns its location."""

    @abstractmethod
    async def bytes_mark(self) -> int:
        """A monotonic count of bytes written (SQLite: write syscalls; PG: WAL position)."""

    @abstractmethod
    async def size(self, location: str) -> int:
        """Bytes the database at ``location`` takes for the engine's data."""

    async def discard(self, location: str) -> None:  # noqa: B027
        """Free what ``fresh`` made, once the run is measured."""

    async def settle(self) -> None:
        """Before a measured run: flush what earlier runs left dirty, so their write-back does
        not land in this run's fsyncs (``sync()``; PostgreSQL also ``CHECKPOINT``)."""
        await asyncio.to_thread(os.sync)


def proc_wchar() -> int:
    """Bytes this process passed to write()/pwrite() so far, all threads (``/proc/self/io``)."""
    with open("/proc/self/io", encoding="ascii") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar line")


class SQLiteDatabase(Database):
    """A new file per run in ``directory``; bytes written = ``/proc/self/io`` ``wchar``."""

    backend = SQLITE

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._n = 0

    async def fresh(self, engine: Engine, name: str) -> str:
        self._n += 1
        path = self.directory / f"{self._n:04d}-{engine.family}-{name}.db"
        await engine.prepare_file(path)
        return str(path)

    async def bytes_mark(self) -> int:
        return proc_wchar()

    async def size(self, location: str) -> int:
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(location + suffix).st_size
        return total

    async def discard(self, location: str) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(location + suffix)


_KEEP_TABLES = ("executus_ckpt_alembic_version", "checkpoint_migrations")


class PostgresDatabase(Database):
    """One database per engine (created at setup, dropped at the end), truncated per run.

    Bytes written = WAL bytes between ``pg_current_wal_lsn()`` before and after (the whole
    cluster's WAL: anything else writing to the server at the time is counted too).
    """

    backend = POSTGRES

    def __init__(self, admin_dsn: str, prefix: str) -> None:
        self.admin_dsn = admin_dsn
        self.prefix = prefix
        self._admin: Any = None
        self._created: list[str] = []
        self._conns: dict[str, Any] = {}

    def dsn_for(self, dbname: str) -> str:
        base, _, _ = self.admin_dsn.rpartition("/")
        return f"{base}/{dbname}"

    async def connect(self) -> None:
        import asyncpg

        self._admin = await asyncpg.connect(self.admin_dsn, timeout=10)

    async def create_database(self, family: str) -> str:
        name = f"{self.prefix}_{family}"
        await self._admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await self._admin.execute(f'CREATE DATABASE "{name}"')
        self._created.append(name)
        return self.dsn_for(name)

    async def _conn(self, dsn: str) -> Any:
        import asyncpg

        conn = self._conns.get(dsn)
        if conn is None or conn.is_closed():
            conn = await asyncpg.connect(dsn, timeout=10)
            self._conns[dsn] = conn
        return conn

    async def fresh(self, engine: Engine, name: str) -> str:
        dsn = engine.dsn  # type: ignore[attr-defined]
        conn = await self._conn(dsn)
        tables = [
            r["tablename"]
            for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                " AND NOT (tablename = ANY($1::text[]))",
                list(_KEEP_TABLES),
            )
        ]
        if tables:
            await conn.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables))
        return str(dsn)

    async def bytes_mark(self) -> int:
        return int(await self._admin.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))

    async def size(self, location: str) -> int:
        conn = await self._conn(location)
        value = await conn.fetchval(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " WHERE c.relkind = 'r' AND c.relnamespace = 'public'::regnamespace"
            " AND NOT (c.relname = ANY($1::text[]))",
            list(_KEEP_TABLES),
        )
        return int(value)

    async def settle(self) -> None:
        with contextlib.suppress(Exception):  # CHECKPOINT needs a superuser (or pg_checkpoint)
            await self._admin.execute("CHECKPOINT")
        await super().settle()

    async def server_info(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name in (
            "server_version",
            "synchronous_commit",
            "fsync",
            "wal_sync_method",
            "full_page_writes",
            "wal_compression",
            "commit_delay",
            "shared_buffers",
        ):
            out[name] = str(await self._admin.fetchval(f"SHOW {name}"))
        return out

    async def close(self) -> None:
        for conn in self._conns.values():
            with contextlib.suppress(Exception):
                await conn.close()
        self._conns.clear()
        if self._admin is not None:
            for name in self._created:
                with contextlib.suppress(Exception):
                    await self._admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await self._admin.close()
            self._admin = None


def pg_dsn(url: str) -> str:
    """``postgresql+asyncpg://...`` (SQLAlchemy style) to a libpq/asyncpg DSN."""
    _, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a PostgreSQL URL: {url!r}")
    return f"postgresql://{rest}"


# -- executus_ckpt ---------------------------------------------------------------------------


class _OursRun(Run):
    def __init__(self, cp: Any, state_type: Any) -> None:
        self._cp = cp
        self._state = state_type

    async def save(
        self,
        transcript: list[Message],
        iteration: int,
        new: Sequence[Message],
        phases: list[str],
    ) -> None:
        await self._cp.save(
            self._state(messages=transcript, iteration=iteration, completed_phases=phases)
        )


class Ours(Engine):
    """executus_ckpt with its defaults and ``throttle=0``."""

    family = "ours"

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.dsn = ""
        self._template: Path | None = None
        self._store: Any = None
        self._factory: Any = None

    def url_of(self, location: str) -> str:
        if self.backend == SQLITE:
            return f"sqlite+aiosqlite:///{location}"
        return "postgresql+asyncpg://" + location.partition("://")[2]

    async def setup(self) -> None:
        from executus_ckpt import migrate

        if isinstance(self.db, PostgresDatabase):
            self.dsn = await self.db.create_database(self.family)
            await migrate(self.url_of(self.dsn))
        else:
            assert isinstance(self.db, SQLiteDatabase)
            # migrate once, then every run starts from a copy of the migrated, empty file
            self._template = self.db.directory / "template-ours.db"
            await migrate(self.url_of(str(self._template)))

    async def prepare_file(self, path: Path) -> None:
        assert self._template is not None
        shutil.copyfile(self._template, path)

    async def open(self, location: str) -> None:
        from executus_ckpt import SQLCheckpointStore, StoreCheckpointerFactory

        self._store = SQLCheckpointStore.from_url(self.url_of(location))
        self._factory = StoreCheckpointerFactory(self._store, throttle=0)
        await self._store.check_schema()
        if self.backend == SQLITE and "sqlite_pragmas" not in self.notes:
            self.notes["sqlite_pragmas"] = await _sqlite_pragmas_via_engine(self._store.engine)

    @property
    def store(self) -> Any:
        return self._store

    async def begin(self, run_id: str) -> Run:
        from executus_ckpt import RunCheckpointState, RunInfo

        cp = await self._factory.begin(
            RunInfo(run_id=run_id, name="bench", inputs={"prompt": "benchmark run"})
        )
        return _OursRun(cp, RunCheckpointState)

    async def close(self) -> None:
        if self._store is not None:
            await self._store.aclose()
            self._store = None


async def _sqlite_pragmas_via_engine(engine: Any) -> str:
    from sqlalchemy import text

    async with engine.connect() as conn:
        sync = (await conn.execute(text("PRAGMA synchronous"))).scalar_one()
        journal = (await conn.execute(text("PRAGMA journal_mode"))).scalar_one()
    return f"journal_mode={journal}, synchronous={_SYNC_NAMES.get(int(sync), sync)}"


_SYNC_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


# -- LangGraph ---------------------------------------------------------------------------------


def langgraph_available(backend: str) -> str | None:
    """None if LangGraph's saver for ``backend`` imports, else why not."""
    try:
        if backend == SQLITE:
            import langgraph.checkpoint.sqlite.aio
        else:
            import langgraph.checkpoint.postgres.aio  # noqa: F401
            import psycopg  # noqa: F401
    except ImportError as exc:
        return f"{exc} (make bench, or: pip install -e . --group bench)"
    return None


class _LangGraphRun(Run):
    """Drives ``aput`` as LangGraph's Pregel loop does for a graph with a ``messages`` channel.

    Per step (superstep) the loop: bumps the written channel's version with the saver's
    ``get_next_version``, records what the node saw in ``versions_seen``, builds the new
    checkpoint with ``create_checkpoint`` (channel_values["messages"] is the whole list),
    computes ``new_versions`` (channels whose version moved), and calls
    ``aput(config, copy_checkpoint(checkpoint), {"source": "loop", "step": step, "parents": {}},
    new_versions)`` with the config returned by the previous ``aput`` (its checkpoint_id is the
    parent). The nodes' ``aput_writes`` calls are left out (they would only add to its cost).
    """

    def __init__(self, saver: Any, thread_id: str) -> None:
        from langgraph.checkpoint.base import empty_checkpoint

        self._saver = saver
        self._checkpoint = empty_checkpoint()
        self._config: dict[str, Any] = {
            "configurable": {"thread_id": thread_id, "checkpoint_ns": ""}
        }
        self._previous_versions: dict[str, Any] = {}

    async def save(
        self,
        transcript: list[Message],
        iteration: int,
        new: Sequence[Message],
        phases: list[str],
    ) -> None:
        from langgraph.checkpoint.base import copy_checkpoint, create_checkpoint

        cp = self._checkpoint
        seen = cp["channel_versions"].get("messages")
        version = self._saver.get_next_version(seen, None)
        cp["channel_versions"]["messages"] = version
        if seen is not None:
            cp["versions_seen"].setdefault("agent", {})["messages"] = seen
        # a BinaryOperatorAggregate channel (add_messages) checkpoints its whole list
        cp["channel_values"]["messages"] = transcript
        checkpoint = create_checkpoint(cp, None, iteration)
        versions = checkpoint["channel_versions"].copy()
        new_versions = {k: v for k, v in versions.items() if self._previous_versions.get(k) != v}
        self._previous_versions = versions
        metadata = {"source": "loop", "step": iteration, "parents": {}}
        self._config = await self._saver.aput(
            self._config, copy_checkpoint(checkpoint), metadata, new_versions
        )
        self._checkpoint = checkpoint


class LangGraph(Engine):
    """``AsyncSqliteSaver`` (its own aiosqlite connection, its defaults) or
    ``AsyncPostgresSaver.from_conn_string`` (one psycopg connection, autocommit, as documented).
    One saver serves all runs (both savers serialize their calls with a lock)."""

    family = "langgraph"

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.dsn = ""
        self._saver: Any = None
        self._cm: Any = None

    async def setup(self) -> None:
        if isinstance(self.db, PostgresDatabase):
            from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

            self.dsn = await self.db.create_database(self.family)
            async with AsyncPostgresSaver.from_conn_string(self.dsn) as saver:
                await saver.setup()

    async def open(self, location: str) -> None:
        if self.backend == SQLITE:
            import aiosqlite
            from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

            conn = await aiosqlite.connect(location)
            self._saver = AsyncSqliteSaver(conn)
            await self._saver.setup()
            if "sqlite_pragmas" not in self.notes:
                async with conn.execute("PRAGMA synchronous") as cur:
                    sync = (await cur.fetchone())[0]
                async with conn.execute("PRAGMA journal_mode") as cur:
                    journal = (await cur.fetchone())[0]
                self.notes["sqlite_pragmas"] = (
                    f"journal_mode={journal}, synchronous={_SYNC_NAMES.get(int(sync), sync)}"
                )
        else:
            from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

            self._cm = AsyncPostgresSaver.from_conn_string(location)
            self._saver = await self._cm.__aenter__()

    async def begin(self, run_id: str) -> Run:
        return _LangGraphRun(self._saver, run_id)

    async def close(self) -> None:
        if self._saver is None:
            return
        if self.backend == SQLITE:
            await self._saver.conn.close()
        else:
            await self._cm.__aexit__(None, None, None)
            self._cm = None
        self._saver = None


# -- the raw-driver floor ----------------------------------------------------------------------

_FLOOR_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS floor_runs (
    run_id TEXT PRIMARY KEY,
    iteration INTEGER NOT NULL,
    completed_phases BLOB NOT NULL,
    message_count INTEGER NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS floor_messages (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (run_id, seq)
);
"""

_FLOOR_SQLITE_UPSERT = (
    "INSERT INTO floor_runs (run_id, iteration, completed_phases, message_count, updated_at)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET iteration = excluded.iteration,"
    " completed_phases = excluded.completed_phases, message_count = excluded.message_count,"
    " updated_at = excluded.updated_at"
)

_FLOOR_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS floor_runs (
    run_id text PRIMARY KEY,
    iteration integer NOT NULL,
    completed_phases bytea NOT NULL,
    message_count integer NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS floor_messages (
    run_id text NOT NULL,
    seq integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (run_id, seq)
);
"""

_FLOOR_PG_UPSERT = (
    "INSERT INTO floor_runs (run_id, iteration, completed_phases, message_count, updated_at)"
    " VALUES ($1, $2, $3, $4, now()) ON CONFLICT (run_id) DO UPDATE SET"
    " iteration = excluded.iteration, completed_phases = excluded.completed_phases,"
    " message_count = excluded.message_count, updated_at = excluded.updated_at"
)


class _FloorSQLiteRun(Run):
    def __init__(self, engine: Floor, run_id: str) -> None:
        self._engine = engine
        self._run_id = run_id
        self._count = 0

    async def save(
        self,
        transcript: list[Message],
        iteration: int,
        new: Sequence[Message],
        phases: list[str],
    ) -> None:
        run_id = self._run_id
        start = self._count
        rows = [(run_id, start + i, orjson.dumps(m)) for i, m in enumerate(new)]
        header = (
            run_id,
            iteration,
            orjson.dumps(phases),
            start + len(rows),
            datetime.now(UTC).isoformat(),
        )
        conn = self._engine.conn
        async with self._engine.lock:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                await conn.executemany("INSERT INTO floor_messages VALUES (?, ?, ?)", rows)
                await conn.execute(_FLOOR_SQLITE_UPSERT, header)
                await conn.execute("COMMIT")
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
        self._count = start + len(rows)


class _FloorPGRun(Run):
    def __init__(self, engine: Floor, run_id: str) -> None:
        self._engine = engine
        self._run_id = run_id
        self._count = 0

    async def save(
        self,
        transcript: list[Message],
        iteration: int,
        new: Sequence[Message],
        phases: list[str],
    ) -> None:
        run_id = self._run_id
        start = self._count
        rows = [(run_id, start + i, orjson.dumps(m)) for i, m in enumerate(new)]
        async with self._engine.pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                "INSERT INTO floor_messages (run_id, seq, data) VALUES ($1, $2, $3)", rows
            )
            await conn.execute(
                _FLOOR_PG_UPSERT, run_id, iteration, orjson.dumps(phases), start + len(rows)
            )
        self._count = start + len(rows)


async def _no_reset(conn: Any) -> None:
    """asyncpg's pool would otherwise send a reset query on every release."""


class Floor(Engine):
    """The raw drivers, delta-appending: the least a durable append can cost.

    SQLite: one aiosqlite connection, WAL + ``synchronous=FULL`` (as ours), autocommit mode
    with explicit ``BEGIN IMMEDIATE`` / ``executemany`` of the new rows / header UPSERT /
    ``COMMIT``, writes serialized by an ``asyncio.Lock`` (one connection, one writer).
    PostgreSQL: an asyncpg pool (max 15, no reset query on release), per save
    ``acquire`` / ``BEGIN`` / ``executemany`` / UPSERT / ``COMMIT``.
    """

    family = "floor"

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.dsn = ""
        self.conn: Any = None
        self.pool: Any = None
        self.lock = asyncio.Lock()

    async def setup(self) -> None:
        if isinstance(self.db, PostgresDatabase):
            import asyncpg

            self.dsn = await self.db.create_database(self.family)
            conn = await asyncpg.connect(self.dsn)
            try:
                await conn.execute(_FLOOR_PG_SCHEMA)
            finally:
                await conn.close()

    async def open(self, location: str) -> None:
        if self.backend == SQLITE:
            import aiosqlite

            self.conn = await aiosqlite.connect(location, isolation_level=None)
            await self.conn.execute("PRAGMA journal_mode = WAL")
            await self.conn.execute("PRAGMA synchronous = FULL")
            await self.conn.executescript(_FLOOR_SQLITE_SCHEMA)
            if "sqlite_pragmas" not in self.notes:
                async with self.conn.execute("PRAGMA synchronous") as cur:
                    sync = (await cur.fetchone())[0]
                self.notes["sqlite_pragmas"] = (
                    f"journal_mode=wal, synchronous={_SYNC_NAMES.get(int(sync), sync)}"
                )
        else:
            import asyncpg

            self.pool = await asyncpg.create_pool(
                location, min_size=1, max_size=PG_POOL_MAX, reset=_no_reset
            )

    async def begin(self, run_id: str) -> Run:
        if self.backend == SQLITE:
            return _FloorSQLiteRun(self, run_id)
        return _FloorPGRun(self, run_id)

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
            self.conn = None
        if self.pool is not None:
            await self.pool.close()
            self.pool = None


@functools.cache
def _lean_pg_save(count: int) -> str:
    """One save of ``count`` messages as one statement. The messages are listed as
    parameters: arrays of ``int``/``bytea`` would make asyncpg introspect their types on each
    new connection (7-25 ms, a floor should not pay that)."""
    values = ", ".join(f"({k}, ${5 + k}::bytea)" for k in range(count))
    return (
        "WITH m AS (INSERT INTO floor_messages (run_id, seq, data)"
        f" SELECT $1, $4 - {count} + x.k, x.d FROM (VALUES {values}) AS x(k, d))"
        " INSERT INTO floor_runs (run_id, iteration, completed_phases, message_count, updated_at)"
        " VALUES ($1, $2, $3, $4, now()) ON CONFLICT (run_id) DO UPDATE SET"
        " iteration = excluded.iteration, completed_phases = excluded.completed_phases,"
        " message_count = excluded.message_count, updated_at = excluded.updated_at"
    )


def _lean_sqlite_save(
    db: sqlite3.Connection, rows: list[tuple[str, int, bytes]], header: tuple[Any, ...]
) -> None:
    """One save's transaction, run in aiosqlite's worker thread on its ``sqlite3`` connection."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany("INSERT INTO floor_messages VALUES (?, ?, ?)", rows)
        db.execute(_FLOOR_SQLITE_UPSERT, header)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


class _LeanSQLiteRun(_FloorSQLiteRun):
    async def save(
        self,
        transcript: list[Message],
        iteration: int,
        new: Sequence[Message],
        phases: list[str],
    ) -> None:
        run_id = self._run_id
        start = self._count
        rows = [(run_id, start + i, orjson.dumps(m)) for i, m in enumerate(new)]
        header = (
            run_id,
            iteration,
            orjson.dumps(phases),
            start + len(rows),
            datetime.now(UTC).isoformat(),
        )
        conn = self._engine.conn
        # One call into the connection's thread; it runs one call at a time, so whole
        # transactions need no lock. (aiosqlite's private _execute: a bench may.)
        await conn._execute(_lean_sqlite_save, conn._conn, rows, header)
        self._count = start + len(rows)


class _LeanPGRun(_FloorPGRun):
    async def save(
        self,
        transcript: list[Message],
        iteration: int,
        new: Sequence[Message],
        phases: list[str],
    ) -> None:
        run_id = self._run_id
        start = self._count
        data = [orjson.dumps(m) for m in new]
        async with self._engine.pool.acquire() as conn:
            await conn.execute(
                _lean_pg_save(len(data)),
                run_id,
                iteration,
                orjson.dumps(phases),
                start + len(data),
                *data,
            )
        self._count = start + len(data)


class Lean(Floor):
    """The floor's writes in the fewest round trips: SQLite = the whole transaction as one
    call into aiosqlite's thread (``BEGIN IMMEDIATE``, ``executemany``, UPSERT, ``COMMIT`` on
    the ``sqlite3`` connection there); PostgreSQL = one statement per save (the messages'
    INSERT, from a ``VALUES`` list, in a CTE of the header UPSERT: one round trip, atomic on
    its own)."""

    family = "lean"

    async def begin(self, run_id: str) -> Run:
        if self.backend == SQLITE:
            return _LeanSQLiteRun(self, run_id)
        return _LeanPGRun(self, run_id)


ENGINE_TYPES: dict[str, type[Engine]] = {
    "ours": Ours,
    "langgraph": LangGraph,
    "floor": Floor,
    "lean": Lean,
}


def sqlite_version() -> str:
    return sqlite3.sqlite_version
