"""Value types: what a run is, what it saves, what the store keeps and what a resumed run gets."""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from .codec import MessageCodec

JSONValue: TypeAlias = (
    bool | int | float | str | Sequence["JSONValue"] | Mapping[str, "JSONValue"] | None
)
"""A JSON-compatible value: what a transcript message may contain."""

_EMPTY_INPUTS: Mapping[str, object] = {}


def utcnow() -> datetime:
    """The current wall-clock time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


class CheckpointStatus(enum.StrEnum):
    """Where a stored checkpoint stands in recovery."""

    ACTIVE = "active"
    """Running or interrupted: a recovery candidate."""
    DEAD = "dead"
    """Kept for the operator (over its attempt budget, or quarantined); never resumed."""
    FAILED = "failed"
    """Failed terminally and kept for the operator (``keep_failed=True``); never resumed."""


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What the host's run engine knows when a run starts.

    ``inputs["prompt"]``, when a ``str``, becomes the checkpoint's prompt so that a recovered
    run can be re-dispatched. Every JSON-compatible entry of ``inputs`` is stored and comes
    back from :meth:`RunCheckpoint.run_info`; other entries are left out (one WARNING names
    their keys).
    """

    run_id: str
    subject_id: str | None = None
    name: str | None = None
    caller_id: str | None = None
    channel_id: str | None = None
    guild_id: str | None = None
    model_tier: str | None = None
    parent_run_id: str | None = None
    inputs: Mapping[str, object] = field(default_factory=lambda: _EMPTY_INPUTS)


@dataclass(frozen=True, slots=True)
class RunCheckpointMeta:
    """Per-run identity stored with every checkpoint (derived from :class:`RunInfo`)."""

    run_id: str
    agent_id: str | None = None
    agent_name: str | None = None
    caller_id: str | None = None
    channel_id: str | None = None
    guild_id: str | None = None
    prompt: str | None = None
    model_tier: str | None = None
    parent_run_id: str | None = None
    inputs: Mapping[str, JSONValue] = field(default_factory=dict)
    """The run's JSON-compatible inputs but a ``str`` prompt (kept as ``prompt``), given back
    by :meth:`RunCheckpoint.run_info` on re-dispatch."""

    @classmethod
    def from_run_info(
        cls, info: RunInfo, inputs: Mapping[str, JSONValue] | None = None
    ) -> RunCheckpointMeta:
        """Derive the meta: ``subject_id`` → ``agent_id``, ``name`` → ``agent_name``, the
        prompt from ``inputs["prompt"]`` when it is a ``str`` (kept once, as ``prompt``), and
        the other inputs (``inputs``: the JSON-compatible ones, as the factory filters them;
        default all of ``info.inputs``)."""
        given = dict(info.inputs if inputs is None else inputs)
        prompt = info.inputs.get("prompt")
        if isinstance(prompt, str):
            given.pop("prompt", None)
        return cls(
            run_id=info.run_id,
            agent_id=info.subject_id,
            agent_name=info.name,
            caller_id=info.caller_id,
            channel_id=info.channel_id,
            guild_id=info.guild_id,
            prompt=prompt if isinstance(prompt, str) else None,
            model_tier=info.model_tier,
            parent_run_id=info.parent_run_id,
            inputs=given,  # type: ignore[arg-type]
        )


@dataclass(frozen=True, slots=True)
class RunCheckpointState:
    """What the run loop hands to ``Checkpointer.save``.

    ``messages`` is the accumulated, pre-compaction transcript: JSON-compatible values, or a
    framework's message objects when the factory has a
    :class:`~executus_ckpt.codec.MessageCodec`. It normally only grows; a compacted or
    edited transcript is stored exactly as given. The checkpointer keeps a shallow copy of
    the sequence, so appending after ``save`` is safe; do not mutate a message in place
    after handing it over.
    """

    messages: Sequence[Any] = ()
    iteration: int = 0
    completed_phases: Sequence[str] = ()
    extra: Mapping[str, JSONValue] | None = None
    """Host state wanted back on resume (token usage, counters, a framework's run state): a
    JSON-compatible mapping, stored exactly as given, validated like messages."""


@dataclass(frozen=True, slots=True)
class ResumeState:
    """What a recovered run is handed: its state at the last phase boundary.

    ``messages`` is the transcript as it stood when the last completed phase was first saved
    (a prefix of the stored transcript), ``iteration`` and ``extra`` are those of that save;
    ``interrupted_tail`` holds the messages saved after it (the interrupted phase's partial
    work, which agent frameworks refuse to resume from). With no completed phase the resumed
    run starts from an empty transcript. Both hold JSON values, or the host's message objects
    when loaded through a :class:`~executus_ckpt.codec.MessageCodec`.
    """

    messages: Sequence[Any] = ()
    iteration: int = 0
    completed_phases: Sequence[str] = ()
    extra: Mapping[str, JSONValue] | None = None
    interrupted_tail: Sequence[Any] = ()

    def skipper(self) -> PhaseSkipper:
        """A fresh :class:`PhaseSkipper` over ``completed_phases``."""
        return PhaseSkipper(self.completed_phases)


class PhaseSkipper:
    """Decides, phase by phase, whether a resumed run skips a phase it already completed.

    Completed phases are consumed as a multiset, apart from the run's live outputs: with
    completed ``["plan", "act"]`` and phases ``plan, act, act`` it skips the first ``plan`` and
    the first ``act`` and runs the second ``act``. A skipper over no completed phases (a fresh
    run) skips nothing.
    """

    __slots__ = ("_remaining",)

    def __init__(self, completed_phases: Sequence[str] = ()) -> None:
        self._remaining: Counter[str] = Counter(completed_phases)

    def should_skip(self, phase_name: str) -> bool:
        """True if ``phase_name`` was completed before the interruption (consumes one)."""
        if self._remaining[phase_name] > 0:
            self._remaining[phase_name] -= 1
            return True
        return False


@dataclass(frozen=True, slots=True)
class CheckpointSummary:
    """A stored checkpoint without its transcript: what listings and recovery scans return.

    ``size_bytes`` is the stored size of the transcript: the sum of its encoded messages.
    The ``boundary_*`` fields are the state at the last phase boundary (``None`` for a
    checkpoint written before boundaries were recorded: it resumes from its whole
    transcript). ``progress_at`` is the time of the last save, ``claimed_at`` of the last
    recovery claim: a claim with no save since the previous one counts as a failed attempt.
    """

    meta: RunCheckpointMeta
    iteration: int
    completed_phases: Sequence[str]
    message_count: int
    size_bytes: int
    created_at: datetime
    updated_at: datetime
    attempts: int = 0
    status: CheckpointStatus = CheckpointStatus.ACTIVE
    last_error: str | None = None
    app_version: str | None = None
    owner: str | None = None
    epoch: int = 0
    extra: Mapping[str, JSONValue] | None = None
    boundary_message_count: int | None = None
    boundary_iteration: int | None = None
    boundary_extra: Mapping[str, JSONValue] | None = None
    progress_at: datetime | None = None
    claimed_at: datetime | None = None

    @property
    def run_id(self) -> str:
        return self.meta.run_id

    @property
    def suspect(self) -> bool:
        """Claimed for recovery before and no save since: it may be what kills the process."""
        return self.claimed_at is not None and (
            self.progress_at is None or self.progress_at <= self.claimed_at
        )

    def with_messages(self, messages: Sequence[JSONValue]) -> RunCheckpoint:
        """The full :class:`RunCheckpoint`: this summary plus its transcript."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        del values["message_count"], values["size_bytes"]
        return RunCheckpoint(messages=messages, **values)


@dataclass(frozen=True, slots=True)
class RunCheckpoint:
    """One stored checkpoint plus the bookkeeping the store keeps.

    ``created_at``/``updated_at`` are timezone-aware UTC. ``attempts`` counts recovery claims
    after which the run made no progress, ``epoch`` rises with every take-over so that a
    stale writer is fenced out. See :class:`CheckpointSummary` for the other fields.
    """

    meta: RunCheckpointMeta
    messages: Sequence[JSONValue] = ()
    iteration: int = 0
    completed_phases: Sequence[str] = ()
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)
    attempts: int = 0
    status: CheckpointStatus = CheckpointStatus.ACTIVE
    last_error: str | None = None
    app_version: str | None = None
    owner: str | None = None
    epoch: int = 0
    extra: Mapping[str, JSONValue] | None = None
    boundary_message_count: int | None = None
    boundary_iteration: int | None = None
    boundary_extra: Mapping[str, JSONValue] | None = None
    progress_at: datetime | None = None
    claimed_at: datetime | None = None

    @property
    def run_id(self) -> str:
        return self.meta.run_id

    def run_info(self) -> RunInfo:
        """Rebuild the :class:`RunInfo` to re-dispatch this run: its stored inputs (with
        ``"prompt"``)."""
        m = self.meta
        inputs: dict[str, object] = dict(m.inputs)
        if m.prompt is not None:
            inputs["prompt"] = m.prompt
        return RunInfo(
            run_id=m.run_id,
            subject_id=m.agent_id,
            name=m.agent_name,
            caller_id=m.caller_id,
            channel_id=m.channel_id,
            guild_id=m.guild_id,
            model_tier=m.model_tier,
            parent_run_id=m.parent_run_id,
            inputs=inputs,
        )

    def resume_state(self, *, codec: MessageCodec[Any] | None = None) -> ResumeState:
        """The :class:`ResumeState` a recovered run continues from: the state at its last
        phase boundary (see :class:`ResumeState`).

        A checkpoint written before boundaries were recorded resumes from its whole
        transcript, iteration and ``extra``. With ``codec``, ``messages`` and
        ``interrupted_tail`` are the host's objects, loaded by it.

        Raises:
            CheckpointSerializationError: ``codec`` could not load a stored message.
        """
        messages = list(self.messages)
        if codec is not None:
            messages = codec.load_all(messages, self.run_id)
        if self.boundary_message_count is None:
            return ResumeState(
                messages=messages,
                iteration=self.iteration,
                completed_phases=self.completed_phases,
                extra=self.extra,
            )
        cut = min(self.boundary_message_count, len(messages))
        return ResumeState(
            messages=messages[:cut],
            iteration=self.boundary_iteration or 0,
            completed_phases=self.completed_phases,
            extra=self.boundary_extra,
            interrupted_tail=messages[cut:],
        )


@dataclass(frozen=True, slots=True)
class CheckpointStats:
    """Counts and sizes over a store's checkpoints (``stats()``); sizes in bytes."""

    total: int = 0
    by_status: Mapping[str, int] = field(default_factory=dict)
    by_agent: Mapping[str, int] = field(default_factory=dict)
    """Checkpoints per agent id (``""`` for runs without one)."""
    total_size_bytes: int = 0
    largest_size_bytes: int = 0
    largest_run_id: str | None = None
    oldest_interrupted_run_id: str | None = None
    oldest_interrupted_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ExecutorInfo:
    """One registered executor (a running service instance), as the operator sees it.

    ``heartbeat_age`` is in seconds by the database's clock; ``alive`` is true while its
    heartbeat has not expired (``stale_after``) and it has not stopped.
    """

    id: str
    name: str | None
    host: str | None
    pid: int | None
    app_version: str | None
    state: str
    stale_after: float
    heartbeat_age: float
    alive: bool
    runs_owned: int = 0


@dataclass(frozen=True, slots=True)
class ExecutorStats:
    """What :meth:`Executor.stats` reports (counts since the executor started)."""

    id: str
    name: str | None
    state: str
    live_executors: int
    """Executors seen alive at the last sweep (this one included)."""
    runs_owned: int
    claims: int
    """Runs this executor claimed for recovery."""
    rescues: int
    """Claimed runs whose previous owner was a registered executor (it died or stalled)."""
    releases: int
    """Runs handed back by drains (this executor's)."""
    fenced_writes: int
    """Writes of this executor's runs refused because another owner took the run over."""
    heartbeat_age: float | None
    """Seconds since the last successful heartbeat (host monotonic clock)."""
    heartbeat_failures: int
    clock_skew: float | None
    """Host clock minus database clock, in seconds, at the last heartbeat."""
