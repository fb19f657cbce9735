"""PostgreSQL (asyncpg): pooled write transactions, and appends batched into one statement.

Most saves of a run append a few messages to a transcript the store already holds. Built as
SQLAlchemy statements that costs ~3 ms of Python per save and several extra round trips
(bench/RESULTS.md); here it is one prepared statement on the connection SQLAlchemy's pool
hands out, and appends of concurrent runs share one statement (group commit). Everything
else stays on SQLAlchemy Core.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .. import telemetry
from ..schema import run_checkpoint_messages as messages_table
from . import _rows
from ._backend import Append, Operation, T, boundary_sets, checkout_listeners
from ._errors import is_bad_data

_H = _rows.header.name
_M = messages_table.name
_SET = _rows.APPENDED


def _batch_sql() -> str:
    cols = ["run_id", *_SET, "add_size", "base", "max_bytes"]
    types = [
        _rows.PG_TYPES["run_id"],
        *(_rows.PG_TYPES[c] for c in _SET),
        "BIGINT",
        "INT",
        "BIGINT",
    ]
    arrays = ", ".join(f"${i}::{ty}[]" for i, ty in enumerate(types, start=1))
    n = len(cols)
    sets = ", ".join(f"{c} = v.{c}" for c in _SET)
    return (
        f"WITH v AS (SELECT * FROM unnest({arrays}) AS v({', '.join(cols)})), "
        f"h AS (UPDATE {_H} AS t SET {sets}, size_bytes = t.size_bytes + v.add_size, "
        f"{boundary_sets(lambda c: f'v.{c}', 't.')} "
        "FROM v WHERE t.run_id = v.run_id AND t.epoch <= v.epoch "
        "AND t.message_count = v.base AND t.size_bytes + v.add_size <= v.max_bytes "
        "RETURNING t.run_id), "
        f"ins AS (INSERT INTO {_M} (run_id, seq, data) "
        f"SELECT x.r, x.s, x.d FROM unnest(${n + 1}::text[], ${n + 2}::int[], "
        f"${n + 3}::bytea[]) AS x(r, s, d) WHERE x.r IN (SELECT run_id FROM h)) "
        "SELECT run_id FROM h"
    )


VALUES_MAX = 16
"""Appends of up to this many messages list them as parameters (``VALUES``) rather than as
arrays: asyncpg has no built-in codec for ``int[]`` or ``bytea[]`` and introspects them, once
per connection, with a catalog query that takes 7-25 ms (the first save on every new pooled
connection, so the first save of a run on a fresh store). Scalars need none."""


@functools.cache
def _single_sql(count: int | None) -> str:
    """The one-statement append of ``count`` messages (``None``: any number, as arrays)."""
    sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(_SET, start=2))
    n = len(_SET) + 2
    base = f"${n + 1}"
    if count is None:
        rows = f"unnest(${n + 3}::bytea[]) WITH ORDINALITY AS x(d, k)"
        select = f"SELECT $1, {base} + x.k::int - 1, x.d FROM {rows}"
    else:
        values = ", ".join(f"({k}, ${n + 3 + k}::bytea)" for k in range(count))
        select = f"SELECT $1, {base} + x.k, x.d FROM (VALUES {values}) AS x(k, d)"
    insert = (
        f", ins AS (INSERT INTO {_M} (run_id, seq, data) {select} WHERE EXISTS (SELECT 1 FROM h))"
        if count != 0
        else ""
    )
    return (
        f"WITH h AS (UPDATE {_H} SET {sets}, size_bytes = size_bytes + ${n}, "
        f"{boundary_sets(lambda c: f'${2 + _SET.index(c)}::{_rows.PG_TYPES[c]}')} "
        f"WHERE run_id = $1 AND epoch <= ${2 + _SET.index('epoch')} AND message_count = {base} "
        f"AND size_bytes + ${n} <= ${n + 2} RETURNING 1){insert} "
        "SELECT count(*) FROM h"
    )


_BATCH_APPEND = _batch_sql()


async def _append_one(connection: Any, a: Append) -> bool:
    """One statement, one round trip, atomic on its own (``connection``: asyncpg, no txn)."""
    header = (a.run_id, *(a.values[c] for c in _SET), a.size, a.base, a.max_bytes)
    if len(a.rows) <= VALUES_MAX:
        updated = await connection.fetchval(_single_sql(len(a.rows)), *header, *a.rows)
    else:
        updated = await connection.fetchval(_single_sql(None), *header, list(a.rows))
    return bool(updated)


async def _append_batch(connection: Any, batch: Sequence[Append]) -> set[str]:
    """Many runs' appends in one statement (one round trip, one commit); returns the run ids
    whose guard matched. Run ids in ``batch`` must be distinct."""
    columns: list[list[Any]] = [[] for _ in range(len(_SET) + 4)]
    msg_runs: list[str] = []
    msg_seqs: list[int] = []
    msg_data: list[bytes] = []
    for a in batch:
        row = (a.run_id, *(a.values[c] for c in _SET), a.size, a.base, a.max_bytes)
        for column, value in zip(columns, row, strict=True):
            column.append(value)
        msg_runs.extend([a.run_id] * len(a.rows))
        msg_seqs.extend(range(a.base, a.base + len(a.rows)))
        msg_data.extend(a.rows)
    rows = await connection.fetch(_BATCH_APPEND, *columns, msg_runs, msg_seqs, msg_data)
    return {r[0] for r in rows}


LINGER = 0.005
"""Seconds an append drainer keeps its connection once the queue is empty: an append that
follows right behind (a run's next save) reuses it instead of checking one out of
SQLAlchemy's pool again (about 0.1 ms of event-loop CPU, a quarter of a save's)."""


class PostgresBackend:
    """Writes in pooled transactions; appends group-committed by up to ``parallel`` drainers.

    Up to ``parallel`` drainer tasks, owned here, each send whatever is queued as one
    statement (on its own connection, kept while appends keep coming) and resolve each caller
    with whether its guard matched; appends that arrive meanwhile form the next batch. A lone
    append is one statement. Two appends of one run never share a batch (in parallel batches
    the second one's guard fails on the row the first one changed, and it is rewritten in
    full: never a mix).
    """

    def __init__(self, engine: AsyncEngine, *, max_batch: int = 64, parallel: int = 2) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._parallel = parallel
        # Each future is resolved with the number of appends in the statement that applied
        # it (for telemetry), or 0 if its guard failed.
        self._queue: deque[tuple[Append, asyncio.Future[int]]] = deque()
        self._drainers: set[asyncio.Task[None]] = set()
        self._busy = 0  # drainers running a statement
        self._idle: deque[asyncio.Future[None]] = deque()  # lingering drainers' wake-ups
        self._closing = False
        self._writes: set[asyncio.Task[Any]] = set()

    async def write(self, op: Operation[T]) -> T:
        async def run() -> T:
            async with self._engine.begin() as conn:
                return await op(conn)

        # Shielded like the SQLite writer: a write that started commits or fails as a whole,
        # whatever happens to the caller (a finalizing delete must not be abandoned).
        task = asyncio.get_running_loop().create_task(run(), name="executus_ckpt.pg_write")
        self._writes.add(task)
        task.add_done_callback(_forget(self._writes))
        return await asyncio.shield(task)

    @asynccontextmanager
    async def read(self, *, snapshot: bool) -> AsyncIterator[AsyncConnection]:
        async with self._engine.connect() as conn:
            if not snapshot:
                yield conn
                return
            await conn.execution_options(isolation_level="REPEATABLE READ")
            async with conn.begin():
                yield conn

    async def append(self, append: Append) -> bool:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._queue.append((append, future))
        self._dispatch()
        # Not shielded: cancelling the caller cancels only this future, never the drainer's
        # statement (which then skips it); a shield would cost another loop turn per save.
        batch = await future
        if batch:
            telemetry.note_batch(batch)
        return batch > 0

    async def aclose(self) -> None:
        self._closing = True
        try:
            while self._wake_one():
                pass
            pending = self._drainers | self._writes
            if pending:
                await asyncio.wait(pending)
        finally:
            self._closing = False

    def _dispatch(self) -> None:
        """Get a drainer onto the queue: wake a lingering one, or start one (up to
        ``parallel``)."""
        # A drainer that has returned stays in the set until its done-callback runs: count
        # only live ones, or an append queued in between would wait for nobody.
        live = sum(1 for task in self._drainers if not task.done())
        if not self._wake_one() and live < self._parallel:
            task = asyncio.get_running_loop().create_task(
                self._drain(), name="executus_ckpt.pg_append"
            )
            self._drainers.add(task)
            task.add_done_callback(self._drainers.discard)

    def _wake_one(self) -> bool:
        """Wake a lingering drainer; False if none was lingering."""
        while self._idle:
            wake = self._idle.popleft()
            if not wake.done():
                wake.set_result(None)
                return True
        return False

    async def _linger(self) -> bool:
        """Wait up to :data:`LINGER` seconds for another append; True if one is queued."""
        if self._closing:
            return bool(self._queue)
        loop = asyncio.get_running_loop()
        wake: asyncio.Future[None] = loop.create_future()
        self._idle.append(wake)
        timer = loop.call_later(LINGER, _wake, wake)
        try:
            await wake
        finally:
            timer.cancel()
            if wake in self._idle:
                self._idle.remove(wake)
        return bool(self._queue)

    def _take(self) -> list[tuple[Append, asyncio.Future[int]]]:
        """The next batch: an even share of the queue among the drainers not running a
        statement (runs saving in step queue their appends together; one batch for all of
        them would leave the server one backend and a core idle)."""
        free = max(1, self._parallel - self._busy)
        limit = min(self._max_batch, -(-len(self._queue) // free))
        batch: list[tuple[Append, asyncio.Future[int]]] = []
        seen: set[str] = set()
        deferred: list[tuple[Append, asyncio.Future[int]]] = []
        while self._queue and len(batch) < limit:
            item = self._queue.popleft()
            if item[0].run_id in seen:
                deferred.append(item)
            else:
                seen.add(item[0].run_id)
                batch.append(item)
        self._queue.extendleft(reversed(deferred))
        return batch

    async def _drain(self) -> None:
        # A pooled connection, kept while appends keep coming; its asyncpg connection is used
        # outside any transaction (each statement commits on its own).
        conn: AsyncConnection | None = None
        driver: Any = None
        listeners: tuple[Any, ...] = ()
        try:
            while True:
                while self._queue:
                    batch = self._take()
                    if self._queue:
                        self._dispatch()  # another drainer for the rest
                    self._busy += 1
                    try:
                        if conn is not None:
                            # Closed by the server or the network while held (the pool's
                            # checkout check would have caught it), or checkout listeners
                            # that have not seen it: check one out again.
                            closed = driver.is_closed()
                            if closed or checkout_listeners(self._engine) != listeners:
                                held, conn = conn, None
                                await (_invalidate(held) if closed else held.close())
                        if conn is None:
                            listeners = checkout_listeners(self._engine)
                            conn = await self._engine.connect()
                            driver = (await conn.get_raw_connection()).driver_connection
                        if len(batch) == 1:
                            first = batch[0][0]
                            ok = await _append_one(driver, first)
                            applied = {first.run_id} if ok else set()
                        else:
                            applied = await _append_batch(driver, [a for a, _ in batch])
                    except asyncio.CancelledError:
                        for _, future in [*batch, *self._queue]:
                            if not future.done():
                                future.cancel()
                        self._queue.clear()
                        if conn is not None:  # a statement may be in flight: drop it
                            held, conn = conn, None
                            await _invalidate(held)
                        raise
                    except BaseException as exc:
                        if conn is not None and not is_bad_data(exc):
                            # The pool cannot see errors raised past SQLAlchemy: drop the
                            # connection rather than hand it out again in an unknown state.
                            held, conn = conn, None
                            await _invalidate(held)
                        for _, future in batch:
                            if not future.done():
                                future.set_exception(exc)
                        if not isinstance(exc, Exception):
                            raise
                        continue
                    finally:
                        self._busy -= 1
                    size = len(batch)
                    telemetry.record_batch("postgresql", size)
                    for append, future in batch:
                        if not future.done():
                            future.set_result(size if append.run_id in applied else 0)
                if conn is not None:
                    if await self._linger():
                        continue
                    # Idle: give the connection back to the pool. Appends queued while it
                    # is returned are taken by this drainer (_dispatch counts it as running).
                    held, conn = conn, None
                    await held.close()
                if not self._queue:
                    return
        finally:
            if conn is not None:
                await conn.close()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _invalidate(conn: AsyncConnection) -> None:
    with contextlib.suppress(Exception):  # already broken: nothing more to release
        await conn.invalidate()


def _forget(tasks: set[asyncio.Task[Any]]) -> Any:
    """A done-callback that drops a finished write and retrieves its outcome (a caller that
    was cancelled no longer waits for it; its error must not warn as never retrieved)."""

    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()

    return done
