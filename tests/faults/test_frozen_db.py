"""A PostgreSQL that stops answering, or drops every connection (issue 10 item 6).

Every store operation, a checkpointed run and the CLI fail with ``StoreUnavailableError`` in
bounded time (``operation_timeout``/``connect_timeout``), and work again once the database
answers. The faults come from a loopback proxy (tests/proxy.py) in front of a per-test
database on the shared server: only this test's connections freeze or break, never the server.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest

from executus_ckpt import (
    NoopCheckpointer,
    Outcome,
    RunCheckpoint,
    RunCheckpointMeta,
    RunCheckpointState,
    RunInfo,
    SQLCheckpointStore,
    StoreCheckpointerFactory,
    StoreUnavailableError,
    checkpointed_run,
    classify_outcome,
    recover_interrupted,
)
from executus_ckpt.testing import ManualClock
from tests.proxy import TCPProxy

OPERATION_TIMEOUT = 1.0
CONNECT_TIMEOUT = 1.0
BOUND = 3.0
"""Seconds an operation may take on a frozen database: the 1 s operation timeout plus slack."""

REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).with_name("executus-ckpt")

pytestmark = pytest.mark.timeout(90)


def state(i: int) -> RunCheckpointState:
    """The state of iteration ``i``: ``2 * i`` messages, appended to the previous one.

    One completed phase throughout: a save that completes a phase is written at once,
    whatever the throttle (a phase boundary), and these tests are about the throttle.
    """
    return RunCheckpointState(
        messages=[{"role": "tool", "n": n} for n in range(2 * i)],
        iteration=i,
        completed_phases=["plan"],
    )


@pytest.fixture
def proxy(pg_url: str) -> Iterator[TCPProxy]:
    p = TCPProxy.for_url(pg_url)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
async def store(
    pg_url: str, proxy: TCPProxy, unretrieved: list[dict[str, Any]]
) -> AsyncIterator[SQLCheckpointStore]:
    store = SQLCheckpointStore.from_url(
        proxy.url(pg_url), operation_timeout=OPERATION_TIMEOUT, connect_timeout=CONNECT_TIMEOUT
    )
    try:
        await store.check_schema()
        yield store
    finally:
        proxy.thaw()
        async with asyncio.timeout(30):
            await store.aclose()


async def fails_in_time(what: str, aw: Awaitable[Any], bound: float = BOUND) -> BaseException:
    """Await ``aw``, which must raise StoreUnavailableError within ``bound`` seconds."""
    start = time.monotonic()
    with pytest.raises(StoreUnavailableError) as info:
        async with asyncio.timeout(bound + 20):  # a hang fails here, not at pytest's timeout
            await aw
    elapsed = time.monotonic() - start
    print(f"{what}: StoreUnavailableError after {elapsed:.2f} s")
    assert elapsed < bound, f"{what} took {elapsed:.2f} s on a frozen database (bound {bound} s)"
    assert info.value.__cause__ is not None
    # Names the timeout, not the cancellation that enforced it (the CLI said "CancelledError").
    assert "timed out" in str(info.value) and "CancelledError" not in str(info.value)
    return info.value


async def eventually(check: Any, within: float = 10.0) -> None:
    """Poll the coroutine function ``check`` until it returns True (real time, bounded)."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"{check.__name__} never became true"
        await asyncio.sleep(0.05)


async def test_frozen_database_fails_each_operation_in_time(
    store: SQLCheckpointStore, proxy: TCPProxy
) -> None:
    factory = StoreCheckpointerFactory(store)
    cp = await factory.begin(RunInfo("frozen-run", inputs={"prompt": "p"}))
    await cp.save(state(1))
    done = await factory.begin(RunInfo("frozen-done"))

    proxy.freeze()
    error = await fails_in_time("checkpointer save (append)", cp.save(state(2)))
    assert "frozen-run" in str(error)
    meta = RunCheckpointMeta("frozen-run")
    rewrite = RunCheckpoint(meta=meta, messages=[{"n": "x"}], iteration=9, epoch=cp.epoch)
    await fails_in_time("store save (rewrite)", store.save(rewrite))
    await fails_in_time("load", store.load("frozen-run"))
    await fails_in_time("list_interrupted", store.list_interrupted())
    await fails_in_time("complete (delete)", done.complete())

    proxy.thaw()
    await cp.save(state(3))
    loaded = await store.load("frozen-run")
    assert loaded is not None
    assert (loaded.iteration, list(loaded.messages)) == (3, list(state(3).messages))
    [listed] = [c for c in await store.list_interrupted() if c.run_id == "frozen-run"]
    assert listed.iteration == 3
    await done.complete()  # the failed complete left the run closed, not deleted: retry works
    assert await store.load("frozen-done") is None
    await cp.complete()
    assert await store.load("frozen-run") is None


async def test_lone_append_on_a_kept_connection_fails_in_time(pg_url: str, proxy: TCPProxy) -> None:
    """A save right behind the previous one is sent by its caller on the connection kept
    from that save, bounded by the statement's own timeout (no outer timer on that path).
    The engine here is the host's, without asyncpg's ``command_timeout``: only the store's
    ``operation_timeout`` can end the wait."""
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(proxy.url(pg_url))
    store = SQLCheckpointStore(engine, operation_timeout=OPERATION_TIMEOUT)
    try:
        factory = StoreCheckpointerFactory(store)
        cp = await factory.begin(RunInfo("kept-run", inputs={"prompt": "p"}))
        await cp.save(state(1))
        await cp.save(state(2))
        backend: Any = store._backend
        assert backend._parked, "no connection kept: the save below would not be a lone append"
        proxy.freeze()  # blocks this loop: the kept connection cannot expire meanwhile
        error = await fails_in_time("lone append on a kept connection", cp.save(state(3)))
        assert "kept-run" in str(error)
        proxy.thaw()
        await cp.save(state(4))
        loaded = await store.load("kept-run")
        assert loaded is not None and loaded.iteration == 4
        assert list(loaded.messages) == list(state(4).messages)
    finally:
        proxy.thaw()
        await store.aclose()
        await engine.dispose()


async def test_recover_interrupted_on_a_frozen_database_fails_in_time(
    store: SQLCheckpointStore, proxy: TCPProxy
) -> None:
    """The typed error itself, not an ExceptionGroup (issue 10 item 7), and nothing
    dispatched; after the thaw every run is recovered."""
    factory = StoreCheckpointerFactory(store)
    for i in range(3):
        cp = await factory.begin(RunInfo(f"interrupted-{i}", inputs={"prompt": "p"}))
        await cp.save(state(1))
    dispatched: list[str] = []

    async def dispatch(checkpoint: RunCheckpoint) -> None:
        dispatched.append(checkpoint.run_id)

    proxy.freeze()
    await fails_in_time("recover_interrupted", recover_interrupted(store, dispatch))
    assert dispatched == []

    proxy.thaw()
    report = await recover_interrupted(store, dispatch)
    assert sorted(report.dispatched) == sorted(dispatched) == [f"interrupted-{i}" for i in range(3)]


async def test_checkpointed_run_on_a_frozen_database(
    store: SQLCheckpointStore, proxy: TCPProxy, caplog: pytest.LogCaptureFixture
) -> None:
    factory = StoreCheckpointerFactory(store)
    caplog.set_level(logging.WARNING, logger="executus_ckpt")

    # A run that began before the freeze: its save raises in time, and its fail() (which
    # cannot delete either) is logged without masking the run's error or holding it up.
    start = time.monotonic()
    with pytest.raises(StoreUnavailableError):
        async with asyncio.timeout(2 * BOUND + 20):
            async with checkpointed_run(factory, RunInfo("began-before")) as cp:
                await cp.save(state(1))
                proxy.freeze()
                start = time.monotonic()
                await cp.save(state(2))
    elapsed = time.monotonic() - start
    print(f"checkpointed_run save + fail on a frozen database: {elapsed:.2f} s")
    assert elapsed < 2 * BOUND
    actions = {r.__dict__.get("action") for r in caplog.records}
    # the save's StoreUnavailableError is a failure (not a shutdown): fail() was tried
    assert "finalize_failed_failed" in actions, actions

    # A run that begins during the freeze goes on, non-durable, after at most the bound.
    start = time.monotonic()
    async with (
        asyncio.timeout(BOUND + 20),
        checkpointed_run(factory, RunInfo("began-frozen")) as cp,
    ):
        entered = time.monotonic() - start
        assert isinstance(cp, NoopCheckpointer)
    print(f"checkpointed_run begin on a frozen database: {entered:.2f} s")
    assert entered < BOUND
    assert any(r.__dict__.get("action") == "begin_failed" for r in caplog.records)

    proxy.thaw()
    kept = await store.load("began-before")  # fail() could not delete it: still recoverable
    # The save that timed out may have committed once the bytes flowed again (documented:
    # its outcome is unknown), never anything else.
    assert kept is not None and kept.iteration in (1, 2)
    assert list(kept.messages) == list(state(kept.iteration).messages)
    async with checkpointed_run(factory, RunInfo("after-thaw")) as cp:
        assert not isinstance(cp, NoopCheckpointer)
        await cp.save(state(1))
        assert (await store.load("after-thaw")) is not None
    assert await store.load("after-thaw") is None


async def test_an_operation_timeout_is_a_failure_not_a_shutdown(
    store: SQLCheckpointStore, proxy: TCPProxy
) -> None:
    cp = await StoreCheckpointerFactory(store).begin(RunInfo("timed-out"))
    proxy.freeze()
    error = await fails_in_time("save", cp.save(state(1)))
    # Its cause chain holds the CancelledError that enforced the timeout (issue 10 item 1).
    assert classify_outcome(error) is Outcome.FAILED


async def test_timed_out_append_leaves_no_unretrieved_error(
    store: SQLCheckpointStore, proxy: TCPProxy, unretrieved: list[dict[str, Any]]
) -> None:
    cp = await StoreCheckpointerFactory(store).begin(RunInfo("leak"))
    await cp.save(state(1))
    proxy.freeze()
    await fails_in_time("append", cp.save(state(2)))
    await asyncio.sleep(2 * OPERATION_TIMEOUT)  # the abandoned statement's own timeout ends it
    gc.collect()
    assert [c["message"] for c in unretrieved] == []


async def test_throttled_run_on_a_frozen_database(
    store: SQLCheckpointStore, proxy: TCPProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Saves inside the window return at once; flush() and the trailing flush fail in time
    and the trailing flush keeps retrying until the newest state is written after the thaw."""
    caplog.set_level(logging.WARNING, logger="executus_ckpt")
    clock = ManualClock()
    factory = StoreCheckpointerFactory(store, throttle=0.5, clock=clock)
    cp = await factory.begin(RunInfo("throttled"))
    await cp.save(state(1))  # written: opens the window

    proxy.freeze()
    clock.advance(0.1)
    start = time.monotonic()
    await cp.save(state(2))  # inside the window: kept for the trailing flush
    assert time.monotonic() - start < 0.5
    await fails_in_time("flush", cp.flush())

    def flush_failures() -> int:
        return sum(r.__dict__.get("action") == "trailing_flush_failed" for r in caplog.records)

    clock.advance(1.0)  # the trailing flush runs now, and fails in time
    start = time.monotonic()

    async def trailing_flush_failed() -> bool:
        return flush_failures() >= 1

    await eventually(trailing_flush_failed, within=BOUND)
    print(f"trailing flush failed after {time.monotonic() - start:.2f} s")
    # After a failed write the next save is not throttled: it writes, and fails in time.
    await fails_in_time("save after a failed write", cp.save(state(3)))

    proxy.thaw()

    async def newest_stored() -> bool:
        clock.advance(30.0)  # past any backoff
        loaded = await store.load("throttled")
        return loaded is not None and loaded.iteration == 3

    await eventually(newest_stored)
    loaded = await store.load("throttled")
    assert loaded is not None and list(loaded.messages) == list(state(3).messages)
    await cp.complete()
    assert await store.load("throttled") is None


async def _cli(*args: str, within: float) -> tuple[int, str, str, float]:
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        str(CLI),
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONASYNCIODEBUG": "0"},
    )
    try:
        async with asyncio.timeout(within):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode(), time.monotonic() - start


CLI_BOUND = 15.0
"""The CLI's default connect timeout (10 s) plus interpreter start-up."""


async def test_cli_list_on_a_frozen_database_fails_in_seconds(pg_url: str, proxy: TCPProxy) -> None:
    url = proxy.url(pg_url)
    code, _, err, elapsed = await _cli("--url", url, "list", within=60)
    assert code == 0, err  # reachable: the CLI and the proxy work
    proxy.freeze()
    code, _, err, elapsed = await _cli("--url", url, "list", within=60)
    print(f"CLI list on a frozen database: exit {code} after {elapsed:.2f} s: {err.strip()}")
    assert code == 1
    assert elapsed < CLI_BOUND
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "unavailable" in lines[0] and "timed out" in lines[0]
    assert "Traceback" not in err and "CancelledError" not in err


async def test_cut_connections_give_typed_errors_then_recover(
    store: SQLCheckpointStore, proxy: TCPProxy
) -> None:
    """Every connection reset at once (a network cut, a server restart behind a proxy):
    each dead pooled connection fails one caller at most, with the typed error."""
    factory = StoreCheckpointerFactory(store)
    cps = [await factory.begin(RunInfo(f"cut-{i}")) for i in range(4)]
    per_cut: list[int] = []
    all_failures: list[BaseException] = []

    async def save_until_written(cp: Any, iteration: int) -> list[BaseException]:
        failures: list[BaseException] = []
        for _ in range(10):  # bounded: a save must succeed again soon
            try:
                async with asyncio.timeout(BOUND + 20):
                    await cp.save(state(iteration))
                return failures
            except StoreUnavailableError as exc:
                failures.append(exc)
        raise AssertionError(f"saves kept failing after the cut: {failures[-1]}")

    for round_ in range(3):
        # Concurrent writes and reads: several connections in the pool when it is cut.
        await asyncio.gather(
            *(cp.save(state(1 + 2 * round_)) for cp in cps),
            *(store.load(cp.run_id) for cp in cps),
        )
        cut = proxy.cut()
        assert cut >= 1
        iteration = 2 + 2 * round_
        results = await asyncio.gather(*(save_until_written(cp, iteration) for cp in cps))
        failures = [f for r in results for f in r]
        per_cut.append(len(failures))
        all_failures += failures
        print(f"cut {round_}: {cut} connections reset, {len(failures)} failed saves")
        for cp in cps:
            loaded = await store.load(cp.run_id)
            assert loaded is not None and loaded.iteration == iteration
            assert list(loaded.messages) == list(state(iteration).messages)
    assert all(type(e) is StoreUnavailableError for e in all_failures), all_failures
    # The pool keeps at most pool_size (5) idle connections: each dead one fails one caller.
    assert max(per_cut) <= 5, per_cut
    for cp in cps:
        await cp.complete()
    assert await store.count() == 0
