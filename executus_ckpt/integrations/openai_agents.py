"""OpenAI Agents SDK integration: a ``Session`` whose items are one run's checkpointed transcript.

``pip install "executus-ckpt[openai-agents]"``. One session is one run (``session_id`` is the
run id): ``Runner.run(agent, ..., session=session)`` stores every turn in the run's checkpoint,
and a run killed mid-way resumes, in a new process, from the turns it had stored::

    async def run_agent(factory, info):
        async with checkpointed_session(factory, info) as session:
            result = await Runner.run(agent, session.input_for(info.inputs["prompt"]),
                                      session=session)
        return result.final_output

    # at boot: await recover_interrupted(store, lambda cp: run_agent(factory, cp.run_info()))

Semantics:

- **Resume.** :func:`checkpointed_session` loads the run's stored transcript, if any, before
  the run begins; the SDK reads it back as history. The SDK stores a turn as one
  ``add_items`` call (the model's output with its tool results), so the stored transcript
  always ends at a turn boundary and the resumed run continues from the whole of it (not
  from a phase boundary: the SDK itself drops a tool call whose output is missing).
  :meth:`ExecutusSession.input_for` gives ``Runner.run`` its input: the prompt on a fresh run
  (or phase), ``[]`` when the stored history already holds it.
- **Durability.** With ``durable=True`` (the default) ``add_items``, ``pop_item``,
  ``clear_session`` and :meth:`~ExecutusSession.end_phase` return only once the new
  transcript is stored (they flush, whatever the factory's throttle): a turn the SDK went
  past survives ``kill -9``. With ``durable=False`` they follow the factory's throttle (the
  store is at most ``throttle`` seconds behind, a crash may lose the last turns and the
  resumed run redoes them). Each write appends only the new items (cost flat in the
  transcript's length); ``pop_item`` and ``clear_session`` rewrite the transcript.
- **Reads.** ``get_items(limit)`` reads the last ``limit`` items from the store
  (``load_tail``: cost grows with ``limit``, not with the transcript); ``get_items()`` reads
  them all. Items come back as JSON values equal to those added (a tuple comes back a list);
  the session keeps its own copies, so a caller mutating an item after ``add_items`` changes
  nothing stored. A run that is not durable (no store, or its ``begin`` failed) is served
  from the session's memory.
- **Cancellation.** A cancelled mutation still settles (the caller waits for it, then gets
  ``CancelledError``), as the SDK's own SQL sessions do. Mutations of one session are
  serialized.
- **Errors.** An item that is not JSON-compatible raises ``CheckpointSerializationError``
  and nothing changes. A failed write raises ``StoreUnavailableError``: the items stay in the
  session and are written with its next write. ``CheckpointFencedError``: the run was taken
  over (or finished) elsewhere, this session must stop.
- **Phases** (optional, for runs made of several ``Runner.run`` calls): ``end_phase(name)``
  records a phase boundary; on resume ``should_skip(name)`` is True for the phases completed
  before the crash. Only phase boundaries count as progress for the recovery attempt budget
  (``max_attempts``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar, cast

import orjson

try:
    from agents.items import TResponseInputItem
    from agents.memory import SessionSettings
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "executus_ckpt.integrations.openai_agents needs the OpenAI Agents SDK: "
        'pip install "executus-ckpt[openai-agents]"'
    ) from exc

from .. import codec
from ..checkpointer import NoopCheckpointer, StoreCheckpointerFactory
from ..errors import (
    CheckpointError,
    CheckpointFencedError,
    CheckpointNotFoundError,
    StoreUnavailableError,
)
from ..lifecycle import checkpointed_run
from ..protocols import Checkpointer, CheckpointStore, TailReadingStore
from ..types import JSONValue, PhaseSkipper, RunCheckpoint, RunCheckpointState, RunInfo

if TYPE_CHECKING:
    from agents.memory import Session

__all__ = ["ExecutusSession", "checkpointed_session"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ExecutusSession:
    """An Agents SDK ``Session`` over one run's checkpoint (see the module docstring).

    Usually made by :func:`checkpointed_session`. Built directly, it writes through
    ``checkpointer`` (the run's, from ``factory.begin(info)``) and reads from ``store``
    (``None``: from memory); ``checkpoint`` is the run's stored checkpoint to resume from (its
    whole transcript, iteration and completed phases), loaded before ``begin``.

    Args:
        checkpointer: the run's checkpointer.
        run_id: the run's id, also the ``session_id``.
        store: where ``get_items`` reads (the checkpointer's store).
        checkpoint: the stored checkpoint of this run, to resume from.
        session_settings: the SDK's settings (``limit``: default ``get_items`` limit).
        durable: mutations return once stored (see the module docstring).
    """

    session_id: str
    session_settings: SessionSettings | None

    def __init__(
        self,
        checkpointer: Checkpointer,
        *,
        run_id: str,
        store: CheckpointStore | None = None,
        checkpoint: RunCheckpoint | None = None,
        session_settings: SessionSettings | Mapping[str, Any] | None = None,
        durable: bool = True,
    ) -> None:
        if checkpoint is not None and checkpoint.run_id != run_id:
            raise ValueError(f"checkpoint of run {checkpoint.run_id!r} given for run {run_id!r}")
        self.session_id = run_id
        self.session_settings = (
            SessionSettings(**session_settings)
            if isinstance(session_settings, Mapping)
            else session_settings or SessionSettings()
        )
        self._checkpointer = checkpointer
        self._store = store
        self._tail = isinstance(store, TailReadingStore)
        self._durable = durable
        # The transcript as the store holds it (the session's own copies: never handed out).
        self._items: list[JSONValue] = []
        self._iteration = 0
        self._phases: tuple[str, ...] = ()
        self._boundary = 0  # transcript length at the last phase boundary
        if checkpoint is not None:
            self._items = list(checkpoint.messages)
            self._iteration = checkpoint.iteration
            self._phases = tuple(checkpoint.completed_phases)
            boundary = checkpoint.boundary_message_count
            self._boundary = (
                min(boundary, len(self._items))
                if boundary is not None
                else (len(self._items) if self._phases else 0)
            )
        self._resumed = bool(self._items or self._phases)
        self._skipper = PhaseSkipper(self._phases)
        self._lock = asyncio.Lock()
        self._closed = False

    # -- the run ---------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        """The run's id (the ``session_id``)."""
        return self.session_id

    @property
    def resumed(self) -> bool:
        """True if the session started from a stored transcript (a recovered run)."""
        return self._resumed

    @property
    def completed_phases(self) -> tuple[str, ...]:
        """The phases completed so far, stored ones included."""
        return self._phases

    def input_for(self, prompt: str | list[TResponseInputItem]) -> str | list[TResponseInputItem]:
        """The input for ``Runner.run`` of the current phase: ``prompt``, or ``[]`` when
        items were stored since the last phase boundary (the history holds the prompt)."""
        return [] if len(self._items) > self._boundary else prompt

    def should_skip(self, phase: str) -> bool:
        """True if ``phase`` was completed before the run was interrupted (completed phases
        are consumed as a multiset: a phase run twice is skipped at most twice)."""
        return self._skipper.should_skip(phase)

    async def end_phase(self, phase: str) -> None:
        """Record the end of ``phase``: a phase boundary, written at once."""
        before = self._phases

        def apply() -> None:
            self._phases = (*before, phase)

        def undo() -> None:
            self._phases = before

        await _settle(self._commit(apply, undo, boundary=True))

    # -- Session ---------------------------------------------------------------------------

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The last ``limit`` items, oldest first (all of them when ``limit`` and
        ``session_settings.limit`` are ``None``), read from the store.

        Raises:
            ValueError: ``limit`` is negative.
            CheckpointNotFoundError: the run's checkpoint is gone (finished elsewhere).
            StoreUnavailableError: the store could not be read.
        """
        if limit is None and self.session_settings is not None:
            limit = self.session_settings.limit
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be None or >= 0, got {limit!r}")
        async with self._lock:
            self._check_open()
            if limit == 0:
                return []
            values = await self._read(limit)
        return cast("list[TResponseInputItem]", values)

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        """Append ``items`` to the transcript (stored before returning when ``durable``).

        Raises:
            CheckpointSerializationError: an item is not JSON-compatible (nothing changed).
            StoreUnavailableError: the write failed; the items are written with the next one.
            CheckpointFencedError: the run was taken over or finished elsewhere.
        """
        if not items:
            return
        copies = [self._copy(item, index) for index, item in enumerate(items)]

        def apply() -> None:
            self._items.extend(copies)

        def undo() -> None:
            del self._items[len(self._items) - len(copies) :]

        await _settle(self._commit(apply, undo))

    async def pop_item(self) -> TResponseInputItem | None:
        """Remove and return the newest item (``None`` if there is none); the transcript is
        rewritten."""
        popped: list[JSONValue] = []

        def apply() -> None:
            popped.append(self._items.pop())

        def undo() -> None:
            self._items.extend(popped)

        async def pop() -> TResponseInputItem | None:
            async with self._lock:
                self._check_open()
                if not self._items:
                    return None
                await self._commit_locked(apply, undo)
                return cast("TResponseInputItem", popped[0])

        return await _settle(pop())

    async def clear_session(self) -> None:
        """Remove every item (the run goes on, with an empty transcript)."""
        removed: list[JSONValue] = []

        def apply() -> None:
            removed.extend(self._items)
            self._items.clear()

        def undo() -> None:
            self._items[:0] = removed

        await _settle(self._commit(apply, undo))

    # -- internals -------------------------------------------------------------------------

    def _copy(self, item: object, index: int) -> JSONValue:
        """The session's own copy of ``item`` (validated like a checkpoint message)."""
        try:
            return codec.decode(codec.encode(item, run_id=self.session_id))
        except CheckpointError as exc:
            raise type(exc)(f"item {index}: {exc}", run_id=self.session_id) from exc

    async def _read(self, limit: int | None) -> list[JSONValue]:
        if self._store is None or isinstance(self._checkpointer, NoopCheckpointer):
            # Not durable: the session's memory is the transcript; hand out copies.
            values = self._items if limit is None else self._items[-limit:]
            return cast("list[JSONValue]", orjson.loads(orjson.dumps(values)))
        await self._checkpointer.flush()  # a throttled write first: read what was added
        if limit is not None and self._tail:
            tail = await cast("TailReadingStore", self._store).load_tail(self.session_id, limit)
            if tail is not None:
                return tail
        else:
            checkpoint = await self._store.load(self.session_id)
            if checkpoint is not None:
                messages = list(checkpoint.messages)
                return messages if limit is None else messages[-limit:]
        raise CheckpointNotFoundError(
            f"run {self.session_id!r} has no checkpoint: it finished or was deleted",
            run_id=self.session_id,
        )

    async def _commit(
        self, apply: Callable[[], None], undo: Callable[[], None], *, boundary: bool = False
    ) -> None:
        async with self._lock:
            self._check_open()
            await self._commit_locked(apply, undo, boundary=boundary)

    async def _commit_locked(
        self, apply: Callable[[], None], undo: Callable[[], None], *, boundary: bool = False
    ) -> None:
        """Change the transcript and store it; a change the store refuses is undone."""
        apply()
        self._iteration += 1
        try:
            await self._save()
        except (StoreUnavailableError, CheckpointFencedError):
            raise  # kept: written with the next write / the run is no longer ours
        except CheckpointError:
            undo()
            self._iteration -= 1
            try:
                await self._save()  # replaces the refused state the checkpointer holds
            except CheckpointError as error:
                logger.warning(
                    "run %s: re-saving after a refused write failed: %s", self.session_id, error
                )
            raise
        if boundary:
            self._boundary = len(self._items)
        else:
            self._boundary = min(self._boundary, len(self._items))

    async def _save(self) -> None:
        state = RunCheckpointState(
            messages=self._items, iteration=self._iteration, completed_phases=self._phases
        )
        await self._checkpointer.save(state)
        if self._durable:
            await self._checkpointer.flush()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the session of run {self.session_id!r} is closed")

    def _close(self) -> None:
        self._closed = True

    def __repr__(self) -> str:
        return f"ExecutusSession(run_id={self.session_id!r}, items={len(self._items)})"


async def _settle(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` to its end even if the caller is cancelled meanwhile; then
    re-raise that cancellation (a mutation's outcome is never left undecided)."""
    task = asyncio.ensure_future(awaitable)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError as exc:
            cancelled = cancelled or exc
    if cancelled is not None:
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation wins
        raise cancelled
    return task.result()


@asynccontextmanager
async def checkpointed_session(
    factory: StoreCheckpointerFactory,
    info: RunInfo,
    *,
    session_settings: SessionSettings | Mapping[str, Any] | None = None,
    durable: bool = True,
    shutdown_exceptions: tuple[type[BaseException], ...] = (),
) -> AsyncIterator[ExecutusSession]:
    """Run a block as one checkpointed run with its :class:`ExecutusSession`.

    Loads the run's stored checkpoint (a recovered run resumes from its transcript), then
    enters :func:`~executus_ckpt.checkpointed_run`: on exit the run is completed (checkpoint
    deleted), failed (deleted) or, on a shutdown, kept for recovery. The session is closed on
    exit. A failing load raises before the run begins (nothing changed: the run stays
    recoverable); a failing ``begin`` is handled as by ``checkpointed_run``.

    Raises:
        StoreUnavailableError: the stored checkpoint could not be loaded.
    """
    store = factory.store
    stored = await store.load(info.run_id) if store is not None else None
    async with checkpointed_run(factory, info, shutdown_exceptions=shutdown_exceptions) as ckpt:
        session = ExecutusSession(
            ckpt,
            run_id=info.run_id,
            store=store,
            checkpoint=stored,
            session_settings=session_settings,
            durable=durable,
        )
        try:
            yield session
        finally:
            session._close()


if TYPE_CHECKING:

    def _is_a_session(session: ExecutusSession) -> Session:
        return session  # mypy checks the protocol
