"""SQLCheckpointStore: checkpoints in SQLite (aiosqlite) or PostgreSQL (asyncpg), via Core.

This module owns the Core statements every backend shares; ``_sqlite``/``_postgres`` own how
a write transaction runs and how the save hot path reaches the driver (``_backend.Backend``),
``_rows`` the row ↔ value conversion and ``_errors`` the mapping of driver errors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import and_, case, exists, func, or_, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .. import codec, telemetry
from .._validation import (
    check_header,
    check_limit,
    check_size,
    check_tail_limit,
    check_text,
    clean_text,
    is_storable_id,
)
from ..config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_CHECKPOINT_BYTES,
    DEFAULT_OPERATION_TIMEOUT,
    DEFAULT_PAGE_SIZE,
    DEFAULT_SQLITE_BUSY_TIMEOUT,
)
from ..errors import CheckpointFencedError
from ..schema import executors
from ..schema import run_checkpoint_messages as messages
from ..schema import run_checkpoints as header
from ..types import (
    CheckpointStats,
    CheckpointStatus,
    CheckpointSummary,
    ExecutorInfo,
    JSONValue,
    RunCheckpoint,
    RunCheckpointMeta,
    utcnow,
)
from . import _rows
from ._backend import Append, Backend, Operation, T
from ._engine import (
    SQLiteSynchronous,
    check_file_identity,
    configure_sqlite,
    create_engine,
    dialect_of,
    file_identity,
    preflight,
)
from ._errors import mapped_errors, safe_url
from ._postgres import PostgresBackend
from ._sqlite import SQLiteBackend

logger = logging.getLogger(__name__)

__all__ = ["SQLCheckpointStore", "SQLiteSynchronous"]

_IDENTITIES_MAX = 4096
"""Runs whose written identity and phases a store remembers (caches: see
``SQLCheckpointStore.append``)."""

V = TypeVar("V")


def _remember(cache: dict[str, V], run_id: str, value: V) -> None:
    """Record what the run's row holds in a per-store cache of at most
    :data:`_IDENTITIES_MAX` runs; only a cache: a forgotten run's next append sends its
    identity again or records the boundary the long way."""
    if len(cache) >= _IDENTITIES_MAX and run_id not in cache:
        cache.clear()
    cache[run_id] = value


class SQLCheckpointStore:
    """A :class:`CheckpointStore` over a SQLAlchemy ``AsyncEngine`` (SQLite or PostgreSQL).

    ``SQLCheckpointStore(engine)`` borrows the engine (the caller disposes it);
    :meth:`from_url` and :meth:`open` create and own theirs, disposed by :meth:`aclose`.

    Durability: a ``save`` that returned survives a process crash on every backend, and a power
    loss too by default (SQLite runs in WAL mode with ``synchronous=FULL``; PostgreSQL as the
    server is configured). ``sqlite_synchronous="NORMAL"`` trades the last commits on power loss
    (never on a process crash) for speed. On SQLite, writes take the write lock up front
    (``BEGIN IMMEDIATE``), are serialized within the process and wait up to
    ``sqlite_busy_timeout`` seconds for other processes, so concurrent runs never see
    ``database is locked``. The store sets these on the engine's SQLite connections, including
    a borrowed engine's.

    The schema revision is checked once, on first use: a missing or stale schema raises
    :class:`SchemaOutOfDateError` naming the fix.

    Timeouts: every operation (waiting for a pooled connection, its statements, the commit)
    fails with :class:`StoreUnavailableError` after ``operation_timeout`` seconds (default
    30), so a database that stops answering (a frozen server, a network black hole) never
    holds a caller longer. A write that timed out may still commit later (its transaction is
    finished in the background, never half-applied): the caller must treat the state as
    unknown, as after any error. ``connect_timeout`` (default 10 s) bounds opening a
    PostgreSQL connection (engines created by :meth:`from_url`; set ``connect_args`` on an
    engine you build yourself).

    Raises (every I/O method):
        StoreUnavailableError: the database could not be reached, failed or did not answer
            in time; the driver error is in ``__cause__``.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_checkpoint_bytes: int = DEFAULT_MAX_CHECKPOINT_BYTES,
        sqlite_synchronous: SQLiteSynchronous = "FULL",
        sqlite_busy_timeout: float = DEFAULT_SQLITE_BUSY_TIMEOUT,
        page_size: int = DEFAULT_PAGE_SIZE,
        operation_timeout: float = DEFAULT_OPERATION_TIMEOUT,
        _owns_engine: bool = False,
    ) -> None:
        if not operation_timeout > 0:
            raise ValueError(f"operation_timeout must be > 0 seconds, got {operation_timeout!r}")
        self._dialect = dialect_of(engine)
        self._timeout = float(operation_timeout)
        self._engine = engine
        self._url = engine.url  # for error messages (AsyncEngine.url is a property chain)
        self._owns_engine = _owns_engine
        self._max_bytes = max_checkpoint_bytes
        self._page_size = page_size
        self._backend: Backend
        if self._dialect == "sqlite":
            configure_sqlite(
                engine, synchronous=sqlite_synchronous, busy_timeout=sqlite_busy_timeout
            )
            self._insert: Callable[..., Any] = sqlite.insert
            self._backend = SQLiteBackend(engine)
        else:
            self._insert = postgresql.insert
            self._backend = PostgresBackend(engine)
        self._schema_checked = False
        # run id -> (meta object, epoch) whose identity columns this store last wrote: an
        # append of that very meta at that epoch leaves them as stored (see append()).
        self._identities: dict[str, tuple[RunCheckpointMeta, int]] = {}
        # run id -> the encoded completed phases this store last wrote: an append of the same
        # phases cannot move the phase boundary (Append.boundary).
        self._phases: dict[str, bytes] = {}
        self._schema_lock = asyncio.Lock()
        self._file: tuple[int, int] | None = None
        self._closed = False

    # -- construction and lifetime -------------------------------------------------------

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        engine_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> SQLCheckpointStore:
        """A store over a new engine for ``url`` that the store owns (see :meth:`aclose`).

        ``url`` is ``sqlite+aiosqlite:///path.db`` or ``postgresql+asyncpg://...``. Keyword
        options are those of the constructor; ``engine_options`` (a dict) goes to
        ``create_async_engine``. ``connect_timeout`` bounds opening a connection, in seconds.
        """
        timeout = float(options.get("operation_timeout", DEFAULT_OPERATION_TIMEOUT))
        engine = create_engine(
            url, engine_options, connect_timeout=connect_timeout, operation_timeout=timeout
        )
        return cls(engine, _owns_engine=True, **options)

    @classmethod
    @asynccontextmanager
    async def open(
        cls, url: str, *, migrate: bool = False, **options: Any
    ) -> AsyncIterator[SQLCheckpointStore]:
        """``async with SQLCheckpointStore.open(url) as store``: a store closed on exit.

        With ``migrate=True`` the schema is first brought to the revision this library needs
        (what ``executus-ckpt migrate`` does), convenient for the embedded SQLite default.
        """
        store = cls.from_url(url, **options)
        try:
            if migrate:
                from ..migrate import migrate as run_migrations

                await run_migrations(store._engine)
            await store.check_schema()
            yield store
        finally:
            await store.aclose()

    async def aclose(self) -> None:
        """Finish queued writes, then dispose the engine if this store created it.

        A borrowed engine is left open.
        """
        await self._backend.aclose()
        if self._owns_engine and not self._closed:
            self._closed = True
            await self._engine.dispose()

    async def __aenter__(self) -> SQLCheckpointStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def engine(self) -> AsyncEngine:
        """The engine this store runs on."""
        return self._engine

    @property
    def operation_timeout(self) -> float:
        """Seconds one operation may take (see the class docstring)."""
        return self._timeout

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._dialect

    def __repr__(self) -> str:
        return f"SQLCheckpointStore({safe_url(self._engine.url)!r})"

    # -- plumbing ------------------------------------------------------------------------

    async def check_schema(self) -> None:
        """Raise :class:`SchemaOutOfDateError` unless the schema is at the needed revision.

        Called once automatically before the first operation.
        """
        if self._schema_checked:
            return
        async with self._schema_lock:
            if self._schema_checked:
                return
            from ..migrate import check_schema_revision

            preflight(self._engine)
            with mapped_errors(self._url, "checking the schema", timeout=self._timeout):
                async with asyncio.timeout(self._timeout):
                    await check_schema_revision(self._engine)
            self._file = file_identity(self._engine)
            self._schema_checked = True

    async def _ready_to_write(self) -> None:
        await self.check_schema()
        if self._file is not None:
            check_file_identity(self._engine, self._file)

    async def _write(self, action: str, run_id: str | None, op: Operation[T]) -> T:
        """Run the write ``op(conn)`` in a transaction, with driver errors mapped."""
        await self._ready_to_write()
        with mapped_errors(self._url, action, run_id, timeout=self._timeout):
            async with asyncio.timeout(self._timeout):
                return await self._backend.write(op)

    @asynccontextmanager
    async def _read(
        self, action: str, run_id: str | None, *, snapshot: bool = False
    ) -> AsyncIterator[AsyncConnection]:
        """A read; with ``snapshot``, one transaction that sees a single consistent state."""
        await self.check_schema()
        with mapped_errors(self._url, action, run_id, timeout=self._timeout):
            async with (
                asyncio.timeout(self._timeout),
                self._backend.read(snapshot=snapshot) as conn,
            ):
                yield conn

    # -- CheckpointStore -----------------------------------------------------------------

    async def save(self, checkpoint: RunCheckpoint) -> None:
        """Insert or replace the run's state (see :meth:`CheckpointStore.save`)."""
        phases = check_header(checkpoint)
        run_id = checkpoint.meta.run_id
        rows = codec.encode_messages(checkpoint.messages, run_id)
        await self._rewrite(checkpoint, phases, rows, sum(map(len, rows)), path="upsert")

    async def append(
        self,
        checkpoint: RunCheckpoint,
        *,
        base_count: int,
        encoded_tail: Sequence[bytes] | None = None,
        replace_from: int | None = None,
    ) -> None:
        """Store ``checkpoint`` over an existing run, writing only what changed (see
        :class:`AppendingStore`): one guarded statement on the raw driver (which records a
        phase boundary too); a rewrite of the transcript in one transaction when the
        stored one is not ``messages[:base_count]`` or messages before ``base_count`` changed
        (``replace_from``). Never creates the run: a run deleted or taken over raises
        :class:`CheckpointFencedError`."""
        phases = check_header(checkpoint)
        run_id = checkpoint.meta.run_id
        messages = checkpoint.messages
        base = _rows.valid_base(base_count, messages)
        edited = replace_from is not None and replace_from < base_count
        if base is None or edited:
            rows = codec.encode_messages(messages, run_id)
            return await self._rewrite(
                checkpoint, phases, rows, sum(map(len, rows)), create=False, path="rewrite"
            )
        tail = _rows.appended_tail(messages, base, encoded_tail, run_id)
        tail_size = sum(map(len, tail))
        # The identity columns go only with a meta this store has not written at this epoch
        # (the checkpointer's appends after begin() leave them as stored).
        known = self._identities.get(run_id)
        fresh = known is None or known[0] is not checkpoint.meta or known[1] != checkpoint.epoch
        append = Append(
            run_id=run_id,
            base=base,
            rows=tail,
            size=tail_size,
            max_bytes=self._max_bytes,
            epoch=checkpoint.epoch,
            values=_rows.appended_values(checkpoint, phases, base + len(tail), fresh),
            identity=fresh,
            boundary=self._phases.get(run_id) != phases,
        )
        await self._ready_to_write()
        with mapped_errors(self._url, "saving", run_id, timeout=self._timeout):
            applied = await self._backend.append(append, self._timeout)
        if applied:
            if append.identity:
                self._wrote_identity(checkpoint.meta, checkpoint.epoch)
            if append.boundary:
                self._wrote_phases(run_id, phases)
            count = base + len(tail)
            telemetry.note_save(
                logger, run_id, checkpoint.iteration, "append", len(tail), tail_size, count
            )
            return
        # Not what we thought was stored (or fenced, or too large): write it all.
        head = codec.encode_messages(messages[:base], run_id)
        await self._rewrite(
            checkpoint,
            phases,
            head + tail,
            tail_size + sum(map(len, head)),
            create=False,
            path="fallback",
        )

    async def _rewrite(
        self,
        checkpoint: RunCheckpoint,
        phases: bytes,
        rows: list[bytes],
        size: int,
        *,
        create: bool = True,
        path: str,
    ) -> None:
        """Write the header and replace the transcript, in one transaction; ``create``
        inserts a missing run (``save``), else a missing or newer run is fenced. ``path``:
        why, for telemetry (``upsert``, ``rewrite``, ``fallback``)."""
        run_id = checkpoint.meta.run_id
        check_size(run_id, size, self._max_bytes)
        values = _rows.values_of(checkpoint, completed_phases=phases)
        values.update(message_count=len(rows), size_bytes=size)
        if create:
            values.update(_rows.new_boundary(values))
            upsert = self._insert(header).values(**values)
            stmt = upsert.on_conflict_do_update(
                index_elements=[header.c.run_id],
                set_={
                    **{k: upsert.excluded[k] for k in _rows.SAVED},
                    **_rows.boundary_update(upsert.excluded),
                },
                where=header.c.epoch <= upsert.excluded.epoch,
            ).returning(header.c.epoch)
        else:
            stmt = (
                header.update()
                .where(header.c.run_id == run_id, header.c.epoch <= checkpoint.epoch)
                .values(
                    **{k: values[k] for k in _rows.SAVED},
                    **_rows.boundary_update(_rows.Incoming(values)),
                )
                .returning(header.c.epoch)
            )

        async def op(conn: AsyncConnection) -> None:
            if (await conn.execute(stmt)).first() is None:
                raise CheckpointFencedError(
                    f"run {run_id!r} was deleted or taken over by a newer writer; this writer "
                    f"(epoch {checkpoint.epoch}) is stale and may no longer save it",
                    run_id=run_id,
                    epoch=checkpoint.epoch,
                )
            await conn.execute(messages.delete().where(messages.c.run_id == run_id))
            await self._insert_messages(conn, run_id, 0, rows)

        await self._write("saving", run_id, op)
        self._wrote_identity(checkpoint.meta, checkpoint.epoch)
        self._wrote_phases(run_id, phases)
        telemetry.note_save(logger, run_id, checkpoint.iteration, path, len(rows), size, len(rows))

    def _wrote_phases(self, run_id: str, phases: bytes) -> None:
        """The run's row now holds these completed phases."""
        _remember(self._phases, run_id, phases)

    def _wrote_identity(self, meta: RunCheckpointMeta, epoch: int) -> None:
        """The run's row now holds ``meta``'s identity columns at ``epoch``."""
        _remember(self._identities, meta.run_id, (meta, epoch))

    @staticmethod
    async def _insert_messages(
        conn: AsyncConnection, run_id: str, start: int, rows: Sequence[bytes]
    ) -> None:
        if rows:
            await conn.execute(
                messages.insert(),
                [{"run_id": run_id, "seq": start + i, "data": d} for i, d in enumerate(rows)],
            )

    async def register(self, checkpoint: RunCheckpoint, *, expect_epoch: int | None = None) -> int:
        """Insert the initial row or take over an existing one; returns the run's epoch.

        The initial row has no messages (``checkpoint.messages`` is ignored): the first
        ``save`` writes them. With ``expect_epoch`` (a run this writer claimed) nothing is
        inserted: the take-over happens only if the run is still at that epoch, else
        :class:`CheckpointFencedError` (it finished, or another replica took it).
        """
        phases = check_header(checkpoint)
        meta = checkpoint.meta
        values = _rows.values_of(checkpoint, completed_phases=phases)
        values.update(message_count=0, size_bytes=0)
        values.update(_rows.new_boundary(values))
        taken_over: dict[str, Any] = {"updated_at": utcnow(), "epoch": header.c.epoch + 1}
        if expect_epoch is None:
            upsert = self._insert(header).values(**values)
            stmt = upsert.on_conflict_do_update(
                index_elements=[header.c.run_id],
                set_={**{name: upsert.excluded[name] for name in _rows.TAKEN_OVER}, **taken_over},
            ).returning(header.c.epoch)
        else:
            stmt = (
                header.update()
                .where(header.c.run_id == meta.run_id, header.c.epoch == expect_epoch)
                .values(**{name: values[name] for name in _rows.TAKEN_OVER}, **taken_over)
                .returning(header.c.epoch)
            )

        async def op(conn: AsyncConnection) -> int:
            epoch = (await conn.execute(stmt)).scalar()
            if epoch is None:
                raise CheckpointFencedError(
                    f"run {meta.run_id!r} is no longer at epoch {expect_epoch}: it finished or "
                    "was taken over since it was claimed",
                    run_id=meta.run_id,
                    epoch=expect_epoch,
                )
            return int(epoch)

        epoch = await self._write("registering", meta.run_id, op)
        self._wrote_identity(meta, int(epoch))
        # a take-over keeps whatever phases the row holds: the next append finds out
        self._phases.pop(meta.run_id, None)
        logger.debug(
            "registered run %s at epoch %d",
            meta.run_id,
            epoch,
            extra={"action": "register_run", "run_id": meta.run_id, "epoch": epoch},
        )
        return int(epoch)

    @staticmethod
    async def _messages_of(conn: AsyncConnection, run_ids: Sequence[str]) -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {r: [] for r in run_ids}
        if not run_ids:
            return out
        rows = await conn.execute(
            select(messages.c.run_id, messages.c.data)
            .where(messages.c.run_id.in_(run_ids))
            .order_by(messages.c.run_id, messages.c.seq)
        )
        for run_id, data in rows:
            out[run_id].append(data)
        return out

    async def load(self, run_id: str) -> RunCheckpoint | None:
        """The stored checkpoint of ``run_id``, or ``None``."""
        if not is_storable_id(run_id):
            return None
        # One read transaction (REPEATABLE READ on PostgreSQL), so that header and messages
        # come from one consistent snapshot.
        async with self._read("loading", run_id, snapshot=True) as conn:
            row = (
                await conn.execute(select(*_rows.SELECT).where(header.c.run_id == run_id))
            ).first()
            if row is None:
                return None
            messages = await self._messages_of(conn, [run_id])
        return _rows.checkpoint_of(row, messages[run_id])

    async def load_tail(self, run_id: str, limit: int) -> list[JSONValue] | None:
        """The last ``limit`` messages of the run's transcript (see
        :class:`~executus_ckpt.protocols.TailReadingStore`): one statement, an indexed range
        read of the messages below the header's count (a NULL row: the run has none)."""
        limit = check_tail_limit(limit, run_id)
        if not is_storable_id(run_id):
            return None
        count = header.c.message_count
        stmt = (
            select(messages.c.data)
            .select_from(header)
            .outerjoin(
                messages,
                and_(
                    messages.c.run_id == header.c.run_id,
                    messages.c.seq >= count - limit,
                    messages.c.seq < count,
                ),
            )
            .where(header.c.run_id == run_id)
            .order_by(messages.c.seq)
        )
        async with self._read("loading the transcript tail of", run_id) as conn:
            rows = (await conn.execute(stmt)).all()
        if not rows:
            return None
        return codec.decode_messages([data for (data,) in rows if data is not None])

    async def delete(self, run_id: str, *, epoch: int | None = None) -> bool:
        """Delete the run's checkpoint; True if one was deleted (see the protocol)."""
        if not is_storable_id(run_id):
            return False
        stmt = header.delete().where(header.c.run_id == run_id)
        if epoch is not None:
            stmt = stmt.where(header.c.epoch <= epoch)

        async def op(conn: AsyncConnection) -> bool:
            deleted = (await conn.execute(stmt.returning(header.c.run_id))).first() is not None
            if deleted:
                await conn.execute(messages.delete().where(messages.c.run_id == run_id))
            return deleted

        self._identities.pop(run_id, None)
        self._phases.pop(run_id, None)
        return await self._write("deleting", run_id, op)

    def _db_clock(self) -> Any:
        """Seconds since the epoch by the database's clock (never a host's)."""
        if self._dialect == "postgresql":
            return func.date_part("epoch", func.clock_timestamp())
        return (func.julianday("now") - 2440587.5) * 86400.0

    def _unowned(self, stale_owners: bool = True, judge: str | None = None) -> Any:
        """No live executor owns the run: no owner, or one that never registered, stopped,
        or (with ``stale_owners``) whose heartbeat expired by the database's clock.

        With ``judge`` (the claimer), an expired heartbeat counts only if the judge is not a
        registered executor or its own heartbeats have been on time for its ``stale_after``.
        """
        registered = select(executors.c.id).where(
            executors.c.id == header.c.owner, executors.c.state != "stopped"
        )
        if not stale_owners:
            return or_(header.c.owner.is_(None), ~exists(registered))
        now = self._db_clock()
        expired = ~exists(registered.where(executors.c.expires_at > now))
        if judge is not None:
            judges = executors.alias("judge")
            healthy = select(judges.c.id).where(
                judges.c.id == judge,
                judges.c.state == "running",
                judges.c.healthy_since <= now - judges.c.stale_after,
                judges.c.heartbeat_at >= now - 2 * judges.c.heartbeat_interval,
            )
            unknown = ~exists(select(judges.c.id).where(judges.c.id == judge))
            expired = and_(expired, or_(unknown, exists(healthy)))
        return or_(header.c.owner.is_(None), ~exists(registered), expired)

    def _filters(
        self,
        status: CheckpointStatus | None,
        agent_id: str | None,
        older_than: float | None,
    ) -> list[Any]:
        clauses: list[Any] = []
        if status is not None:
            clauses.append(header.c.status == str(status))
        if agent_id is not None:
            clauses.append(header.c.agent_id == agent_id)
        bound = _rows.cutoff(older_than)
        if bound is not None:
            clauses.append(header.c.updated_at <= bound)
        return clauses

    async def list_interrupted(
        self,
        *,
        agent_id: str | None = None,
        older_than: float | None = None,
        limit: int | None = None,
        stale_owners: bool = True,
    ) -> list[RunCheckpoint]:
        """Interrupted checkpoints with transcripts, oldest ``updated_at`` first (see the
        protocol for what is interrupted)."""
        limit = check_limit(limit)
        stmt = (
            select(*_rows.SELECT)
            .where(
                *self._filters(CheckpointStatus.ACTIVE, agent_id, older_than),
                self._unowned(stale_owners),
            )
            .order_by(header.c.updated_at, header.c.run_id)
            .limit(limit)
        )
        async with self._read("listing interrupted runs", None, snapshot=True) as conn:
            rows = (await conn.execute(stmt)).all()
            messages = await self._messages_of(conn, [r.run_id for r in rows])
        return [_rows.checkpoint_of(r, messages[r.run_id]) for r in rows]

    async def iter_summaries(
        self,
        *,
        status: CheckpointStatus | None = CheckpointStatus.ACTIVE,
        agent_id: str | None = None,
        older_than: float | None = None,
        updated_before: datetime | None = None,
        limit: int | None = None,
        newest_first: bool = False,
        interrupted: bool = False,
        stale_owners: bool = True,
    ) -> AsyncIterator[CheckpointSummary]:
        """Stream summaries page by page (keyset pagination on ``(updated_at, run_id)``)."""
        limit = check_limit(limit)
        filters = self._filters(status, agent_id, older_than)
        if interrupted:
            filters.append(self._unowned(stale_owners))
        if updated_before is not None:
            filters.append(header.c.updated_at < _rows.as_utc(updated_before))
        key = tuple_(header.c.updated_at, header.c.run_id)
        order = (
            (header.c.updated_at.desc(), header.c.run_id.desc())
            if newest_first
            else (header.c.updated_at, header.c.run_id)
        )
        last: tuple[Any, str] | None = None
        remaining = limit
        while remaining is None or remaining > 0:
            page = self._page_size if remaining is None else min(self._page_size, remaining)
            where = list(filters)
            if last is not None:
                where.append(key < tuple_(*last) if newest_first else key > tuple_(*last))
            stmt = select(*_rows.SELECT).where(and_(True, *where)).order_by(*order).limit(page)
            async with self._read("listing runs", None) as conn:
                rows = (await conn.execute(stmt)).all()
            for row in rows:
                yield _rows.summary_of(row)
            if len(rows) < page:
                return
            if remaining is not None:
                remaining -= len(rows)
            last = (rows[-1].updated_at, rows[-1].run_id)

    async def claim(
        self, run_id: str, *, epoch: int, owner: str | None = None, stale_owners: bool = True
    ) -> RunCheckpoint | None:
        """Atomically claim an active run at ``epoch`` for recovery (see the protocol)."""
        check_text("owner", owner, run_id)
        if not is_storable_id(run_id):
            return None
        now = utcnow()
        claimable: tuple[Any, ...] = (
            header.c.run_id == run_id,
            header.c.status == str(CheckpointStatus.ACTIVE),
            header.c.epoch == epoch,
            # re-checked at write time: a run whose owner came back (or that finished)
            # since it was listed is left alone, and so is every run while the claimer's
            # own heartbeats are late
            self._unowned(stale_owners, judge=owner),
        )
        if self._dialect == "postgresql":
            # FOR UPDATE SKIP LOCKED: a run another replica is claiming (or its owner is
            # writing) right now is skipped at once instead of waited for; it is still
            # interrupted at the next sweep if nobody took it.
            locked = (
                select(header.c.run_id)
                .where(*claimable)
                .with_for_update(skip_locked=True)
                .correlate(None)
                .scalar_subquery()
            )
            claimable = (header.c.run_id == locked,)
        stmt = (
            header.update()
            .where(*claimable)
            # updated_at moves too: a recovery pass that started before this claim will not
            # list the run again (its scan is bounded by updated_before).
            .values(
                attempts=_rows.attempts_after_claim(),
                claimed_at=now,
                epoch=header.c.epoch + 1,
                owner=owner,
                updated_at=now,
            )
            .returning(*_rows.SELECT)
        )

        async def op(conn: AsyncConnection) -> RunCheckpoint | None:
            row = (await conn.execute(stmt)).first()
            if row is None:
                return None
            messages = await self._messages_of(conn, [run_id])
            return _rows.checkpoint_of(row, messages[run_id])

        return await self._write("claiming", run_id, op)

    async def claim_interrupted(
        self,
        *,
        limit: int,
        owner: str | None,
        stale_owners: bool = True,
        exclude_owner: str | None = None,
        agent_id: str | None = None,
        older_than: float | None = None,
    ) -> list[tuple[RunCheckpoint, str | None]]:
        """Claim up to ``limit`` interrupted runs, oldest first, in one statement (see
        :class:`~executus_ckpt.protocols.BatchClaimingStore`): ``FOR UPDATE SKIP LOCKED`` on
        PostgreSQL, so concurrent claimers take different runs; one immediate write
        transaction on SQLite."""
        check_text("owner", owner, None)
        limit = check_tail_limit(limit, None)
        if limit == 0:
            return []
        where = [
            *self._filters(CheckpointStatus.ACTIVE, agent_id, older_than),
            self._unowned(stale_owners, judge=owner),
            ~_rows.suspect(),
        ]
        if exclude_owner is not None:
            where.append(or_(header.c.owner.is_(None), header.c.owner != exclude_owner))
        picked = (
            select(header.c.run_id, header.c.owner)
            .where(*where)
            .order_by(header.c.updated_at, header.c.run_id)
            .limit(limit)
        )
        now = utcnow()
        values = {
            "attempts": _rows.attempts_after_claim(),
            "claimed_at": now,
            "epoch": header.c.epoch + 1,
            "owner": owner,
            "updated_at": now,
        }

        async def op(conn: AsyncConnection) -> list[tuple[RunCheckpoint, str | None]]:
            if self._dialect == "postgresql":
                chosen = picked.with_for_update(skip_locked=True).cte("chosen")
                stmt = (
                    header.update()
                    .where(header.c.run_id == chosen.c.run_id)
                    .values(**values)
                    .returning(*_rows.SELECT, chosen.c.owner.label("previous_owner"))
                )
                rows = (await conn.execute(stmt)).all()
                previous = {r.run_id: r.previous_owner for r in rows}
            else:
                # The write transaction holds SQLite's lock from its first statement (BEGIN
                # IMMEDIATE): nobody writes between this read and the update.
                previous = {r.run_id: r.owner for r in (await conn.execute(picked)).all()}
                if not previous:
                    return []
                stmt = (
                    header.update()
                    .where(header.c.run_id.in_(list(previous)))
                    .values(**values)
                    .returning(*_rows.SELECT)
                )
                rows = (await conn.execute(stmt)).all()
            rows = sorted(rows, key=lambda r: (r.updated_at, r.run_id))
            stored = await self._messages_of(conn, [r.run_id for r in rows])
            return [(_rows.checkpoint_of(r, stored[r.run_id]), previous[r.run_id]) for r in rows]

        return await self._write("claiming interrupted runs", None, op)

    async def mark_dead(self, run_id: str, *, reason: str, epoch: int | None = None) -> bool:
        """Mark the run dead with ``reason`` as its last error (see the protocol)."""
        if not is_storable_id(run_id):
            return False
        stmt = (
            header.update()
            .where(header.c.run_id == run_id)
            .values(status=str(CheckpointStatus.DEAD), last_error=clean_text(reason))
        )
        if epoch is not None:
            stmt = stmt.where(header.c.epoch <= epoch)

        async def op(conn: AsyncConnection) -> bool:
            return bool((await conn.execute(stmt)).rowcount)

        return await self._write("marking dead", run_id, op)

    async def record_error(self, run_id: str, error: str, *, epoch: int | None = None) -> bool:
        """Store ``error`` as the run's last error (see the protocol)."""
        if not is_storable_id(run_id):
            return False
        stmt = header.update().where(header.c.run_id == run_id).values(last_error=clean_text(error))
        if epoch is not None:
            stmt = stmt.where(header.c.epoch <= epoch)

        async def op(conn: AsyncConnection) -> bool:
            return bool((await conn.execute(stmt)).rowcount)

        return await self._write("recording an error for", run_id, op)

    async def requeue(self, run_id: str) -> bool:
        """Make a dead or failed run recoverable again (status active, attempts 0); True if
        it was dead or failed."""
        if not is_storable_id(run_id):
            return False
        kept = (str(CheckpointStatus.DEAD), str(CheckpointStatus.FAILED))
        stmt = (
            header.update()
            .where(header.c.run_id == run_id, header.c.status.in_(kept))
            .values(status=str(CheckpointStatus.ACTIVE), attempts=0, claimed_at=None)
        )

        async def op(conn: AsyncConnection) -> bool:
            return bool((await conn.execute(stmt)).rowcount)

        return await self._write("requeueing", run_id, op)

    async def release(self, run_id: str, *, epoch: int, progress: bool = True) -> bool:
        """Hand a run cut off by a graceful shutdown back for recovery (see the protocol)."""
        if not is_storable_id(run_id):
            return False
        released: dict[str, Any] = {"owner": None, "epoch": header.c.epoch + 1}
        if progress:
            released["progress_at"] = utcnow()
        stmt = (
            header.update()
            .where(
                header.c.run_id == run_id,
                header.c.epoch <= epoch,
                header.c.status == str(CheckpointStatus.ACTIVE),
            )
            .values(**released)
        )

        async def op(conn: AsyncConnection) -> bool:
            return bool((await conn.execute(stmt)).rowcount)

        return await self._write("releasing", run_id, op)

    async def mark_failed(self, run_id: str, *, error: str, epoch: int | None = None) -> bool:
        """Keep a terminally failed run for the operator with ``error`` (see the protocol)."""
        if not is_storable_id(run_id):
            return False
        stmt = (
            header.update()
            .where(header.c.run_id == run_id)
            .values(status=str(CheckpointStatus.FAILED), last_error=clean_text(error))
        )
        if epoch is not None:
            stmt = stmt.where(header.c.epoch <= epoch)

        async def op(conn: AsyncConnection) -> bool:
            return bool((await conn.execute(stmt)).rowcount)

        return await self._write("marking failed", run_id, op)

    async def purge(
        self,
        *,
        older_than: float,
        status: CheckpointStatus | None = CheckpointStatus.DEAD,
        dry_run: bool = False,
        batch_size: int = 500,
        on_progress: Callable[[int], None] | None = None,
    ) -> int:
        """Delete checkpoints not updated for ``older_than`` seconds; returns how many.

        Deletes in transactions of at most ``batch_size`` runs (no long lock on a table that
        live runs write to), re-checking the age in the ``DELETE`` itself, so a run written
        meanwhile is never removed; on PostgreSQL rows locked by a write in flight are skipped
        (``SKIP LOCKED``). ``dry_run`` only counts. ``status=None`` purges every status.
        """
        bound = _rows.cutoff(older_than)
        filters = self._filters(status, None, None)
        if bound is not None:
            filters.append(header.c.updated_at <= bound)
        if dry_run:
            stmt = select(func.count()).select_from(header).where(*filters)
            async with self._read("counting runs to purge", None) as conn:
                return int((await conn.execute(stmt)).scalar_one())
        pick = (
            select(header.c.run_id).where(*filters).order_by(header.c.updated_at).limit(batch_size)
        )
        if self._dialect == "postgresql":
            pick = pick.with_for_update(skip_locked=True)

        async def op(conn: AsyncConnection) -> tuple[int, int]:
            """One batch: (rows picked, rows deleted). A picked row that changed meanwhile
            (no longer matches the filters) is left alone."""
            ids = list((await conn.execute(pick)).scalars())
            if not ids:
                return 0, 0
            doomed = header.delete().where(header.c.run_id.in_(ids), *filters)
            gone = list((await conn.execute(doomed.returning(header.c.run_id))).scalars())
            if gone:
                await conn.execute(messages.delete().where(messages.c.run_id.in_(gone)))
            return len(ids), len(gone)

        total = 0
        while True:
            picked, deleted = await self._write("purging", None, op)
            if picked == 0:
                break
            total += deleted
            if deleted and on_progress is not None:
                on_progress(total)
            if not deleted:
                await asyncio.sleep(0)  # rows changed under us: let their writers finish
        logger.info("purged %d checkpoints", total, extra={"action": "purge", "count": total})
        return total

    async def stats(self) -> CheckpointStats:
        """Counts by status and agent, sizes, and the oldest interrupted run."""
        async with self._read("computing stats", None, snapshot=True) as conn:
            by_status = {
                str(k): int(v)
                for k, v in await conn.execute(
                    select(header.c.status, func.count()).group_by(header.c.status)
                )
            }
            agent = func.coalesce(header.c.agent_id, "")
            by_agent = {
                str(k): int(v)
                for k, v in await conn.execute(select(agent, func.count()).group_by(agent))
            }
            total_size = (
                await conn.execute(select(func.coalesce(func.sum(header.c.size_bytes), 0)))
            ).scalar_one()
            largest = (
                await conn.execute(
                    select(header.c.run_id, header.c.size_bytes)
                    .order_by(header.c.size_bytes.desc(), header.c.run_id)
                    .limit(1)
                )
            ).first()
            oldest = (
                await conn.execute(
                    select(header.c.run_id, header.c.updated_at)
                    .where(header.c.status == str(CheckpointStatus.ACTIVE))
                    .order_by(header.c.updated_at, header.c.run_id)
                    .limit(1)
                )
            ).first()
        return CheckpointStats(
            total=sum(by_status.values()),
            by_status=by_status,
            by_agent=by_agent,
            total_size_bytes=int(total_size),
            largest_size_bytes=int(largest.size_bytes) if largest else 0,
            largest_run_id=largest.run_id if largest else None,
            oldest_interrupted_run_id=oldest.run_id if oldest else None,
            oldest_interrupted_at=oldest.updated_at if oldest else None,
        )

    async def count(self, *, status: CheckpointStatus | None = None) -> int:
        """How many checkpoints are stored (with ``status``, only those)."""
        stmt = select(func.count()).select_from(header).where(*self._filters(status, None, None))
        async with self._read("counting runs", None) as conn:
            return int((await conn.execute(stmt)).scalar_one())

    # -- executors (many replicas) ---------------------------------------------------------

    async def register_executor(
        self,
        executor_id: str,
        *,
        name: str | None,
        host: str | None,
        pid: int | None,
        app_version: str | None,
        stale_after: float,
        heartbeat_interval: float | None = None,
    ) -> float:
        """Record a starting executor as alive; returns the database's clock (epoch s)."""
        for field, value in (("executor name", name), ("host", host), ("app_version", app_version)):
            check_text(field, value, None)
        now = self._db_clock()
        stmt = (
            self._insert(executors)
            .values(
                id=executor_id,
                name=name,
                host=host,
                pid=pid,
                app_version=app_version,
                state="running",
                stale_after=stale_after,
                started_at=now,
                heartbeat_at=now,
                expires_at=now + stale_after,
                heartbeat_interval=heartbeat_interval,
                healthy_since=now,
            )
            .returning(executors.c.heartbeat_at)
        )

        async def op(conn: AsyncConnection) -> float:
            return float((await conn.execute(stmt)).scalar_one())

        return await self._write("registering executor", None, op)

    async def heartbeat_executor(self, executor_id: str) -> float | None:
        """Extend a running (or draining) executor's life by its ``stale_after``; returns the
        database's clock (epoch s), or None if its row is gone or stopped."""
        now = self._db_clock()
        stmt = (
            executors.update()
            .where(executors.c.id == executor_id, executors.c.state != "stopped")
            .values(
                heartbeat_at=now,
                expires_at=now + executors.c.stale_after,
                # a late beat (the process or the database stalled) restarts the healthy period
                healthy_since=case(
                    (
                        executors.c.heartbeat_at >= now - 2 * executors.c.heartbeat_interval,
                        func.coalesce(executors.c.healthy_since, now),
                    ),
                    else_=now,
                ),
            )
            .returning(executors.c.heartbeat_at)
        )

        async def op(conn: AsyncConnection) -> float | None:
            value = (await conn.execute(stmt)).scalar()
            return None if value is None else float(value)

        return await self._write("heartbeat", None, op)

    async def set_executor_state(self, executor_id: str, state: str) -> None:
        """``draining`` (still owns its runs) or ``stopped`` (deregistered: owns nothing)."""
        values: dict[str, Any] = {"state": state}
        if state == "stopped":
            values["stopped_at"] = self._db_clock()
        stmt = executors.update().where(executors.c.id == executor_id).values(**values)

        async def op(conn: AsyncConnection) -> None:
            await conn.execute(stmt)

        await self._write("updating executor", None, op)

    async def release_owned(self, owner: str) -> int:
        """Hand back every active run ``owner`` holds (owner cleared, epoch raised, counted as
        progress): what a drain does last. Returns how many."""
        stmt = (
            header.update()
            .where(header.c.owner == owner, header.c.status == str(CheckpointStatus.ACTIVE))
            .values(owner=None, epoch=header.c.epoch + 1, progress_at=utcnow())
            .returning(header.c.run_id)
        )

        async def op(conn: AsyncConnection) -> int:
            return len((await conn.execute(stmt)).all())

        return await self._write("releasing runs of", None, op)

    async def list_executors(self, *, include_stopped: bool = False) -> list[ExecutorInfo]:
        """Registered executors, newest first, with heartbeat age by the database's clock
        and the runs each owns."""
        now = self._db_clock()
        owned = (
            select(func.count())
            .select_from(header)
            .where(
                header.c.owner == executors.c.id, header.c.status == str(CheckpointStatus.ACTIVE)
            )
            .scalar_subquery()
        )
        stmt = select(
            executors,
            (now - executors.c.heartbeat_at).label("age"),
            (executors.c.expires_at > now).label("fresh"),
            owned.label("owned"),
        ).order_by(executors.c.started_at.desc())
        if not include_stopped:
            stmt = stmt.where(executors.c.state != "stopped")
        async with self._read("listing executors", None) as conn:
            rows = (await conn.execute(stmt)).all()
        return [
            ExecutorInfo(
                id=r.id,
                name=r.name,
                host=r.host,
                pid=r.pid,
                app_version=r.app_version,
                state=r.state,
                stale_after=float(r.stale_after),
                heartbeat_age=max(0.0, float(r.age)),
                alive=bool(r.fresh) and r.state != "stopped",
                runs_owned=int(r.owned),
            )
            for r in rows
        ]

    async def database_time(self) -> float:
        """The database's clock, in seconds since the epoch."""
        async with self._read("reading the database clock", None) as conn:
            return float((await conn.execute(select(self._db_clock()))).scalar_one())
