"""SQLite durability settings: WAL + synchronous=FULL by default, NORMAL on request."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from executus_ckpt import RunCheckpoint, RunCheckpointMeta, SQLCheckpointStore, migrate


async def pragmas(store: SQLCheckpointStore) -> tuple[str, int, int]:
    async with store.engine.connect() as conn:
        mode = (await conn.execute(text("PRAGMA journal_mode"))).scalar_one()
        sync = (await conn.execute(text("PRAGMA synchronous"))).scalar_one()
        busy = (await conn.execute(text("PRAGMA busy_timeout"))).scalar_one()
    return str(mode), int(sync), int(busy)


@pytest.mark.parametrize(
    ("option", "expected"), [(None, 2), ("FULL", 2), ("NORMAL", 1), ("EXTRA", 3)]
)
async def test_synchronous_level(tmp_path: Path, option: str | None, expected: int) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'd.db'}"
    await migrate(url)
    kwargs = {} if option is None else {"sqlite_synchronous": option}
    async with SQLCheckpointStore.open(url, **kwargs) as store:
        await store.save(RunCheckpoint(RunCheckpointMeta("r"), messages=[{"a": 1}]))
        mode, sync, busy = await pragmas(store)
    assert mode == "wal"
    assert sync == expected  # 1 NORMAL, 2 FULL, 3 EXTRA
    assert busy == 30_000


async def test_busy_timeout_option(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'd.db'}"
    await migrate(url)
    async with SQLCheckpointStore.open(url, sqlite_busy_timeout=2.5) as store:
        assert (await pragmas(store))[2] == 2500


def test_bad_synchronous_level_is_refused() -> None:
    with pytest.raises(ValueError, match="FULL, NORMAL or EXTRA"):
        SQLCheckpointStore.from_url("sqlite+aiosqlite:///x.db", sqlite_synchronous="OFF")  # type: ignore[arg-type]


async def test_a_missing_file_is_refused_without_being_created(tmp_path: Path) -> None:
    from executus_ckpt import SchemaOutOfDateError

    path = tmp_path / "absent.db"
    url = f"sqlite+aiosqlite:///{path}"
    store = SQLCheckpointStore.from_url(url)
    try:
        with pytest.raises(SchemaOutOfDateError) as info:
            await store.load("r")
    finally:
        await store.aclose()
    assert info.value.found is None
    assert not path.exists(), "looking must not leave an empty database file behind"
    async with SQLCheckpointStore.open(url, migrate=True) as created:  # migrating creates it
        assert await created.load("r") is None
    assert path.exists()


def test_cli_on_a_missing_file_creates_nothing(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from executus_ckpt.cli import main

    path = tmp_path / "absent.db"
    for args in (["list"], ["stats"], ["current"], ["show", "r"]):
        result = CliRunner().invoke(main, ["--url", f"sqlite+aiosqlite:///{path}", *args])
        assert result.exit_code == 1, (args, result.output)
    assert not path.exists()
