"""The append on the save hot path, on the raw driver connection.

Most saves of a run append a few messages to a transcript the store already holds. Built as
SQLAlchemy statements that costs ~3 ms of Python per save and several extra round trips
(bench/RESULTS.md); here it is one prepared statement on PostgreSQL and two driver calls on
SQLite, on the connection SQLAlchemy's pool hands out. Everything else (full rewrites,
recovery, the operator's calls) stays on SQLAlchemy Core.

Both appends are guarded exactly like the Core version: the header is updated only if the run
is not fenced, still holds ``base`` messages and stays under the size cap; the messages are
inserted only if it was. A False return means nothing was written and the caller rewrites the
transcript in full.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..schema import run_checkpoint_messages as m
from ..schema import run_checkpoints as t

META = (
    "agent_id",
    "agent_name",
    "caller_id",
    "channel_id",
    "guild_id",
    "prompt",
    "model_tier",
    "parent_run_id",
)
_SET = (
    "iteration",
    "completed_phases",
    "message_count",
    "updated_at",
    "epoch",
    "app_version",
    "owner",
    *META,
)


@dataclass(frozen=True, slots=True)
class Append:
    """One guarded append: the header values and the new messages (encoded)."""

    run_id: str
    base: int
    rows: Sequence[bytes]
    size: int
    max_bytes: int
    iteration: int
    completed_phases: bytes
    updated_at: datetime
    epoch: int
    app_version: str | None
    owner: str | None
    meta: Sequence[str | None]  # in META order

    def header(self) -> tuple[Any, ...]:
        """Values for the ``_SET`` columns, in order."""
        return (
            self.iteration,
            self.completed_phases,
            self.base + len(self.rows),
            self.updated_at,
            self.epoch,
            self.app_version,
            self.owner,
            *self.meta,
        )


def _pg_sql() -> str:
    sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(_SET, start=2))
    n = len(_SET) + 2
    return (
        f"WITH h AS (UPDATE {t.name} SET {sets}, size_bytes = size_bytes + ${n} "
        f"WHERE run_id = $1 AND epoch <= ${2 + _SET.index('epoch')} AND message_count = ${n + 1} "
        f"AND size_bytes + ${n} <= ${n + 2} RETURNING 1), "
        f"ins AS (INSERT INTO {m.name} (run_id, seq, data) "
        f"SELECT $1, x.s, x.d FROM unnest(${n + 3}::int[], ${n + 4}::bytea[]) AS x(s, d) "
        f"WHERE EXISTS (SELECT 1 FROM h)) "
        f"SELECT count(*) FROM h"
    )


_PG_APPEND = _pg_sql()


async def append_postgres(connection: Any, a: Append) -> bool:
    """One statement, one round trip, atomic on its own (``connection``: asyncpg, no txn)."""
    seqs = list(range(a.base, a.base + len(a.rows)))
    updated = await connection.fetchval(
        _PG_APPEND,
        a.run_id,
        *a.header(),
        a.size,
        a.base,
        a.max_bytes,
        seqs,
        list(a.rows),
    )
    return bool(updated)


_SQLITE_UPDATE = (
    f"UPDATE {t.name} SET " + ", ".join(f"{c} = ?" for c in _SET) + ", size_bytes = size_bytes + ? "
    "WHERE run_id = ? AND epoch <= ? AND message_count = ? AND size_bytes + ? <= ?"
)
_SQLITE_INSERT = f"INSERT INTO {m.name} (run_id, seq, data) VALUES (?, ?, ?)"


def sqlite_time(value: datetime) -> str:
    """A UTC time as SQLAlchemy's SQLite ``DATETIME`` stores it (so Core reads it back)."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


async def append_sqlite(connection: Any, a: Append) -> bool:
    """Two driver calls inside the caller's write transaction (``connection``: aiosqlite)."""
    header = list(a.header())
    header[_SET.index("updated_at")] = sqlite_time(a.updated_at)
    cursor = await connection.execute(
        _SQLITE_UPDATE, (*header, a.size, a.run_id, a.epoch, a.base, a.size, a.max_bytes)
    )
    if cursor.rowcount != 1:
        return False
    if a.rows:
        await connection.executemany(
            _SQLITE_INSERT, [(a.run_id, a.base + i, d) for i, d in enumerate(a.rows)]
        )
    return True
