"""A pydantic-ai agent service whose runs survive ``kill -9`` (executus_ckpt's pydantic-ai example).

Each run is one agent working in two stages, "research" then "write", each a pydantic-ai run
with a tool call. The model is an offline fake (pydantic-ai's ``FunctionModel``): swap in
``Agent("openai:gpt-5.2", ...)`` for a real one. Run it, kill it mid-run, run it again::

    python examples/pydantic_ai_service.py --db sqlite+aiosqlite:///agent.db --runs 3 &
    sleep 1; kill -9 $!
    python examples/pydantic_ai_service.py --db sqlite+aiosqlite:///agent.db --runs 0

The second boot recovers the killed runs: a run that had finished "research" skips it (its
transcript and output come back from the checkpoint) and re-runs "write" from its start. It
prints one JSON event per line (stage started/skipped/done, tool calls, finished runs with
their transcript). ``--db`` also takes ``postgresql+asyncpg://user@host/db``; the schema is
migrated at boot. Needs ``pip install "executus-ckpt[pydantic-ai]"`` (and ``[postgres]``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import ModelMessagesTypeAdapter as Messages
from pydantic_ai.messages import (
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

from executus_ckpt import (
    RunCheckpoint,
    RunInfo,
    SQLCheckpointStore,
    StoreCheckpointerFactory,
    recover_interrupted,
)
from executus_ckpt.integrations.pydantic_ai import MESSAGE_CODEC, checkpointed_agent_run

LATENCY = 0.2  # seconds per tool call (--latency)


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def fake_model(messages: list[Any], info: AgentInfo) -> ModelResponse:
    """Call the stage's tool once, then answer with what it returned."""
    prompt = next(
        p.content for m in reversed(messages) for p in m.parts if isinstance(p, UserPromptPart)
    )
    returns = [p for p in messages[-1].parts if isinstance(p, ToolReturnPart)]
    if returns:
        return ModelResponse(parts=[TextPart(f"{prompt} -> {returns[0].content}")])
    return ModelResponse(parts=[ToolCallPart("lookup", {"query": prompt})])


agent = Agent(FunctionModel(fake_model), deps_type=str, instructions="You write short reports.")


@agent.tool
async def lookup(ctx: RunContext[str], query: str) -> str:
    """Look something up (slowly: the service gets killed in here)."""
    emit("tool", run_id=ctx.deps, query=query)
    await asyncio.sleep(LATENCY)
    return f"notes on {query!r}"


async def report(
    factory: StoreCheckpointerFactory, info: RunInfo, cp: RunCheckpoint | None = None
) -> None:
    """The run: two stages, each skipped if a recovered run completed it before the crash."""
    async with checkpointed_agent_run(factory, info, agent, resume=cp, deps=info.run_id) as run:
        for stage, prompt in [
            ("research", f"Research {info.inputs['prompt']}"),
            ("write", "Write the report"),
        ]:
            emit("stage", run_id=info.run_id, stage=stage)
            result = await run.stage(stage, prompt)
            emit("stage_done", run_id=info.run_id, stage=stage, skipped=result.skipped)
    emit(
        "finished",
        run_id=info.run_id,
        output=run.output,
        requests=run.usage.requests,
        messages=Messages.dump_python(run.messages, mode="json"),
    )


async def serve(db: str, runs: int, throttle: float) -> None:
    async with SQLCheckpointStore.open(db, migrate=True) as store:
        factory = StoreCheckpointerFactory(store, throttle=throttle, message_codec=MESSAGE_CODEC)
        # Boot: resume the runs a previous process left behind (from their last stage boundary).
        recovered = await recover_interrupted(store, lambda cp: report(factory, cp.run_info(), cp))
        emit("recovery_done", run_ids=sorted(recovered.dispatched))
        # Then serve new work.
        async with asyncio.TaskGroup() as group:
            for i in range(1, runs + 1):
                info = RunInfo(f"run-{i}", inputs={"prompt": f"topic {i}"})
                group.create_task(report(factory, info))
    emit("all_done")


def main() -> None:
    global LATENCY
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="sqlite+aiosqlite:///agent.db", help="database URL")
    parser.add_argument("--runs", type=int, default=3, help="new runs to start after recovery")
    parser.add_argument("--latency", type=float, default=LATENCY, help="seconds per tool call")
    parser.add_argument("--throttle", type=float, default=0.5, help="seconds between saves")
    args = parser.parse_args()
    LATENCY = args.latency
    asyncio.run(serve(args.db, args.runs, args.throttle))


if __name__ == "__main__":
    main()
