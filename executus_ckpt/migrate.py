"""Schema migrations (alembic) from code: ``await migrate(url)``, and the revision check.

alembic is imported only when a migration runs: reading the stored revision (every store does
it once) is a plain Core query, so ``import executus_ckpt`` does not load alembic.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from sqlalchemy import Column, Connection, MetaData, String, Table, inspect, select, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from .config import VERSION_TABLE
from .errors import CheckpointError, SchemaOutOfDateError
from .schema import OLDEST_COMPATIBLE_KEY, REQUIRED_REVISION, schema_info
from .stores._engine import (
    WRITE_OPTIONS,
    configure_sqlite,
    create_engine,
    create_private_file,
    preflight,
    sqlite_file_missing,
)
from .stores._errors import mapped_errors, safe_url

if TYPE_CHECKING:
    from alembic.config import Config

logger = logging.getLogger(__name__)

_version_table = Table(VERSION_TABLE, MetaData(), Column("version_num", String(32)))
"""alembic's version table, read with Core (kept apart from ``schema.metadata``)."""

_MIGRATION_LOCK = 0x65786563_636B7074  # "execckpt": PostgreSQL advisory lock key

# alembic keeps the running migration in module globals (`alembic.context`, `alembic.op`):
# two runs in one process, even on two databases or two event loops, would overwrite each
# other's (KeyError('config')). The database lock cannot help there, so the process takes
# turns too: tasks of one loop queue on that loop's asyncio.Lock, loops (threads) on one
# threading.Lock that is polled, never waited on, so that no loop blocks.
_process_turn = threading.Lock()
_loop_turns: WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = WeakKeyDictionary()
_loop_turns_guard = threading.Lock()
_POLL_MAX = 0.05  # seconds between tries for another loop's turn, at most


def script_location() -> str:
    """Where the migration scripts are: the source checkout's, else those in the wheel.

    A checkout is recognised by its ``alembic.ini`` and ``pyproject.toml`` beside
    ``migrations/`` (an editable install keeps a stale copy in the wheel location; an
    installed wheel must never pick up another package's top-level ``migrations/``).
    """
    root = Path(__file__).resolve().parent.parent
    source = root / "migrations"
    if (
        (source / "env.py").is_file()
        and (root / "alembic.ini").is_file()
        and (root / "pyproject.toml").is_file()
    ):
        return str(source)
    packaged = resources.files("executus_ckpt") / "_migrations"
    if packaged.is_dir():
        return str(packaged)
    raise FileNotFoundError("executus_ckpt migration scripts not found (broken installation)")


def alembic_config(url: str | None = None) -> Config:
    """An alembic :class:`Config` for our scripts (no ini file needed)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", script_location())
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@cache
def known_revisions() -> tuple[str, ...]:
    """Every revision id the shipped migration scripts define, oldest first.

    A revision stored in a database but missing here was written by a newer release.
    """
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    return tuple(rev.revision for rev in reversed(list(script.walk_revisions())))


def check_target(revision: str) -> None:
    """Raise :class:`CheckpointError` unless ``revision`` is a target :func:`migrate` takes.

    The targets are ``"head"``, ``"base"`` and the ids of :func:`known_revisions` (alembic's
    relative and partial forms are not accepted: an operator names a revision exactly).
    """
    known = known_revisions()
    if revision in ("head", "base") or revision in known:
        return
    raise CheckpointError(
        f"unknown schema revision {revision!r}: use 'head', 'base' or one of {', '.join(known)}"
    )


def is_newer(found: str | None) -> bool:
    """True if ``found`` is a revision our scripts do not have (a newer release wrote it)."""
    return found is not None and found not in known_revisions()


def schema_error(url: URL, found: str | None) -> SchemaOutOfDateError:
    """The error for a database at revision ``found`` (``None``: never migrated).

    Its message and ``command`` name the fix that works: ``executus-ckpt migrate`` for a
    missing or older schema; upgrading the library for a schema written by a newer release
    (this release's scripts cannot move a database off a revision they do not have).
    """
    where = safe_url(url)
    if is_newer(found):
        from . import __version__

        command = "pip install --upgrade executus-ckpt"
        return SchemaOutOfDateError(
            f"the database at {where} is at schema revision {found}, which executus-ckpt "
            f"{__version__} does not know (it requires revision {REQUIRED_REVISION}): a newer "
            f"release migrated it. Upgrade executus-ckpt to the release that wrote revision "
            f"{found} or a later one (`{command}`); this release cannot migrate it",
            found=found,
            required=REQUIRED_REVISION,
            command=command,
        )
    command = f"executus-ckpt migrate --url '{where}'"
    state = "has no executus_ckpt schema" if found is None else f"is at schema revision {found}"
    return SchemaOutOfDateError(
        f"the database at {where} {state}, but this version of executus_ckpt requires revision "
        f"{REQUIRED_REVISION}; run `{command}` (or `await executus_ckpt.migrate(url)`)",
        found=found,
        required=REQUIRED_REVISION,
        command=command,
    )


async def migrate(url_or_engine: str | AsyncEngine, revision: str = "head") -> None:
    """Upgrade (or downgrade, for a revision below the current one) the checkpoint schema.

    Runs the migrations that ship with the package, so it works from an installed wheel. The
    version table is ``executus_ckpt_alembic_version``: a host's own alembic history is left
    alone. An engine passed in is borrowed (left open; its timeouts apply); a URL gets a
    temporary engine that bounds connecting only, not the statements (a data migration of a
    large database may run long).
    Concurrent calls against one PostgreSQL database (replicas migrating at boot) are
    serialized by an advisory lock; on SQLite by the write lock.

    Args:
        url_or_engine: ``sqlite+aiosqlite:///...`` / ``postgresql+asyncpg://...`` or an engine.
        revision: target revision; ``"head"`` (default), a revision id, or ``"base"``.

    Raises:
        CheckpointError: ``revision`` is not one of those (checked before connecting).
        SchemaOutOfDateError: the database is at a revision a newer release wrote; nothing
            was changed (upgrade executus-ckpt instead).
        StoreUnavailableError: the database could not be reached or failed.
    """
    check_target(revision)
    await run_with_connection(url_or_engine, _run, alembic_config(), revision)


async def run_with_connection(
    url_or_engine: str | AsyncEngine, fn: Callable[..., None], *args: object
) -> None:
    """Run ``fn(sync_connection, *args)`` in one committed transaction (alembic's hook).

    The connection is set up as the store sets up its own (SQLite pragmas, ``BEGIN
    IMMEDIATE``), so migrating a live SQLite file waits for writers instead of failing.
    One run at a time per process (alembic's state is global), and per PostgreSQL database
    (an advisory lock) or SQLite file (its write lock) across processes.
    """
    owned = isinstance(url_or_engine, str)
    # A temporary engine of its own bounds connecting only: a data migration of a large
    # database, or the wait for another replica's migration (the advisory lock), may take
    # longer than the store's per-statement timeout.
    engine = (
        create_engine(url_or_engine, operation_timeout=None)
        if isinstance(url_or_engine, str)
        else url_or_engine
    )
    try:
        preflight(engine)
        create_private_file(engine)
        configure_sqlite(engine)
        async with _one_migration_at_a_time():
            await _run_locked(engine, fn, *args)
    finally:
        if owned:
            await engine.dispose()


async def _run_locked(engine: AsyncEngine, fn: Callable[..., None], *args: object) -> None:
    with mapped_errors(engine.url, "migrating"):
        async with engine.execution_options(**WRITE_OPTIONS).connect() as conn:
            if conn.dialect.name == "postgresql":
                await conn.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK}
                )
            await conn.run_sync(fn, *args)
            await conn.commit()


@asynccontextmanager
async def _one_migration_at_a_time() -> AsyncIterator[None]:
    """Hold this process's migration turn (see ``_process_turn``); cancellable while waiting."""
    loop = asyncio.get_running_loop()
    with _loop_turns_guard:
        turn = _loop_turns.setdefault(loop, asyncio.Lock())
    async with turn:
        delay = 0.001
        while not _process_turn.acquire(blocking=False):
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)
        try:
            yield
        finally:
            _process_turn.release()


def _run(connection: Connection, cfg: Config, revision: str) -> None:
    from alembic import command
    from alembic.script import ScriptDirectory
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    cfg.attributes["connection"] = connection
    current = _read_revision(connection)
    if is_newer(current):
        raise schema_error(connection.engine.url, current)
    script = ScriptDirectory.from_config(cfg)
    target = script.get_current_head() if revision == "head" else revision
    if revision == "base" or (
        current is not None
        and target is not None
        and current != target
        and target in {rev.revision for rev in script.iterate_revisions(current, "base")}
    ):
        logger.info("downgrading checkpoint schema from %s to %s", current, revision)
        step = command.downgrade
    else:
        logger.info("upgrading checkpoint schema from %s to %s", current, revision)
        step = command.upgrade
    try:
        step(cfg, revision)
    except (CommandError, RevisionError) as exc:  # a backstop: the cases we know are refused above
        raise CheckpointError(f"migrating to schema revision {revision!r} failed: {exc}") from exc


def _read_revision(connection: Connection) -> str | None:
    if not inspect(connection).has_table(VERSION_TABLE):
        return None
    return connection.execute(select(_version_table.c.version_num)).scalar()


async def current_revision(engine: AsyncEngine) -> str | None:
    """The schema revision stored in the database, or ``None`` if never migrated.

    Raises:
        StoreUnavailableError: the database could not be reached.
    """
    preflight(engine)
    if sqlite_file_missing(engine):
        return None  # no file, no schema: do not create an empty file just to look
    with mapped_errors(engine.url, "reading the schema revision"):
        async with engine.connect() as conn:
            return await conn.run_sync(_read_revision)


async def schema_status(engine: AsyncEngine) -> tuple[str | None, bool]:
    """``(found revision, usable by this release)``: usable if at ``REQUIRED_REVISION``, or
    newer and declared compatible with it by the release that migrated it (a rolling deploy).

    Raises:
        StoreUnavailableError: the database could not be reached.
    """
    found = await current_revision(engine)
    if found == REQUIRED_REVISION:
        return found, True
    if found is not None and found > REQUIRED_REVISION:
        oldest = await _oldest_compatible_revision(engine)
        if oldest is not None and oldest <= REQUIRED_REVISION:
            logger.info(
                "database schema at revision %s, declared compatible with revision %s "
                "(this release requires %s)",
                found,
                oldest,
                REQUIRED_REVISION,
                extra={"action": "schema_compatible", "found": found},
            )
            return found, True
    return found, False


async def check_schema_revision(engine: AsyncEngine) -> None:
    """Raise :class:`SchemaOutOfDateError` unless this release can use the database's schema
    (see :func:`schema_status`).

    The error names the fix (see :func:`schema_error`); only then are the migration scripts
    read, so a store on an up-to-date database never imports alembic.
    """
    found, usable = await schema_status(engine)
    if not usable:
        raise schema_error(engine.url, found)


async def _oldest_compatible_revision(engine: AsyncEngine) -> str | None:
    def read(connection: Connection) -> str | None:
        if not inspect(connection).has_table(schema_info.name):
            return None
        value = connection.execute(
            select(schema_info.c.value).where(schema_info.c.name == OLDEST_COMPATIBLE_KEY)
        ).scalar()
        return None if value is None else str(value)

    with mapped_errors(engine.url, "reading the schema's compatibility"):
        async with engine.connect() as conn:
            return await conn.run_sync(read)
