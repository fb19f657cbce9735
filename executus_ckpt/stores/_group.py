"""Group commit: queued writes of many callers share one transaction and one fsync.

SQLite has one writer at a time and pays an fsync per commit (``synchronous=FULL``). When many
runs save at once, running each save in its own transaction serializes them on that fsync.
Here the first write to arrive starts a drainer task, owned by the store, that takes every
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from ..errors import CheckpointError, StoreUnavailableError

logger = logging.getLogger(__name__)

T = TypeVar("T")
Operation = Callable[[AsyncConnection], Awaitable[T]]


RawOperation = Callable[[Any], Awaitable[T]]
"""An operation on the raw driver connection (aiosqlite), inside the batch's transaction."""


@dataclass(slots=True)
class _Pending(Generic[T]):
    op: Callable[[Any], Awaitable[T]]
    future: asyncio.Future[T]
    action: str
    run_id: str | None
    raw: bool = False


class GroupCommitter:
    """Serializes writes through one owned drainer task, batching them per transaction."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[AsyncConnection]],
        map_error: Callable[[str, str | None, BaseException], BaseException],
        *,
        max_batch: int = 64,
    ) -> None:
        # One connection, checked out by the drainer and kept while writes keep coming (no
        # checkout and reset per batch); returned when the queue is empty, dropped after a
        # failed batch.
        self._connect = connect
        self._conn: AsyncConnection | None = None
        self._map_error = map_error
        self._max_batch = max_batch
        self._queue: deque[_Pending[Any]] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self.batches = 0
        self.operations = 0

    async def submit(self, action: str, run_id: str | None, op: Operation[T]) -> T:
        """Run ``op(conn)`` in the next shared transaction; returns once it is committed.

        Cancelling the caller does not cancel the write (it is finished with its batch).
        """
        return await self._enqueue(_Pending(op, self._future(), action, run_id))

    async def submit_raw(self, action: str, run_id: str | None, op: RawOperation[T]) -> T:
        """As :meth:`submit`, for an operation on the raw driver connection. A batch made only
        of these runs on the driver alone (``BEGIN IMMEDIATE`` … ``COMMIT``): the fewest
        thread hops per save."""
        return await self._enqueue(_Pending(op, self._future(), action, run_id, raw=True))

    @staticmethod
    def _future() -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _enqueue(self, pending: _Pending[T]) -> T:
        loop = asyncio.get_running_loop()
        future = pending.future
        self._queue.append(pending)
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain(), name="executus_ckpt.group_commit")
        return await asyncio.shield(future)

    async def aclose(self) -> None:
        """Wait for queued writes to finish, then close the connection."""
        if self._drainer is not None and not self._drainer.done():
            await asyncio.wait([self._drainer])
        await self._close_connection()

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
            # this same drainer: submit() only starts a new one once this one is done.
            await self._close_connection()
            if not self._queue:
                return

    async def _run(self, batch: list[_Pending[Any]]) -> None:
        results: list[tuple[Any, BaseException | None]] = []
        try:
            if self._conn is None:
                self._conn = await self._connect()
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
                mapped = (
                    exc
                    if isinstance(exc, CheckpointError)
                    else self._map_error(item.action, item.run_id, exc)
                )
                _settle(item.future, error=mapped)
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
