"""PostgreSQL (asyncpg): pooled write transactions, and appends batched into one statement.

Most saves of a run append a few messages to a transcript the store already holds. Built as
SQLAlchemy statements that costs ~3 ms of Python per save and several extra round trips
(bench/RESULTS.md); here it is one prepared statement on the connection SQLAlchemy's pool
hands out, and appends of concurrent runs share one statement (group commit). Everything
else stays on SQLAlchemy Core.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..schema import run_checkpoint_messages as messages_table
from . import _rows
from ._backend import Append, Operation, T
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
        f"h AS (UPDATE {_H} AS t SET {sets}, size_bytes = t.size_bytes + v.add_size "
        "FROM v WHERE t.run_id = v.run_id AND t.epoch <= v.epoch "
        "AND t.message_count = v.base AND t.size_bytes + v.add_size <= v.max_bytes "
        "RETURNING t.run_id), "
        f"ins AS (INSERT INTO {_M} (run_id, seq, data) "
        f"SELECT x.r, x.s, x.d FROM unnest(${n + 1}::text[], ${n + 2}::int[], "
        f"${n + 3}::bytea[]) AS x(r, s, d) WHERE x.r IN (SELECT run_id FROM h)) "
        "SELECT run_id FROM h"
    )


def _single_sql() -> str:
    sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(_SET, start=2))
    n = len(_SET) + 2
    return (
        f"WITH h AS (UPDATE {_H} SET {sets}, size_bytes = size_bytes + ${n} "
        f"WHERE run_id = $1 AND epoch <= ${2 + _SET.index('epoch')} AND message_count = ${n + 1} "
        f"AND size_bytes + ${n} <= ${n + 2} RETURNING 1), "
        f"ins AS (INSERT INTO {_M} (run_id, seq, data) "
        f"SELECT $1, x.s, x.d FROM unnest(${n + 3}::int[], ${n + 4}::bytea[]) AS x(s, d) "
        f"WHERE EXISTS (SELECT 1 FROM h)) "
        f"SELECT count(*) FROM h"
    )


_APPEND = _single_sql()
_BATCH_APPEND = _batch_sql()


async def _append_one(connection: Any, a: Append) -> bool:
    """One statement, one round trip, atomic on its own (``connection``: asyncpg, no txn)."""
    updated = await connection.fetchval(
        _APPEND,
        a.run_id,
        *(a.values[c] for c in _SET),
        a.size,
        a.base,
        a.max_bytes,
        list(range(a.base, a.base + len(a.rows))),
        list(a.rows),
    )
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


class PostgresBackend:
    """Writes in pooled transactions; appends group-committed by up to ``parallel`` drainers.

    Up to ``parallel`` drainer tasks, owned here, each send whatever is queued as one
    statement (on its own connection) and resolve each caller with whether its guard matched;
    appends that arrive meanwhile form the next batch. A lone append is one statement. Two
    appends of one run never share a batch (in parallel batches the second one's guard fails
    on the row the first one changed, and it is rewritten in full: never a mix).
    """

    def __init__(self, engine: AsyncEngine, *, max_batch: int = 64, parallel: int = 2) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._parallel = parallel
        self._queue: deque[tuple[Append, asyncio.Future[bool]]] = deque()
        self._drainers: set[asyncio.Task[None]] = set()
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
        future: asyncio.Future[bool] = loop.create_future()
        self._queue.append((append, future))
        if len(self._drainers) < self._parallel:
            task = loop.create_task(self._drain(), name="executus_ckpt.pg_append")
            self._drainers.add(task)
            task.add_done_callback(self._drainers.discard)
        return await asyncio.shield(future)

    async def aclose(self) -> None:
        pending = self._drainers | self._writes
        if pending:
            await asyncio.wait(pending)

    @asynccontextmanager
    async def _raw_connection(self) -> AsyncIterator[Any]:
        """A pooled asyncpg connection outside any transaction (autocommit statements)."""
        async with self._engine.connect() as conn:
            raw = await conn.get_raw_connection()
            try:
                yield raw.driver_connection
            except BaseException as exc:
                if not is_bad_data(exc):
                    # The pool cannot see errors raised past SQLAlchemy: drop the connection
                    # rather than hand it out again in an unknown state.
                    await conn.invalidate()
                raise

    def _take(self) -> list[tuple[Append, asyncio.Future[bool]]]:
        batch: list[tuple[Append, asyncio.Future[bool]]] = []
        seen: set[str] = set()
        deferred: list[tuple[Append, asyncio.Future[bool]]] = []
        while self._queue and len(batch) < self._max_batch:
            item = self._queue.popleft()
            if item[0].run_id in seen:
                deferred.append(item)
            else:
                seen.add(item[0].run_id)
                batch.append(item)
        self._queue.extendleft(reversed(deferred))
        return batch

    async def _drain(self) -> None:
        while self._queue:
            batch = self._take()
            try:
                async with self._raw_connection() as connection:
                    if len(batch) == 1:
                        first = batch[0][0]
                        ok = await _append_one(connection, first)
                        applied = {first.run_id} if ok else set()
                    else:
                        applied = await _append_batch(connection, [a for a, _ in batch])
            except asyncio.CancelledError:
                for _, future in [*batch, *self._queue]:
                    if not future.done():
                        future.cancel()
                self._queue.clear()
                raise
            except BaseException as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            for append, future in batch:
                if not future.done():
                    future.set_result(append.run_id in applied)


def _forget(tasks: set[asyncio.Task[Any]]) -> Any:
    """A done-callback that drops a finished write and retrieves its outcome (a caller that
    was cancelled no longer waits for it; its error must not warn as never retrieved)."""

    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()

    return done
