"""An OpenAI Agents SDK service whose runs survive ``kill -9``, on an offline canned model.

Each run is one ``Runner.run`` of a research agent: the model asks for ``--steps`` tool calls
(one per turn), then writes a report from every finding. Each turn is stored by the run's
:class:`~executus_ckpt.integrations.openai_agents.ExecutusSession` before the next one starts.
At boot the service first resumes the runs a previous process left (they continue from their
stored turns), then starts ``--runs`` new ones. No API key, no network: the model is canned.

Usage::

    python examples/openai_agents_service.py --url sqlite+aiosqlite:///agents.db --runs 3 &
    sleep 1; kill -9 $!                                    # mid-run
    python examples/openai_agents_service.py --url sqlite+aiosqlite:///agents.db  # resumes them

``--url postgresql+asyncpg://user@host/db`` works the same. It prints one JSON event per line:
``model_call`` (with the history the model got), ``tool``, ``recovered``, ``finished``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import os
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

from agents import Agent, ModelResponse, Runner, Usage, function_tool, set_tracing_disabled
from agents.models.interface import Model
from agents.testing import assistant_message, function_call

from executus_ckpt import RunInfo, SQLCheckpointStore, StoreCheckpointerFactory, recover_interrupted
from executus_ckpt.integrations.openai_agents import checkpointed_session

RUN_ID: contextvars.ContextVar[str] = contextvars.ContextVar("run_id")


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, "run": RUN_ID.get(None), **fields}) + "\n")
    sys.stdout.flush()


class ResearchModel(Model):
    """Canned and deterministic: asks for the next ``research`` step until it has ``steps``
    findings in its input, then reports them. A resumed run continues where its history ends."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    async def get_response(
        self, system_instructions: Any, input: Any, *args: Any, **kwargs: Any
    ) -> ModelResponse:
        history = [{"role": "user", "content": input}] if isinstance(input, str) else input
        findings = [i["output"] for i in history if i.get("type") == "function_call_output"]
        emit("model_call", history=len(history))
        if len(findings) < self.steps:
            step = len(findings)
            output = [function_call("research", {"step": step}, call_id=f"call-{step}")]
        else:
            output = [assistant_message("report: " + "; ".join(findings), item_id="report")]
        return ModelResponse(output=output, usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise NotImplementedError("the canned model does not stream")


def research_agent(steps: int, latency: float) -> Agent[Any]:
    @function_tool
    async def research(step: int) -> str:
        """Research one step of the topic."""
        await asyncio.sleep(latency)  # the slow work a crash interrupts
        emit("tool", step=step)
        return f"finding {step}"

    return Agent(
        name="Researcher",
        instructions="Research, then report.",
        model=ResearchModel(steps),
        tools=[research],
    )


async def run_agent(factory: StoreCheckpointerFactory, agent: Agent[Any], info: RunInfo) -> None:
    """One run: its session resumes the stored turns, if any."""
    RUN_ID.set(info.run_id)
    async with checkpointed_session(factory, info) as session:
        prompt = session.input_for(str(info.inputs["prompt"]))
        result = await Runner.run(agent, prompt, session=session, max_turns=100)
    emit("finished", output=result.final_output, resumed=session.resumed)


async def serve(url: str, runs: int, steps: int, latency: float) -> None:
    set_tracing_disabled(True)  # offline: no trace export
    agent = research_agent(steps, latency)
    async with SQLCheckpointStore.open(url, migrate=True) as store:
        factory = StoreCheckpointerFactory(store, app_version="research-v1")
        # Boot: resume what a killed process left, then serve new runs.
        report = await recover_interrupted(
            store, lambda cp: run_agent(factory, agent, cp.run_info()), max_attempts=3
        )
        emit("recovered", runs=sorted(report.dispatched), failed=sorted(report.failed))
        await asyncio.gather(
            *(
                run_agent(factory, agent, RunInfo(f"run-{i}", inputs={"prompt": f"topic {i}"}))
                for i in range(1, runs + 1)
            )
        )
    emit("all_done")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="database URL (SQLite or PostgreSQL)")
    parser.add_argument("--runs", type=int, default=0, help="new runs to start after recovery")
    parser.add_argument("--steps", type=int, default=8, help="tool turns per run")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per tool call")
    args = parser.parse_args(argv)
    os.environ.setdefault("OPENAI_API_KEY", "sk-offline")  # never used: the model is canned
    asyncio.run(serve(args.url, args.runs, args.steps, args.latency))


if __name__ == "__main__":
    main()
