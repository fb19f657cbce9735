"""Run lifecycle: finalize a run's checkpoint on every exit path."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from . import telemetry
from .checkpointer import NoopCheckpointer
from .config import DEFAULT_SHUTDOWN_FLUSH_TIMEOUT
from .errors import CheckpointFencedError, ShutdownError
from .protocols import Checkpointer, CheckpointerFactory
from .types import RunInfo

logger = logging.getLogger(__name__)

SHUTDOWN_EXCEPTIONS: tuple[type[BaseException], ...] = (
    asyncio.CancelledError,
    ShutdownError,
    KeyboardInterrupt,
    SystemExit,
)
"""Exceptions that mean "the service is going down", not "the run failed"."""


class Outcome(enum.Enum):
    """How a run ended, as far as its checkpoint is concerned."""

    COMPLETED = "completed"
    """Finished: the checkpoint is deleted."""
    FAILED = "failed"
    """Terminal error: the checkpoint is deleted (retrying would fail the same way)."""
    SHUTDOWN = "shutdown"
    """Cut off by shutdown: the checkpoint is kept for recovery."""


def classify_outcome(
    exc: BaseException | None,
    shutdown_exceptions: tuple[type[BaseException], ...] = (),
) -> Outcome:
    """Classify how a run ended from the exception it ended with (``None``: it returned).

    A shutdown is an instance of ``asyncio.CancelledError``, :class:`ShutdownError`,
    ``KeyboardInterrupt``, ``SystemExit`` or one of ``shutdown_exceptions``, or an exception
    group whose every member (recursively) is one. Anything else is a failure; in
    particular the exception's ``__cause__`` and ``__context__`` are not looked at: a
    ``TimeoutError`` from ``asyncio.timeout()`` or ``wait_for()`` (raised from their own
    ``CancelledError``) is a failed run, and a host that wraps a shutdown in its own
    exception lists that exception in ``shutdown_exceptions``.
    """
    if exc is None:
        return Outcome.COMPLETED
    kinds = SHUTDOWN_EXCEPTIONS + tuple(shutdown_exceptions)
    return Outcome.SHUTDOWN if _is_shutdown(exc, kinds) else Outcome.FAILED


def _is_shutdown(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return bool(exc.exceptions) and all(_is_shutdown(e, kinds) for e in exc.exceptions)
    return isinstance(exc, kinds)


@asynccontextmanager
async def checkpointed_run(
    factory: CheckpointerFactory,
    info: RunInfo,
    *,
    shutdown_exceptions: tuple[type[BaseException], ...] = (),
    flush_timeout: float = DEFAULT_SHUTDOWN_FLUSH_TIMEOUT,
) -> AsyncIterator[Checkpointer]:
    """Run a block as one checkpointed run; yields the run's :class:`Checkpointer`.

    On exit the outcome is classified (:func:`classify_outcome`) and the checkpoint finalized,
    on every exit path: no exception → ``complete()``; a shutdown → the pending throttled
    state is flushed (within ``flush_timeout`` seconds) and the checkpoint kept for recovery;
    anything else → ``fail(exc)``. The block's exception always propagates unchanged
    (cancellation included).

    A ``begin`` that fails is logged at WARNING and the run goes on with a no-op checkpointer
    (not durable), except a :class:`CheckpointFencedError` (a recovered run that finished or
    was taken by another replica since it was claimed), which propagates: the block does
    not run. Errors from ``complete``/``fail``/``flush`` are logged, never raised over
    the run's own result or exception.
    """
    try:
        checkpointer: Checkpointer = await factory.begin(info)
    except CheckpointFencedError:
        # The run is not ours to run (it finished, or another replica took it since it was
        # claimed): running it non-durable would run it twice.
        raise
    except Exception as exc:
        telemetry.log(
            logger,
            logging.WARNING,
            "run %s is not durable: checkpointing could not begin (%s: %s)",
            info.run_id,
            type(exc).__name__,
            exc,
            action="begin_failed",
            exc_info=exc,
            run_id=info.run_id,
            error=type(exc).__name__,
        )
        checkpointer = NoopCheckpointer()
    try:
        yield checkpointer
    except BaseException as exc:
        outcome = classify_outcome(exc, shutdown_exceptions)
        await _finalize(checkpointer, info.run_id, outcome, exc, flush_timeout)
        raise
    await _finalize(checkpointer, info.run_id, Outcome.COMPLETED, None, flush_timeout)


async def _finalize(
    checkpointer: Checkpointer,
    run_id: str,
    outcome: Outcome,
    exc: BaseException | None,
    flush_timeout: float,
) -> None:
    try:
        if outcome is Outcome.COMPLETED:
            await checkpointer.complete()
        elif outcome is Outcome.FAILED:
            await checkpointer.fail(exc)
        else:
            # One deadline over the flush and the wait for in-flight writes: a database that
            # stopped answering must not hold a shutdown (the write is then abandoned). A
            # timeout cancels once, so each step gets its own scope on the same deadline.
            deadline = asyncio.get_running_loop().time() + flush_timeout
            try:
                async with asyncio.timeout_at(deadline):
                    await checkpointer.flush()
            finally:
                async with asyncio.timeout_at(deadline):
                    await checkpointer.aclose(release=True)
            telemetry.log(
                logger,
                logging.INFO,
                "run %s shut down: checkpoint kept for recovery",
                run_id,
                action="run_interrupted",
                run_id=run_id,
            )
    except Exception as error:
        level = logging.WARNING if outcome is Outcome.SHUTDOWN else logging.ERROR
        what = {
            Outcome.COMPLETED: "complete",
            Outcome.FAILED: "fail",
            Outcome.SHUTDOWN: "flush on shutdown",
        }[outcome]
        telemetry.log(
            logger,
            level,
            "run %s: %s of its checkpoint failed (%s: %s)%s",
            run_id,
            what,
            type(error).__name__,
            error,
            " - it will be recovered again at the next boot"
            if outcome is not Outcome.SHUTDOWN
            else " - the newest state may be lost",
            action=f"finalize_{outcome.value}_failed",
            exc_info=error,
            run_id=run_id,
            error=type(error).__name__,
        )
