"""Child process for the crash tests: saves, then freezes mid-transaction until SIGKILLed.

Usage: python -m tests.faults.crash_child URL PAUSE_AT
PAUSE_AT: "insert" (header updated, messages not yet inserted) or "commit" (both written,
not committed). Prints READY when the first snapshot is durable and PAUSED when frozen.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from sqlalchemy import event

from executus_ckpt import RunCheckpointState, RunInfo, SQLCheckpointStore, StoreCheckpointerFactory


def messages(n: int) -> list[dict[str, Any]]:
    return [{"role": "tool", "n": i, "content": "r" * 500} for i in range(n)]


async def main(url: str, pause_at: str) -> None:
    async with SQLCheckpointStore.open(url) as store:
        cp = await StoreCheckpointerFactory(store).begin(RunInfo("crash-run"))
        await cp.save(RunCheckpointState(messages=messages(6), iteration=1))
        print("READY", flush=True)

        def freeze(*_: Any) -> None:
            print("PAUSED", flush=True)
            time.sleep(120)  # blocks this process until the parent kills it

        sync_engine = store.engine.sync_engine
        if pause_at == "commit":
            event.listen(sync_engine, "commit", freeze)
        else:

            def before(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
                if statement.lstrip().upper().startswith("INSERT INTO RUN_CHECKPOINT_MESSAGES"):
                    freeze()

            event.listen(sync_engine, "before_cursor_execute", before)
        await cp.save(RunCheckpointState(messages=messages(9), iteration=2))
        print("NOT KILLED", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
