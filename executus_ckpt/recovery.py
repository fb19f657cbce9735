"""Boot recovery: claim, count, dispatch or dead-letter the interrupted runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType

from . import telemetry
from .config import DEFAULT_MAX_ATTEMPTS, DEFAULT_RECOVERY_CONCURRENCY
from .protocols import BatchClaimingStore, CheckpointStore
from .types import CheckpointStatus, CheckpointSummary, RunCheckpoint

logger = logging.getLogger(__name__)

Dispatch = Callable[[RunCheckpoint], Awaitable[object]]
Accept = Callable[[RunCheckpoint], bool]


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What one recovery pass did, by run id."""

    dispatched: tuple[str, ...] = ()
    """Claimed and handed to ``dispatch``, which returned."""
    dead: tuple[str, ...] = ()
    """Over ``max_attempts``: marked dead and kept for the operator."""
    quarantined: tuple[str, ...] = ()
    """Rejected by ``accept``: marked dead with the reason, kept for the operator."""
    failed: Mapping[str, BaseException] = field(default_factory=lambda: MappingProxyType({}))
    """``dispatch`` (or ``accept``, or the store) raised; the run stays recoverable. The
    exceptions are kept without their tracebacks (their frames would keep every failed run's
    transcript alive); the full traceback is logged at WARNING when the failure happens."""
    lost: tuple[str, ...] = ()
    """Claimed by someone else between listing and claiming (another replica)."""

    @property
    def total(self) -> int:
        return (
            len(self.dispatched)
            + len(self.dead)
            + len(self.quarantined)
            + len(self.failed)
            + len(self.lost)
        )


async def recover_interrupted(
    store: CheckpointStore,
    dispatch: Dispatch,
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    concurrency: int = DEFAULT_RECOVERY_CONCURRENCY,
    accept: Accept | None = None,
    owner: str | None = None,
    agent_id: str | None = None,
    older_than: float | None = None,
    limit: int | None = None,
    stale_owners: bool = True,
    on_claim: Callable[[CheckpointSummary, RunCheckpoint], None] | None = None,
    exclude_owner: str | None = None,
    batch_claims: bool = False,
) -> RecoveryReport:
    """Re-dispatch the interrupted runs, oldest first; call once at service start.

    Each run is claimed atomically (attempt count and epoch raised) *before* ``dispatch``, so a
    run that crashes the service every time it runs is dispatched at most ``max_attempts``
    times: at the next claim it is marked dead (kept with its last error, no longer listed as
    interrupted) and logged at ERROR. A run that ``accept`` rejects (e.g. its ``app_version``
    belongs to a phase graph this deploy no longer has) is quarantined the same way with the
    reason. A ``dispatch`` that raises is recorded in the report and as the run's last error;
    the run stays recoverable. (A run that ``dispatch`` started inside
    :func:`checkpointed_run` and that later fails with an ordinary exception is finalized like
    any failed run: its checkpoint is deleted.)

    Crash loops: ``attempts`` counts only claims after which the run made no progress (it
    reached no new phase boundary and was not released by a graceful shutdown), so runs
    interrupted by deploys never go dead for it. A run claimed before that made no progress
    since is a *suspect*: suspects are claimed and dispatched one at a time, after the other
    runs of the pass, so a run that kills the process takes no innocent run down with it.
    For this isolation ``dispatch`` should return when the run has finished (or at least
    when it is safely under way).

    Runs are streamed from the store and at most ``concurrency`` are claimed or dispatched at
    once, so memory is bounded by ``concurrency`` transcripts whatever the backlog. Runs
    updated after the pass began (e.g. re-registered by a dispatched run) are not revisited.

    Args:
        store: the checkpoint store.
        dispatch: the host's coroutine that re-launches a run from its checkpoint (typically
            ``checkpointed_run(factory, cp.run_info())`` resumed from ``cp.resume_state()``).
        max_attempts: recovery claims a run gets before it is marked dead (>= 1).
        concurrency: claims/dispatches in flight at once (>= 1).
        accept: predicate over the claimed checkpoint; False quarantines the run.
        owner: this executor's id, recorded on each claimed run. Runs claimed under an id
            that is not a registered, live executor count as interrupted again at once: a
            concurrent pass on another replica may claim them too (what an
            :class:`Executor` prevents by registering first).
        agent_id, older_than, limit: restrict the pass (as for ``list_interrupted``).
        exclude_owner: leave runs of this owner alone (an :class:`Executor` passes its own id:
            after a stall it must not rescue the runs it is still running).
        on_claim: called with the listed summary and the claimed checkpoint of each claim
            (an :class:`Executor` counts rescues with it).
        stale_owners: take runs of executors whose heartbeat expired (an :class:`Executor`
            passes False until its own heartbeats have succeeded for ``stale_after``).
        batch_claims: on a :class:`~executus_ckpt.protocols.BatchClaimingStore`, claim the
            non-suspect runs several at a time, oldest first, in one statement each
            (``FOR UPDATE SKIP LOCKED`` on PostgreSQL) instead of listing them and claiming
            each: replicas sweeping at once take different runs instead of racing for the
            same ones (an :class:`Executor` sets it). Suspects are still claimed one at a
            time, after the others. ``owner`` must be a registered, live executor: runs it
            claims are then no longer interrupted for the next batch.

    Only *interrupted* runs are taken: runs owned by a live :class:`Executor` (another
    replica) are left alone, here and again inside each claim's statement.

    Raises:
        StoreUnavailableError: the store could not be listed (per-run store errors are
            reported in ``failed`` instead). Runs dispatched before the listing failed are
            awaited first, never cancelled.
        SchemaOutOfDateError: the database is not migrated to the needed revision.
    """
    if max_attempts < 1 or concurrency < 1:
        raise ValueError("max_attempts and concurrency must be >= 1")
    if batch_claims and owner is None:
        raise ValueError("batch_claims needs the owner: a registered executor's id")
    # Runs this pass has seen: a run re-listed later in the scan (its updated_at moved when
    # it was claimed or re-registered) is not taken twice. (Not a time bound: updated_at is
    # written by many hosts' clocks, and a skewed one would hide runs.)
    seen: set[str] = set()
    dispatched: list[str] = []
    dead: list[str] = []
    quarantined: list[str] = []
    lost: list[str] = []
    failed: dict[str, BaseException] = {}
    slots = asyncio.Semaphore(concurrency)
    # Lazy: the pass's span starts with its first claim (an idle sweep emits none).
    pass_op = telemetry.operation(
        "recovery",
        lazy=True,
        executor_id=owner,
        max_attempts=max_attempts,
        concurrency=concurrency,
    )

    async def recover_one(summary: CheckpointSummary, claimed: RunCheckpoint | None = None) -> None:
        """Claim the run (unless ``claimed`` already), then dead-letter, quarantine or
        dispatch it."""
        run_id = summary.run_id
        claim = telemetry.operation(
            "claim",
            parent=pass_op,
            run_id=run_id,
            epoch=summary.epoch,
            executor_id=owner,
            previous_owner=summary.owner,
            attempt=None,
            outcome=None,
        )
        try:
            checkpoint = claimed or await store.claim(
                run_id, epoch=summary.epoch, owner=owner, stale_owners=stale_owners
            )
            if checkpoint is not None and on_claim is not None:
                on_claim(summary, checkpoint)
            if checkpoint is None:
                lost.append(run_id)
                claim.set(outcome="lost")
                claim.end()
                telemetry.count_recovery("lost")
                claim.log(
                    logger,
                    logging.INFO,
                    "run %s was claimed elsewhere",
                    run_id,
                    action="claim_lost",
                )
                return
            claim.set(epoch=checkpoint.epoch, attempt=checkpoint.attempts)
            if checkpoint.attempts > max_attempts:
                phases = checkpoint.completed_phases
                reason = (
                    f"gave up: no progress across {checkpoint.attempts - 1} recovery claims "
                    f"(max_attempts={max_attempts}); last completed phase: "
                    f"{phases[-1] if phases else 'none'}; "
                    f"last error: {checkpoint.last_error or 'none'}"
                )
                await store.mark_dead(run_id, reason=reason, epoch=checkpoint.epoch)
                dead.append(run_id)
                claim.set(outcome="dead")
                claim.end()
                telemetry.count_recovery("dead")
                claim.log(
                    logger,
                    logging.ERROR,
                    "run %s marked dead: %s",
                    run_id,
                    reason,
                    action="mark_dead",
                )
                return
            if accept is not None and not accept(checkpoint):
                reason = (
                    f"quarantined: rejected by this deploy's accept() "
                    f"(app_version={checkpoint.app_version!r})"
                )
                await store.mark_dead(run_id, reason=reason, epoch=checkpoint.epoch)
                quarantined.append(run_id)
                claim.set(outcome="quarantined")
                claim.end()
                telemetry.count_recovery("quarantined")
                claim.log(logger, logging.WARNING, "run %s %s", run_id, reason, action="quarantine")
                return
            claim.set(outcome="recovered")
            claim.end()
            claim.log(
                logger,
                logging.INFO,
                "recovering run %s (attempt %d of %d, iteration %d, phases done: %s)",
                run_id,
                checkpoint.attempts,
                max_attempts,
                checkpoint.iteration,
                len(checkpoint.completed_phases),
                action="dispatch_run",
            )
            # The recovered run's spans (begin, save...) are children of its claim.
            with claim.activated():
                await dispatch(checkpoint)
            dispatched.append(run_id)
            telemetry.count_recovery("recovered")
        except Exception as exc:
            failed[run_id] = _without_frames(exc)
            claim.fail(exc)
            claim.end()
            telemetry.count_recovery("failed")
            claim.log(
                logger,
                logging.WARNING,
                "recovery of run %s failed (%s: %s); it stays recoverable",
                run_id,
                type(exc).__name__,
                exc,
                action="dispatch_failed",
                exc_info=exc,
            )
            try:
                await store.record_error(run_id, f"{type(exc).__name__}: {exc}")
            except Exception:  # the failure is already reported; the store may be down
                logger.debug("could not record the error of run %s", run_id, exc_info=True)
        finally:
            slots.release()

    # Not a TaskGroup: a listing that fails mid-pass must not cancel the runs already
    # dispatched (each was charged an attempt); they finish, then the typed error is raised.
    tasks: set[asyncio.Task[None]] = set()
    suspects: list[CheckpointSummary] = []
    listing = store.iter_summaries(
        status=CheckpointStatus.ACTIVE,
        agent_id=agent_id,
        older_than=older_than,
        limit=limit,
        interrupted=True,
        stale_owners=stale_owners,
    )

    def spawn(summary: CheckpointSummary, claimed: RunCheckpoint | None = None) -> None:
        task = asyncio.get_running_loop().create_task(
            recover_one(summary, claimed), name=f"executus_ckpt.recover:{summary.run_id}"
        )
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    batched = batch_claims and isinstance(store, BatchClaimingStore)
    remaining = limit

    async def claim_batches() -> None:
        """Claim free-slot-sized batches until nothing is left to claim."""
        nonlocal remaining
        assert isinstance(store, BatchClaimingStore)
        while remaining is None or remaining > 0:
            await slots.acquire()  # at least one run can start; take every other free slot
            free = 1
            while free < concurrency and not slots.locked():
                await slots.acquire()
                free += 1
            if remaining is not None:
                free_for_limit = min(free, remaining)
                for _ in range(free - free_for_limit):
                    slots.release()
                free = free_for_limit
            try:
                claimed = await store.claim_interrupted(
                    limit=free,
                    owner=owner,
                    stale_owners=stale_owners,
                    exclude_owner=exclude_owner,
                    agent_id=agent_id,
                    older_than=older_than,
                )
            except BaseException:
                for _ in range(free):
                    slots.release()
                raise
            for _ in range(free - len(claimed)):
                slots.release()
            fresh = [c for c in claimed if c[0].run_id not in seen]
            for checkpoint, previous_owner in claimed:
                seen.add(checkpoint.run_id)
                spawn(_claimed_summary(checkpoint, previous_owner), checkpoint)
            if remaining is not None:
                remaining -= len(claimed)
            if not fresh:
                return  # nothing left, or only runs this pass already had (released again)

    try:
        if batched:
            await claim_batches()
        async for summary in listing:
            if summary.run_id in seen:
                if batched:
                    continue  # claimed by this pass's batches
                # The scan is in updated_at order: from here on it lists runs touched since
                # the pass began (claimed, re-registered). They are the next pass's.
                break
            seen.add(summary.run_id)
            if exclude_owner is not None and summary.owner == exclude_owner:
                continue  # an executor's own run: a process that stalled must not rescue itself
            if summary.suspect:
                suspects.append(summary)  # dispatched alone, after the others
                continue
            if batched:
                continue  # not claimable when the batches ran (claimed elsewhere since)
            await slots.acquire()
            spawn(summary)
    except asyncio.CancelledError:
        await _close(listing)
        await _cancel_all(tasks)
        pass_op.end()
        raise
    except BaseException as exc:
        await _close(listing)
        await _join(tasks)
        if isinstance(exc, Exception):
            pass_op.fail(exc)
        pass_op.end()
        raise
    try:
        await _close(listing)
        await _join(tasks)
        # Runs claimed before that reached no new phase since may be what crashed the
        # process: each is claimed and dispatched alone, so that if it kills the process
        # again, it takes no innocent run with it (and is dead-lettered within its budget).
        for summary in suspects:
            await slots.acquire()
            await recover_one(summary)
    except BaseException:
        pass_op.end()  # cancelled: the span ends with what it saw
        raise

    report = RecoveryReport(
        dispatched=tuple(dispatched),
        dead=tuple(dead),
        quarantined=tuple(quarantined),
        failed=MappingProxyType(failed),
        lost=tuple(lost),
    )
    pass_op.set(
        runs_recovered=len(report.dispatched),
        runs_dead=len(report.dead),
        runs_quarantined=len(report.quarantined),
        runs_failed=len(report.failed),
        runs_lost=len(report.lost),
    )
    pass_op.end()
    pass_op.log(
        logger,
        logging.INFO,
        "recovery pass: %d dispatched, %d dead, %d quarantined, %d failed, %d claimed elsewhere",
        len(report.dispatched),
        len(report.dead),
        len(report.quarantined),
        len(report.failed),
        len(report.lost),
        action="recovery_pass",
    )
    return report


def _claimed_summary(checkpoint: RunCheckpoint, previous_owner: str | None) -> CheckpointSummary:
    """The summary a listing would have shown of a run claimed in a batch: before the claim
    (its previous owner and epoch)."""
    values = {
        f.name: getattr(checkpoint, f.name)
        for f in fields(CheckpointSummary)
        if f.name not in ("message_count", "size_bytes")
    }
    values.update(owner=previous_owner, epoch=checkpoint.epoch - 1)
    return CheckpointSummary(**values, message_count=len(checkpoint.messages), size_bytes=0)


async def _close(listing: object) -> None:
    """Close the listing (it may have been left mid-way), releasing what it holds."""
    aclose = getattr(listing, "aclose", None)
    if aclose is not None:
        await aclose()


async def _cancel_all(tasks: set[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(set(tasks))


async def _join(tasks: set[asyncio.Task[None]]) -> None:
    """Wait for the dispatched runs; if the pass itself is cancelled meanwhile, cancel them,
    wait for them, and re-raise."""
    try:
        if tasks:
            await asyncio.wait(set(tasks))
    except asyncio.CancelledError:
        await _cancel_all(tasks)
        raise


def _without_frames(exc: BaseException) -> BaseException:
    """``exc`` with the tracebacks of its chain dropped: their frames hold the claimed
    transcripts, and a report of many failures must not keep them all alive."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        item.__traceback__ = None
        stack += [item.__cause__, item.__context__]
        if isinstance(item, BaseExceptionGroup):
            stack += list(item.exceptions)
    return exc
