"""Child process for the seeded SIGKILL test: several runs saving as fast as they can.

Usage: python -m tests.faults.sigkill_child URL PREFIX RUNS

Prints ``READY`` once the store is open, ``BEGUN <run>`` once a run's initial row is
written, and ``ACK <run> <iteration>`` (flushed) after each ``save`` returned: every printed
line is a promise the parent checks after SIGKILLing this process at a random moment.
Transcripts are append-heavy, with a compaction (a full rewrite) every 10 iterations; the
state of an iteration is a function of the run and the iteration only (:func:`transcript`).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from executus_ckpt import RunCheckpointState, RunInfo, SQLCheckpointStore, StoreCheckpointerFactory

LIFETIME = 30.0
"""Seconds before the child stops by itself (a parent that failed to kill it)."""


def transcript(run: str, iteration: int) -> list[dict[str, Any]]:
    """The messages of ``run`` at ``iteration``: 3 more each time, rewritten every 10."""
    if iteration == 0:
        return []
    generation, step = divmod(iteration - 1, 10)
    return [
        {"run": run, "g": generation, "k": k, "content": "x" * 200} for k in range(3 * (step + 1))
    ]


def phases(iteration: int) -> list[str]:
    return [f"phase-{p}" for p in range(iteration // 4)]


def state(run: str, iteration: int) -> RunCheckpointState:
    return RunCheckpointState(
        messages=transcript(run, iteration), iteration=iteration, completed_phases=phases(iteration)
    )


async def run(factory: StoreCheckpointerFactory, run_id: str) -> None:
    cp = await factory.begin(RunInfo(run_id))
    print(f"BEGUN {run_id}", flush=True)
    iteration = 0
    while True:
        iteration += 1
        await cp.save(state(run_id, iteration))
        print(f"ACK {run_id} {iteration}", flush=True)


async def main(url: str, prefix: str, runs: int) -> None:
    async with SQLCheckpointStore.open(url) as store:
        print("READY", flush=True)
        factory = StoreCheckpointerFactory(store)
        async with asyncio.timeout(LIFETIME), asyncio.TaskGroup() as group:
            for r in range(runs):
                group.create_task(run(factory, f"{prefix}-r{r}"))


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    except TimeoutError:
        print("NOT KILLED", flush=True)
