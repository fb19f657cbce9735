"""Schema migrations (alembic) from code: ``await migrate(url)``, and the revision check.

alembic is imported only when a migration runs: reading the stored revision (every store does
it once) is a plain Core query, so ``import executus_ckpt`` does not load alembic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Column, Connection, MetaData, String, Table, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from .config import VERSION_TABLE
from .errors import SchemaOutOfDateError
from .schema import REQUIRED_REVISION
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


async def migrate(url_or_engine: str | AsyncEngine, revision: str = "head") -> None:
    """Upgrade (or downgrade, for a revision below the current one) the checkpoint schema.

    Runs the migrations that ship with the package, so it works from an installed wheel. The
    version table is ``executus_ckpt_alembic_version``: a host's own alembic history is left
    alone. An engine passed in is borrowed (left open); a URL gets a temporary engine.
    Concurrent calls against one PostgreSQL database (replicas migrating at boot) are
    serialized by an advisory lock; on SQLite by the write lock.

    Args:
        url_or_engine: ``sqlite+aiosqlite:///...`` / ``postgresql+asyncpg://...`` or an engine.
        revision: target revision; ``"head"`` (default), a revision id, or ``"base"``.

    Raises:
        StoreUnavailableError: the database could not be reached or failed.
    """
    await run_with_connection(url_or_engine, _run, alembic_config(), revision)


async def run_with_connection(
    url_or_engine: str | AsyncEngine, fn: Callable[..., None], *args: object
) -> None:
    """Run ``fn(sync_connection, *args)`` in one committed transaction (alembic's hook).

    The connection is set up as the store sets up its own (SQLite pragmas, ``BEGIN
    IMMEDIATE``), so migrating a live SQLite file waits for writers instead of failing.
    """
    owned = isinstance(url_or_engine, str)
    engine = create_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    try:
        preflight(engine)
        create_private_file(engine)
        configure_sqlite(engine)
        with mapped_errors(engine.url, "migrating"):
            async with engine.execution_options(**WRITE_OPTIONS).connect() as conn:
                if conn.dialect.name == "postgresql":
                    await conn.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK}
                    )
                await conn.run_sync(fn, *args)
                await conn.commit()
    finally:
        if owned:
            await engine.dispose()


def _run(connection: Connection, cfg: Config, revision: str) -> None:
    from alembic import command
    from alembic.script import ScriptDirectory

    cfg.attributes["connection"] = connection
    current = _read_revision(connection)
    script = ScriptDirectory.from_config(cfg)
    target = script.get_current_head() if revision == "head" else revision
    if revision == "base" or (
        current is not None
        and target is not None
        and current != target
        and target in {rev.revision for rev in script.iterate_revisions(current, "base")}
    ):
        logger.info("downgrading checkpoint schema from %s to %s", current, revision)
        command.downgrade(cfg, revision)
    else:
        logger.info("upgrading checkpoint schema from %s to %s", current, revision)
        command.upgrade(cfg, revision)


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


async def check_schema_revision(engine: AsyncEngine) -> None:
    """Raise :class:`SchemaOutOfDateError` unless the database is at ``REQUIRED_REVISION``."""
    found = await current_revision(engine)
    if found == REQUIRED_REVISION:
        return
    url = safe_url(engine.url)
    command = f"executus-ckpt migrate --url '{url}'"
    state = "has no executus_ckpt schema" if found is None else f"is at schema revision {found}"
    raise SchemaOutOfDateError(
        f"the database at {url} {state}, but this version of executus_ckpt requires revision "
        f"{REQUIRED_REVISION}; run `{command}` (or `await executus_ckpt.migrate(url)`)",
        found=found,
        required=REQUIRED_REVISION,
        command=command,
    )
