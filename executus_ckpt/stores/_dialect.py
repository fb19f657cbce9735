"""The few things that differ between SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Table, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

_WRITE_OPTION = "executus_ckpt_write"
_PRAGMAS_APPLIED = "executus_ckpt_pragmas"
_HOOKED = "_executus_ckpt_sqlite_hooks"

Insert = sqlite.Insert | postgresql.Insert


def insert_for(dialect: str) -> Callable[[Table], Any]:
    """The dialect's ``INSERT`` construct with ``on_conflict_do_update`` (upsert)."""
    return sqlite.insert if dialect == "sqlite" else postgresql.insert


def write_options() -> dict[str, Any]:
    """Execution options that mark a connection's transactions as writes."""
    return {_WRITE_OPTION: True}


def install_sqlite_hooks(engine: AsyncEngine, *, synchronous: str, busy_timeout: float) -> None:
    """Make the engine's SQLite connections durable and lock-safe (idempotent per engine).

    - WAL journal with the chosen ``synchronous`` level, a busy timeout, foreign keys on;
    - SQLAlchemy, not the driver, emits BEGIN (the documented recipe), so that writes can begin
      with ``BEGIN IMMEDIATE``: a deferred transaction that reads, then writes, fails with
      SQLITE_BUSY at once when another connection committed in between, busy timeout or not.
    Pragmas are applied on a connection's first checkout, so a borrowed engine's existing pool
    gets them too.
    """
    sync_engine = engine.sync_engine
    if getattr(sync_engine, _HOOKED, None) == (synchronous, busy_timeout):
        return
    if getattr(sync_engine, _HOOKED, None) is not None:
        raise ValueError(
            "this engine already serves an SQLCheckpointStore with other SQLite options"
        )
    setattr(sync_engine, _HOOKED, (synchronous, busy_timeout))
    timeout_ms = int(busy_timeout * 1000)

    @event.listens_for(sync_engine, "checkout")
    def _prepare(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if record.info.get(_PRAGMAS_APPLIED):
            return
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {timeout_ms}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute(f"PRAGMA synchronous = {synchronous}")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()
        record.info[_PRAGMAS_APPLIED] = True

    @event.listens_for(sync_engine, "begin")
    def _begin(conn: Connection) -> None:
        write = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
