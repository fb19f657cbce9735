"""The replicas demo's service: one replica among several sharing one database.

Run as ``python -m executus_ckpt._replica_service --url URL --name NAME --runs N --hb 0.3
--stale 2 --sweep 0.3 --grace 0.5 [--step 0.2]``. It enters an :class:`Executor`, starts ``N``
live runs (``<name>-run-<i>``, phases of saves through ``checkpointed_run(ex.factory(), ...)``)
and calls ``ex.recover(dispatch)``: a dispatched run resumes from ``cp.resume_state()`` and runs
to its end. On SIGTERM (or when its stdin closes) it calls ``await ex.drain(grace)`` and exits 0.

It prints one JSON event per line on stdout, flushed: ``{"event", "replica", "pid", "t" (wall
clock), ...}`` with events ``ready``, ``started`` (a live run began), ``dispatched`` (the
recovery loop handed it a run: owner it was taken from, attempts, phases done), ``phase_done``,
``finished`` (the run ended and its checkpoint was deleted), ``fenced`` (a write was refused:
the run belongs to another replica now), ``interrupted`` (cancelled by the drain),
``draining``, ``drained`` and ``exit``. Not an operator command: the demo's parent reads it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from .demo import APP_VERSION, simulated_run
from .errors import CheckpointFencedError
from .executor import Executor
from .stores.sql import SQLCheckpointStore
from .types import RunCheckpoint, RunInfo

_PASSED_ON = frozenset({"phase_done", "finished"})


class _Out:
    name = ""
    finalize_fenced: set[str] = set()  # noqa: RUF012 - one process, one state


def emit(event: dict[str, Any]) -> None:
    record = {"event": event.get("event"), "replica": _Out.name, "pid": os.getpid()}
    record["t"] = time.time()
    record.update(event)
    sys.stdout.write(json.dumps(record, default=str) + "\n")
    sys.stdout.flush()


def _run_events(event: dict[str, Any]) -> None:
    """What :func:`simulated_run` reports, minus the chatter (every save, every phase start)."""
    if event.get("event") in _PASSED_ON and event.get("run") not in _Out.finalize_fenced:
        emit(event)


class _FencedLog(logging.Handler):
    """A fenced ``complete`` only logs (the run is another owner's): report it as ``fenced``."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "action", None) in ("finalize_fenced", "fenced"):
            run_id = getattr(record, "run_id", None)
            if run_id is not None:
                _Out.finalize_fenced.add(str(run_id))
            emit({"event": "fenced", "run": run_id, "where": "library"})


async def _one_run(
    ex: Executor, info: RunInfo, step: float, checkpoint: RunCheckpoint | None
) -> None:
    resume = None if checkpoint is None else checkpoint.resume_state()
    try:
        await simulated_run(ex.factory(), info, resume=resume, latency=step, emit=_run_events)
    except asyncio.CancelledError:
        emit({"event": "interrupted", "run": info.run_id})
        raise
    except CheckpointFencedError as exc:
        emit({"event": "fenced", "run": info.run_id, "where": "save", "error": str(exc)})


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Stop when stdin reaches EOF (the parent went away): a daemon thread on the raw fd."""

    def read() -> None:
        with contextlib.suppress(OSError):
            while os.read(0, 4096):
                pass
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=read, name="stdin-watch", daemon=True).start()


async def serve(args: argparse.Namespace) -> int:
    _Out.name = args.name
    logging.getLogger("executus_ckpt").addHandler(_FencedLog())
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    why: list[str] = []

    def on_sigterm() -> None:
        why.append("SIGTERM")
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    _watch_stdin(loop, stop)
    tasks: set[asyncio.Task[None]] = set()

    async with (
        SQLCheckpointStore.open(args.url) as store,
        Executor(
            store,
            name=args.name,
            app_version=APP_VERSION,
            heartbeat_interval=args.hb,
            stale_after=args.stale,
            sweep_interval=args.sweep,
        ) as ex,
    ):
        emit({"event": "ready", "executor": ex.id})

        async def dispatch(cp: RunCheckpoint) -> None:
            emit(
                {
                    "event": "dispatched",
                    "run": cp.run_id,
                    "attempts": cp.attempts,
                    "phases_done": list(cp.completed_phases),
                }
            )
            await _one_run(ex, cp.run_info(), args.step, cp)

        for i in range(args.runs):
            info = RunInfo(
                run_id=f"{args.name}-run-{i + 1}",
                subject_id="demo-agent",
                name="Researcher",
                caller_id="user-42",
                inputs={"prompt": f"Write report #{i + 1} on {args.name}"},
            )
            task = loop.create_task(_one_run(ex, info, args.step * (1 + 0.1 * i), None))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            emit({"event": "started", "run": info.run_id})
        ex.recover(dispatch, max_attempts=3, concurrency=8)

        await stop.wait()
        emit({"event": "draining", "why": why[0] if why else "stdin closed", "grace": args.grace})
        await ex.drain(args.grace)
        stats = ex.stats()
        emit({"event": "drained", "releases": stats.releases, "claims": stats.claims})
    emit({"event": "exit"})
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m executus_ckpt._replica_service", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--url", required=True, help="Migrated database URL.")
    parser.add_argument("--name", required=True, help="This replica's label.")
    parser.add_argument("--runs", type=int, required=True, help="Live runs to start.")
    parser.add_argument("--hb", type=float, default=0.3, help="Heartbeat interval (s).")
    parser.add_argument("--stale", type=float, default=2.0, help="stale_after (s).")
    parser.add_argument("--sweep", type=float, default=0.3, help="Sweep interval (s).")
    parser.add_argument("--grace", type=float, default=0.5, help="Drain grace on SIGTERM (s).")
    parser.add_argument("--step", type=float, default=0.2, help="Seconds per model/tool step.")
    args = parser.parse_args(argv)
    sys.exit(asyncio.run(serve(args)))


if __name__ == "__main__":
    main()
