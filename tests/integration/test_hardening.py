"""Issue 10 regressions that need a real database but no fault injection.

Each test names the item it pins.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from executus_ckpt import (
    CheckpointError,
    InMemoryCheckpointStore,
    RunCheckpoint,
    RunCheckpointMeta,
    SQLCheckpointStore,
    StoreUnavailableError,
    migrate,
)
from executus_ckpt.stores._engine import create_engine
from executus_ckpt.stores._errors import safe_url


def _cp(run_id: str = "r1", iteration: int = 1) -> RunCheckpoint:
    return RunCheckpoint(
        meta=RunCheckpointMeta(run_id), messages=[{"i": iteration}], iteration=iteration
    )


def _modes(directory: Path, prefix: str) -> dict[str, int]:
    return {
        p.name: stat.S_IMODE(p.stat().st_mode)
        for p in directory.iterdir()
        if p.name.startswith(prefix)
    }


def _unlink_all(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


# -- item 10: store options after migrate(engine) / open(migrate=True) ----------------------


@pytest.mark.parametrize("synchronous", ["NORMAL", "EXTRA"])
async def test_open_with_migrate_and_sqlite_options(tmp_path: Path, synchronous: str) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'opts.db'}"
    async with SQLCheckpointStore.open(
        url, migrate=True, sqlite_synchronous=synchronous, sqlite_busy_timeout=2.5
    ) as store:
        await store.save(_cp())
        async with store.engine.connect() as conn:
            level = (await conn.exec_driver_sql("PRAGMA synchronous")).scalar()
            busy = (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar()
    assert level == {"NORMAL": 1, "EXTRA": 3}[synchronous]
    assert busy == 2500


async def test_migrate_engine_then_store_with_other_options(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'e.db'}")
    try:
        await migrate(engine)
        store = SQLCheckpointStore(engine, sqlite_synchronous="NORMAL")
        await store.save(_cp())
        assert (await store.load("r1")) is not None
        await store.aclose()
    finally:
        await engine.dispose()


# -- item 18: a password given as ?password= never shows ------------------------------------


def test_query_password_is_masked_everywhere() -> None:
    url = "postgresql+asyncpg://app@db.invalid:5432/ckpt?password=hunter2&ssl=disable"
    engine = create_engine(url)
    assert "hunter2" not in str(engine.url)
    assert "hunter2" not in repr(engine.url)
    assert engine.url.password == "hunter2"  # still used to connect
    store = SQLCheckpointStore(engine)
    assert "hunter2" not in repr(store)
    assert "hunter2" not in safe_url(make_url(url))
    assert "ssl=disable" in safe_url(make_url(url))


async def test_query_password_not_in_errors() -> None:
    url = "postgresql+asyncpg://app@127.0.0.1:1/ckpt?password=hunter2"
    async with SQLCheckpointStore.from_url(url, connect_timeout=2.0) as store:
        with pytest.raises(StoreUnavailableError) as info:
            await store.load("r1")
    assert "hunter2" not in str(info.value)


# -- item 19: files the library creates are private ------------------------------------------


async def test_sqlite_files_are_created_0600(tmp_path: Path) -> None:
    db = tmp_path / "private.db"
    url = f"sqlite+aiosqlite:///{db}"
    old = os.umask(0o022)
    try:
        async with SQLCheckpointStore.open(url, migrate=True) as store:
            await store.save(_cp())
            modes = _modes(tmp_path, "private.db")
    finally:
        os.umask(old)
    assert modes["private.db"] == 0o600
    assert all(mode == 0o600 for mode in modes.values()), modes


async def test_existing_file_mode_is_left_alone(tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    db.touch(mode=0o640)
    os.chmod(db, 0o640)
    await migrate(f"sqlite+aiosqlite:///{db}")
    assert stat.S_IMODE(db.stat().st_mode) == 0o640


# -- item 20: a SQLite file deleted under a running store ------------------------------------


async def test_deleted_sqlite_file_is_detected(tmp_path: Path) -> None:
    db = tmp_path / "gone.db"
    url = f"sqlite+aiosqlite:///{db}"
    async with SQLCheckpointStore.open(url, migrate=True) as store:
        await store.save(_cp(iteration=1))
        _unlink_all(db)
        with pytest.raises(StoreUnavailableError, match="deleted or replaced") as info:
            await store.save(_cp(iteration=2))
        assert str(db) in str(info.value)


# -- item 15: one rule for limit ---------------------------------------------------------------


@pytest.mark.parametrize("limit", [-1, -5])
async def test_negative_limit_is_refused(store: object, limit: int) -> None:
    assert isinstance(store, InMemoryCheckpointStore | SQLCheckpointStore)
    await store.save(_cp())
    with pytest.raises(CheckpointError, match="limit"):
        await store.list_interrupted(limit=limit)
    with pytest.raises(CheckpointError, match="limit"):
        [s async for s in store.iter_summaries(limit=limit)]


async def test_zero_limit_lists_nothing(store: object) -> None:
    assert isinstance(store, InMemoryCheckpointStore | SQLCheckpointStore)
    await store.save(_cp())
    assert await store.list_interrupted(limit=0) == []
    assert [s async for s in store.iter_summaries(limit=0)] == []
    assert len(await store.list_interrupted(limit=None)) == 1


def test_cli_never_prints_a_query_password() -> None:
    from click.testing import CliRunner

    from executus_ckpt.cli import main

    url = "postgresql+asyncpg://app@127.0.0.1:1/ckpt?password=hunter2"
    for args in (["--url", url, "list"], ["--url", url, "stats"], ["--url", url, "current"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0
        assert "hunter2" not in result.output, result.output
