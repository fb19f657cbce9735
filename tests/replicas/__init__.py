"""Many replicas on one database: real OS processes (``replica_child``) against real databases.

The harness the tests share: :class:`Fleet` starts replica processes, reads their JSON event
lines (each with the parent's receive time added as ``recv``), sends them signals by PID, and
stops every one it started at the end (by PID, SIGCONT first if stopped, SIGKILL if it does not
exit). The event log is the ground truth the tests count from; the database is checked too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CHILD = "tests.replicas.replica_child"

Event = dict[str, Any]

SMALL = {"hb": 0.5, "stale": 3.0, "sweep": 0.5}
"""The small settings of issue 12's tests: heartbeat 0.5 s, stale_after 3 s, sweep 0.5 s."""


class Replica:
    """One replica process and the events it printed."""

    def __init__(self, fleet: Fleet, name: str, proc: asyncio.subprocess.Process, log: Path):
        self.fleet = fleet
        self.name = name
        self.proc = proc
        self.log = log
        self.pid = proc.pid
        self.ex: str | None = None
        self.stopped = False
        self.events: list[Event] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                return
            try:
                event = json.loads(line)
            except ValueError:
                event = {"ev": "garbage", "line": line.decode(errors="replace")}
            event["recv"] = time.time()
            event.setdefault("name", self.name)
            if event.get("ev") == "ready":
                self.ex = event.get("ex")
            self.events.append(event)
            self.fleet.events.append(event)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def ready(self, within: float = 30.0) -> Replica:
        await self.fleet.wait_for(lambda: self.ex is not None, within, f"{self.name} ready")
        return self

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.returncode is None:
            os.kill(self.pid, sig)
            if sig == signal.SIGSTOP:
                self.stopped = True
            elif sig == signal.SIGCONT:
                self.stopped = False

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()

    async def wait(self, within: float = 60.0) -> int:
        async with asyncio.timeout(within):
            code = await self.proc.wait()
            await self._reader
        return code

    async def kill(self) -> None:
        """SIGKILL, and wait for the exit (and the last events)."""
        self.signal(signal.SIGKILL)
        await self.wait(30)

    def stderr_tail(self, n: int = 40) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


class Fleet:
    """Replica processes of one test (``async with``: all stopped at the end, by PID)."""

    def __init__(self, url: str, workdir: Path, **defaults: Any) -> None:
        self.url = url
        self.workdir = workdir
        self.defaults = {**SMALL, **defaults}
        self.replicas: list[Replica] = []
        self.events: list[Event] = []

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop_all()
        # every event, for a post-mortem (kept in the test's tmp_path)
        lines = "".join(json.dumps(e) + "\n" for e in self.events)
        (self.workdir / "events.jsonl").write_text(lines)

    async def spawn(self, name: str, *, env: dict[str, str] | None = None, **opts: Any) -> Replica:
        """Start ``replica_child`` with the fleet's defaults overridden by ``opts``
        (``start_runs=True`` → ``--start-runs``; ``no_recover=True`` → ``--no-recover``)."""
        merged = {**self.defaults, **opts}
        argv = [sys.executable, "-m", CHILD, "--url", self.url, "--name", name]
        for key, value in merged.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif value is False or value is None:
                continue
            else:
                argv += [flag, str(value)]
        log = self.workdir / f"{name}-{len(self.replicas)}.stderr"
        with open(log, "wb") as err:  # noqa: ASYNC230 - a local file, once per process
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=REPO,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                limit=1 << 20,
            )
        replica = Replica(self, name, proc, log)
        self.replicas.append(replica)
        return replica

    async def wait_for(self, predicate: Callable[[], bool], within: float, what: str) -> float:
        """Poll ``predicate`` every 20 ms; returns when it holds (its time), fails after
        ``within`` s with the replicas' stderr tails."""
        deadline = time.monotonic() + within
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {within} s waiting for {what}\n{self.dump()}"
                )
            await asyncio.sleep(0.02)
        return time.time()

    def dump(self) -> str:
        parts = []
        for r in self.replicas:
            parts.append(f"--- {r.name} pid {r.pid} rc {r.proc.returncode} ---\n{r.stderr_tail()}")
        return "\n".join(parts)

    async def stop_all(self) -> None:
        """Stop every replica this fleet started, by PID: SIGCONT if stopped, close stdin,
        SIGKILL whatever has not exited within a few seconds."""
        for r in self.replicas:
            if r.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(r.pid, signal.SIGCONT)
                r.close_stdin()
        for r in self.replicas:
            if r.alive:
                with contextlib.suppress(TimeoutError):
                    await r.wait(8)
            if r.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(r.pid, signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    await r.wait(10)

    # -- event queries ----------------------------------------------------------------------

    def of(
        self, ev: str, *, name: str | None = None, runs: Iterable[str] | None = None
    ) -> list[Event]:
        wanted = None if runs is None else set(runs)
        return [
            e
            for e in self.events
            if e.get("ev") == ev
            and (name is None or e.get("name") == name)
            and (wanted is None or e.get("run") in wanted)
        ]

    def finished(self) -> Counter[str]:
        return Counter(e["run"] for e in self.of("finished"))

    def problems(self) -> list[Event]:
        """Events that must never happen in a healthy fleet."""
        return [e for e in self.events if e.get("ev") in ("failed", "not_durable", "garbage")]


def assert_each_finished_once(fleet: Fleet, runs: Iterable[str]) -> None:
    expected = set(runs)
    counts = fleet.finished()
    twice = {r: n for r, n in counts.items() if n > 1}
    missing = expected - set(counts)
    extra = set(counts) - expected
    if twice:
        story = "\n".join(
            f"  {e['t']:.3f} {e['name']} {e['ev']} {e.get('epoch', '')} {e.get('where', '')}"
            for e in fleet.events
            if e.get("run") in twice and e.get("ev") != "saved"
        )
        raise AssertionError(f"finished more than once: {twice}\n{story}")
    assert not missing, f"never finished: {sorted(missing)[:20]} ({len(missing)})\n{fleet.dump()}"
    assert not extra, f"unexpected runs finished: {sorted(extra)[:20]}"


async def rows_left(url: str) -> list[Any]:
    """Every checkpoint row still stored (any status), as summaries."""
    from executus_ckpt import SQLCheckpointStore

    async with SQLCheckpointStore.open(url) as store:
        return [s async for s in store.iter_summaries(status=None)]


def report(line: str) -> None:
    """A measured figure: printed (``pytest -s``), and appended to the file named by
    ``$EXECUTUS_CKPT_REPLICA_REPORT`` if set."""
    print(f"\n[replicas] {line}", flush=True)
    path = os.environ.get("EXECUTUS_CKPT_REPLICA_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def backend_of(url: str) -> str:
    return "postgres" if url.startswith("postgresql") else "sqlite"
