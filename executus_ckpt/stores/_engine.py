"""Engines: create one for a URL, prepare SQLite connections, refuse hopeless SQLite paths.

Used by the store and by :func:`executus_ckpt.migrate` alike, so that a migration runs on
connections set up exactly as the store's (durability pragmas, ``BEGIN IMMEDIATE``) without
building a store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ..config import DEFAULT_SQLITE_BUSY_TIMEOUT
from ..errors import CheckpointError, StoreUnavailableError

SQLiteSynchronous = Literal["FULL", "NORMAL", "EXTRA"]

_WRITE_OPTION = "executus_ckpt_write"
_SETTINGS = "_executus_ckpt_sqlite"
_APPLIED = "executus_ckpt_pragmas"

WRITE_OPTIONS: dict[str, Any] = {_WRITE_OPTION: True}
"""Execution options that mark a connection's transactions as writes (``BEGIN IMMEDIATE``)."""


def dialect_of(engine: AsyncEngine) -> Literal["sqlite", "postgresql"]:
    """The engine's backend, or :class:`CheckpointError` for one we do not support."""
    name = engine.dialect.name
    if name not in ("sqlite", "postgresql"):
        raise CheckpointError(
            f"unsupported database {name!r}: use sqlite+aiosqlite or postgresql+asyncpg"
        )
    return "sqlite" if name == "sqlite" else "postgresql"


def create_engine(url: str, engine_options: dict[str, Any] | None = None) -> AsyncEngine:
    """A new engine for ``url`` with the pool settings the library relies on."""
    options = dict(engine_options or {})
    # No pool_pre_ping: on asyncpg it costs three round trips per checkout. A connection that
    # died is invalidated by the error it raises, and the pool reconnects.
    if make_url(url).get_backend_name() == "sqlite":
        # Every path of ours ends its own transaction (SQLAlchemy's Connection rolls back on
        # close what it began), so the pool's extra reset is a wasted thread hop.
        options.setdefault("pool_reset_on_return", None)
    return create_async_engine(url, **options)


def _sqlite_path(engine: AsyncEngine) -> str | None:
    """The file of a SQLite file database; None for memory and URI filenames."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:"):  # URI filenames: leave them to SQLite
        return None
    return database


def sqlite_file_missing(engine: AsyncEngine) -> bool:
    """True for a SQLite file database that does not exist yet (connecting would create it)."""
    path = _sqlite_path(engine)
    return path is not None and not os.path.exists(path)


def preflight(engine: AsyncEngine) -> None:
    """Refuse a SQLite file whose directory does not exist, before connecting.

    aiosqlite's worker thread outlives a failed connect and can crash on a closed loop
    (omnilib/aiosqlite#241); a missing directory is the common cause, so catch it here.

    Raises:
        StoreUnavailableError: the SQLite file cannot be created there.
    """
    path = _sqlite_path(engine)
    if path is None:
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise StoreUnavailableError(
            f"SQLite database {path!r} cannot be opened: directory {parent!r} does not "
            "exist (create it, or fix the URL)"
        )


@dataclass(slots=True)
class _SQLiteSettings:
    synchronous: SQLiteSynchronous = "FULL"
    busy_timeout: float = DEFAULT_SQLITE_BUSY_TIMEOUT
    generation: int = 0


def configure_sqlite(
    engine: AsyncEngine,
    *,
    synchronous: SQLiteSynchronous | None = None,
    busy_timeout: float | None = None,
) -> None:
    """Make the engine's SQLite connections durable and lock-safe.

    - WAL journal with the chosen ``synchronous`` level, a busy timeout, foreign keys on;
    - SQLAlchemy, not the driver, emits BEGIN (the documented recipe), so that writes can begin
      with ``BEGIN IMMEDIATE``: a deferred transaction that reads, then writes, fails with
      SQLITE_BUSY at once when another connection committed in between, busy timeout or not.

    The hooks are installed once per engine; ``None`` keeps the current setting (the
    defaults on a fresh engine), so :func:`migrate` can prepare an engine that a store with
    other options uses later. A changed setting reaches every pooled connection at its next
    checkout.
    """
    if engine.dialect.name != "sqlite":
        return
    if synchronous is not None and synchronous not in ("FULL", "NORMAL", "EXTRA"):
        raise ValueError(f"sqlite_synchronous must be FULL, NORMAL or EXTRA, got {synchronous!r}")
    sync_engine = engine.sync_engine
    settings: _SQLiteSettings | None = getattr(sync_engine, _SETTINGS, None)
    if settings is None:
        settings = _SQLiteSettings()
        setattr(sync_engine, _SETTINGS, settings)
        _install_hooks(sync_engine, settings)
    wanted = (
        synchronous or settings.synchronous,
        settings.busy_timeout if busy_timeout is None else busy_timeout,
    )
    if wanted != (settings.synchronous, settings.busy_timeout):
        settings.synchronous, settings.busy_timeout = wanted
        settings.generation += 1


def _install_hooks(sync_engine: Any, settings: _SQLiteSettings) -> None:
    @event.listens_for(sync_engine, "checkout")
    def _prepare(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if record.info.get(_APPLIED) == settings.generation:
            return
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(settings.busy_timeout * 1000)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute(f"PRAGMA synchronous = {settings.synchronous}")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()
        record.info[_APPLIED] = settings.generation

    @event.listens_for(sync_engine, "begin")
    def _begin(conn: Connection) -> None:
        write = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
