"""A state is validated when it is handed to ``save``, with the stores' rules, throttled or not.

Regression (issue 9, item 4): ``save(iteration=2**40)`` inside the throttle window used to
return normally, then the trailing flush retried it forever while the stored state stayed
old. Bad shapes (issue 10, item 12) used to be coerced: a ``str`` stored one message per
character, a dict its keys, a generator whatever it yielded.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from typing import Any

import pytest

from executus_ckpt import (
    CheckpointError,
    InMemoryCheckpointStore,
    RunCheckpointMeta,
    RunCheckpointState,
    new_checkpointer,
)
from executus_ckpt.testing import ManualClock

META = RunCheckpointMeta("run-v", agent_id="agent")
GOOD = RunCheckpointState(messages=[{"m": 0}], iteration=1, completed_phases=["plan"])


class Phase(enum.StrEnum):
    PLAN = "plan"


def _messages() -> Iterator[dict[str, int]]:
    yield {"m": 1}


BAD: list[tuple[str, dict[str, Any]]] = [
    ("iteration-2**40", {"iteration": 2**40}),
    ("iteration-negative", {"iteration": -1}),
    ("iteration-none", {"iteration": None}),
    ("iteration-bool", {"iteration": True}),
    ("messages-str", {"messages": '[{"m": 0}]'}),
    ("messages-bytes", {"messages": b"[]"}),
    ("messages-dict", {"messages": {"role": "user"}}),
    ("messages-generator", {"messages": _messages()}),
    ("messages-none", {"messages": None}),
    ("messages-int", {"messages": 5}),
    ("phases-dict", {"completed_phases": {"plan": True}}),
    ("phases-str", {"completed_phases": "plan"}),
    ("phases-none", {"completed_phases": None}),
    ("phases-int", {"completed_phases": 5}),
    ("phases-non-str", {"completed_phases": ["plan", 3]}),
    # equal to the good state's ["plan"], which was validated just before: still refused
    ("phases-str-enum", {"completed_phases": [Phase.PLAN]}),
    ("phases-str-enum-tuple", {"completed_phases": (Phase.PLAN,)}),
]


def _bad_state(changes: dict[str, Any]) -> RunCheckpointState:
    fields = {"messages": [{"m": 0}, {"m": 1}], "iteration": 2, "completed_phases": ["plan"]}
    fields.update(changes)
    return RunCheckpointState(**fields)


@pytest.mark.parametrize("throttle", [0.0, 10.0], ids=["unthrottled", "in-window"])
@pytest.mark.parametrize(("name", "changes"), BAD, ids=[n for n, _ in BAD])
async def test_bad_state_is_refused_at_save(
    name: str, changes: dict[str, Any], throttle: float
) -> None:
    store = InMemoryCheckpointStore()
    clock = ManualClock()
    cp = new_checkpointer(store, META, throttle=throttle, clock=clock)
    await cp.save(GOOD)  # written: opens the throttle window
    with pytest.raises(CheckpointError) as info:
        await cp.save(_bad_state(changes))
    assert info.value.run_id == "run-v"
    await cp.flush()  # nothing bad is pending: the stored state stays the good one
    stored = await store.load("run-v")
    assert stored is not None
    assert (stored.iteration, list(stored.messages), list(stored.completed_phases)) == (
        1,
        [{"m": 0}],
        ["plan"],
    )
    await cp.aclose()


async def test_bad_identity_is_refused_at_the_first_save() -> None:
    store = InMemoryCheckpointStore()
    cp = new_checkpointer(store, RunCheckpointMeta("run-x", agent_id="a" * 256), throttle=10.0)
    with pytest.raises(CheckpointError, match="agent_id"):
        await cp.save(GOOD)
    assert await store.load("run-x") is None
