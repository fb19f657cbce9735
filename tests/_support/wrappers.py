"""Store wrappers for the checkpointer and lifecycle tests: they record, gate and fail writes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from executus_ckpt import StoreUnavailableError

WRITE_PATHS = ["save", "append"]
"""The two ways a checkpointer writes: whole-transcript saves, or appends of the new tail."""


class Recorder:
    """Wraps a store: records saved iterations, can block (gate) or fail the next writes.

    ``Recorder(store)`` is a plain :class:`CheckpointStore` (whole-transcript saves) or, inside
    ``write_path("append")``, an :class:`AppendingStore` whose appends are recorded, gated and
    failed the same way: the checkpointer tests run over both paths.
    """

    path = "save"

    def __new__(cls, inner: Any) -> Recorder:
        kind = AppendingRecorder if cls is Recorder and Recorder.path == "append" else cls
        return object.__new__(kind)

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.saved: list[int] = []
        self.deletes = 0
        self.fail_next = 0
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def save(self, checkpoint: Any) -> None:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise StoreUnavailableError("injected failure", run_id=checkpoint.meta.run_id)
        await self.inner.save(checkpoint)
        self.saved.append(checkpoint.iteration)

    async def delete(self, run_id: str, *, epoch: int | None = None) -> bool:
        self.deletes += 1
        return bool(await self.inner.delete(run_id, epoch=epoch))

    def __getattr__(self, name: str) -> Any:
        if name == "append":  # a plain store: the checkpointer must not find an append
            raise AttributeError(name)
        return getattr(self.inner, name)


class AppendingRecorder(Recorder):
    """A :class:`Recorder` that forwards (and records) the append fast path."""

    appends = 0

    async def append(
        self,
        checkpoint: Any,
        *,
        base_count: int,
        encoded_tail: Any = None,
        replace_from: Any = None,
    ) -> None:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise StoreUnavailableError("injected failure", run_id=checkpoint.meta.run_id)
        await self.inner.append(
            checkpoint,
            base_count=base_count,
            encoded_tail=encoded_tail,
            replace_from=replace_from,
        )
        self.saved.append(checkpoint.iteration)
        self.appends += 1


@contextmanager
def write_path(path: str) -> Iterator[str]:
    """Make ``Recorder(...)`` build the wrapper for ``path`` (one of :data:`WRITE_PATHS`).

    Each checkpointer test module turns this into its autouse, parametrized fixture.
    """
    Recorder.path = path
    try:
        yield path
    finally:
        Recorder.path = "save"


class FaultyStore:
    """Wraps a store: ``register``, ``save`` or ``delete`` can fail or hang on demand."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.fail_register = False
        self.fail_delete = False
        self.hang_saves = False
        self.release = asyncio.Event()
        self.save_entered = asyncio.Event()
        self.saved: list[int] = []

    async def register(self, checkpoint: Any) -> int:
        if self.fail_register:
            raise StoreUnavailableError("injected register failure", run_id=checkpoint.run_id)
        return int(await self.inner.register(checkpoint))

    async def save(self, checkpoint: Any) -> None:
        if self.hang_saves:
            self.save_entered.set()
            await self.release.wait()  # "forever", until the test cleans up
        await self.inner.save(checkpoint)
        self.saved.append(checkpoint.iteration)

    async def delete(self, run_id: str, *, epoch: int | None = None) -> bool:
        if self.fail_delete:
            raise StoreUnavailableError("injected delete failure", run_id=run_id)
        return bool(await self.inner.delete(run_id, epoch=epoch))

    def __getattr__(self, name: str) -> Any:
        if name == "append":  # a plain store: every write goes through save()
            raise AttributeError(name)
        return getattr(self.inner, name)
