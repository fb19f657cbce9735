"""Schema migrations (alembic) from code: ``await migrate(url)``, and the revision check."""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from .config import VERSION_TABLE
from .errors import CheckpointError, SchemaOutOfDateError
from .schema import REQUIRED_REVISION
from .stores.sql import DRIVER_ERRORS, map_driver_error, preflight, sqlite_file_missing

logger = logging.getLogger(__name__)


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
    cfg = Config()
    cfg.set_main_option("script_location", script_location())
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest revision among the shipped migration scripts."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


async def migrate(url_or_engine: str | AsyncEngine, revision: str = "head") -> None:
    """Upgrade (or downgrade, for a revision below the current one) the checkpoint schema.

    Runs the migrations that ship with the package, so it works from an installed wheel. The
    version table is ``executus_ckpt_alembic_version``: a host's own alembic history is left
    alone. An engine passed in is borrowed (left open); a URL gets a temporary engine.

    Args:
        url_or_engine: ``sqlite+aiosqlite:///...`` / ``postgresql+asyncpg://...`` or an engine.
        revision: target revision; ``"head"`` (default), a revision id, or ``"base"``.
    """
    await run_with_connection(url_or_engine, _run, alembic_config(), revision)


async def run_with_connection(
    url_or_engine: str | AsyncEngine, fn: Callable[..., None], *args: object
) -> None:
    """Run ``fn(sync_connection, *args)`` in one committed transaction (alembic's hook).

    The connection is set up as the store sets up its own (SQLite pragmas, ``BEGIN
    IMMEDIATE``), so migrating a live SQLite file waits for writers instead of failing.
    """
    from .stores.sql import SQLCheckpointStore

    if isinstance(url_or_engine, str):
        store = SQLCheckpointStore.from_url(url_or_engine)
    else:
        store = SQLCheckpointStore(url_or_engine)
    try:
        store.preflight()
        async with store.write_engine.connect() as conn:
            await conn.run_sync(fn, *args)
            await conn.commit()
    except CheckpointError:
        raise
    except DRIVER_ERRORS as exc:
        raise map_driver_error(store.engine, "migrating", None, exc) from exc
    finally:
        await store.aclose()


def _run(connection: Connection, cfg: Config, revision: str) -> None:
    cfg.attributes["connection"] = connection
    current = MigrationContext.configure(
        connection, opts={"version_table": VERSION_TABLE}
    ).get_current_revision()
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


async def current_revision(engine: AsyncEngine) -> str | None:
    """The schema revision stored in the database, or ``None`` if never migrated.

    Raises:
        StoreUnavailableError: the database could not be reached.
    """
    preflight(engine)
    if sqlite_file_missing(engine):
        return None  # no file, no schema: do not create an empty file just to look
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_current)
    except DRIVER_ERRORS as exc:
        raise map_driver_error(engine, "reading the schema revision", None, exc) from exc


def _current(connection: Connection) -> str | None:
    ctx = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return ctx.get_current_revision()


async def check_schema_revision(engine: AsyncEngine) -> None:
    """Raise :class:`SchemaOutOfDateError` unless the database is at ``REQUIRED_REVISION``."""
    found = await current_revision(engine)
    if found == REQUIRED_REVISION:
        return
    url = engine.url.render_as_string(hide_password=True)
    command = f"executus-ckpt migrate --url '{url}'"
    state = "has no executus_ckpt schema" if found is None else f"is at schema revision {found}"
    raise SchemaOutOfDateError(
        f"the database at {url} {state}, but this version of executus_ckpt requires revision "
        f"{REQUIRED_REVISION}; run `{command}` (or `await executus_ckpt.migrate(url)`)",
        found=found,
        required=REQUIRED_REVISION,
        command=command,
    )
