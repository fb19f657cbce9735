"""InMemoryCheckpointStore: the reference semantics, for tests and hosts without a database."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .. import codec, telemetry
from .._validation import (
    check_header,
    check_limit,
    check_size,
    check_tail_limit,
    check_text,
    clean_text,
)
from ..config import DEFAULT_MAX_CHECKPOINT_BYTES
from ..errors import CheckpointFencedError
from ..types import (
    CheckpointStats,
    CheckpointStatus,
    CheckpointSummary,
    ExecutorInfo,
    JSONValue,
    RunCheckpoint,
    utcnow,
)
from . import _rows
from ._rows import appended_tail, as_utc, cutoff, valid_base

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Row:
    """One stored run: its header as the SQL store's columns hold it, and its messages."""

    values: dict[str, Any]
    messages: list[bytes] = field(default_factory=list)

    @classmethod
    def initial(cls, checkpoint: RunCheckpoint, phases: bytes) -> _Row:
        """A registered run's first row: no messages yet."""
        values = _rows.values_of(checkpoint, completed_phases=phases)
        values.update(message_count=0, size_bytes=0)
        return cls({**values, **_rows.new_boundary(values)})

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def __setitem__(self, name: str, value: Any) -> None:
        self.values[name] = value

    def summary(self) -> CheckpointSummary:
        return _rows.summary_of(self.values)

    def checkpoint(self) -> RunCheckpoint:
        return _rows.checkpoint_of(self.values, self.messages)


_KEPT_STATUSES = frozenset({str(CheckpointStatus.DEAD), str(CheckpointStatus.FAILED)})


class InMemoryCheckpointStore:
    """A :class:`CheckpointStore` in process memory, with the SQL store's exact semantics.

    Messages are encoded on save and decoded on load, so what comes back is what a SQL store
    would return (tuples come back as lists) and bad input fails the same way. Nothing
    survives the process.
    """

    def __init__(self, *, max_checkpoint_bytes: int = DEFAULT_MAX_CHECKPOINT_BYTES) -> None:
        self._rows: dict[str, _Row] = {}
        self._executors: dict[str, dict[str, Any]] = {}
        self._max_bytes = max_checkpoint_bytes

    async def save(self, checkpoint: RunCheckpoint) -> None:
        phases = check_header(checkpoint)
        encoded = codec.encode_messages(checkpoint.messages, checkpoint.meta.run_id)
        self._store(checkpoint, phases, encoded, sum(map(len, encoded)), "upsert")

    async def append(
        self,
        checkpoint: RunCheckpoint,
        *,
        base_count: int,
        encoded_tail: Sequence[bytes] | None = None,
        replace_from: int | None = None,
    ) -> None:
        """As the SQL store's: only the messages after ``base_count`` are encoded when the
        stored transcript has that length and nothing before it changed; never creates the
        run (see :class:`AppendingStore`)."""
        phases = check_header(checkpoint)
        run_id = checkpoint.meta.run_id
        messages = checkpoint.messages
        base = valid_base(base_count, messages)
        row = self._rows.get(run_id)
        if row is None:
            raise CheckpointFencedError(
                f"run {run_id!r} was deleted; this writer (epoch {checkpoint.epoch}) may no "
                "longer save it",
                run_id=run_id,
                epoch=checkpoint.epoch,
            )
        self._check_epoch(row, checkpoint)
        edited = replace_from is not None and replace_from < base_count
        if base is None or edited or len(row.messages) != base:
            encoded = codec.encode_messages(messages, run_id)
            path = "rewrite" if base is None or edited else "fallback"
            return self._store(checkpoint, phases, encoded, sum(map(len, encoded)), path)
        tail = appended_tail(messages, base, encoded_tail, run_id)
        size = sum(map(len, tail))
        self._store(
            checkpoint, phases, row.messages + tail, row["size_bytes"] + size, "append", tail, size
        )

    @staticmethod
    def _check_epoch(row: _Row, checkpoint: RunCheckpoint) -> None:
        if row["epoch"] > checkpoint.epoch:
            raise CheckpointFencedError(
                f"run {checkpoint.meta.run_id!r} was taken over (epoch {row['epoch']} > "
                f"{checkpoint.epoch}); this writer is stale",
                run_id=checkpoint.meta.run_id,
                epoch=checkpoint.epoch,
            )

    def _store(
        self,
        checkpoint: RunCheckpoint,
        phases: bytes,
        encoded: list[bytes],
        size: int,
        path: str,
        written: list[bytes] | None = None,
        written_size: int | None = None,
    ) -> None:
        """Store the run with transcript ``encoded`` (``size`` bytes), of which ``written``
        (``written_size`` bytes; default: all) is new; ``path`` is reported to telemetry."""
        run_id = checkpoint.meta.run_id
        row = self._rows.get(run_id)
        if row is not None:
            self._check_epoch(row, checkpoint)
        check_size(run_id, size, self._max_bytes)
        values = _rows.values_of(checkpoint, completed_phases=phases)
        values.update(message_count=len(encoded), size_bytes=size)
        if row is None:
            row = self._rows[run_id] = _Row({**values, **_rows.new_boundary(values)})
        else:
            row.values.update(_boundary_after(row.values, values))
            row.values.update({name: values[name] for name in _rows.SAVED})
        row.messages = encoded
        telemetry.note_save(
            logger,
            run_id,
            checkpoint.iteration,
            path,
            len(encoded if written is None else written),
            size if written_size is None else written_size,
            len(encoded),
        )

    async def register(self, checkpoint: RunCheckpoint, *, expect_epoch: int | None = None) -> int:
        phases = check_header(checkpoint)
        row = self._rows.get(checkpoint.meta.run_id)
        if expect_epoch is not None and (row is None or row["epoch"] != expect_epoch):
            raise CheckpointFencedError(
                f"run {checkpoint.meta.run_id!r} is no longer at epoch {expect_epoch}",
                run_id=checkpoint.meta.run_id,
                epoch=expect_epoch,
            )
        if row is None:
            self._rows[checkpoint.meta.run_id] = _Row.initial(checkpoint, phases)
            return checkpoint.epoch
        values = _rows.values_of(checkpoint, completed_phases=phases)
        row.values.update({name: values[name] for name in _rows.TAKEN_OVER})
        row["updated_at"] = utcnow()
        row["epoch"] += 1
        return int(row["epoch"])

    async def load(self, run_id: str) -> RunCheckpoint | None:
        row = self._rows.get(run_id)
        return None if row is None else row.checkpoint()

    async def load_tail(self, run_id: str, limit: int) -> list[JSONValue] | None:
        """The last ``limit`` messages of the run's transcript (see
        :class:`~executus_ckpt.protocols.TailReadingStore`)."""
        limit = check_tail_limit(limit, run_id)
        row = self._rows.get(run_id)
        if row is None:
            return None
        return codec.decode_messages(row.messages[len(row.messages) - limit :] if limit else [])

    async def delete(self, run_id: str, *, epoch: int | None = None) -> bool:
        row = self._rows.get(run_id)
        if row is None or (epoch is not None and row["epoch"] > epoch):
            return False
        del self._rows[run_id]
        return True

    def _select(
        self,
        status: CheckpointStatus | None,
        agent_id: str | None,
        older_than: float | None,
        newest_first: bool,
    ) -> list[_Row]:
        bound = cutoff(older_than)
        rows = [
            r
            for r in self._rows.values()
            if (status is None or r["status"] == status)
            and (agent_id is None or r["agent_id"] == agent_id)
            and (bound is None or r["updated_at"] <= bound)
        ]
        rows.sort(key=lambda r: (r["updated_at"], r["run_id"]), reverse=newest_first)
        return rows

    async def list_interrupted(
        self,
        *,
        agent_id: str | None = None,
        older_than: float | None = None,
        limit: int | None = None,
        stale_owners: bool = True,
    ) -> list[RunCheckpoint]:
        limit = check_limit(limit)
        rows = self._select(CheckpointStatus.ACTIVE, agent_id, older_than, False)
        rows = [r for r in rows if self._unowned(r, stale_owners)]
        return [r.checkpoint() for r in rows[:limit]]

    async def iter_summaries(
        self,
        *,
        status: CheckpointStatus | None = CheckpointStatus.ACTIVE,
        agent_id: str | None = None,
        older_than: float | None = None,
        updated_before: datetime | None = None,
        limit: int | None = None,
        newest_first: bool = False,
        interrupted: bool = False,
        stale_owners: bool = True,
    ) -> AsyncIterator[CheckpointSummary]:
        limit = check_limit(limit)
        rows = self._select(status, agent_id, older_than, newest_first)
        if interrupted:
            rows = [r for r in rows if self._unowned(r, stale_owners)]
        if updated_before is not None:
            rows = [r for r in rows if r["updated_at"] < as_utc(updated_before)]
        # Snapshot first, as a database page would be: later changes are not seen.
        for summary in [row.summary() for row in rows[:limit]]:
            yield summary

    async def claim(
        self, run_id: str, *, epoch: int, owner: str | None = None, stale_owners: bool = True
    ) -> RunCheckpoint | None:
        check_text("owner", owner, run_id)
        row = self._rows.get(run_id)
        if row is None or row["status"] != CheckpointStatus.ACTIVE or row["epoch"] != epoch:
            return None
        if not self._unowned(row, stale_owners, judge=owner):
            return None
        progressed = (
            row["claimed_at"] is not None
            and row["progress_at"] is not None
            and row["progress_at"] > row["claimed_at"]
        )
        now = utcnow()
        row["attempts"] = 1 if progressed else row["attempts"] + 1
        row["claimed_at"] = now
        row["epoch"] += 1
        row["owner"] = owner
        row["updated_at"] = now
        return row.checkpoint()

    async def claim_interrupted(
        self,
        *,
        limit: int,
        owner: str | None,
        stale_owners: bool = True,
        exclude_owner: str | None = None,
        agent_id: str | None = None,
        older_than: float | None = None,
    ) -> list[tuple[RunCheckpoint, str | None]]:
        """As the SQL store's (one process: the claims of one call are atomic)."""
        check_text("owner", owner, None)
        limit = check_tail_limit(limit, None)
        rows = [
            r
            for r in self._select(CheckpointStatus.ACTIVE, agent_id, older_than, False)
            if self._unowned(r, stale_owners, judge=owner)
            and not r.summary().suspect
            and (exclude_owner is None or r["owner"] != exclude_owner)
        ]
        claimed: list[tuple[RunCheckpoint, str | None]] = []
        for row in rows[:limit]:
            previous = row["owner"]
            checkpoint = await self.claim(
                row["run_id"], epoch=row["epoch"], owner=owner, stale_owners=stale_owners
            )
            if checkpoint is not None:
                claimed.append((checkpoint, previous))
        return claimed

    async def mark_dead(self, run_id: str, *, reason: str, epoch: int | None = None) -> bool:
        row = self._rows.get(run_id)
        if row is None or (epoch is not None and row["epoch"] > epoch):
            return False
        row["status"] = str(CheckpointStatus.DEAD)
        row["last_error"] = clean_text(reason)
        return True

    async def record_error(self, run_id: str, error: str, *, epoch: int | None = None) -> bool:
        row = self._rows.get(run_id)
        if row is None or (epoch is not None and row["epoch"] > epoch):
            return False
        row["last_error"] = clean_text(error)
        return True

    async def requeue(self, run_id: str) -> bool:
        """Make a dead or failed run recoverable again (status active, attempts 0); True if
        it was dead or failed."""
        row = self._rows.get(run_id)
        if row is None or row["status"] not in _KEPT_STATUSES:
            return False
        row["status"] = str(CheckpointStatus.ACTIVE)
        row["attempts"] = 0
        row["claimed_at"] = None
        return True

    async def release(self, run_id: str, *, epoch: int, progress: bool = True) -> bool:
        row = self._rows.get(run_id)
        if row is None or row["epoch"] > epoch or row["status"] != CheckpointStatus.ACTIVE:
            return False
        row["owner"] = None
        row["epoch"] += 1
        if progress:
            row["progress_at"] = utcnow()
        return True

    async def mark_failed(self, run_id: str, *, error: str, epoch: int | None = None) -> bool:
        row = self._rows.get(run_id)
        if row is None or (epoch is not None and row["epoch"] > epoch):
            return False
        row["status"] = str(CheckpointStatus.FAILED)
        row["last_error"] = clean_text(error)
        return True

    async def purge(
        self,
        *,
        older_than: float,
        status: CheckpointStatus | None = CheckpointStatus.DEAD,
        dry_run: bool = False,
        batch_size: int = 500,
        on_progress: Callable[[int], None] | None = None,
    ) -> int:
        """Delete checkpoints not updated for ``older_than`` seconds; returns how many."""
        doomed = [r["run_id"] for r in self._select(status, None, older_than, False)]
        if dry_run:
            return len(doomed)
        # Batches as the SQL store runs them: progress after each batch that deleted rows.
        for start in range(0, len(doomed), batch_size):
            for run_id in doomed[start : start + batch_size]:
                del self._rows[run_id]
            if on_progress is not None:
                on_progress(min(start + batch_size, len(doomed)))
        return len(doomed)

    async def stats(self) -> CheckpointStats:
        """Counts by status and agent, sizes, and the oldest interrupted run."""
        rows = list(self._rows.values())
        by_status: dict[str, int] = {}
        by_agent: dict[str, int] = {}
        for r in rows:
            by_status[str(r["status"])] = by_status.get(str(r["status"]), 0) + 1
            by_agent[r["agent_id"] or ""] = by_agent.get(r["agent_id"] or "", 0) + 1
        # The same tie-break as SQL: largest size, then the smallest run id.
        largest = min(rows, key=lambda r: (-r["size_bytes"], r["run_id"]), default=None)
        active = self._select(CheckpointStatus.ACTIVE, None, None, False)
        return CheckpointStats(
            total=len(rows),
            by_status=by_status,
            by_agent=by_agent,
            total_size_bytes=sum(r["size_bytes"] for r in rows),
            largest_size_bytes=largest["size_bytes"] if largest else 0,
            largest_run_id=largest["run_id"] if largest else None,
            oldest_interrupted_run_id=active[0]["run_id"] if active else None,
            oldest_interrupted_at=active[0]["updated_at"] if active else None,
        )

    async def count(self, *, status: CheckpointStatus | None = None) -> int:
        """How many checkpoints are stored (with ``status``, only those)."""
        return sum(1 for r in self._rows.values() if status is None or r["status"] == status)

    # -- executors (one process: the store's clock is the host's) ------------------------------

    def _unowned(self, row: _Row, stale_owners: bool, judge: str | None = None) -> bool:
        owner = row["owner"]
        if owner is None:
            return True
        executor = self._executors.get(owner)
        if executor is None or executor["state"] == "stopped":
            return True
        now = time.time()
        if not stale_owners or executor["expires_at"] > now:
            return False
        claimer = None if judge is None else self._executors.get(judge)
        return claimer is None or self._healthy(claimer, now)

    @staticmethod
    def _healthy(executor: dict[str, Any], now: float) -> bool:
        """On time (no beat over two intervals late) for its ``stale_after``."""
        interval = executor["heartbeat_interval"]
        return (
            executor["state"] == "running"
            and interval is not None
            and executor["healthy_since"] <= now - executor["stale_after"]
            and executor["heartbeat_at"] >= now - 2 * interval
        )

    @staticmethod
    def _beat(executor: dict[str, Any], now: float) -> None:
        interval = executor["heartbeat_interval"]
        if interval is None or executor["heartbeat_at"] < now - 2 * interval:
            executor["healthy_since"] = now
        executor["heartbeat_at"] = now
        executor["expires_at"] = now + executor["stale_after"]

    async def register_executor(
        self,
        executor_id: str,
        *,
        name: str | None,
        host: str | None,
        pid: int | None,
        app_version: str | None,
        stale_after: float,
        heartbeat_interval: float | None = None,
    ) -> float:
        now = time.time()
        self._executors[executor_id] = {
            "id": executor_id,
            "name": name,
            "host": host,
            "pid": pid,
            "app_version": app_version,
            "state": "running",
            "stale_after": stale_after,
            "started_at": now,
            "heartbeat_at": now,
            "expires_at": now + stale_after,
            "heartbeat_interval": heartbeat_interval,
            "healthy_since": now,
        }
        return now

    async def heartbeat_executor(self, executor_id: str) -> float | None:
        executor = self._executors.get(executor_id)
        if executor is None or executor["state"] == "stopped":
            return None
        now = time.time()
        self._beat(executor, now)
        return now

    async def set_executor_state(self, executor_id: str, state: str) -> None:
        executor = self._executors.get(executor_id)
        if executor is not None:
            executor["state"] = state

    async def release_owned(self, owner: str) -> int:
        released = 0
        for row in self._rows.values():
            if row["owner"] == owner and row["status"] == CheckpointStatus.ACTIVE:
                row["owner"] = None
                row["epoch"] += 1
                row["progress_at"] = utcnow()
                released += 1
        return released

    async def list_executors(self, *, include_stopped: bool = False) -> list[ExecutorInfo]:
        now = time.time()
        owned: dict[str, int] = {}
        for row in self._rows.values():
            if row["owner"] is not None and row["status"] == CheckpointStatus.ACTIVE:
                owned[row["owner"]] = owned.get(row["owner"], 0) + 1
        return [
            ExecutorInfo(
                id=e["id"],
                name=e["name"],
                host=e["host"],
                pid=e["pid"],
                app_version=e["app_version"],
                state=e["state"],
                stale_after=e["stale_after"],
                heartbeat_age=max(0.0, now - e["heartbeat_at"]),
                alive=e["state"] != "stopped" and e["expires_at"] > now,
                runs_owned=owned.get(e["id"], 0),
            )
            for e in sorted(self._executors.values(), key=lambda e: -e["started_at"])
            if include_stopped or e["state"] != "stopped"
        ]

    async def database_time(self) -> float:
        return time.time()

    def __repr__(self) -> str:
        return f"InMemoryCheckpointStore(runs={len(self._rows)})"


def _boundary_after(stored: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The SQL store's ``boundary_update`` on one row (see ``_rows``)."""
    old_phases, new_phases = stored["completed_phases"], new["completed_phases"]
    if new_phases != old_phases and len(new_phases) > len(old_phases):
        return {
            "boundary_message_count": new["message_count"],
            "boundary_iteration": new["iteration"],
            "boundary_extra": new["extra"],
            "progress_at": new["updated_at"],
        }
    count = stored["boundary_message_count"]
    return {"boundary_message_count": None if count is None else min(count, new["message_count"])}
