"""alembic environment for executus_ckpt (async; reuses a connection handed in by migrate())."""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from executus_ckpt.config import ENV_DATABASE_URL, VERSION_TABLE
from executus_ckpt.schema import metadata

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ.get(ENV_DATABASE_URL)
    url = url or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit(
            f"no database URL: pass `-x url=...` or set {ENV_DATABASE_URL} "
            "(e.g. sqlite+aiosqlite:///executus_ckpt.db)"
        )
    return url


def do_run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        compare_server_default=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    from executus_ckpt.migrate import run_with_connection

    # The connection `await migrate(url)` would use: the store's SQLite pragmas and locking.
    await run_with_connection(_url(), do_run_migrations)


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    do_run_migrations(connection)
elif context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_async_migrations())
