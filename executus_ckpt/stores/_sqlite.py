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
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..errors import CheckpointError, StoreUnavailableError
from ..schema import UTCDateTime
from ..schema import run_checkpoint_messages as messages_table
from . import _rows
from ._backend import Append, Operation, T
from ._engine import WRITE_OPTIONS

logger = logging.getLogger(__name__)

RawOperation = Callable[[Any], Awaitable[T]]
"""An operation on the raw driver connection (aiosqlite), inside the batch's transaction."""

_SET = _rows.APPENDED
_TIMES = frozenset(c for c in _SET if isinstance(_rows.header.c[c].type, UTCDateTime))
_UPDATE = (
    f"UPDATE {_rows.header.name} SET "
    + ", ".join(f"{c} = ?" for c in _SET)
    + ", size_bytes = size_bytes + ? "
    "WHERE run_id = ? AND epoch <= ? AND message_count = ? AND size_bytes + ? <= ?"
)
_INSERT = f"INSERT INTO {messages_table.name} (run_id, seq, data) VALUES (?, ?, ?)"


def sqlite_time(value: datetime) -> str:
    """A UTC time as SQLAlchemy's SQLite ``DATETIME`` stores it (so Core reads it back)."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


async def _append(connection: Any, a: Append) -> bool:
    """Two driver calls inside the caller's write transaction (``connection``: aiosqlite)."""
    header = [sqlite_time(a.values[c]) if c in _TIMES else a.values[c] for c in _SET]
    cursor = await connection.execute(
        _UPDATE, (*header, a.size, a.run_id, a.epoch, a.base, a.size, a.max_bytes)
    )
    if cursor.rowcount != 1:
        return False
    if a.rows:
        await connection.executemany(
            _INSERT, [(a.run_id, a.base + i, d) for i, d in enumerate(a.rows)]
        )
    return True


@dataclass(slots=True)
class _Pending(Generic[T]):
    op: Callable[[Any], Awaitable[T]]
    future: asyncio.Future[T]
    raw: bool = False


class SQLiteBackend:
    """Serializes this process's writes through one owned drainer, batching them per
    transaction; reads use the pool."""

    def __init__(self, engine: AsyncEngine, *, max_batch: int = 64) -> None:
        self._engine = engine
        self._write_engine = engine.execution_options(**WRITE_OPTIONS)
        # One connection, checked out by the drainer and kept while writes keep coming (no
        # checkout and reset per batch); returned when the queue is empty, dropped after a
        # failed batch.
        self._conn: AsyncConnection | None = None
        self._max_batch = max_batch
        self._queue: deque[_Pending[Any]] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self.batches = 0
        self.operations = 0

    # -- Backend -------------------------------------------------------------------------

    async def write(self, op: Operation[T]) -> T:
        """Run ``op(conn)`` in the next shared transaction; returns once it is committed.

        Cancelling the caller does not cancel the write (it is finished with its batch).
        """
        return await self._enqueue(_Pending(op, self._future()))

    @asynccontextmanager
    async def read(self, *, snapshot: bool) -> AsyncIterator[AsyncConnection]:
        async with self._engine.connect() as conn:
            if not snapshot:
                yield conn
                return
            async with conn.begin():
                yield conn

    async def append(self, append: Append) -> bool:
        """The append as a raw operation: a batch made only of these runs on the driver alone
        (``BEGIN IMMEDIATE`` … ``COMMIT``), the fewest thread hops per save."""

        async def op(driver: Any) -> bool:
            return await _append(driver, append)

        return await self._enqueue(_Pending(op, self._future(), raw=True))

    async def aclose(self) -> None:
        """Wait for queued writes to finish, then close the connection."""
        if self._drainer is not None and not self._drainer.done():
            await asyncio.wait([self._drainer])
        await self._close_connection()

    # -- the drainer ---------------------------------------------------------------------

    @staticmethod
    def _future() -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _enqueue(self, pending: _Pending[T]) -> T:
        self._queue.append(pending)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(
                self._drain(), name="executus_ckpt.group_commit"
            )
        return await asyncio.shield(pending.future)

    async def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def _drain(self) -> None:
        while True:
            while self._queue:
                batch = [
                    self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))
                ]
                try:
                    await self._run(batch)
                except asyncio.CancelledError:
                    # Only at loop shutdown: tell the waiters, then stop.
                    error = StoreUnavailableError(
                        "write cancelled: the event loop is shutting down"
                    )
                    for item in [*batch, *self._queue]:
                        _settle(item.future, error=error)
                    self._queue.clear()
                    await self._discard_connection()
                    raise
            # Idle: give the connection back to the pool (a store over a borrowed engine is
            # not required to be closed). Writes queued while it is returned are taken by
            # this same drainer: _enqueue() only starts a new one once this one is done.
            await self._close_connection()
            if not self._queue:
                return

    async def _run(self, batch: list[_Pending[Any]]) -> None:
        results: list[tuple[Any, BaseException | None]] = []
        try:
            if self._conn is None:
                self._conn = await self._write_engine.connect()
            conn = self._conn
            if all(item.raw for item in batch):
                raw: Any = (await conn.get_raw_connection()).driver_connection
                await raw.execute("BEGIN IMMEDIATE")
                try:
                    for item in batch:
                        results.append(await self._call(item, raw))
                    await raw.execute("COMMIT")
                except BaseException:
                    if raw.in_transaction:
                        await raw.execute("ROLLBACK")
                    raise
            else:
                async with conn.begin():
                    driver: Any = None
                    for item in batch:
                        if item.raw and driver is None:
                            driver = (await conn.get_raw_connection()).driver_connection
                        results.append(await self._call(item, driver if item.raw else conn))
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
        if len(batch) > 1:
            logger.debug("group commit of %d writes", len(batch))
        for item, (value, failure) in zip(batch, results, strict=True):
            _settle(item.future, value=value, error=failure)

    @staticmethod
    async def _call(item: _Pending[Any], conn: Any) -> tuple[Any, BaseException | None]:
        try:
            return await item.op(conn), None
        except CheckpointError as exc:  # raised before the op wrote anything
            return None, exc

    async def _discard_connection(self) -> None:
        """After a failed batch: drop the connection (its state is unknown); reopen later."""
        conn, self._conn = self._conn, None
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
