"""Child process for the crash tests: saves, then freezes mid-save until SIGKILLed.

Usage: python -m tests.faults.crash_child URL PAUSE_AT
PAUSE_AT:
- "insert": the header is updated, the new messages are being inserted (the append);
- "commit": a whole transcript rewritten (a compaction), the transaction not committed.
SQLite freezes in sqlite3's trace callback (the driver thread, mid-transaction). PostgreSQL
freezes server-side, in a BEFORE INSERT trigger that sleeps (the append is one statement), or
in SQLAlchemy's commit event for the rewrite. Prints READY when the first snapshot is durable
and PAUSED (SQLite, or the PostgreSQL rewrite) / SENT (PostgreSQL append) when frozen.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.util import await_only

from executus_ckpt import RunCheckpointState, RunInfo, SQLCheckpointStore, StoreCheckpointerFactory

PAUSE_FUNCTION = """
CREATE OR REPLACE FUNCTION executus_test_pause() RETURNS trigger AS $$
BEGIN PERFORM pg_sleep(120); RETURN NEW; END $$ LANGUAGE plpgsql
"""
PAUSE_TRIGGER = """
CREATE TRIGGER executus_test_pause BEFORE INSERT ON run_checkpoint_messages
FOR EACH ROW EXECUTE FUNCTION executus_test_pause()
"""


def messages(n: int) -> list[dict[str, Any]]:
    return [{"role": "tool", "n": i, "content": "r" * 500} for i in range(n)]


def freeze() -> None:
    print("PAUSED", flush=True)
    time.sleep(120)  # blocks until the parent kills this process


async def main(url: str, pause_at: str) -> None:
    async with SQLCheckpointStore.open(url) as store:
        cp = await StoreCheckpointerFactory(store).begin(RunInfo("crash-run"))
        await cp.save(RunCheckpointState(messages=messages(6), iteration=1))
        print("READY", flush=True)
        nxt = messages(9) if pause_at == "insert" else messages(2)  # append / rewrite
        if store.dialect == "sqlite":
            marker = "INSERT INTO RUN_CHECKPOINT_MESSAGES" if pause_at == "insert" else "COMMIT"

            def trace(sql: str) -> None:
                if sql.lstrip().upper().startswith(marker):
                    freeze()

            def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
                await_only(dbapi_connection.driver_connection.set_trace_callback(trace))

            event.listen(store.engine.sync_engine, "checkout", on_checkout)
        elif pause_at == "insert":
            dsn = make_url(url).set(drivername="postgresql").render_as_string(False)
            admin = await asyncpg.connect(dsn)
            await admin.execute(PAUSE_FUNCTION)
            await admin.execute(PAUSE_TRIGGER)
            await admin.close()
            print("SENT", flush=True)
        else:
            event.listen(store.engine.sync_engine, "commit", lambda conn: freeze())
        await cp.save(RunCheckpointState(messages=nxt, iteration=2))
        print("NOT KILLED", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
