"""Migration errors are typed and name a fix that works (issue 10 item 8).

A database marked by a newer release (a revision id our scripts do not have) and a target
revision that does not exist used to surface as alembic tracebacks; the schema check advised
``executus-ckpt migrate``, which cannot move a database off a revision it does not know.
"""

from __future__ import annotations

import re

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from executus_ckpt import (
    CheckpointError,
    SchemaOutOfDateError,
    SQLCheckpointStore,
    StoreUnavailableError,
    migrate,
)
from executus_ckpt.config import VERSION_TABLE
from executus_ckpt.schema import REQUIRED_REVISION

NEWER = "9999"
SECRET = "s3cretpw"


def _with_password(url: str) -> str:
    u = make_url(url)
    if u.get_backend_name() != "postgresql":
        return url
    return u.set(password=SECRET).render_as_string(hide_password=False)


async def _execute(url: str, statement: str) -> list[tuple[object, ...]]:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(text(statement))
            return [tuple(r) for r in result.all()] if result.returns_rows else []
    finally:
        await engine.dispose()


async def _stamp(url: str, revision: str) -> None:
    await _execute(url, f"UPDATE {VERSION_TABLE} SET version_num = '{revision}'")


async def _version_rows(url: str) -> list[tuple[object, ...]]:
    return await _execute(url, f"SELECT version_num FROM {VERSION_TABLE}")


def _assert_names_the_upgrade(err: SchemaOutOfDateError) -> None:
    message = str(err)
    assert err.found == NEWER
    assert err.required == REQUIRED_REVISION
    assert re.search(rf"\b{NEWER}\b", message), message
    assert re.search(rf"\b{REQUIRED_REVISION}\b", message), message
    assert "upgrade executus-ckpt" in message, message
    assert "executus-ckpt migrate" not in message, "migrate cannot leave an unknown revision"
    assert "executus-ckpt migrate" not in err.command
    assert SECRET not in message and SECRET not in err.command


@pytest.mark.parametrize("revision", ["head", REQUIRED_REVISION, "base"])
async def test_migrate_refuses_a_schema_written_by_a_newer_release(
    sql_url: str, revision: str
) -> None:
    await _stamp(sql_url, NEWER)
    with pytest.raises(SchemaOutOfDateError) as info:
        await migrate(_with_password(sql_url), revision)
    _assert_names_the_upgrade(info.value)
    assert await _version_rows(sql_url) == [(NEWER,)], "the newer release's mark is kept"


async def test_store_refuses_a_schema_written_by_a_newer_release(sql_url: str) -> None:
    await _stamp(sql_url, NEWER)
    # ... that did not declare it usable by this release (a contracting migration; see
    # test_schema_compat.py for one that did).
    engine = create_async_engine(sql_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text("UPDATE executus_ckpt_schema_info SET value = :v"), {"v": NEWER}
            )
    finally:
        await engine.dispose()
    with pytest.raises(SchemaOutOfDateError) as info:
        async with SQLCheckpointStore.open(_with_password(sql_url)):
            pass
    _assert_names_the_upgrade(info.value)


@pytest.mark.parametrize("revision", ["nonsense", "", "00", "heads", "-1"])
async def test_migrate_to_an_unknown_revision_is_refused(empty_sql_url: str, revision: str) -> None:
    with pytest.raises(CheckpointError) as info:
        await migrate(empty_sql_url, revision)
    assert not isinstance(info.value, StoreUnavailableError | SchemaOutOfDateError)
    message = str(info.value)
    assert repr(revision) in message, message
    for valid in ("head", "base", "0001", REQUIRED_REVISION):
        assert valid in message, message
    assert await _execute(empty_sql_url, "SELECT 1") == [(1,)]
    rows = await _execute(
        empty_sql_url,
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'run_checkpoints'"
        if empty_sql_url.startswith("postgresql")
        else "SELECT count(*) FROM sqlite_master WHERE name = 'run_checkpoints'",
    )
    assert rows == [(0,)], "a refused target migrates nothing"


async def test_unknown_revision_is_refused_before_connecting() -> None:
    # A bad argument is reported as such, even when the database is also unreachable.
    with pytest.raises(CheckpointError) as info:
        await migrate("postgresql+asyncpg://u@127.0.0.1:1/x", "nonsense")
    assert not isinstance(info.value, StoreUnavailableError)
    assert "'nonsense'" in str(info.value)
