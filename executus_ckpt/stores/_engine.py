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
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ..config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_OPERATION_TIMEOUT,
    DEFAULT_SQLITE_BUSY_TIMEOUT,
)
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


def create_engine(
    url: str,
    engine_options: dict[str, Any] | None = None,
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    operation_timeout: float | None = DEFAULT_OPERATION_TIMEOUT,
) -> AsyncEngine:
    """A new engine for ``url`` with the pool settings and timeouts the library relies on
    (``operation_timeout=None``: statements and pool checkouts are not bounded).

    A password given as ``?password=`` moves into the URL's password field, so that every
    rendering of the URL (SQLAlchemy's own included) masks it.
    """
    options = dict(engine_options or {})
    parsed = _password_in_place(make_url(url))
    if parsed.get_backend_name() == "postgresql":
        connect_args = dict(options.get("connect_args") or {})
        # asyncpg: `timeout` bounds connecting, `command_timeout` every statement (the raw
        # fast path's too); the store bounds the whole operation on top of these.
        connect_args.setdefault("timeout", connect_timeout)
        connect_args.setdefault("command_timeout", operation_timeout)
        options["connect_args"] = connect_args
    if "poolclass" not in options:  # NullPool & co. take no pool_timeout
        options.setdefault("pool_timeout", operation_timeout)
    # No pool_pre_ping: on asyncpg it costs three round trips per checkout. A connection that
    # died is invalidated by the error it raises, and the pool reconnects.
    if parsed.get_backend_name() == "sqlite":
        # Every path of ours ends its own transaction (SQLAlchemy's Connection rolls back on
        # close what it began), so the pool's extra reset is a wasted thread hop.
        options.setdefault("pool_reset_on_return", None)
    engine = create_async_engine(parsed, **options)
    if parsed.get_backend_name() == "postgresql":
        discard_closed_connections(engine)
    return engine


def discard_closed_connections(engine: AsyncEngine) -> None:
    """Never hand out a pooled asyncpg connection that the server or the network closed.

    asyncpg notices a closed socket (``pg_terminate_backend``, a restart, a reset) on its own,
    without a round trip: at checkout such a connection is dropped, and with it every
    connection the pool held at the time (they most likely died together), so that one
    outage fails no caller for a dead connection (no ``pool_pre_ping`` round trips either).
    The store's raw-driver appends bypass SQLAlchemy's own disconnect handling: this covers
    them too.
    """

    @event.listens_for(engine.sync_engine, "checkout")
    def _check_open(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        driver = getattr(dbapi_connection, "driver_connection", None)
        if driver is not None and driver.is_closed():
            raise sa_exc.InvalidatePoolError("pooled connection closed by the server or network")


def _password_in_place(url: URL) -> URL:
    password = url.query.get("password")
    if password is None or url.password is not None:
        return url
    value = password if isinstance(password, str) else password[-1]
    return url.difference_update_query(["password"]).set(password=value)


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


def create_private_file(engine: AsyncEngine) -> None:
    """Create a missing SQLite file readable by its owner only (0600): transcripts hold user
    data. SQLite creates the ``-wal`` and ``-shm`` files with the database file's mode. An
    existing file's mode is left as it is."""
    path = _sqlite_path(engine)
    if path is None or os.path.exists(path):
        return
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:  # created meanwhile by another process: theirs to set
        return
    os.close(fd)


def file_identity(engine: AsyncEngine) -> tuple[int, int] | None:
    """(device, inode) of the SQLite file the engine opens, or None (no file, not SQLite)."""
    path = _sqlite_path(engine)
    if path is None:
        return None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def check_file_identity(engine: AsyncEngine, expected: tuple[int, int]) -> None:
    """Raise :class:`StoreUnavailableError` if the SQLite path no longer names the file the
    store opened (deleted or replaced under it): writes would go to an unlinked file and be
    lost at the next open."""
    if file_identity(engine) != expected:
        raise StoreUnavailableError(
            f"SQLite database {_sqlite_path(engine)!r} was deleted or replaced while the store "
            "had it open: writes would be lost; restore the file or restart the service"
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
