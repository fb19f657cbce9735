"""Run pydantic-ai agents as checkpointed runs (extra ``pydantic-ai``: ``pydantic-ai-slim`` only).

pydantic-ai has no named phases, so a host names its own *stages* ("research", then "write"...),
each one agent run (``agent.iter``) continuing the transcript of the previous ones::

    factory = StoreCheckpointerFactory(store, message_codec=MESSAGE_CODEC)

    async def report(factory, info, checkpoint=None):
        async with checkpointed_agent_run(factory, info, agent, resume=checkpoint) as run:
            await run.stage("research", f"Research {info.inputs['prompt']}")
            return (await run.stage("write", "Write the report.")).output

    await recover_interrupted(store, lambda cp: report(factory, cp.run_info(), cp))

What is stored, per run:

- the transcript: pydantic-ai's ``ModelMessage`` objects, through :data:`MESSAGE_CODEC` (a codec
  over ``ModelMessagesTypeAdapter``; each message is dumped once);
- a save after every ``agent.iter`` step that changed the transcript (a model response, tool
  results), so ``iteration`` counts the steps of all stages;
- a stage's *phase boundary* when its agent run ends: the stage's name is appended to
  ``completed_phases`` in that save. A finished agent run does not end in an unanswered tool
  call (unless its output is ``DeferredToolRequests``: then the next stage passes
  ``deferred_tool_results``), so the boundary transcript is one pydantic-ai accepts a new
  prompt on;
- ``extra["usage"]``: the run's accumulated ``RunUsage`` (all stages, JSON form) and
  ``extra["stage_outputs"]``: ``[name, output]`` per completed stage, the output in its JSON
  form (``pydantic_core.to_jsonable_python``).

On resume (``resume=checkpoint``, a recovered :class:`~executus_ckpt.RunCheckpoint`), the run
continues from its last phase boundary: completed stages are skipped (their stored output is
returned), the interrupted stage re-runs from its start on the boundary transcript. Its partial
work (``ResumeState.interrupted_tail``) would make pydantic-ai refuse the next prompt ("Cannot
provide a new user prompt when the message history contains unprocessed tool calls").
"""

from __future__ import annotations

import typing
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import pydantic_core
from pydantic import TypeAdapter
from pydantic_ai.agent import AbstractAgent
from pydantic_ai.messages import (
    ModelMessage,
    ModelMessagesTypeAdapter,
    ModelRequest,
    ModelResponse,
)
from pydantic_ai.usage import RunUsage

from ..checkpointer import NoopCheckpointer
from ..codec import MessageCodec
from ..config import DEFAULT_SHUTDOWN_FLUSH_TIMEOUT
from ..errors import CheckpointSerializationError
from ..lifecycle import checkpointed_run
from ..protocols import Checkpointer, CheckpointerFactory
from ..types import JSONValue, PhaseSkipper, RunCheckpoint, RunCheckpointState, RunInfo

__all__ = [
    "MESSAGE_CODEC",
    "OUTPUTS_KEY",
    "USAGE_KEY",
    "CheckpointedAgentRun",
    "StageResult",
    "checkpointed_agent_run",
]


def _dump(message: ModelMessage) -> Any:
    return ModelMessagesTypeAdapter.dump_python([message], mode="json")[0]


def _load(value: Any) -> ModelMessage:
    return ModelMessagesTypeAdapter.validate_python([value])[0]


def _load_many(values: list[Any]) -> list[ModelMessage]:
    return ModelMessagesTypeAdapter.validate_python(values)


MESSAGE_CODEC: Final[MessageCodec[ModelMessage]] = MessageCodec(
    dump=_dump, load=_load, load_many=_load_many
)
"""Stores pydantic-ai ``ModelMessage`` objects as the JSON of ``ModelMessagesTypeAdapter``
(bytes as base64) and loads them back. Give it to the factory:
``StoreCheckpointerFactory(store, message_codec=MESSAGE_CODEC)`` or
``executor.factory(message_codec=MESSAGE_CODEC)``."""

_USAGE: Final = TypeAdapter(RunUsage)
USAGE_KEY: Final = "usage"
"""``extra`` key of the run's accumulated ``RunUsage`` (JSON form)."""
OUTPUTS_KEY: Final = "stage_outputs"
"""``extra`` key of the completed stages' outputs: a list of ``[name, output JSON]``."""
_OWNED_ITER_ARGS: Final = frozenset({"message_history", "conversation", "usage"})
_UNSET: Any = object()


@dataclass(frozen=True, slots=True)
class StageResult:
    """What :meth:`CheckpointedAgentRun.stage` returns.

    Attributes:
        name: the stage's name (its phase name).
        output: the agent run's output; for a stage skipped on resume, the output stored at its
            boundary, validated back into the stage's output type when that is a type (``str``,
            a pydantic model, ``list[int]``, a union...) and left in its JSON form otherwise
            (output functions, ``ToolOutput(...)`` markers, lists of specs).
        skipped: True if the stage was completed before the run was interrupted (not re-run).
        usage: this stage's ``RunUsage``; None for a skipped stage.
    """

    name: str
    output: Any
    skipped: bool = False
    usage: RunUsage | None = None


class CheckpointedAgentRun:
    """One checkpointed run made of named stages, each an agent run continuing the transcript.

    Made by :func:`checkpointed_agent_run`; call :meth:`stage` for each stage, in order, on
    fresh and resumed runs alike (a resumed run skips what it completed).
    """

    def __init__(
        self,
        checkpointer: Checkpointer,
        agent: AbstractAgent[Any, Any],
        *,
        deps: Any = None,
        resume: RunCheckpoint | None = None,
        codec: MessageCodec[Any] = MESSAGE_CODEC,
    ) -> None:
        self._checkpointer = checkpointer
        self._agent = agent
        self._deps = deps
        self._messages: list[ModelMessage] = []
        self._completed: list[str] = []
        self._iteration = 0
        self._usage = RunUsage()
        self._outputs: list[JSONValue] = []  # [name, output JSON] per completed stage
        self._restored: list[tuple[str, JSONValue]] = []
        self._results: list[StageResult] = []
        self._skipper = PhaseSkipper()
        if resume is not None:
            state = resume.resume_state(codec=codec)
            self._messages = _model_messages(state.messages)
            self._completed = list(state.completed_phases)
            self._iteration = state.iteration
            self._skipper = state.skipper()
            boundary = state.extra or {}
            self._outputs = list(_as_list(boundary.get(OUTPUTS_KEY)))
            self._restored = [
                (str(item[0]), item[1])
                for item in self._outputs
                if isinstance(item, list) and len(item) == 2
            ]
            # The spend up to the last save, the interrupted stage's partial work included
            # (tokens it used were paid for even though the stage re-runs).
            latest = resume.extra or boundary
            if (usage := latest.get(USAGE_KEY)) is not None:
                self._usage = _USAGE.validate_python(usage)

    @property
    def checkpointer(self) -> Checkpointer:
        """The run's :class:`~executus_ckpt.Checkpointer`."""
        return self._checkpointer

    @property
    def messages(self) -> list[ModelMessage]:
        """The transcript so far (a copy): on a resumed run, it starts with the boundary's."""
        return list(self._messages)

    @property
    def completed_phases(self) -> list[str]:
        """The names of the completed stages, in order (resumed ones included)."""
        return list(self._completed)

    @property
    def iteration(self) -> int:
        """``agent.iter`` steps taken by the run's stages (a resumed run counts on from its
        boundary)."""
        return self._iteration

    @property
    def usage(self) -> RunUsage:
        """The run's accumulated usage: every stage, and on a resumed run what earlier
        attempts spent up to their last save."""
        return self._usage

    @property
    def results(self) -> list[StageResult]:
        """One :class:`StageResult` per :meth:`stage` call so far."""
        return list(self._results)

    @property
    def output(self) -> Any:
        """The output of the last stage (None before any)."""
        return self._results[-1].output if self._results else None

    async def stage(
        self,
        name: str,
        user_prompt: str | Sequence[Any] | None = None,
        *,
        agent: AbstractAgent[Any, Any] | None = None,
        deps: Any = _UNSET,
        output_type: Any = None,
        **iter_kwargs: Any,
    ) -> StageResult:
        """Run stage ``name``: one ``agent.iter(user_prompt, ...)`` over the transcript so far.

        On a resumed run, a stage completed before the interruption is skipped (its stored
        output is returned, see :class:`StageResult`). Otherwise the agent runs with
        ``message_history`` = the transcript so far; the state is saved after every step that
        changed the transcript, and the stage's end is saved as its phase boundary. Stages run
        one at a time. pydantic-ai's ``usage_limits`` apply to each stage, as to any agent
        run; :attr:`CheckpointedAgentRun.usage` is the run's total. If the stage raises, the
        run's transcript stays as it was before the stage (a host that catches the error and
        goes on continues from the previous boundary).

        Args:
            name: the stage's phase name (names may repeat: completed ones are consumed as a
                multiset, see :class:`~executus_ckpt.PhaseSkipper`).
            user_prompt: the stage's prompt.
            agent: the agent for this stage; default: the run's.
            deps: the agent's deps for this stage; default: the run's.
            output_type: passed to ``agent.iter`` when given (and used to validate a skipped
                stage's stored output back).
            **iter_kwargs: any other ``agent.iter`` argument (``model_settings``,
                ``usage_limits``, ``instructions``, ``toolsets``...) except
                ``message_history``, ``conversation`` and ``usage``, which the run owns.

        Raises:
            TypeError: ``iter_kwargs`` holds an argument the run owns.
            CheckpointSerializationError: the stage's output has no JSON form (nothing of the
                boundary is written).
            CheckpointFencedError: another replica took the run over (stop the run).
            Whatever the agent run raises (a shutdown keeps the checkpoint for recovery).
        """
        owned = _OWNED_ITER_ARGS.intersection(iter_kwargs)
        if owned:
            raise TypeError(
                f"stage() got {', '.join(sorted(owned))}: the checkpointed run owns the "
                "message history and usage"
            )
        run_agent = self._agent if agent is None else agent
        spec = run_agent.output_type if output_type is None else output_type
        if self._skipper.should_skip(name):
            result = StageResult(name, _restored_output(spec, self._take_output(name)), True)
            self._results.append(result)
            return result
        if output_type is not None:
            iter_kwargs["output_type"] = output_type
        base, before = self._usage, self._messages
        try:
            async with run_agent.iter(
                user_prompt,
                message_history=before or None,
                deps=self._deps if deps is _UNSET else deps,
                **iter_kwargs,
            ) as agent_run:
                first = True
                async for node in agent_run:
                    self._usage = base + agent_run.usage
                    if AbstractAgent.is_end_node(node):
                        continue
                    if not first:  # the node before this one ran
                        self._iteration += 1
                    first = False
                    messages = agent_run.all_messages()
                    if len(messages) != len(self._messages) or (
                        messages and messages[-1] is not self._messages[-1]
                    ):
                        self._messages = list(messages)
                        await self._save()
                run_result = agent_run.result
                assert run_result is not None, "an agent run that reached End has a result"
                stage_usage = agent_run.usage
                self._messages = list(agent_run.all_messages())
        except BaseException:
            # The stage's partial work may end in an unanswered tool call: a host that goes
            # on after catching the error continues from the previous boundary.
            self._messages = before
            raise
        self._iteration += 1
        self._usage = base + stage_usage
        self._outputs.append([name, _output_json(name, run_result.output)])
        self._completed.append(name)
        await self._save()  # the stage's phase boundary
        result = StageResult(name, run_result.output, False, stage_usage)
        self._results.append(result)
        return result

    def _take_output(self, name: str) -> JSONValue:
        for i, (stored, value) in enumerate(self._restored):
            if stored == name:
                del self._restored[i]
                return value
        return None

    async def _save(self) -> None:
        extra: dict[str, JSONValue] = {
            USAGE_KEY: _USAGE.dump_python(self._usage, mode="json"),
            OUTPUTS_KEY: list(self._outputs),
        }
        await self._checkpointer.save(
            RunCheckpointState(
                messages=self._messages,
                iteration=self._iteration,
                completed_phases=tuple(self._completed),
                extra=extra,
            )
        )


@asynccontextmanager
async def checkpointed_agent_run(
    factory: CheckpointerFactory,
    info: RunInfo,
    agent: AbstractAgent[Any, Any],
    *,
    resume: RunCheckpoint | None = None,
    deps: Any = None,
    shutdown_exceptions: tuple[type[BaseException], ...] = (),
    flush_timeout: float = DEFAULT_SHUTDOWN_FLUSH_TIMEOUT,
) -> AsyncIterator[CheckpointedAgentRun]:
    """``async with checkpointed_agent_run(factory, info, agent) as run``: a checkpointed run
    of ``agent`` whose stages are :meth:`CheckpointedAgentRun.stage` calls.

    It is :func:`~executus_ckpt.checkpointed_run` (same outcomes: the block's end completes
    the run and deletes its checkpoint, a shutdown keeps it for recovery, any other exception
    fails it) around a :class:`CheckpointedAgentRun`.

    Args:
        factory: a factory with a message codec for pydantic-ai messages
            (``message_codec=MESSAGE_CODEC``).
        info: the run (``info.run_id`` identifies it across restarts).
        agent: the default agent of the stages.
        resume: the recovered checkpoint (what ``recover_interrupted`` / ``executor.recover``
            hand to ``dispatch``); None for a fresh run.
        deps: the default ``deps`` of the stages (never stored: a recovered run is handed
            the host's deps again).
        shutdown_exceptions, flush_timeout: as for ``checkpointed_run``.

    Raises:
        ValueError: the factory has no message codec (its saves would refuse pydantic-ai's
            message objects).
        CheckpointSerializationError: the checkpoint's transcript cannot be loaded as
            pydantic-ai messages.
    """
    codec = getattr(factory, "message_codec", None)
    if codec is None:
        raise ValueError(
            "checkpointed_agent_run needs a factory with a message codec: "
            "StoreCheckpointerFactory(store, message_codec=MESSAGE_CODEC) or "
            "executor.factory(message_codec=MESSAGE_CODEC)"
        )
    # Load the transcript before the run begins: a checkpoint that cannot be loaded stays
    # stored (the error goes to the dispatcher) instead of failing the run.
    run = CheckpointedAgentRun(NoopCheckpointer(), agent, deps=deps, resume=resume, codec=codec)
    async with checkpointed_run(
        factory, info, shutdown_exceptions=shutdown_exceptions, flush_timeout=flush_timeout
    ) as checkpointer:
        run._checkpointer = checkpointer
        yield run


def _model_messages(values: Sequence[Any]) -> list[ModelMessage]:
    messages = list(values)
    if all(isinstance(m, ModelRequest | ModelResponse) for m in messages):
        return messages
    return MESSAGE_CODEC.load_all(messages)


def _as_list(value: JSONValue | None) -> list[JSONValue]:
    return value if isinstance(value, list) else []


def _output_json(stage: str, output: Any) -> JSONValue:
    try:
        value: JSONValue = pydantic_core.to_jsonable_python(output)
    except pydantic_core.PydanticSerializationError as exc:
        raise CheckpointSerializationError(
            f"the output of stage {stage!r} ({type(output).__name__}) has no JSON form: {exc}"
        ) from exc
    return value


def _restored_output(spec: Any, value: JSONValue) -> Any:
    if value is None or not (isinstance(spec, type) or typing.get_origin(spec) is not None):
        return value
    return TypeAdapter(spec).validate_python(value)
