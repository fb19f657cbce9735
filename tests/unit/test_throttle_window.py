"""Throttle and transcript validation regressions (issue 10, items 13 and 16)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from executus_ckpt import (
    CheckpointSerializationError,
    InMemoryCheckpointStore,
    RunCheckpointMeta,
    RunCheckpointState,
    new_checkpointer,
)
from executus_ckpt.testing import ManualClock

META = RunCheckpointMeta("run-t")


class SlowStore(InMemoryCheckpointStore):
    """Writes wait on ``gate``; each write records the clock time it started."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__()
        self.clock = clock
        self.gate = asyncio.Event()
        self.started: list[float] = []

    async def save(self, checkpoint: Any) -> None:
        self.started.append(self.clock())
        await self.gate.wait()
        await super().save(checkpoint)

    async def append(
        self,
        checkpoint: Any,
        *,
        base_count: int,
        encoded_tail: Any = None,
        replace_from: Any = None,
    ) -> None:
        await self.save(checkpoint)


async def _settle() -> None:
    for _ in range(30):
        await asyncio.sleep(0)


async def test_a_save_during_an_in_flight_write_waits_for_the_next_window() -> None:
    clock = ManualClock()
    store = SlowStore(clock)
    cp = new_checkpointer(store, META, throttle=2.0, clock=clock)
    first = asyncio.create_task(cp.save(RunCheckpointState(messages=[{"i": 0}], iteration=0)))
    await _settle()
    assert store.started == [0.0]  # the first write is in flight (gated)
    await clock.run_for(1.0)
    await cp.save(RunCheckpointState(messages=[{"i": 0}, {"i": 1}], iteration=1))  # deferred
    store.gate.set()  # the first write finishes at t=1
    await first
    await _settle()
    assert store.started == [0.0], "a second write inside the window that began at t=0"
    await clock.run_for(0.9)
    assert store.started == [0.0]
    await clock.run_for(0.1)  # t=2: the window ends
    await _settle()
    assert store.started == [0.0, 2.0]
    stored = await store.load("run-t")
    assert stored is not None and stored.iteration == 1
    await cp.aclose()


@pytest.mark.parametrize("throttle", [0.0, 10.0])
async def test_an_earlier_message_replaced_by_an_invalid_one_is_refused(throttle: float) -> None:
    store = InMemoryCheckpointStore()
    cp = new_checkpointer(store, META, throttle=throttle, clock=ManualClock())
    messages: list[Any] = [{"i": 0}, {"i": 1}, {"i": 2}]
    await cp.save(RunCheckpointState(messages=messages, iteration=1))
    messages[0] = {"bad": float("nan")}  # same length, an earlier message replaced
    with pytest.raises(CheckpointSerializationError):
        await cp.save(RunCheckpointState(messages=messages, iteration=2))
    await cp.flush()
    stored = await store.load("run-t")
    assert stored is not None and stored.iteration == 1
    assert list(stored.messages) == [{"i": 0}, {"i": 1}, {"i": 2}]
    await cp.aclose()
