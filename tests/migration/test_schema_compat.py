"""Rolling deploys: a release keeps working on a database that a newer release migrated, when
that release declared the schema compatible (expand-only); it refuses otherwise."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text

from executus_ckpt import (
    RunCheckpoint,
    RunCheckpointMeta,
    SchemaOutOfDateError,
    SQLCheckpointStore,
)
from executus_ckpt.config import VERSION_TABLE
from executus_ckpt.schema import OLDEST_COMPATIBLE_KEY, REQUIRED_REVISION
from executus_ckpt.stores._engine import create_engine

NEWER = f"{int(REQUIRED_REVISION) + 1:04d}"


async def _as_if_newer(url: str, oldest_compatible: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = :v"), {"v": NEWER})
            await conn.execute(
                text("UPDATE executus_ckpt_schema_info SET value = :v WHERE name = :k"),
                {"v": oldest_compatible, "k": OLDEST_COMPATIBLE_KEY},
            )
    finally:
        await engine.dispose()


async def test_head_declares_the_previous_revision_compatible(sql_url: str) -> None:
    engine = create_engine(sql_url)
    try:
        async with engine.connect() as conn:
            oldest = (
                await conn.execute(
                    text("SELECT value FROM executus_ckpt_schema_info WHERE name = :k"),
                    {"k": OLDEST_COMPATIBLE_KEY},
                )
            ).scalar_one()
    finally:
        await engine.dispose()
    assert oldest < REQUIRED_REVISION, "0004 and 0005 are expand-only: 0003's code may use them"


async def test_a_compatible_newer_schema_is_accepted(sql_url: str) -> None:
    await _as_if_newer(sql_url, REQUIRED_REVISION)
    async with SQLCheckpointStore.open(sql_url) as store:
        await store.save(RunCheckpoint(meta=RunCheckpointMeta("r"), messages=[{"m": 1}]))
        loaded = await store.load("r")
        assert loaded is not None and list(loaded.messages) == [{"m": 1}]


async def test_an_incompatible_newer_schema_is_refused(sql_url: str) -> None:
    await _as_if_newer(sql_url, NEWER)  # a contracting migration: our code may not use it
    with pytest.raises(SchemaOutOfDateError) as info:
        async with SQLCheckpointStore.open(sql_url):
            pass
    assert info.value.found == NEWER
    assert "upgrade" in str(info.value).lower()


def _current(url: str, *args: str) -> tuple[int, str]:
    import os

    from click.testing import CliRunner

    from executus_ckpt.cli import main

    result = CliRunner().invoke(
        main, ["current", *args], env={**os.environ, "EXECUTUS_CKPT_DATABASE_URL": url}
    )
    return result.exit_code, result.stdout


async def test_cli_current_accepts_a_compatible_newer_schema(sql_url: str) -> None:
    """A database migrated by the next release and declared usable by this one is fine for
    this release: `current` says so and exits 0 (a deploy gate must not fail on it)."""
    import asyncio

    await _as_if_newer(sql_url, REQUIRED_REVISION)
    code, out = await asyncio.to_thread(_current, sql_url)
    assert code == 0, out
    assert f"found: {NEWER}" in out and "compatible" in out
    code, out = await asyncio.to_thread(_current, sql_url, "--json")
    assert code == 0, out
    assert json.loads(out) == {
        "found": NEWER,
        "required": REQUIRED_REVISION,
        "up_to_date": False,
        "compatible": True,
    }


async def test_cli_current_refuses_an_incompatible_newer_schema(sql_url: str) -> None:
    import asyncio

    await _as_if_newer(sql_url, NEWER)
    code, out = await asyncio.to_thread(_current, sql_url)
    assert code == 1 and "upgrade executus-ckpt" in out
    code, out = await asyncio.to_thread(_current, sql_url, "--json")
    assert code == 1 and json.loads(out)["compatible"] is False
