"""Exact storage's cost per save (issue 11): an appending host, a host that rebuilds its
message dicts every save, and ``verify=True``; checkpointer over the in-memory store (the
checkpointer's own CPU, no database) and over SQLite (the whole save).

Run: ``.venv/bin/python -m bench.exact`` (prints a table; about 30 s).
"""

from __future__ import annotations

import asyncio
import copy
import statistics
import tempfile
import time
from typing import Any

from executus_ckpt import (
    InMemoryCheckpointStore,
    RunCheckpointState,
    RunInfo,
    SQLCheckpointStore,
    StoreCheckpointerFactory,
)

ITERATIONS = 200
WINDOWS = {"@25": range(21, 31), "@200": range(191, 201)}


def _iteration(i: int) -> list[dict[str, Any]]:
    return [
        {"role": "assistant", "tool_calls": [{"id": f"c{i}", "name": "search"}]},
        {"role": "tool", "tool_call_id": f"c{i}", "content": "x" * 16_000},
        {"role": "assistant", "content": f"answer {i}"},
    ]


async def _run(store: Any, mode: str) -> dict[str, float]:
    factory = StoreCheckpointerFactory(store, verify=mode == "verify")
    cp = await factory.begin(RunInfo(f"run-{mode}", inputs={"prompt": "go"}))
    transcript: list[Any] = [{"role": "user", "content": "go"}]
    times: dict[int, float] = {}
    for i in range(1, ITERATIONS + 1):
        transcript += _iteration(i)
        handed = copy.deepcopy(transcript) if mode == "rebuild" else transcript
        started = time.perf_counter()
        await cp.save(RunCheckpointState(messages=handed, iteration=i))
        times[i] = time.perf_counter() - started
    await cp.complete()
    return {w: statistics.median(times[i] for i in r) * 1000 for w, r in WINDOWS.items()}


async def main() -> None:
    print("| store | host | p50 @25 | p50 @200 | @200 / @25 |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{tmp}/exact.db"
        async with SQLCheckpointStore.open(url, migrate=True) as sqlite_store:
            for label, store in (("memory", InMemoryCheckpointStore()), ("SQLite", sqlite_store)):
                for mode in ("append", "rebuild", "verify"):
                    r = await _run(store, mode)
                    ratio = r["@200"] / r["@25"]
                    print(
                        f"| {label} | {mode} | {r['@25']:.2f} ms | {r['@200']:.2f} ms "
                        f"| {ratio:.2f}x |"
                    )


if __name__ == "__main__":
    asyncio.run(main())
