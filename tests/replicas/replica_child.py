"""A replica process for the many-replica tests: one :class:`Executor` on a shared database.

Usage::

    python -m tests.replicas.replica_child --url URL --name NAME [--runs N --run-prefix P
        --start-runs] [--hb 0.5 --stale 3 --sweep 0.5] [--grace 20] [--duration S] ...

Opens ``SQLCheckpointStore.open(url)``, enters ``Executor(store, name=..., ...)``, optionally
starts ``--runs`` live runs through ``ex.factory()`` (``--keep-live K`` keeps K of its own runs
going, starting a new one whenever one ends, for ``--spawn-for`` seconds), and calls
``ex.recover(dispatch)`` unless ``--no-recover``. A dispatched run resumes from
``cp.resume_state()`` (completed phases skipped) and runs to its end in
``checkpointed_run(ex.factory(), cp.run_info())``; with ``--dispatch noop`` it ends at once
(begin + complete, no save).

It stops when its stdin is closed or after ``--duration`` seconds (then ``drain(--grace)``), or
on SIGTERM (``drain(--grace)`` too), and exits 0 after printing ``exit``.

Every event is one JSON line on stdout, flushed: ``{"ev": ..., "t": wall clock (the real one,
even under a simulated skew), "pid", "name", "ex", "run", ...}``. Events: ``ready``,
``started`` (a live run began), ``dispatched`` (the recovery loop handed a run over: claimed
epoch, attempts, stored iteration), ``begun`` (its checkpointer's epoch), ``saved`` (a save
returned: iteration, epoch), ``fenced`` (a save raised :class:`CheckpointFencedError`, or a
``complete`` was refused: the run stops, it is not ``finished``), ``save_error`` (with
``--tolerate-outage``: a save failed with :class:`StoreUnavailableError`, the run goes on),
``finished`` (the run ended
and its ``complete()`` deleted the row), ``interrupted`` (cancelled by a drain),
``not_durable`` (``begin`` failed), ``failed`` (an unexpected error), ``lib`` (selected
library log records: rescues, lost claims, dead runs, heartbeat failures...), ``draining``,
``drained`` (with ``ex.stats()``), ``exit``.

``EXECUTUS_CKPT_TEST_CLOCK_SKEW=<seconds>`` shifts this process's host clock (``time.time``
and the library's ``utcnow``) by that much, as a host whose clock is off would; the database's
clock is untouched (on SQLite, ``julianday('now')`` is computed by SQLite's C code).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from datetime import datetime, timedelta
from typing import Any

_REAL_TIME = time.time
SKEW_ENV = "EXECUTUS_CKPT_TEST_CLOCK_SKEW"

_LIB_ACTIONS = frozenset(
    {
        "rescue_run",
        "claim_lost",
        "mark_dead",
        "quarantine",
        "finalize_fenced",
        "fenced",
        "executor_lost",
        "heartbeat_failed",
        "heartbeat_crashed",
        "sweep_failed",
        "release_failed",
        "dispatch_failed",
        "begin_failed",
        "clock_skew",
    }
)


class _State:
    name = ""
    ex = ""


_ATTEMPT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "attempt", default=None
)
"""The run attempt (one ``one_run`` call) whose task is logging: its finalize task inherits
it, so a refused ``complete`` is pinned on this attempt, not on another copy of the run."""


def emit(ev: str, **fields: Any) -> None:
    record = {"ev": ev, "t": _REAL_TIME(), "pid": os.getpid(), "name": _State.name}
    if _State.ex:
        record["ex"] = _State.ex
    record.update(fields)
    sys.stdout.write(json.dumps(record, default=str) + "\n")
    sys.stdout.flush()


class _Forward(logging.Handler):
    """Library records with an ``action`` we watch become ``lib`` events."""

    def emit(self, record: logging.LogRecord) -> None:
        action = getattr(record, "action", None)
        if action not in _LIB_ACTIONS:
            return
        run_id = getattr(record, "run_id", None)
        attempt = _ATTEMPT.get()
        if action == "finalize_fenced" and attempt is not None and attempt["run"] == run_id:
            attempt["fenced"] = True
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        emit("lib", action=action, run=run_id, msg=message[:300])


def apply_clock_skew() -> float:
    """Shift the host clock of this process by ``$EXECUTUS_CKPT_TEST_CLOCK_SKEW`` seconds."""
    skew = float(os.environ.get(SKEW_ENV, "0") or 0)
    if not skew:
        return 0.0
    time.time = lambda: _REAL_TIME() + skew

    class SkewedDatetime(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return datetime.now(tz) + timedelta(seconds=skew)

        @classmethod
        def utcnow(cls) -> datetime:  # type: ignore[override]
            return datetime.now() + timedelta(seconds=skew)

    import executus_ckpt.types as types_module

    types_module.datetime = SkewedDatetime  # type: ignore[misc]  # utcnow() reads it per call
    return skew


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="replica_child")
    p.add_argument("--url", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--runs", type=int, default=0)
    p.add_argument("--run-prefix", default="run")
    p.add_argument("--start-runs", action="store_true")
    p.add_argument("--keep-live", type=int, default=0)
    p.add_argument("--spawn-for", type=float, default=0.0)
    p.add_argument("--hb", type=float, default=0.5)
    p.add_argument("--stale", type=float, default=3.0)
    p.add_argument("--sweep", type=float, default=0.5)
    p.add_argument("--grace", type=float, default=20.0)
    p.add_argument("--duration", type=float, default=0.0)
    p.add_argument("--phases", type=int, default=3)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--iter-sleep", type=float, default=0.2)
    p.add_argument("--no-recover", action="store_true")
    p.add_argument("--recover-delay", type=float, default=0.0)
    p.add_argument("--dispatch", choices=("run", "noop"), default="run")
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--dispatch-limit", type=int, default=0)
    p.add_argument("--quiet-saves", action="store_true")
    p.add_argument("--tolerate-outage", action="store_true")
    return p.parse_args(argv)


async def run_body(
    args: argparse.Namespace,
    cp: Any,
    run_id: str,
    resume: Any | None,
) -> bool:
    """The run loop: phases of iterations, one save per iteration. False if fenced."""
    from executus_ckpt import CheckpointFencedError, RunCheckpointState, StoreUnavailableError

    skipper = resume.skipper() if resume is not None else None
    messages: list[Any] = list(resume.messages) if resume is not None else []
    iteration = resume.iteration if resume is not None else 0
    completed: list[str] = list(resume.completed_phases) if resume is not None else []
    for p in range(args.phases):
        phase = f"phase-{p}"
        if skipper is not None and skipper.should_skip(phase):
            continue
        for _ in range(args.iters):
            await asyncio.sleep(args.iter_sleep)
            iteration += 1
            messages.append({"role": "assistant", "run": run_id, "i": iteration, "p": phase})
            last = _ == args.iters - 1
            done = [*completed, phase] if last else completed
            try:
                await cp.save(
                    RunCheckpointState(
                        messages=list(messages), iteration=iteration, completed_phases=done
                    )
                )
            except CheckpointFencedError as exc:
                emit("fenced", run=run_id, where="save", it=iteration, epoch=cp.epoch, e=str(exc))
                return False
            except StoreUnavailableError as exc:
                if not args.tolerate_outage:
                    raise
                emit("save_error", run=run_id, it=iteration, e=str(exc)[:200])
                continue
            if not args.quiet_saves:
                emit("saved", run=run_id, it=iteration, epoch=getattr(cp, "epoch", None))
        completed.append(phase)
    return True


async def one_run(
    args: argparse.Namespace, ex: Any, run_id: str, checkpoint: Any | None = None
) -> None:
    """A live run (``checkpoint`` None) or a recovered one, start to end."""
    from executus_ckpt import (
        CheckpointFencedError,
        NoopCheckpointer,
        RunInfo,
        checkpointed_run,
    )

    info = RunInfo(run_id=run_id, inputs={"prompt": f"do {run_id}"})
    resume = None
    if checkpoint is not None:
        info = checkpoint.run_info()
        resume = checkpoint.resume_state()
    ok = True
    attempt: dict[str, Any] = {"run": run_id, "fenced": False}
    _ATTEMPT.set(attempt)
    try:
        async with checkpointed_run(ex.factory(), info) as cp:
            if isinstance(cp, NoopCheckpointer):
                emit("not_durable", run=run_id)
            emit(
                "started" if checkpoint is None else "begun",
                run=run_id,
                epoch=getattr(cp, "epoch", None),
            )
            if checkpoint is None or args.dispatch == "run":
                ok = await run_body(args, cp, run_id, resume)
    except asyncio.CancelledError:
        emit("interrupted", run=run_id)
        raise
    except CheckpointFencedError as exc:
        # begin() refused a claim that was superseded (the run finished, or another replica
        # took it, since this one claimed it): the block did not run. Not a failure.
        emit("fenced", run=run_id, where="begin", e=str(exc))
        return
    except Exception as exc:
        emit("failed", run=run_id, error=f"{type(exc).__name__}: {exc}")
        raise
    if not ok:
        return  # fenced: complete() was a no-op (the run is another owner's)
    if attempt["fenced"]:
        emit("fenced", run=run_id, where="complete")
        return
    emit("finished", run=run_id, by="live" if checkpoint is None else "recovered")


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Set ``stop`` when stdin reaches EOF (the parent closed it). A daemon thread."""

    def read() -> None:
        with contextlib.suppress(OSError):  # the raw fd: no buffer lock held at shutdown
            while os.read(0, 4096):
                pass
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=read, name="stdin-watch", daemon=True).start()


async def main(args: argparse.Namespace) -> int:
    from executus_ckpt import Executor, SQLCheckpointStore

    _State.name = args.name
    skew = apply_clock_skew()
    handler = _Forward()
    lib = logging.getLogger("executus_ckpt")
    lib.addHandler(handler)
    lib.setLevel(logging.INFO)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING,
        format=f"%(asctime)s {args.name} %(levelname)s %(name)s: %(message)s",
    )

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    why: list[str] = []

    def on_signal(signame: str) -> None:
        why.append(signame)
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_signal, "SIGTERM")
    _watch_stdin(loop, stop)

    limit = asyncio.Semaphore(args.dispatch_limit) if args.dispatch_limit > 0 else None

    async with (
        SQLCheckpointStore.open(args.url) as store,
        Executor(
            store,
            name=args.name,
            heartbeat_interval=args.hb,
            stale_after=args.stale,
            sweep_interval=args.sweep,
        ) as ex,
    ):
        _State.ex = ex.id
        emit("ready", skew=skew)
        live: set[asyncio.Task[None]] = set()
        counter = 0

        def start_live() -> None:
            nonlocal counter
            run_id = f"{args.run_prefix}-{counter}"
            counter += 1
            task = loop.create_task(one_run(args, ex, run_id), name=f"live:{run_id}")
            live.add(task)
            task.add_done_callback(live.discard)
            task.add_done_callback(_retrieve)

        if args.start_runs:
            for _ in range(args.runs):
                start_live()

        async def dispatch(checkpoint: Any) -> None:
            emit(
                "dispatched",
                run=checkpoint.run_id,
                epoch=checkpoint.epoch,
                attempts=checkpoint.attempts,
                it=checkpoint.iteration,
                phases=list(checkpoint.completed_phases),
            )
            if limit is None:
                await one_run(args, ex, checkpoint.run_id, checkpoint)
                return
            async with limit:
                await one_run(args, ex, checkpoint.run_id, checkpoint)

        async def recover_later() -> None:
            await asyncio.sleep(args.recover_delay)
            ex.recover(dispatch, max_attempts=args.max_attempts, concurrency=args.concurrency)
            emit("recovering")

        if not args.no_recover:
            if args.recover_delay > 0:
                loop.create_task(recover_later()).add_done_callback(_retrieve)
            else:
                ex.recover(dispatch, max_attempts=args.max_attempts, concurrency=args.concurrency)
                emit("recovering")

        async def keep_live() -> None:
            deadline = loop.time() + args.spawn_for
            while loop.time() < deadline and not stop.is_set():
                while len(live) < args.keep_live and ex.state == "running":
                    start_live()
                await asyncio.sleep(0.05)

        if args.keep_live > 0:
            loop.create_task(keep_live()).add_done_callback(_retrieve)

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.duration if args.duration > 0 else None):
                await stop.wait()
        emit("draining", why=why[0] if why else "stop", grace=args.grace)
        await ex.drain(args.grace)
        stats = ex.stats()
        emit("drained", stats=dataclasses.asdict(stats))
    emit("exit")
    return 0


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
