"""SQLCheckpointStore: checkpoints in SQLite (aiosqlite) or PostgreSQL (asyncpg), via Core."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Literal, TypeVar, cast

from sqlalchemy import and_, func, select, tuple_
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .. import codec
from ..config import (
    DEFAULT_MAX_CHECKPOINT_BYTES,
    DEFAULT_PAGE_SIZE,
    DEFAULT_SQLITE_BUSY_TIMEOUT,
)
from ..errors import (
    CheckpointError,
    CheckpointFencedError,
    StoreUnavailableError,
)
from ..schema import run_checkpoint_messages as m
from ..schema import run_checkpoints as t
from ..types import (
    CheckpointStats,
    CheckpointStatus,
    CheckpointSummary,
    JSONValue,
    RunCheckpoint,
    RunCheckpointMeta,
    utcnow,
)
from ._common import (
    as_utc,
    check_header,
    check_size,
    check_text,
    clean_text,
    cutoff,
    encode_messages,
    is_storable_id,
    join_messages,
    tail_encodings,
    valid_base,
)
from ._dialect import insert_for, install_sqlite_hooks, write_options
from ._fastpath import META as _FAST_META
from ._fastpath import Append, PostgresAppendBatcher, append_sqlite
from ._group import GroupCommitter, Operation

logger = logging.getLogger(__name__)

T = TypeVar("T")

SQLiteSynchronous = Literal["FULL", "NORMAL", "EXTRA"]

_META_COLUMNS = (
    t.c.agent_id,
    t.c.agent_name,
    t.c.caller_id,
    t.c.channel_id,
    t.c.guild_id,
    t.c.prompt,
    t.c.model_tier,
    t.c.parent_run_id,
)
_SUMMARY_COLUMNS = (
    t.c.run_id,
    *_META_COLUMNS,
    t.c.message_count,
    t.c.size_bytes,
    t.c.iteration,
    t.c.completed_phases,
    t.c.status,
    t.c.attempts,
    t.c.last_error,
    t.c.app_version,
    t.c.owner,
    t.c.epoch,
    t.c.created_at,
    t.c.updated_at,
)


def _meta_values(meta: RunCheckpointMeta) -> dict[str, Any]:
    return {
        "agent_id": meta.agent_id,
        "agent_name": meta.agent_name,
        "caller_id": meta.caller_id,
        "channel_id": meta.channel_id,
        "guild_id": meta.guild_id,
        "prompt": meta.prompt,
        "model_tier": meta.model_tier,
        "parent_run_id": meta.parent_run_id,
    }


def _meta_of(row: Any) -> RunCheckpointMeta:
    return RunCheckpointMeta(
        run_id=row.run_id,
        agent_id=row.agent_id,
        agent_name=row.agent_name,
        caller_id=row.caller_id,
        channel_id=row.channel_id,
        guild_id=row.guild_id,
        prompt=row.prompt,
        model_tier=row.model_tier,
        parent_run_id=row.parent_run_id,
    )


def _summary_of(row: Any) -> CheckpointSummary:
    return CheckpointSummary(
        meta=_meta_of(row),
        iteration=row.iteration,
        completed_phases=cast(Sequence[str], codec.decode(row.completed_phases)),
        message_count=row.message_count,
        size_bytes=row.size_bytes,
        created_at=row.created_at,
        updated_at=row.updated_at,
        attempts=row.attempts,
        status=CheckpointStatus(row.status),
        last_error=row.last_error,
        app_version=row.app_version,
        owner=row.owner,
        epoch=row.epoch,
    )


def _checkpoint_of(row: Any, messages: Sequence[bytes]) -> RunCheckpoint:
    return _summary_of(row).with_messages(cast(Sequence[JSONValue], join_messages(messages)))


def _raw_driver_errors() -> tuple[type[BaseException], ...]:
    """Errors of the drivers themselves, raised on the raw fast path (asyncpg is optional)."""
    errors: list[type[BaseException]] = [sqlite3.Error]
    try:
        import asyncpg  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - the postgres extra is not installed
        pass
    else:
        errors += [asyncpg.PostgresError, asyncpg.InterfaceError]
    return tuple(errors)


DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.DBAPIError,
    OSError,
    TimeoutError,
    UnicodeError,
    OverflowError,
    *_raw_driver_errors(),
)


def _driver_error(exc: BaseException) -> BaseException:
    """The driver's own exception under SQLAlchemy's (and its adapter's) wrappers."""
    inner = exc.orig if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None else exc
    return (
        inner.__cause__ if getattr(inner, "sqlstate", None) is None and inner.__cause__ else inner
    )


def _is_bad_data(exc: BaseException) -> bool:
    if isinstance(
        exc,
        UnicodeError
        | OverflowError
        | sa_exc.DataError
        | sa_exc.IntegrityError
        | sqlite3.DataError
        | sqlite3.IntegrityError,
    ):
        return True
    sqlstate = getattr(_driver_error(exc), "sqlstate", None)
    # SQLSTATE class 22: data exception; 23: integrity constraint violation.
    return isinstance(sqlstate, str) and sqlstate[:2] in ("22", "23")


def _describe(exc: BaseException) -> str:
    inner = _driver_error(exc)
    return f"{type(inner).__name__}: {inner}"


def sqlite_file_missing(engine: AsyncEngine) -> bool:
    """True for a SQLite file database that does not exist yet (connecting would create it)."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return False
    if database.startswith("file:"):
        return False
    return not os.path.exists(database)


def preflight(engine: AsyncEngine) -> None:
    """Refuse a SQLite file whose directory does not exist, before connecting.

    aiosqlite's worker thread outlives a failed connect and can crash on a closed loop
    (omnilib/aiosqlite#241); a missing directory is the common cause, so catch it here.

    Raises:
        StoreUnavailableError: the SQLite file cannot be created there.
    """
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return
    if database.startswith("file:"):  # URI filenames: leave them to SQLite
        return
    parent = os.path.dirname(os.path.abspath(database))
    if not os.path.isdir(parent):
        raise StoreUnavailableError(
            f"SQLite database {database!r} cannot be opened: directory {parent!r} does not "
            "exist (create it, or fix the URL)"
        )


def map_driver_error(
    engine: AsyncEngine, action: str, run_id: str | None, exc: BaseException
) -> CheckpointError:
    """A driver failure as a typed error: bad data → :class:`CheckpointError` (inputs are
    validated before they reach the database; this is the backstop), else
    :class:`StoreUnavailableError`. The URL is printed without its password."""
    url = engine.url.render_as_string(hide_password=True)
    what = f" run {run_id!r}" if run_id else ""
    if _is_bad_data(exc):
        return CheckpointError(
            f"{action}{what} rejected by the database at {url}: {_describe(exc)}",
            run_id=run_id,
        )
    return StoreUnavailableError(
        f"{action}{what} failed: database at {url} unavailable ({_describe(exc)})",
        run_id=run_id,
    )


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

    Raises (every I/O method):
        StoreUnavailableError: the database could not be reached or failed; the driver error
            is in ``__cause__``.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_checkpoint_bytes: int = DEFAULT_MAX_CHECKPOINT_BYTES,
        sqlite_synchronous: SQLiteSynchronous = "FULL",
        sqlite_busy_timeout: float = DEFAULT_SQLITE_BUSY_TIMEOUT,
        page_size: int = DEFAULT_PAGE_SIZE,
        _owns_engine: bool = False,
    ) -> None:
        if sqlite_synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(
                f"sqlite_synchronous must be FULL, NORMAL or EXTRA, got {sqlite_synchronous!r}"
            )
        self._engine = engine
        self._owns_engine = _owns_engine
        self._max_bytes = max_checkpoint_bytes
        self._page_size = page_size
        self._dialect = engine.dialect.name
        if self._dialect not in ("sqlite", "postgresql"):
            raise CheckpointError(
                f"unsupported database {self._dialect!r}: "
                "use sqlite+aiosqlite or postgresql+asyncpg"
            )
        self._insert = insert_for(self._dialect)
        self._write_engine = engine.execution_options(**write_options())
        self._group: GroupCommitter | None = None
        self._pg_batcher: PostgresAppendBatcher | None = None
        if self._dialect == "sqlite":
            install_sqlite_hooks(
                engine, synchronous=sqlite_synchronous, busy_timeout=sqlite_busy_timeout
            )
            # SQLite has one writer at a time: this process's writes go through one owned
            # drainer, which batches those that arrive together into one transaction (one
            # fsync) instead of queueing them on the file lock.
            self._group = GroupCommitter(self._write_engine.connect, self._unavailable)
        self._schema_checked = False
        self._schema_lock = asyncio.Lock()
        self._closed = False

    # -- construction and lifetime -------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLCheckpointStore:
        """A store over a new engine for ``url`` that the store owns (see :meth:`aclose`).

        ``url`` is ``sqlite+aiosqlite:///path.db`` or ``postgresql+asyncpg://...``. Keyword
        options are those of the constructor; ``engine_options`` (a dict) goes to
        ``create_async_engine``.
        """
        engine_options: dict[str, Any] = dict(options.pop("engine_options", None) or {})
        # No pool_pre_ping: on asyncpg it costs three round trips per checkout. A connection
        # that died is invalidated by the error it raises, and the pool reconnects.
        if make_url(url).get_backend_name() == "sqlite":
            # Every path of ours ends its own transaction (SQLAlchemy's Connection rolls back
            # on close what it began), so the pool's extra reset is a wasted thread hop.
            engine_options.setdefault("pool_reset_on_return", None)
        engine = create_async_engine(url, **engine_options)
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
        if self._group is not None:
            await self._group.aclose()
        if self._pg_batcher is not None:
            await self._pg_batcher.aclose()
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
    def write_engine(self) -> AsyncEngine:
        """The engine view whose transactions are writes (``BEGIN IMMEDIATE`` on SQLite)."""
        return self._write_engine

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._dialect

    def __repr__(self) -> str:
        url = self._engine.url.render_as_string(hide_password=True)
        return f"SQLCheckpointStore({url!r})"

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

            self.preflight()
            try:
                await check_schema_revision(self._engine)
            except CheckpointError:
                raise
            except DRIVER_ERRORS as exc:
                raise self._unavailable("checking the schema", None, exc) from exc
            self._schema_checked = True

    def preflight(self) -> None:
        """Refuse a SQLite file whose directory does not exist, before connecting."""
        preflight(self._engine)

    def _unavailable(self, action: str, run_id: str | None, exc: BaseException) -> CheckpointError:
        return map_driver_error(self._engine, action, run_id, exc)

    async def _submit(self, action: str, run_id: str | None, op: Operation[T]) -> T:
        """Run the write ``op(conn)`` in a transaction, with driver errors mapped."""
        await self.check_schema()
        if self._group is not None:
            return await self._group.submit(action, run_id, op)
        try:
            async with self._write_engine.begin() as conn:
                return await op(conn)
        except CheckpointError:
            raise
        except DRIVER_ERRORS as exc:
            raise self._unavailable(action, run_id, exc) from exc

    @asynccontextmanager
    async def _read(
        self, action: str, run_id: str | None, *, snapshot: bool = False
    ) -> AsyncIterator[AsyncConnection]:
        """A read; with ``snapshot``, one transaction that sees a single consistent state."""
        await self.check_schema()
        try:
            async with self._engine.connect() as conn:
                if not snapshot:
                    yield conn
                    return
                if self._dialect == "postgresql":
                    await conn.execution_options(isolation_level="REPEATABLE READ")
                async with conn.begin():
                    yield conn
        except CheckpointError:
            raise
        except DRIVER_ERRORS as exc:
            raise self._unavailable(action, run_id, exc) from exc

    # -- CheckpointStore -----------------------------------------------------------------

    async def save(
        self,
        checkpoint: RunCheckpoint,
        *,
        base_count: int | None = None,
        encoded_tail: Sequence[bytes] | None = None,
    ) -> None:
        """Insert or replace the run's state (see :meth:`CheckpointStore.save`).

        With ``base_count`` (the caller's word that the stored transcript is
        ``checkpoint.messages[:base_count]``) only the messages after it are inserted, with the
        header, in one transaction. If the stored transcript turns out to have another length
        the whole transcript is rewritten in that same transaction: never a mix.
        """
        run_id = checkpoint.meta.run_id
        phases = check_header(checkpoint)
        messages = checkpoint.messages
        base = valid_base(base_count, messages)
        start = base or 0
        tail = tail_encodings(messages, start, encoded_tail, run_id)
        tail_size = sum(map(len, tail))
        if base is None:
            check_size(run_id, tail_size, self._max_bytes)
        header = {
            **_meta_values(checkpoint.meta),
            "iteration": checkpoint.iteration,
            "completed_phases": phases,
            "app_version": checkpoint.app_version,
            "owner": checkpoint.owner,
            "epoch": checkpoint.epoch,
            "updated_at": as_utc(checkpoint.updated_at),
        }

        append = None
        if base is not None:
            append = Append(
                run_id=run_id,
                base=base,
                rows=tail,
                size=tail_size,
                max_bytes=self._max_bytes,
                iteration=checkpoint.iteration,
                completed_phases=phases,
                updated_at=as_utc(checkpoint.updated_at),
                epoch=checkpoint.epoch,
                app_version=checkpoint.app_version,
                owner=checkpoint.owner,
                meta=[header[c] for c in _FAST_META],
            )
            if await self._append(append):
                self._log_save(run_id, checkpoint.iteration, len(tail), tail_size, True)
                return

        async def op(conn: AsyncConnection) -> None:
            rows, size = tail, tail_size
            if base is not None:
                # Not what we thought was stored (or fenced, or too large): write it all.
                # Raising here is still before this operation wrote anything.
                head = encode_messages(messages[:start], run_id)
                rows = head + rows
                size += sum(map(len, head))
                check_size(run_id, size, self._max_bytes)
            stmt = self._insert(t).values(
                run_id=run_id,
                created_at=as_utc(checkpoint.created_at),
                status=str(checkpoint.status),
                attempts=checkpoint.attempts,
                last_error=checkpoint.last_error,
                message_count=len(rows),
                size_bytes=size,
                **header,
            )
            replaced = {*header, "message_count", "size_bytes"}
            stmt = stmt.on_conflict_do_update(
                index_elements=[t.c.run_id],
                set_={k: stmt.excluded[k] for k in replaced},
                where=t.c.epoch <= stmt.excluded.epoch,
            ).returning(t.c.epoch)
            if (await conn.execute(stmt)).first() is None:
                raise CheckpointFencedError(
                    f"run {run_id!r} was taken over by a newer writer; this writer "
                    f"(epoch {checkpoint.epoch}) is stale and may no longer save it",
                    run_id=run_id,
                    epoch=checkpoint.epoch,
                )
            await conn.execute(m.delete().where(m.c.run_id == run_id))
            await self._insert_messages(conn, run_id, 0, rows)
            self._log_save(run_id, checkpoint.iteration, len(rows), size, False)

        await self._submit("saving", run_id, op)

    async def _append(self, append: Append) -> bool:
        """The guarded append on the raw driver; False: not applied (rewrite in full)."""
        if self._group is None:
            return await self._append_postgres(append)
        await self.check_schema()

        async def op(driver: Any) -> bool:
            return await append_sqlite(driver, append)

        return await self._group.submit_raw("saving", append.run_id, op)

    async def _append_postgres(self, append: Append) -> bool:
        """The append on PostgreSQL, batched with concurrent ones (see ``_fastpath``);
        False: not applied (the caller rewrites in full)."""
        await self.check_schema()
        if self._pg_batcher is None:
            self._pg_batcher = PostgresAppendBatcher(self._raw_pg_connection)
        try:
            return await self._pg_batcher.submit(append)
        except DRIVER_ERRORS as exc:
            raise self._unavailable("saving", append.run_id, exc) from exc

    @asynccontextmanager
    async def _raw_pg_connection(self) -> AsyncIterator[Any]:
        """A pooled asyncpg connection outside any transaction (autocommit statements)."""
        async with self._engine.connect() as conn:
            raw = await conn.get_raw_connection()
            try:
                yield raw.driver_connection
            except BaseException as exc:
                if not _is_bad_data(exc):
                    # The pool cannot see errors raised past SQLAlchemy: drop the connection
                    # rather than hand it out again in an unknown state.
                    await conn.invalidate()
                raise

    @staticmethod
    async def _insert_messages(
        conn: AsyncConnection, run_id: str, start: int, rows: Sequence[bytes]
    ) -> None:
        if rows:
            await conn.execute(
                m.insert(),
                [{"run_id": run_id, "seq": start + i, "data": d} for i, d in enumerate(rows)],
            )

    @staticmethod
    def _log_save(run_id: str, iteration: int, count: int, size: int, appended: bool) -> None:
        logger.debug(
            "saved run %s at iteration %d: %s %d messages (%d bytes)",
            run_id,
            iteration,
            "appended" if appended else "rewrote",
            count,
            size,
            extra={"action": "save_checkpoint", "run_id": run_id, "appended": appended},
        )

    async def register(self, checkpoint: RunCheckpoint) -> int:
        """Insert the initial row or take over an existing one; returns the run's epoch.

        The initial row has no messages (``checkpoint.messages`` is ignored): the first
        ``save`` writes them.
        """
        phases = check_header(checkpoint)
        meta = checkpoint.meta
        stmt = self._insert(t).values(
            run_id=meta.run_id,
            **_meta_values(meta),
            message_count=0,
            size_bytes=0,
            iteration=checkpoint.iteration,
            completed_phases=phases,
            status=str(checkpoint.status),
            attempts=checkpoint.attempts,
            last_error=checkpoint.last_error,
            app_version=checkpoint.app_version,
            owner=checkpoint.owner,
            epoch=checkpoint.epoch,
            created_at=as_utc(checkpoint.created_at),
            updated_at=as_utc(checkpoint.updated_at),
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[t.c.run_id],
            set_={
                **{c.name: stmt.excluded[c.name] for c in _META_COLUMNS},
                "app_version": stmt.excluded.app_version,
                "owner": stmt.excluded.owner,
                "updated_at": utcnow(),
                "epoch": t.c.epoch + 1,
            },
        ).returning(t.c.epoch)

        async def op(conn: AsyncConnection) -> int:
            return int((await conn.execute(stmt)).scalar_one())

        epoch = await self._submit("registering", meta.run_id, op)
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
            select(m.c.run_id, m.c.data)
            .where(m.c.run_id.in_(run_ids))
            .order_by(m.c.run_id, m.c.seq)
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
                await conn.execute(select(*_SUMMARY_COLUMNS).where(t.c.run_id == run_id))
            ).first()
            if row is None:
                return None
            messages = await self._messages_of(conn, [run_id])
        return _checkpoint_of(row, messages[run_id])

    async def delete(self, run_id: str, *, epoch: int | None = None) -> bool:
        """Delete the run's checkpoint; True if one was deleted (see the protocol)."""
        if not is_storable_id(run_id):
            return False
        stmt = t.delete().where(t.c.run_id == run_id)
        if epoch is not None:
            stmt = stmt.where(t.c.epoch <= epoch)

        async def op(conn: AsyncConnection) -> bool:
            deleted = (await conn.execute(stmt.returning(t.c.run_id))).first() is not None
            if deleted:
                await conn.execute(m.delete().where(m.c.run_id == run_id))
            return deleted

        return await self._submit("deleting", run_id, op)

    def _filters(
        self,
        status: CheckpointStatus | None,
        agent_id: str | None,
        older_than: float | None,
    ) -> list[Any]:
        clauses: list[Any] = []
        if status is not None:
            clauses.append(t.c.status == str(status))
        if agent_id is not None:
            clauses.append(t.c.agent_id == agent_id)
        bound = cutoff(older_than)
        if bound is not None:
            clauses.append(t.c.updated_at <= bound)
        return clauses

    async def list_interrupted(
        self,
        *,
        agent_id: str | None = None,
        older_than: float | None = None,
        limit: int | None = None,
    ) -> list[RunCheckpoint]:
        """Active checkpoints with transcripts, oldest ``updated_at`` first."""
        stmt = (
            select(*_SUMMARY_COLUMNS)
            .where(*self._filters(CheckpointStatus.ACTIVE, agent_id, older_than))
            .order_by(t.c.updated_at, t.c.run_id)
            .limit(limit)
        )
        async with self._read("listing interrupted runs", None, snapshot=True) as conn:
            rows = (await conn.execute(stmt)).all()
            messages = await self._messages_of(conn, [r.run_id for r in rows])
        return [_checkpoint_of(r, messages[r.run_id]) for r in rows]

    async def iter_summaries(
        self,
        *,
        status: CheckpointStatus | None = CheckpointStatus.ACTIVE,
        agent_id: str | None = None,
        older_than: float | None = None,
        updated_before: datetime | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> AsyncIterator[CheckpointSummary]:
        """Stream summaries page by page (keyset pagination on ``(updated_at, run_id)``)."""
        filters = self._filters(status, agent_id, older_than)
        if updated_before is not None:
            filters.append(t.c.updated_at < as_utc(updated_before))
        key = tuple_(t.c.updated_at, t.c.run_id)
        order = (
            (t.c.updated_at.desc(), t.c.run_id.desc())
            if newest_first
            else (t.c.updated_at, t.c.run_id)
        )
        last: tuple[Any, str] | None = None
        remaining = limit
        while remaining is None or remaining > 0:
            page = self._page_size if remaining is None else min(self._page_size, remaining)
            where = list(filters)
            if last is not None:
                where.append(key < tuple_(*last) if newest_first else key > tuple_(*last))
            stmt = select(*_SUMMARY_COLUMNS).where(and_(True, *where)).order_by(*order).limit(page)
            async with self._read("listing runs", None) as conn:
                rows = (await conn.execute(stmt)).all()
            for row in rows:
                yield _summary_of(row)
            if len(rows) < page:
                return
            if remaining is not None:
                remaining -= len(rows)
            last = (rows[-1].updated_at, rows[-1].run_id)

    async def claim(
        self, run_id: str, *, epoch: int, owner: str | None = None
    ) -> RunCheckpoint | None:
        """Atomically claim an active run at ``epoch`` for recovery (see the protocol)."""
        check_text("owner", owner, run_id)
        if not is_storable_id(run_id):
            return None
        stmt = (
            t.update()
            .where(
                t.c.run_id == run_id,
                t.c.status == str(CheckpointStatus.ACTIVE),
                t.c.epoch == epoch,
            )
            # updated_at moves too: a recovery pass that started before this claim will not
            # list the run again (its scan is bounded by updated_before).
            .values(
                attempts=t.c.attempts + 1, epoch=t.c.epoch + 1, owner=owner, updated_at=utcnow()
            )
            .returning(*_SUMMARY_COLUMNS)
        )

        async def op(conn: AsyncConnection) -> RunCheckpoint | None:
            row = (await conn.execute(stmt)).first()
            if row is None:
                return None
            messages = await self._messages_of(conn, [run_id])
            return _checkpoint_of(row, messages[run_id])

        return await self._submit("claiming", run_id, op)

    async def mark_dead(self, run_id: str, *, reason: str, epoch: int | None = None) -> bool:
        """Mark the run dead with ``reason`` as its last error (see the protocol)."""
        if not is_storable_id(run_id):
            return False
        stmt = (
            t.update()
            .where(t.c.run_id == run_id)
            .values(status=str(CheckpointStatus.DEAD), last_error=clean_text(reason))
        )
        if epoch is not None:
            stmt = stmt.where(t.c.epoch <= epoch)

        async def op(conn: AsyncConnection) -> bool:
            return bool((await conn.execute(stmt)).rowcount)

        return await self._submit("marking dead", run_id, op)

    async def record_error(self, run_id: str, error: str) -> bool:
        """Store ``error`` as the run's last error; True if the run exists."""
        if not is_storable_id(run_id):
            return False
        stmt = t.update().where(t.c.run_id == run_id).values(last_error=clean_text(error))

        async def op(conn: AsyncConnection) -> bool:
            return bool((await conn.execute(stmt)).rowcount)

        return await self._submit("recording an error for", run_id, op)

    async def requeue(self, run_id: str) -> bool:
        """Make a dead run recoverable again (status active, attempts 0); True if it was dead."""
        if not is_storable_id(run_id):
            return False
        stmt = (
            t.update()
            .where(t.c.run_id == run_id, t.c.status == str(CheckpointStatus.DEAD))
            .values(status=str(CheckpointStatus.ACTIVE), attempts=0)
        )

        async def op(conn: AsyncConnection) -> bool:
            return bool((await conn.execute(stmt)).rowcount)

        return await self._submit("requeueing", run_id, op)

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
        bound = cutoff(older_than)
        filters = self._filters(status, None, None)
        if bound is not None:
            filters.append(t.c.updated_at <= bound)
        if dry_run:
            stmt = select(func.count()).select_from(t).where(*filters)
            async with self._read("counting runs to purge", None) as conn:
                return int((await conn.execute(stmt)).scalar_one())
        pick = select(t.c.run_id).where(*filters).order_by(t.c.updated_at).limit(batch_size)
        if self._dialect == "postgresql":
            pick = pick.with_for_update(skip_locked=True)

        async def op(conn: AsyncConnection) -> int:
            ids = list((await conn.execute(pick)).scalars())
            if not ids:
                return 0
            gone = list(
                (
                    await conn.execute(
                        t.delete().where(t.c.run_id.in_(ids), *filters).returning(t.c.run_id)
                    )
                ).scalars()
            )
            if gone:
                await conn.execute(m.delete().where(m.c.run_id.in_(gone)))
            return len(gone) or -1  # -1: rows picked but changed meanwhile; try again

        total = 0
        while True:
            deleted = await self._submit("purging", None, op)
            if deleted == 0:
                break
            total += max(deleted, 0)
            if on_progress is not None:
                on_progress(total)
            if deleted < 0:
                await asyncio.sleep(0)
        logger.info("purged %d checkpoints", total, extra={"action": "purge", "count": total})
        return total

    async def stats(self) -> CheckpointStats:
        """Counts by status and agent, sizes, and the oldest interrupted run."""
        async with self._read("computing stats", None, snapshot=True) as conn:
            by_status = {
                str(k): int(v)
                for k, v in await conn.execute(
                    select(t.c.status, func.count()).group_by(t.c.status)
                )
            }
            agent = func.coalesce(t.c.agent_id, "")
            by_agent = {
                str(k): int(v)
                for k, v in await conn.execute(select(agent, func.count()).group_by(agent))
            }
            total_size = (
                await conn.execute(select(func.coalesce(func.sum(t.c.size_bytes), 0)))
            ).scalar_one()
            largest = (
                await conn.execute(
                    select(t.c.run_id, t.c.size_bytes)
                    .order_by(t.c.size_bytes.desc(), t.c.run_id)
                    .limit(1)
                )
            ).first()
            oldest = (
                await conn.execute(
                    select(t.c.run_id, t.c.updated_at)
                    .where(t.c.status == str(CheckpointStatus.ACTIVE))
                    .order_by(t.c.updated_at, t.c.run_id)
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
        stmt = select(func.count()).select_from(t).where(*self._filters(status, None, None))
        async with self._read("counting runs", None) as conn:
            return int((await conn.execute(stmt)).scalar_one())
