"""The append on the save hot path, on the raw driver connection.

Most saves of a run append a few messages to a transcript the store already holds. Built as
SQLAlchemy statements that costs ~3 ms of Python per save and several extra round trips
(bench/RESULTS.md); here it is one prepared statement on PostgreSQL and two driver calls on
SQLite, on the connection SQLAlchemy's pool hands out. Everything else (full rewrites,
recovery, the operator's calls) stays on SQLAlchemy Core.

Both appends are guarded exactly like the Core version: the header is updated only if the run
is not fenced, still holds ``base`` messages and stays under the size cap; the messages are
inserted only if it was. A False return means nothing was written and the caller rewrites the
transcript in full.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..schema import run_checkpoint_messages as m
from ..schema import run_checkpoints as t

META = (
    "agent_id",
    "agent_name",
    "caller_id",
    "channel_id",
    "guild_id",
    "prompt",
    "model_tier",
    "parent_run_id",
)
_SET = (
    "iteration",
    "completed_phases",
    "message_count",
    "updated_at",
    "epoch",
    "app_version",
    "owner",
    *META,
)


@dataclass(frozen=True, slots=True)
class Append:
    """One guarded append: the header values and the new messages (encoded)."""

    run_id: str
    base: int
    rows: Sequence[bytes]
    size: int
    max_bytes: int
    iteration: int
    completed_phases: bytes
    updated_at: datetime
    epoch: int
    app_version: str | None
    owner: str | None
    meta: Sequence[str | None]  # in META order

    def header(self) -> tuple[Any, ...]:
        """Values for the ``_SET`` columns, in order."""
        return (
            self.iteration,
            self.completed_phases,
            self.base + len(self.rows),
            self.updated_at,
            self.epoch,
            self.app_version,
            self.owner,
            *self.meta,
        )


def _pg_sql() -> str:
    sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(_SET, start=2))
    n = len(_SET) + 2
    return (
        f"WITH h AS (UPDATE {t.name} SET {sets}, size_bytes = size_bytes + ${n} "
        f"WHERE run_id = $1 AND epoch <= ${2 + _SET.index('epoch')} AND message_count = ${n + 1} "
        f"AND size_bytes + ${n} <= ${n + 2} RETURNING 1), "
        f"ins AS (INSERT INTO {m.name} (run_id, seq, data) "
        f"SELECT $1, x.s, x.d FROM unnest(${n + 3}::int[], ${n + 4}::bytea[]) AS x(s, d) "
        f"WHERE EXISTS (SELECT 1 FROM h)) "
        f"SELECT count(*) FROM h"
    )


_PG_APPEND = _pg_sql()


async def append_postgres(connection: Any, a: Append) -> bool:
    """One statement, one round trip, atomic on its own (``connection``: asyncpg, no txn)."""
    seqs = list(range(a.base, a.base + len(a.rows)))
    updated = await connection.fetchval(
        _PG_APPEND,
        a.run_id,
        *a.header(),
        a.size,
        a.base,
        a.max_bytes,
        seqs,
        list(a.rows),
    )
    return bool(updated)


_PG_TYPES = {
    "iteration": "int",
    "completed_phases": "bytea",
    "message_count": "int",
    "updated_at": "timestamptz",
    "epoch": "bigint",
    **{c: "text" for c in ("app_version", "owner", *META)},
}


def _pg_batch_sql() -> str:
    cols = ["run_id", *_SET, "add_size", "base", "max_bytes"]
    types = ["text", *(_PG_TYPES[c] for c in _SET), "bigint", "int", "bigint"]
    arrays = ", ".join(f"${i}::{ty}[]" for i, ty in enumerate(types, start=1))
    n = len(cols)
    sets = ", ".join(f"{c} = v.{c}" for c in _SET)
    return (
        f"WITH v AS (SELECT * FROM unnest({arrays}) AS v({', '.join(cols)})), "
        f"h AS (UPDATE {t.name} AS t SET {sets}, size_bytes = t.size_bytes + v.add_size "
        "FROM v WHERE t.run_id = v.run_id AND t.epoch <= v.epoch "
        "AND t.message_count = v.base AND t.size_bytes + v.add_size <= v.max_bytes "
        "RETURNING t.run_id), "
        f"ins AS (INSERT INTO {m.name} (run_id, seq, data) "
        f"SELECT x.r, x.s, x.d FROM unnest(${n + 1}::text[], ${n + 2}::int[], "
        f"${n + 3}::bytea[]) AS x(r, s, d) WHERE x.r IN (SELECT run_id FROM h)) "
        "SELECT run_id FROM h"
    )


_PG_BATCH_APPEND = _pg_batch_sql()


async def append_postgres_batch(connection: Any, batch: Sequence[Append]) -> set[str]:
    """Many runs' appends in one statement (one round trip, one commit); returns the run ids
    whose guard matched. Run ids in ``batch`` must be distinct."""
    columns: list[list[Any]] = [[] for _ in range(len(_SET) + 4)]
    msg_runs: list[str] = []
    msg_seqs: list[int] = []
    msg_data: list[bytes] = []
    for a in batch:
        for column, value in zip(
            columns, (a.run_id, *a.header(), a.size, a.base, a.max_bytes), strict=True
        ):
            column.append(value)
        msg_runs.extend([a.run_id] * len(a.rows))
        msg_seqs.extend(range(a.base, a.base + len(a.rows)))
        msg_data.extend(a.rows)
    rows = await connection.fetch(_PG_BATCH_APPEND, *columns, msg_runs, msg_seqs, msg_data)
    return {r[0] for r in rows}


class PostgresAppendBatcher:
    """Group commit for PostgreSQL appends: those that arrive together share one statement.

    Up to ``parallel`` drainer tasks, owned here, each send whatever is queued as one
    statement (on its own connection) and resolve each caller with whether its guard matched;
    appends that arrive meanwhile form the next batch. A lone append is one statement, as
    before. Two appends of one run never share a batch (in parallel batches the second one's
    guard fails on the row the first one changed, and it is rewritten in full: never a mix).
    """

    def __init__(
        self,
        connect: Callable[[], AbstractAsyncContextManager[Any]],
        *,
        max_batch: int = 64,
        parallel: int = 2,
    ) -> None:
        self._connect = connect
        self._max_batch = max_batch
        self._parallel = parallel
        self._queue: deque[tuple[Append, asyncio.Future[bool]]] = deque()
        self._drainers: set[asyncio.Task[None]] = set()

    async def submit(self, append: Append) -> bool:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._queue.append((append, future))
        if len(self._drainers) < self._parallel:
            task = loop.create_task(self._drain(), name="executus_ckpt.pg_append")
            self._drainers.add(task)
            task.add_done_callback(self._drainers.discard)
        return await asyncio.shield(future)

    async def aclose(self) -> None:
        if self._drainers:
            await asyncio.wait(set(self._drainers))

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
                async with self._connect() as connection:
                    if len(batch) == 1:
                        applied = (
                            {batch[0][0].run_id}
                            if await append_postgres(connection, batch[0][0])
                            else set()
                        )
                    else:
                        applied = await append_postgres_batch(connection, [a for a, _ in batch])
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


_SQLITE_UPDATE = (
    f"UPDATE {t.name} SET " + ", ".join(f"{c} = ?" for c in _SET) + ", size_bytes = size_bytes + ? "
    "WHERE run_id = ? AND epoch <= ? AND message_count = ? AND size_bytes + ? <= ?"
)
_SQLITE_INSERT = f"INSERT INTO {m.name} (run_id, seq, data) VALUES (?, ?, ?)"


def sqlite_time(value: datetime) -> str:
    """A UTC time as SQLAlchemy's SQLite ``DATETIME`` stores it (so Core reads it back)."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


async def append_sqlite(connection: Any, a: Append) -> bool:
    """Two driver calls inside the caller's write transaction (``connection``: aiosqlite)."""
    header = list(a.header())
    header[_SET.index("updated_at")] = sqlite_time(a.updated_at)
    cursor = await connection.execute(
        _SQLITE_UPDATE, (*header, a.size, a.run_id, a.epoch, a.base, a.size, a.max_bytes)
    )
    if cursor.rowcount != 1:
        return False
    if a.rows:
        await connection.executemany(
            _SQLITE_INSERT, [(a.run_id, a.base + i, d) for i, d in enumerate(a.rows)]
        )
    return True
