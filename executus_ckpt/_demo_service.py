"""The demo's doomed service: the child process that ``executus-ckpt demo`` kills with SIGKILL.

Run as ``python -m executus_ckpt._demo_service --url URL --runs N --latency SECONDS``. It starts
``N`` simulated runs at different speeds and prints one JSON event per line on stdout (the
parent reads them to pick the moment to kill it). Not an operator command: it has its own entry
point so that the CLI carries no hidden options for it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from .checkpointer import StoreCheckpointerFactory
from .demo import APP_VERSION, run_infos, simulated_run
from .stores.sql import SQLCheckpointStore


async def serve(url: str, runs: int, latency: float) -> None:
    """Run ``runs`` runs at different speeds against ``url``, printing JSON events."""

    def emit(event: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    async with SQLCheckpointStore.open(url) as store:
        factory = StoreCheckpointerFactory(store, executor_id="boot-1", app_version=APP_VERSION)
        async with asyncio.TaskGroup() as group:
            for i, info in enumerate(run_infos(runs)):
                # run-1 is fast and finishes before the crash; the others are slower.
                speed = latency if i == 0 else latency * (1 + 2 * i)
                group.create_task(
                    simulated_run(factory, info, resume=None, latency=speed, emit=emit)
                )
    emit({"event": "all_done"})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m executus_ckpt._demo_service", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--url", required=True, help="Migrated database URL.")
    parser.add_argument("--runs", type=int, required=True, help="How many runs to start.")
    parser.add_argument("--latency", type=float, required=True, help="Seconds per step.")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.url, args.runs, args.latency))


if __name__ == "__main__":
    main()
