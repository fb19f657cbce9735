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
import logging
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

logger = logging.getLogger(__name__)

_H = _rows.header.name
_M = messages_table.name


VALUES_MAX = 16
"""Appends of up to this many messages list them as parameters (``VALUES``) rather than as
arrays: asyncpg has no built-in codec for ``int[]`` or ``bytea[]`` and introspects them, once
per connection, with a catalog query that takes 7-25 ms (the first save on every new pooled
connection, so the first save of a run on a fresh store). Scalars need none."""


_IDENTITY = frozenset(_rows.META_FIELDS)


@functools.cache
def _single_sql(count: int | None, identity: bool = True, boundary: bool = True) -> str:
    """The one-statement append of ``count`` messages (``None``: any number, as arrays);
    ``identity``: set the identity columns too; ``boundary``: record a phase boundary if the
    phases gained one, else apply only over the same stored phases (:attr:`Append.boundary`)."""
    columns = _rows.appended(identity)
    sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(columns, start=2))
    n = len(columns) + 2
    base = f"${n + 1}"
    phases = f"${2 + columns.index('completed_phases')}"
    if boundary:
        moved = boundary_sets(lambda c: f"${2 + columns.index(c)}::{_rows.PG_TYPES[c]}")
        sets = f"{sets}, {moved}"
        same = ""
    else:
        same = f"AND completed_phases = {phases} "
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
        f"WITH h AS (UPDATE {_H} SET {sets}, size_bytes = size_bytes + ${n} "
        f"WHERE run_id = $1 AND epoch <= ${2 + columns.index('epoch')} "
        f"AND message_count = {base} {same}"
        f"AND size_bytes + ${n} <= ${n + 2} RETURNING 1){insert} "
        "SELECT count(*) FROM h"
    )


@functools.cache
def _batch_sql(identity: bool) -> str:
    """Many runs' appends as one statement, one array per column; ``identity``: with the
    identity columns, each row's flag saying whether to set them or keep the stored ones
    (without: every row keeps them, and nine arrays fewer travel)."""
    columns = _rows.appended(identity)
    cols = ["run_id", *columns, "add_size", "base", "max_bytes"]
    types = [_rows.PG_TYPES[c] for c in ("run_id", *columns)] + ["BIGINT", "INT", "BIGINT"]
    if identity:
        cols.append("identity")
        types.append("BOOLEAN")
    arrays = ", ".join(f"${i}::{ty}[]" for i, ty in enumerate(types, start=1))
    n = len(cols)
    # An identity column left as stored is set to its own stored datum (a TOASTed value
    # keeps its TOAST pointer: nothing is rewritten).
    sets = ", ".join(
        f"{c} = CASE WHEN v.identity THEN v.{c} ELSE t.{c} END"
        if c in _IDENTITY
        else f"{c} = v.{c}"
        for c in columns
    )
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


async def _append_one(connection: Any, a: Append, timeout: float | None = None) -> bool:  # noqa: ASYNC109
    """One statement, one round trip, atomic on its own (``connection``: asyncpg, no txn);
    ``timeout``: seconds, else the connection's ``command_timeout``."""
    values = [a.values[c] for c in _rows.appended(a.identity)]
    header = (a.run_id, *values, a.size, a.base, a.max_bytes)
    if len(a.rows) <= VALUES_MAX:
        sql, args = _single_sql(len(a.rows), a.identity, a.boundary), (*header, *a.rows)
    else:
        sql, args = _single_sql(None, a.identity, a.boundary), (*header, list(a.rows))
    return bool(await connection.fetchval(sql, *args, timeout=timeout))


async def _append_batch(connection: Any, batch: Sequence[Append]) -> set[str]:
    """Many runs' appends in one statement (one round trip, one commit); returns the run ids
    whose guard matched. Run ids in ``batch`` must be distinct."""
    identity = any(a.identity for a in batch)
    names = _rows.appended(identity)
    columns: list[list[Any]] = [[] for _ in range(len(names) + 4 + identity)]
    msg_runs: list[str] = []
    msg_seqs: list[int] = []
    msg_data: list[bytes] = []
    for a in batch:
        values = a.values
        # an identity left as stored travels as NULLs (the statement keeps the stored one)
        header = [None if c in _IDENTITY and not a.identity else values[c] for c in names]
        row = [a.run_id, *header, a.size, a.base, a.max_bytes]
        if identity:
            row.append(a.identity)
        for column, value in zip(columns, row, strict=True):
            column.append(value)
        msg_runs.extend([a.run_id] * len(a.rows))
        msg_seqs.extend(range(a.base, a.base + len(a.rows)))
        msg_data.extend(a.rows)
    sql = _batch_sql(identity)
    rows = await connection.fetch(sql, *columns, msg_runs, msg_seqs, msg_data)
    return {r[0] for r in rows}


LINGER = 0.005
"""Seconds a connection is kept after its last append: an append that follows right behind
(a run's next save) reuses it instead of checking one out of SQLAlchemy's pool again (about
0.1 ms of event-loop CPU, a quarter of a save's)."""


class _Held:
    """A pooled connection kept between appends (its asyncpg connection is used outside any
    transaction: each statement commits on its own)."""

    __slots__ = ("conn", "driver", "listeners", "parked_at")

    def __init__(self, conn: AsyncConnection, driver: Any, listeners: tuple[Any, ...]) -> None:
        self.conn = conn
        self.driver = driver
        self.listeners = listeners
        self.parked_at = 0.0


class PostgresBackend:
    """Writes in pooled transactions; appends as one statement each, group-committed when
    they overlap.

    An append that finds nothing else in flight is sent at once by its caller, on a
    connection kept from the previous append (:data:`LINGER`). Appends that arrive while
    statements are running queue up; up to ``parallel`` drainer tasks, owned here, each send
    whatever is queued as one statement and resolve each caller with whether its guard
    matched. At most ``parallel`` statements run at once. Two appends of one run never share
    a batch (in parallel batches the second one's guard fails on the row the first one
    changed, and it is rewritten in full: never a mix).
    """

    def __init__(self, engine: AsyncEngine, *, max_batch: int = 64, parallel: int = 2) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._parallel = parallel
        # Each future is resolved with the number of appends in the statement that applied
        # it (for telemetry), or 0 if its guard failed.
        self._queue: deque[tuple[Append, asyncio.Future[int]]] = deque()
        self._drainers: set[asyncio.Task[None]] = set()
        self._busy = 0  # statements running (drainers' batches and callers' own appends)
        self._direct = 0  # callers sending their own append
        self._no_direct = asyncio.Event()  # set while none is (aclose waits for it)
        self._no_direct.set()
        self._parked: list[_Held] = []  # kept connections, most recently used last
        self._expiry: asyncio.TimerHandle | None = None
        self._returning: set[asyncio.Task[None]] = set()  # kept connections going back
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

    async def append(self, append: Append, timeout: float) -> bool:  # noqa: ASYNC109
        if not self._queue and not self._busy and self._parked and not self._closing:
            # Nothing else in flight: send it from here (no hop through a drainer task).
            # Cancelling the caller interrupts the statement, which then may or may not be
            # applied, as with a cancelled queued append: the next guard finds out.
            if await self._send_own(append, timeout):
                telemetry.note_batch(1)
                return True
            return False
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._queue.append((append, future))
        self._dispatch()
        # Not shielded: cancelling the caller cancels only this future, never the drainer's
        # statement (which then skips it); a shield would cost another loop turn per save.
        async with asyncio.timeout(timeout):
            batch = await future
        if batch:
            telemetry.note_batch(batch)
        return batch > 0

    async def aclose(self) -> None:
        self._closing = True
        try:
            await self._no_direct.wait()  # callers sending their own append: no tasks of ours
            pending = self._drainers | self._writes
            if pending:
                await asyncio.wait(pending)
            self._expire(everything=True)
            if self._returning:
                await asyncio.wait(set(self._returning))
        finally:
            self._closing = False

    async def _send_own(self, append: Append, timeout: float) -> bool:  # noqa: ASYNC109
        """Send ``append`` on a kept connection; the statement's own timeout (asyncpg's timer,
        which it arms anyway) bounds it, so no second timer is armed on this path."""
        held: _Held | None = None
        self._busy += 1
        self._direct += 1
        self._no_direct.clear()
        try:
            held = self._parked.pop()
            if self._usable(held):
                ok = await _append_one(held.driver, append, timeout)
            else:
                # Checked out anew: the checkout and the statement share the bound.
                held = None
                async with asyncio.timeout(timeout):
                    held = await self._ready(None)
                    ok = await _append_one(held.driver, append)
        except BaseException as exc:
            held = self._after_error(held, exc)
            raise
        finally:
            self._busy -= 1
            self._direct -= 1
            if held is not None:
                self._park(held)
            if self._queue:
                self._dispatch()  # appends that arrived meanwhile
            if not self._direct:
                self._no_direct.set()
        telemetry.record_batch("postgresql", 1)
        return ok

    def _dispatch(self) -> None:
        """Start a drainer for the queue, up to ``parallel`` statements at once (callers
        sending their own append count)."""
        # A drainer that has returned stays in the set until its done-callback runs: count
        # only live ones, or an append queued in between would wait for nobody.
        live = sum(1 for task in self._drainers if not task.done())
        if live + self._direct < self._parallel:
            task = asyncio.get_running_loop().create_task(
                self._drain(), name="executus_ckpt.pg_append"
            )
            self._drainers.add(task)
            task.add_done_callback(self._drainers.discard)

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
        held: _Held | None = None
        try:
            while self._queue:
                batch = self._take()
                if self._queue:
                    self._dispatch()  # another drainer for the rest
                self._busy += 1
                try:
                    if held is None and self._parked:
                        held = self._parked.pop()
                    # _ready owns the connection until it returns (its own errors let it go)
                    kept, held = held, None
                    held = await self._ready(kept)
                    if len(batch) == 1:
                        first = batch[0][0]
                        ok = await _append_one(held.driver, first)
                        applied = {first.run_id} if ok else set()
                    else:
                        applied = await _append_batch(held.driver, [a for a, _ in batch])
                except BaseException as exc:
                    held = self._after_error(held, exc)
                    if isinstance(exc, asyncio.CancelledError):
                        for _, future in [*batch, *self._queue]:
                            if not future.done():
                                future.cancel()
                        self._queue.clear()
                        raise
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
        finally:
            if held is not None:
                self._park(held)

    def _usable(self, held: _Held) -> bool:
        """Whether kept ``held`` can take a statement now; if not it is given back. Closed by
        the server or the network while kept (the pool's checkout check would have caught
        it), or checkout listeners that have not seen it: one is checked out again."""
        closed = held.driver.is_closed()
        if closed or checkout_listeners(self._engine) != held.listeners:
            self._let_go(held.conn, broken=closed)
            return False
        return True

    async def _ready(self, held: _Held | None) -> _Held:
        """``held`` if it can take a statement now, else a connection checked out anew
        (``held`` is then given back; on an error no connection is left checked out)."""
        if held is not None and not self._usable(held):
            held = None
        if held is None:
            listeners = checkout_listeners(self._engine)
            conn = await self._engine.connect()
            try:
                driver = (await conn.get_raw_connection()).driver_connection
            except BaseException:
                self._let_go(conn, broken=True)
                raise
            held = _Held(conn, driver, listeners)
        return held

    def _after_error(self, held: _Held | None, exc: BaseException) -> _Held | None:
        """``held`` if it can take another statement after ``exc`` (the server refused the
        data); otherwise a statement may be in flight or the connection broken, and the pool
        cannot see errors raised past SQLAlchemy: it is invalidated, and None returned."""
        if held is not None and not (isinstance(exc, Exception) and is_bad_data(exc)):
            self._let_go(held.conn, broken=True)
            return None
        return held

    def _let_go(self, conn: AsyncConnection, *, broken: bool = False) -> None:
        """Give ``conn`` back to the pool (``broken``: invalidate it) in a task owned here,
        so that neither a caller's cancellation nor its error path can leave it checked out."""
        loop = asyncio.get_running_loop()
        release = _invalidate(conn) if broken else _give_back(conn)
        task = loop.create_task(release, name="executus_ckpt.pg_release")
        self._returning.add(task)
        task.add_done_callback(self._returning.discard)

    def _park(self, held: _Held) -> None:
        """Keep ``held`` for the next append, for :data:`LINGER` seconds."""
        loop = asyncio.get_running_loop()
        held.parked_at = loop.time()
        self._parked.append(held)
        if self._closing:
            self._expire(everything=True)
        elif self._expiry is None:
            self._expiry = loop.call_later(LINGER, self._expire)

    def _expire(self, *, everything: bool = False) -> None:
        """Give back the kept connections unused for :data:`LINGER` (all of them when
        closing); one timer for all of them, re-armed for the next to expire."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() - LINGER
        kept: list[_Held] = []
        for held in self._parked:
            if everything or held.parked_at <= deadline:
                self._let_go(held.conn)
            else:
                kept.append(held)
        self._parked = kept
        if kept:
            first = min(held.parked_at for held in kept)
            self._expiry = loop.call_at(first + LINGER, self._expire)


async def _give_back(conn: AsyncConnection) -> None:
    """Return a kept connection to the pool; if that fails it is gone already (the pool
    discards a connection whose reset fails), and nobody is waiting to hear of it."""
    try:
        await conn.close()
    except Exception as exc:
        logger.debug("returning a kept connection to the pool failed: %r", exc)


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
