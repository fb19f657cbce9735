"""Run metadata, states, waiting helpers and the exceptions the lifecycle tests raise."""

from __future__ import annotations

import asyncio
from typing import Any

from executus_ckpt import RunCheckpointMeta, RunCheckpointState, RunInfo, ShutdownError

META = RunCheckpointMeta("run-1", agent_id="agent", prompt="hi")
RUN = RunInfo("run-1", subject_id="agent", name="Agent", inputs={"prompt": "hi"})
LIFECYCLE_LOGGER = "executus_ckpt.lifecycle"


def state(
    i: int, messages: list[Any] | None = None, phases: tuple[str, ...] = ()
) -> RunCheckpointState:
    """Iteration ``i`` with ``messages`` (default: ``i`` messages ``{"i": k}``) and ``phases``."""
    msgs = messages if messages is not None else [{"i": k} for k in range(i)]
    return RunCheckpointState(messages=msgs, iteration=i, completed_phases=phases)


async def settle() -> None:
    """Let woken tasks run until they block."""
    for _ in range(20):
        await asyncio.sleep(0)


async def drain() -> None:
    """Let woken tasks run and wait (bounded) for their writes to reach the database.

    Only I/O completion is awaited here; throttle timing is driven by the ManualClock alone.
    """
    await settle()
    for _ in range(50):
        writes = [t for t in asyncio.all_tasks() if t.get_name().startswith("executus_ckpt.write")]
        if not writes:
            return
        await asyncio.wait(writes, timeout=5)
        for _ in range(5):
            await asyncio.sleep(0)


async def stored_iteration(store: Any, run_id: str = "run-1") -> int | None:
    cp = await store.load(run_id)
    return None if cp is None else int(cp.iteration)


class HostShutdown(Exception):
    """A host's own "we are going down" exception."""


class HostShutdownChild(ShutdownError):
    """A subclass of the library's ShutdownError."""


def raised_from(exc: BaseException, cause: BaseException | None) -> BaseException:
    """``exc`` as it is after ``raise exc from cause`` (traceback and chaining set)."""
    try:
        raise exc from cause
    except BaseException as caught:
        return caught


def raised_during(exc: BaseException, context: BaseException) -> BaseException:
    """``exc`` raised implicitly while ``context`` was being handled (``__context__`` only)."""
    try:
        try:
            raise context
        except BaseException:
            raise exc  # noqa: B904 - implicit chaining is the point
    except BaseException as caught:
        return caught
