"""Test helpers for hosts and for this package: a clock that only moves when told to."""

from __future__ import annotations

import asyncio
import heapq
import itertools


class ManualClock:
    """A monotonic clock for tests: ``clock()`` reads it, ``advance(s)`` moves it.

    Pass it as ``clock=`` to :func:`new_checkpointer` or :class:`StoreCheckpointerFactory`: the
    trailing flush then sleeps on :meth:`sleep`, which returns only when the clock has been
    advanced far enough, so tests control time without real sleeps.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._ids = itertools.count()

    def __call__(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        """Wait until the clock reaches ``now + seconds``."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._ids), fut))
        await fut

    def advance(self, seconds: float) -> None:
        """Move the clock forward and wake the sleepers that are due."""
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)

    async def run_for(self, seconds: float) -> None:
        """Advance by ``seconds`` and let the woken tasks run until they block again."""
        self.advance(seconds)
        for _ in range(50):
            await asyncio.sleep(0)

    @property
    def sleepers(self) -> int:
        """How many tasks are waiting on this clock."""
        return sum(1 for _, _, f in self._sleepers if not f.done())
