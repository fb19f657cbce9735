"""The small interface each database backend implements for :class:`SQLCheckpointStore`.

``sql.py`` builds the Core statements every backend shares and hands them to its backend as
operations; a backend decides how a write transaction is run (SQLite: one group-committing
writer per process; PostgreSQL: a pooled connection per write), how a consistent read is
opened, and how the save hot path (:class:`Append`) reaches the driver.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

T = TypeVar("T")

Operation = Callable[[AsyncConnection], Awaitable[T]]
"""A unit of work on a Core connection, run inside the backend's write transaction."""


@dataclass(frozen=True, slots=True)
class Append:
    """One guarded append: new header values and the new messages (encoded).

    Applied only if the run is not fenced (stored epoch <= ``epoch``), still holds ``base``
    messages and stays under ``max_bytes``; otherwise nothing is written.
    """

    run_id: str
    base: int
    rows: Sequence[bytes]
    size: int
    max_bytes: int
    epoch: int
    values: Mapping[str, Any]
    """Values of ``_rows.APPENDED`` columns (``message_count`` included)."""
    identity: bool = True
    """Whether to write the identity columns (``_rows.META_FIELDS``) too. False when this
    store wrote this very meta at this epoch already: the backends then leave them as stored
    (on PostgreSQL a re-set large ``prompt``/``inputs`` would be TOASTed anew at every save;
    either way they need not travel with every append)."""
    boundary: bool = True
    """Whether the save may move the phase boundary. False when ``completed_phases`` are the
    ones this store last wrote for the run: a backend may then leave the boundary columns
    alone, provided it applies the append only if the stored phases are still these (on
    PostgreSQL that spares the statement its four ``CASE`` expressions, about 20 µs of server
    time a save)."""


def boundary_sets(new: Callable[[str], str], old: str = "") -> str:
    """SET clauses of an append's raw ``UPDATE`` that record a phase boundary: the twin of
    ``_rows.boundary_update`` (keep them alike; the contract tests run both paths), so that
    a boundary save stays one statement. ``new(column)`` is the SQL of the incoming value,
    ``old`` the stored row's qualifier (``"t."``). In an ``UPDATE`` a column on the right
    of ``=`` is the stored value, before this statement.
    """
    phases = new("completed_phases")
    changed = (
        f"({old}completed_phases <> {phases} AND length({phases}) > length({old}completed_phases))"
    )
    count = new("message_count")
    kept = f"{old}boundary_message_count"
    return (
        f"boundary_message_count = CASE WHEN {changed} THEN {count} WHEN {kept} IS NULL "
        f"THEN NULL WHEN {kept} <= {count} THEN {kept} ELSE {count} END, "
        f"boundary_iteration = CASE WHEN {changed} THEN {new('iteration')} "
        f"ELSE {old}boundary_iteration END, "
        f"boundary_extra = CASE WHEN {changed} THEN {new('extra')} "
        f"ELSE {old}boundary_extra END, "
        f"progress_at = CASE WHEN {changed} THEN {new('updated_at')} ELSE {old}progress_at END"
    )


def checkout_listeners(engine: AsyncEngine) -> tuple[Any, ...]:
    """The pool's ``checkout`` listeners now (compared by identity).

    Both backends keep a pooled connection while appends keep coming instead of checking it
    out per batch. Whatever listens to checkouts (the store's own hooks, a host's
    instrumentation, a test's tracer) must still see the connection before its next write,
    as it would have without the hold: a held connection is given back and checked out again
    when this changed since its checkout.
    """
    return tuple(engine.sync_engine.pool.dispatch.checkout)


class Backend(Protocol):
    """What a dialect provides; every method may raise driver errors (the store maps them)."""

    async def write(self, op: Operation[T]) -> T:
        """Run ``op`` in a write transaction and commit; finishes even if the caller is
        cancelled."""
        ...

    def read(self, *, snapshot: bool) -> AbstractAsyncContextManager[AsyncConnection]:
        """A connection for reads; with ``snapshot``, one transaction seeing one state."""
        ...

    async def append(self, append: Append, timeout: float) -> bool:  # noqa: ASYNC109
        """Apply ``append`` on the raw driver; False if its guard failed (nothing written).
        Raises ``TimeoutError`` after ``timeout`` seconds. The backend bounds its own wait
        (not ``asyncio.timeout`` around the call: PostgreSQL's lone append is bounded by the
        statement's own timer, which asyncpg arms anyway, one timer per save instead of two)."""
        ...

    async def aclose(self) -> None:
        """Finish queued writes and return connections to the pool."""
        ...
