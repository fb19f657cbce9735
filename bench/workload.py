"""The agent-shaped workload: 3 messages per iteration, a growing append-only transcript."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]

_WORD_TEXT = (
    "the of and to in is for on that with as by at from this are be or an it was which "
    "result search query page document section table value error status request response "
    "function return python database index transaction commit latency throughput agent "
    "model tool call answer summary source reference customer order invoice payment "
    "report config server client network timeout retry cache memory disk file path node "
    "graph edge phase plan research write review draft final data record field column row "
    "key id name"
)
_WORDS = tuple(_WORD_TEXT.split())

PHASES = ("plan", "research", "draft", "review", "write")


def _text(rng: random.Random, size: int) -> str:
    """Deterministic prose-like ASCII text of exactly ``size`` characters (compresses ~3x)."""
    parts: list[str] = []
    n = 0
    while n < size:
        word = rng.choice(_WORDS)
        if rng.random() < 0.08:
            word = f"{word}{rng.randrange(10_000)}"
        parts.append(word)
        n += len(word) + 1
    return " ".join(parts)[:size]


@dataclass(frozen=True, slots=True)
class Iteration:
    """The 3 messages one iteration appends."""

    tool_call: Message
    tool_result: Message
    answer: Message


def make_iterations(n: int, result_size: int, *, seed: int = 5) -> list[Iteration]:
    """``n`` iterations: tool call (~300 B JSON), tool result (``result_size`` B), answer (~500 B).

    Built once, outside any timing; every engine gets the same message objects.
    """
    rng = random.Random(seed * 1_000_003 + result_size)
    out: list[Iteration] = []
    for i in range(1, n + 1):
        call_id = f"call_{i:05d}_{rng.randrange(16**8):08x}"
        args = json.dumps({"query": _text(rng, 150), "top_k": 5, "page": i})
        call = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "web_search", "arguments": args},
                }
            ],
        }
        # the tool result's content is sized so that its JSON encoding is ~result_size bytes
        result = {"role": "tool", "tool_call_id": call_id, "content": ""}
        overhead = len(json.dumps(result, separators=(",", ":")))
        result["content"] = _text(rng, max(1, result_size - overhead))
        answer = {"role": "assistant", "content": _text(rng, 460)}
        out.append(Iteration(call, result, answer))
    return out


def completed_phases(iteration: int, total: int) -> list[str]:
    """Phases completed by ``iteration`` of ``total`` (one more every fifth of the run)."""
    step = max(1, total // len(PHASES))
    return list(PHASES[: min(len(PHASES) - 1, iteration // step)])


def encoded_sizes(items: list[Iteration]) -> tuple[int, int, int]:
    """Mean compact-JSON sizes of (tool call, tool result, answer), for the report."""

    def size(m: Message) -> int:
        return len(json.dumps(m, separators=(",", ":")))

    n = max(1, len(items))
    return (
        sum(size(it.tool_call) for it in items) // n,
        sum(size(it.tool_result) for it in items) // n,
        sum(size(it.answer) for it in items) // n,
    )
