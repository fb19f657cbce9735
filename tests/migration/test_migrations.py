"""Schema migrations: ``migrate()``, the revision check, the alembic CLI, on SQLite and PostgreSQL.

Every test runs on both backends through the ``sql_url`` (migrated) / ``empty_sql_url``
(un-migrated) fixtures.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from executus_ckpt import (
    RunCheckpoint,
    RunCheckpointMeta,
    SchemaOutOfDateError,
    SQLCheckpointStore,
    migrate,
)
from executus_ckpt.config import ENV_DATABASE_URL, VERSION_TABLE
from executus_ckpt.migrate import (
    alembic_config,
    current_revision,
    script_location,
)
from executus_ckpt.schema import REQUIRED_REVISION, metadata

REPO_ROOT = Path(__file__).resolve().parents[2]
ALEMBIC = Path(sys.executable).parent / "alembic"


def head_revision() -> str:
    """The newest revision among the shipped migration scripts."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


INDEXES = {ix.name for ix in metadata.tables["run_checkpoints"].indexes}
SCHEMA_TABLES = set(metadata.tables)


def _revisions() -> list[str]:
    """Every shipped revision, oldest first."""
    script = ScriptDirectory.from_config(alembic_config())
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


# -- helpers -------------------------------------------------------------------------------


@asynccontextmanager
async def _engine(url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(url)
    try:
        yield engine
    finally:
        await engine.dispose()


async def _tables(url: str) -> set[str]:
    async with _engine(url) as engine, engine.connect() as conn:
        return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))


async def _indexes(url: str) -> set[str]:
    async with _engine(url) as engine, engine.connect() as conn:
        found = await conn.run_sync(lambda c: inspect(c).get_indexes("run_checkpoints"))
    return {ix["name"] for ix in found if ix["name"]}


async def _revision(url: str) -> str | None:
    async with _engine(url) as engine:
        return await current_revision(engine)


async def _execute(url: str, *statements: str) -> None:
    async with _engine(url) as engine, engine.begin() as conn:
        for stmt in statements:
            await conn.execute(text(stmt))


async def _rows(url: str, query: str) -> list[tuple[Any, ...]]:
    async with _engine(url) as engine, engine.connect() as conn:
        return [tuple(r) for r in (await conn.execute(text(query))).all()]


async def _round_trip(url: str, run_id: str = "r1") -> None:
    """A store over ``url`` saves and loads a checkpoint."""
    async with SQLCheckpointStore.open(url) as store:
        await store.save(
            RunCheckpoint(RunCheckpointMeta(run_id, agent_id="a"), messages=[{"x": 1}], iteration=3)
        )
        loaded = await store.load(run_id)
    assert loaded is not None
    assert loaded.messages == [{"x": 1}]
    assert loaded.iteration == 3
    assert loaded.meta.agent_id == "a"


def _with_password(url: str, password: str) -> str:
    """``url`` with a password, for PostgreSQL (trust auth accepts any); SQLite unchanged."""
    u = make_url(url)
    if u.get_backend_name() != "postgresql":
        return url
    return u.set(password=password).render_as_string(hide_password=False)


async def _alembic(*args: str, url_env: str | None = None) -> subprocess.CompletedProcess[str]:
    """The alembic CLI from the repo root (its alembic.ini), with the URL env var as given."""
    env = {k: v for k, v in os.environ.items() if k != ENV_DATABASE_URL}
    if url_env is not None:
        env[ENV_DATABASE_URL] = url_env
    return await asyncio.to_thread(
        subprocess.run,
        [str(ALEMBIC), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


def _ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"alembic failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
    return proc


# -- migrate() ------------------------------------------------------------------------------


def test_required_revision_is_the_shipped_head() -> None:
    assert head_revision() == REQUIRED_REVISION
    revisions = _revisions()
    assert revisions[0] == "0001", "the first revision creates run_checkpoints"
    assert revisions[-1] == REQUIRED_REVISION
    assert len(set(revisions)) == len(revisions)
    assert VERSION_TABLE == "executus_ckpt_alembic_version"


async def test_migrate_empty_db_reaches_head(empty_sql_url: str) -> None:
    assert await _revision(empty_sql_url) is None
    assert "run_checkpoints" not in await _tables(empty_sql_url)

    await migrate(empty_sql_url)

    assert await _revision(empty_sql_url) == REQUIRED_REVISION == head_revision()
    tables = await _tables(empty_sql_url)
    assert {*SCHEMA_TABLES, "executus_ckpt_alembic_version"} <= tables
    assert "alembic_version" not in tables, "a host's alembic_version table must not be created"
    assert await _rows(empty_sql_url, f"SELECT version_num FROM {VERSION_TABLE}") == [
        (REQUIRED_REVISION,)
    ]
    assert await _indexes(empty_sql_url) == INDEXES


async def test_migrate_leaves_host_alembic_history_alone(empty_sql_url: str) -> None:
    await _execute(
        empty_sql_url,
        "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)",
        "INSERT INTO alembic_version (version_num) VALUES ('hostrev42')",
        "CREATE TABLE host_things (id INTEGER PRIMARY KEY, name VARCHAR(20))",
        "INSERT INTO host_things (id, name) VALUES (7, 'kept')",
    )

    await migrate(empty_sql_url)
    assert await _revision(empty_sql_url) == REQUIRED_REVISION
    assert await _rows(empty_sql_url, "SELECT version_num FROM alembic_version") == [("hostrev42",)]

    # ... and through a full downgrade as well: ours goes, the host's stays.
    await migrate(empty_sql_url, "base")
    assert await _revision(empty_sql_url) is None
    assert await _rows(empty_sql_url, "SELECT version_num FROM alembic_version") == [("hostrev42",)]
    assert await _rows(empty_sql_url, "SELECT id, name FROM host_things") == [(7, "kept")]
    tables = await _tables(empty_sql_url)
    assert not tables & SCHEMA_TABLES
    assert {"alembic_version", "host_things"} <= tables


async def test_migrate_is_idempotent_and_keeps_data(sql_url: str) -> None:
    await _round_trip(sql_url, "kept")
    await migrate(sql_url)
    await migrate(sql_url, "head")
    await migrate(sql_url, REQUIRED_REVISION)
    assert await _revision(sql_url) == REQUIRED_REVISION
    assert await _rows(sql_url, f"SELECT version_num FROM {VERSION_TABLE}") == [
        (REQUIRED_REVISION,)
    ]
    async with SQLCheckpointStore.open(sql_url) as store:
        loaded = await store.load("kept")
    assert loaded is not None and loaded.messages == [{"x": 1}]


async def test_migrate_borrowed_engine_is_left_open(empty_sql_url: str) -> None:
    async with _engine(empty_sql_url) as engine:
        await migrate(engine)
        # The engine still works after migrate() (borrowed, not disposed) ...
        assert await current_revision(engine) == REQUIRED_REVISION
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM run_checkpoints"))).scalar() == 0
        # ... and a store over it can be used.
        store = SQLCheckpointStore(engine)
        await store.save(RunCheckpoint(RunCheckpointMeta("b1"), messages=["m"]))
        assert (await store.load("b1")) is not None
        await store.aclose()


async def test_downgrade_to_base_then_upgrade_again(sql_url: str) -> None:
    await _round_trip(sql_url, "before")

    await migrate(sql_url, "base")
    assert await _revision(sql_url) is None
    assert not await _tables(sql_url) & SCHEMA_TABLES
    with pytest.raises(SchemaOutOfDateError):
        async with SQLCheckpointStore.open(sql_url):
            pass

    await migrate(sql_url)
    assert await _revision(sql_url) == REQUIRED_REVISION
    assert await _indexes(sql_url) == INDEXES
    await _round_trip(sql_url, "after")
    async with SQLCheckpointStore.open(sql_url) as store:
        assert await store.load("before") is None, "downgrade to base drops the data"
        assert await store.count() == 1


async def test_step_by_step_up_and_down(empty_sql_url: str) -> None:
    """Every revision can be reached one step at a time, up to head and back to base."""
    revisions = _revisions()
    for rev in revisions:
        await migrate(empty_sql_url, rev)
        assert await _revision(empty_sql_url) == rev
    assert await _tables(empty_sql_url) >= SCHEMA_TABLES
    for rev in reversed(revisions[:-1]):
        await migrate(empty_sql_url, rev)
        assert await _revision(empty_sql_url) == rev
    await migrate(empty_sql_url, "base")
    assert await _revision(empty_sql_url) is None
    assert not await _tables(empty_sql_url) & SCHEMA_TABLES
    await migrate(empty_sql_url)
    assert await _revision(empty_sql_url) == REQUIRED_REVISION


def _snapshot(cp: RunCheckpoint | None) -> tuple[Any, ...]:
    assert cp is not None
    return (
        cp.meta,
        list(cp.messages),
        cp.iteration,
        list(cp.completed_phases),
        cp.created_at,
        cp.updated_at,
        cp.attempts,
        str(cp.status),
        cp.last_error,
        cp.app_version,
        cp.owner,
        cp.epoch,
    )


async def test_downgrade_and_upgrade_keep_checkpoints(sql_url: str) -> None:
    """Going down to any earlier revision (not base) and back up loses no checkpoint."""
    runs = [
        RunCheckpoint(
            RunCheckpointMeta(f"run-{i:03d}", agent_id="agent", prompt="p\u00e9"),
            messages=[{"role": "user", "content": f"m{j} \U0001f600"} for j in range(i % 4)],
            iteration=i,
            completed_phases=["plan"] if i % 2 else [],
            app_version="v1",
            owner="o",
        )
        for i in range(205)  # more than one batch of a data migration
    ]
    async with SQLCheckpointStore.open(sql_url) as store:
        for cp in runs:
            await store.save(cp)
        await store.record_error("run-001", "boom")
        before = {cp.run_id: _snapshot(await store.load(cp.run_id)) for cp in runs}
    assert [m for m in before.values() if m[1]], "some runs have messages"

    for rev in _revisions()[:-1]:
        await migrate(sql_url, rev)
        assert await _revision(sql_url) == rev
        await migrate(sql_url)
        assert await _revision(sql_url) == REQUIRED_REVISION
        async with SQLCheckpointStore.open(sql_url) as store:
            after = {cp.run_id: _snapshot(await store.load(cp.run_id)) for cp in runs}
            assert await store.count() == len(runs)
        assert after == before, f"checkpoints changed going down to {rev} and back up"


# -- the schema module and the migrations agree -----------------------------------------------


def _autogenerate_diff(connection: Connection) -> list[Any]:
    ctx = MigrationContext.configure(
        connection,
        opts={
            "compare_type": True,
            "compare_server_default": True,
            "include_name": lambda name, type_, _parent: (
                not (type_ == "table" and name == VERSION_TABLE)
            ),
        },
    )
    return list(compare_metadata(ctx, metadata))


async def test_no_autogenerate_diff_after_upgrade(empty_sql_url: str) -> None:
    await migrate(empty_sql_url)
    async with _engine(empty_sql_url) as engine, engine.connect() as conn:
        diff = await conn.run_sync(_autogenerate_diff)
    assert diff == [], f"schema.py and the migrations disagree: {diff}"


async def test_autogenerate_diff_detects_a_drift(empty_sql_url: str) -> None:
    """The diff check above is live: a missing index is reported."""
    await migrate(empty_sql_url)
    await _execute(empty_sql_url, "DROP INDEX ix_run_checkpoints_agent_status")
    async with _engine(empty_sql_url) as engine, engine.connect() as conn:
        diff = await conn.run_sync(_autogenerate_diff)
    assert [d[0] for d in diff] == ["add_index"]
    assert diff[0][1].name == "ix_run_checkpoints_agent_status"


# -- the store's revision check -----------------------------------------------------------------


async def test_store_refuses_unmigrated_db(empty_sql_url: str) -> None:
    url = _with_password(empty_sql_url, "s3cretpw")
    with pytest.raises(SchemaOutOfDateError) as info:
        async with SQLCheckpointStore.open(url):
            pass
    err = info.value
    assert err.found is None
    assert err.required == REQUIRED_REVISION
    message = str(err)
    assert re.search(rf"\b{REQUIRED_REVISION}\b", message), message
    assert "executus-ckpt migrate" in message
    assert "executus-ckpt migrate" in err.command
    assert "s3cretpw" not in message
    assert "s3cretpw" not in err.command
    assert "s3cretpw" not in repr(err)
    # Refusing creates nothing.
    assert await _tables(empty_sql_url) == set()


async def test_store_refuses_unmigrated_db_lazily_on_first_use(empty_sql_url: str) -> None:
    store = SQLCheckpointStore.from_url(empty_sql_url)
    try:
        with pytest.raises(SchemaOutOfDateError) as load_err:
            await store.load("x")
        with pytest.raises(SchemaOutOfDateError):
            await store.save(RunCheckpoint(RunCheckpointMeta("x")))
    finally:
        await store.aclose()
    assert load_err.value.found is None
    assert "run_checkpoints" not in await _tables(empty_sql_url)


async def test_store_refuses_db_at_an_older_revision(sql_url: str) -> None:
    # A revision our scripts do not know (a newer release's) is tested in
    # test_migration_errors.py: its fix is another one.
    stamped = "0001"
    await _execute(sql_url, f"UPDATE {VERSION_TABLE} SET version_num = '{stamped}'")
    url = _with_password(sql_url, "s3cretpw")
    with pytest.raises(SchemaOutOfDateError) as info:
        async with SQLCheckpointStore.open(url):
            pass
    err = info.value
    assert err.found == stamped
    assert err.required == REQUIRED_REVISION
    message = str(err)
    assert re.search(rf"\b{stamped}\b", message), message
    assert re.search(rf"\b{REQUIRED_REVISION}\b", message), message
    assert "executus-ckpt migrate" in message
    assert "s3cretpw" not in message
    # The version row is left as it was.
    assert await _rows(sql_url, f"SELECT version_num FROM {VERSION_TABLE}") == [(stamped,)]


async def test_store_accepts_migrated_db(sql_url: str) -> None:
    store = SQLCheckpointStore.from_url(sql_url)
    try:
        await store.check_schema()  # no exception
        assert await store.count() == 0
    finally:
        await store.aclose()


# -- open(migrate=True) -------------------------------------------------------------------------


async def test_open_with_migrate_on_empty_db(empty_sql_url: str) -> None:
    async with SQLCheckpointStore.open(empty_sql_url, migrate=True) as store:
        await store.save(RunCheckpoint(RunCheckpointMeta("m1"), messages=[1, 2], iteration=1))
        loaded = await store.load("m1")
        assert loaded is not None and loaded.messages == [1, 2]
    assert await _revision(empty_sql_url) == REQUIRED_REVISION
    assert "alembic_version" not in await _tables(empty_sql_url)
    # And again on the now-migrated database: a no-op that keeps the data.
    async with SQLCheckpointStore.open(empty_sql_url, migrate=True) as store:
        loaded = await store.load("m1")
        assert loaded is not None and loaded.iteration == 1
    assert await _revision(empty_sql_url) == REQUIRED_REVISION


# -- the alembic CLI from the repo root -----------------------------------------------------------


async def test_alembic_cli_with_x_url(empty_sql_url: str) -> None:
    _ok(await _alembic("-x", f"url={empty_sql_url}", "upgrade", "head"))
    assert await _revision(empty_sql_url) == REQUIRED_REVISION
    tables = await _tables(empty_sql_url)
    assert "run_checkpoints" in tables and "alembic_version" not in tables

    current = _ok(await _alembic("-x", f"url={empty_sql_url}", "current"))
    assert f"{REQUIRED_REVISION} (head)" in current.stdout
    await _round_trip(empty_sql_url)

    _ok(await _alembic("-x", f"url={empty_sql_url}", "downgrade", "base"))
    assert await _revision(empty_sql_url) is None
    assert "run_checkpoints" not in await _tables(empty_sql_url)


async def test_alembic_cli_with_env_url(empty_sql_url: str) -> None:
    _ok(await _alembic("upgrade", "head", url_env=empty_sql_url))
    assert await _revision(empty_sql_url) == REQUIRED_REVISION
    assert "alembic_version" not in await _tables(empty_sql_url)

    current = _ok(await _alembic("current", url_env=empty_sql_url))
    assert f"{REQUIRED_REVISION} (head)" in current.stdout
    await _round_trip(empty_sql_url)


async def test_alembic_cli_x_url_wins_over_env(empty_sql_url: str, tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    _ok(
        await _alembic(
            "-x",
            f"url={empty_sql_url}",
            "upgrade",
            "head",
            url_env=f"sqlite+aiosqlite:///{other}",
        )
    )
    assert await _revision(empty_sql_url) == REQUIRED_REVISION
    assert not other.exists()


async def test_alembic_cli_without_url_fails_clearly() -> None:
    proc = await _alembic("current")
    assert proc.returncode != 0
    assert ENV_DATABASE_URL in proc.stderr
    assert "-x url=" in proc.stderr


def test_migrations_come_from_the_checkout() -> None:
    """In the source checkout, migrate() runs the same scripts as the alembic CLI."""
    assert Path(script_location()) == REPO_ROOT / "migrations"
