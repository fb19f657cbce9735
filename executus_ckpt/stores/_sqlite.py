"""SQLite (aiosqlite): one group-committing writer per process, appends on the raw driver.

SQLite has one writer at a time and pays an fsync per commit (``synchronous=FULL``). When many
runs save at once, running each save in its own transaction serializes them on that fsync.
Here the first write to arrive starts a drainer task, owned by the backend, that takes every
write queued so far and runs them in one transaction; writes that arrive meanwhile form the
next batch. A caller's future is resolved only after the commit that contains its write, so a
``save`` still returns only once its own state is durable.

An operation that raises a :class:`CheckpointError` must do so before it writes anything (the
store's operations validate, then write): the batch goes on without it. Any other error rolls
back the whole batch and every caller in it gets the error; nothing is half-written.

A batch made only of appends (the save hot path) is one call into aiosqlite's worker thread:
``BEGIN IMMEDIATE``, each append's ``UPDATE`` and ``executemany``, ``COMMIT``, run there by
one function on the ``sqlite3`` connection. Each call into that thread costs a queue hand-off
and an event-loop wake-up (about as much as SQLite's own work for a small append), so one
call instead of four is what brings a save near the raw driver's floor (bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import sqlite3
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .. import telemetry
from ..errors import CheckpointError, StoreUnavailableError
from ..schema import UTCDateTime
from ..schema import run_checkpoint_messages as messages_table
from . import _rows
from ._backend import Append, Operation, T, boundary_sets, checkout_listeners
from ._engine import WRITE_OPTIONS

logger = logging.getLogger(__name__)

_SET = _rows.APPENDED
_TIMES = frozenset(c for c in _SET if isinstance(_rows.header.c[c].type, UTCDateTime))


def _update_sql(columns: tuple[str, ...]) -> str:
    return (
        f"UPDATE {_rows.header.name} SET "
        + ", ".join(f"{c} = :{c}" for c in columns)
        + ", size_bytes = size_bytes + :add_size, "
        + boundary_sets(lambda c: f":{c}")
        + " WHERE run_id = :run_id AND epoch <= :epoch AND message_count = :base "
        "AND size_bytes + :add_size <= :max_bytes"
    )


_UPDATE = {identity: _update_sql(_rows.appended(identity)) for identity in (True, False)}
"""The append's header update, with the identity columns (True) or leaving them as stored."""
_INSERT = f"INSERT INTO {messages_table.name} (run_id, seq, data) VALUES (?, ?, ?)"

LINGER = 0.005
"""Seconds the drainer keeps its connection once its queue is empty: a write that follows
right behind (a run's next save, issued as soon as the last one returned) reuses it instead
of checking one out again, which costs about 0.1 ms of event-loop CPU, as much as the rest of
an append. Longer would hold a pooled connection for nothing between an agent's steps."""


def sqlite_time(value: datetime) -> str:
    """A UTC time as SQLAlchemy's SQLite ``DATETIME`` stores it (so Core reads it back)."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _parameters(a: Append) -> dict[str, Any]:
    columns = _rows.appended(a.identity)
    values = {c: sqlite_time(a.values[c]) if c in _TIMES else a.values[c] for c in columns}
    values.update(
        run_id=a.run_id, epoch=a.epoch, base=a.base, add_size=a.size, max_bytes=a.max_bytes
    )
    return values


def _rows_of(a: Append) -> list[tuple[str, int, bytes]]:
    return [(a.run_id, a.base + i, d) for i, d in enumerate(a.rows)]


def _apply(db: sqlite3.Connection, appends: Sequence[Append], begin: bool) -> list[bool]:
    """The appends on the ``sqlite3`` connection, in aiosqlite's worker thread; with ``begin``
    in a transaction of their own (``BEGIN IMMEDIATE`` … ``COMMIT``), else inside the one
    the connection is in. Returns whether each one's guard matched."""
    if begin:
        db.execute("BEGIN IMMEDIATE")
    try:
        applied: list[bool] = []
        for a in appends:
            ok = db.execute(_UPDATE[a.identity], _parameters(a)).rowcount == 1
            if ok and a.rows:
                db.executemany(_INSERT, _rows_of(a))
            applied.append(ok)
        if begin:
            db.execute("COMMIT")
    except BaseException:
        if begin and db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return applied


async def _apply_in_hops(driver: Any, appends: Sequence[Append], begin: bool) -> list[bool]:
    """:func:`_apply` through aiosqlite's public API: one call into its thread per statement
    (the fallback when :func:`one_hop_class` is None)."""
    if begin:
        await driver.execute("BEGIN IMMEDIATE")
    try:
        applied: list[bool] = []
        for a in appends:
            cursor = await driver.execute(_UPDATE[a.identity], _parameters(a))
            ok = cursor.rowcount == 1
            if ok and a.rows:
                await driver.executemany(_INSERT, _rows_of(a))
            applied.append(ok)
        if begin:
            await driver.execute("COMMIT")
    except BaseException:
        if begin and driver.in_transaction:
            await driver.execute("ROLLBACK")
        raise
    return applied


@functools.cache
def one_hop_class() -> type | None:
    """``aiosqlite.Connection`` if it has the private API the one-hop path uses, else None.

    ``aiosqlite.Connection._execute(fn, *args)`` runs ``fn(*args)`` in the connection's
    worker thread and returns its result (every public method of aiosqlite reaches that
    thread through it; checked with aiosqlite 0.22), and ``Connection._conn`` is the
    ``sqlite3`` connection. Both are private: checked once, on the first append, and without
    them appends take the public path (one call per statement, four per save).
    ``tests/integration/test_group_commit.py`` fails if the fast path stops being used, so an
    aiosqlite upgrade that drops it is noticed rather than silently slower.
    """
    import aiosqlite  # here, not at import: `import executus_ckpt` stays light

    cls = aiosqlite.Connection
    execute = getattr(cls, "_execute", None)
    if not inspect.iscoroutinefunction(execute) or not isinstance(
        getattr(cls, "_conn", None), property
    ):
        return None
    try:
        params = inspect.signature(execute).parameters.values()
    except (TypeError, ValueError):
        return None
    if not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return None
    return cls


async def _run_appends(driver: Any, appends: Sequence[Append], *, begin: bool) -> list[bool]:
    cls = one_hop_class()
    if cls is not None and isinstance(driver, cls):
        connection: Any = driver  # private and untyped: see one_hop_class()
        result: list[bool] = await connection._execute(_apply, connection._conn, appends, begin)
        return result
    return await _apply_in_hops(driver, appends, begin)


@dataclass(slots=True)
class _Pending:
    """A queued write: a Core operation (``op``) or an append (``append``)."""

    future: asyncio.Future[Any]
    op: Operation[Any] | None = None
    append: Append | None = None
    batch: int = 0
    """Writes in the transaction that committed it (set by the drainer, for telemetry)."""


class SQLiteBackend:
    """Serializes this process's writes through one owned drainer, batching them per
    transaction; reads use the pool."""

    def __init__(self, engine: AsyncEngine, *, max_batch: int = 64) -> None:
        self._engine = engine
        self._write_engine = engine.execution_options(**WRITE_OPTIONS)
        # One connection, checked out by the drainer and kept while writes keep coming (no
        # checkout per batch); returned when the queue stays empty for LINGER seconds,
        # dropped after a failed batch. ``_driver`` is its aiosqlite connection.
        self._conn: AsyncConnection | None = None
        self._driver: Any = None
        self._listeners: tuple[Any, ...] = ()  # checkout listeners at its checkout
        self._max_batch = max_batch
        self._queue: deque[_Pending] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None  # set while the drainer lingers
        self._closing = False
        self.batches = 0
        self.operations = 0

    # -- Backend -------------------------------------------------------------------------

    async def write(self, op: Operation[T]) -> T:
        """Run ``op(conn)`` in the next shared transaction; returns once it is committed.

        Cancelling the caller does not cancel the write (it is finished with its batch).
        """
        pending = _Pending(self._future(), op=op)
        result: T = await self._enqueue(pending)
        telemetry.note_batch(pending.batch)
        return result

    @asynccontextmanager
    async def read(self, *, snapshot: bool) -> AsyncIterator[AsyncConnection]:
        async with self._engine.connect() as conn:
            if not snapshot:
                yield conn
                return
            async with conn.begin():
                yield conn

    async def append(self, append: Append, timeout: float) -> bool:  # noqa: ASYNC109
        """Queue the append; a batch made only of appends runs as one call into the driver's
        thread (``BEGIN IMMEDIATE`` … ``COMMIT``)."""
        pending = _Pending(self._future(), append=append)
        async with asyncio.timeout(timeout):
            applied: bool = await self._enqueue(pending)
        telemetry.note_batch(pending.batch)
        return applied

    async def aclose(self) -> None:
        """Wait for queued writes to finish, then close the connection."""
        self._closing = True
        try:
            self._wake_drainer()
            if self._drainer is not None and not self._drainer.done():
                await asyncio.wait([self._drainer])
            await self._close_connection()
        finally:
            self._closing = False

    # -- the drainer ---------------------------------------------------------------------

    @staticmethod
    def _future() -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _enqueue(self, pending: _Pending) -> Any:
        self._queue.append(pending)
        self._wake_drainer()
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(
                self._drain(), name="executus_ckpt.group_commit"
            )
        # Not shielded: cancelling the caller cancels only this future, never its write (the
        # drainer finishes the batch and skips a cancelled future); a shield would cost
        # another loop turn per save.
        return await pending.future

    async def _close_connection(self) -> None:
        conn, self._conn, self._driver = self._conn, None, None
        if conn is not None:
            await conn.close()

    async def _drain(self) -> None:
        batch: list[_Pending] = []
        try:
            while True:
                while self._queue:
                    batch = [
                        self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))
                    ]
                    await self._run(batch)
                    batch = []
                if await self._linger():
                    continue
                # Idle: give the connection back to the pool (a store over a borrowed engine
                # is not required to be closed). Writes queued while it is returned are taken
                # by this same drainer: _enqueue() only starts a new one once this one is done.
                await self._close_connection()
                if not self._queue:
                    return
        except asyncio.CancelledError:
            # Only at loop shutdown: tell the waiters, then stop.
            error = StoreUnavailableError("write cancelled: the event loop is shutting down")
            for item in [*batch, *self._queue]:
                _settle(item.future, error=error)
            self._queue.clear()
            await self._discard_connection()
            raise

    async def _linger(self) -> bool:
        """Wait up to :data:`LINGER` seconds for another write; True if one was queued."""
        if self._closing or self._conn is None:
            return bool(self._queue)
        loop = asyncio.get_running_loop()
        wake = self._wake = loop.create_future()
        timer = loop.call_later(LINGER, _settle, wake)
        try:
            await wake
        finally:
            timer.cancel()
            self._wake = None
        return bool(self._queue)

    def _wake_drainer(self) -> None:
        if self._wake is not None:
            _settle(self._wake)

    async def _connection(self) -> tuple[AsyncConnection, Any]:
        """The held connection and its aiosqlite connection, checked out if needed."""
        listeners = checkout_listeners(self._engine)
        if self._conn is not None and listeners != self._listeners:
            await self._close_connection()  # let the new checkout listeners see it
        if self._conn is None:
            self._listeners = listeners
            conn = await self._write_engine.connect()
            try:
                self._driver = (await conn.get_raw_connection()).driver_connection
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
        return self._conn, self._driver

    async def _run(self, batch: list[_Pending]) -> None:
        results: list[tuple[Any, BaseException | None]]
        try:
            conn, driver = await self._connection()
            if all(item.op is None for item in batch):
                appends = [item.append for item in batch if item.append is not None]
                applied = await _run_appends(driver, appends, begin=True)
                results = [(ok, None) for ok in applied]
            else:
                async with conn.begin():
                    results = await self._run_mixed(conn, driver, batch)
        except asyncio.CancelledError:
            await self._discard_connection()
            raise
        except BaseException as exc:
            await self._discard_connection()
            for item in batch:
                _settle(item.future, error=exc)
            if not isinstance(exc, Exception):
                raise
            return
        self.batches += 1
        self.operations += len(batch)
        size = len(batch)
        if size > 1:
            logger.debug("group commit of %d writes", size)
        telemetry.record_batch("sqlite", size)
        for item, (value, failure) in zip(batch, results, strict=True):
            item.batch = size
            _settle(item.future, value=value, error=failure)

    @staticmethod
    async def _run_mixed(
        conn: AsyncConnection, driver: Any, batch: Sequence[_Pending]
    ) -> list[tuple[Any, BaseException | None]]:
        """Core operations and appends, in order, inside the transaction ``conn`` is in; each
        run of consecutive appends is one call into the driver's thread."""
        results: list[tuple[Any, BaseException | None]] = []
        appends: list[Append] = []

        async def flush() -> None:
            if appends:
                applied = await _run_appends(driver, appends, begin=False)
                results.extend((ok, None) for ok in applied)
                appends.clear()

        for item in batch:
            if item.append is not None:
                appends.append(item.append)
                continue
            await flush()
            assert item.op is not None
            try:
                results.append((await item.op(conn), None))
            except CheckpointError as exc:  # raised before the op wrote anything
                results.append((None, exc))
        await flush()
        return results

    async def _discard_connection(self) -> None:
        """After a failed batch: drop the connection (its state is unknown); reopen later."""
        conn, self._conn, self._driver = self._conn, None, None
        if conn is None:
            return
        try:
            await conn.invalidate()
        except Exception:  # already broken: nothing more to release
            logger.debug("could not invalidate the group-commit connection", exc_info=True)


def _settle(
    future: asyncio.Future[Any], *, value: Any = None, error: BaseException | None = None
) -> None:
    if future.done():  # the caller was cancelled: nobody waits for this result
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
