"""Child of the rolling-deploy test: the previous release's store code against head.

Usage: python tests/migration/prev_release_child.py URL NEW_RUN_ID  (with ``PYTHONPATH`` set to
a checkout of the previous release, so that ``executus_ckpt`` is that release's package).

Begins and saves a run ``old-run``, loads ``NEW_RUN_ID`` (written by the new code), lists and
claims it. Prints one JSON line: ``{"module", "ok", ...}`` or ``{"module", "refused", "message"}``
when the store refuses the schema. Runs under that release's API only.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import executus_ckpt
from executus_ckpt import (
    RunCheckpointState,
    RunInfo,
    SchemaOutOfDateError,
    SQLCheckpointStore,
    StoreCheckpointerFactory,
)


async def main(url: str, new_run: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"module": executus_ckpt.__file__}
    try:
        async with SQLCheckpointStore.open(url) as store:
            factory = StoreCheckpointerFactory(store, throttle=0)
            cp = await factory.begin(RunInfo("old-run", inputs={"prompt": "old"}))
            first = [{"role": "user", "content": "old"}]
            await cp.save(RunCheckpointState(first, 1, []))
            second = [*first, {"role": "assistant", "content": "step 2"}]
            await cp.save(RunCheckpointState(second, 2, ["plan"]))
            await cp.aclose()
            loaded = await store.load(new_run)
            assert loaded is not None
            doc["new_run_messages"] = list(loaded.messages)
            doc["new_run_phases"] = list(loaded.completed_phases)
            listed = [s.run_id for s in await store.list_interrupted()]
            assert sorted(listed) == sorted([new_run, "old-run"]), listed
            claimed = await store.claim(new_run, epoch=loaded.epoch, owner="old-replica")
            assert claimed is not None
            doc["ok"] = True
    except SchemaOutOfDateError as exc:
        doc.update(refused=type(exc).__name__, message=str(exc))
    return doc


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2]))), flush=True)
