"""Tail reads (issue 13, item 3): the last ``limit`` messages of a transcript, on every store,
without loading the rest; consistent with ``load`` after appends, rewrites and shrinking."""

from __future__ import annotations

from typing import Any

import pytest

from executus_ckpt import CheckpointError, RunCheckpointState, RunInfo, StoreCheckpointerFactory
from executus_ckpt.protocols import TailReadingStore


async def _saved(store: Any, messages: list[Any]) -> Any:
    cp = await StoreCheckpointerFactory(store, throttle=0).begin(RunInfo("r"))
    await cp.save(RunCheckpointState(messages=messages, iteration=1))
    return cp


async def test_tail_is_the_end_of_the_stored_transcript(store: Any) -> None:
    assert isinstance(store, TailReadingStore)
    messages: list[Any] = [{"i": i} for i in range(50)]
    cp = await _saved(store, messages)
    assert await store.load_tail("r", 3) == [{"i": 47}, {"i": 48}, {"i": 49}]
    assert await store.load_tail("r", 1) == [{"i": 49}]
    assert await store.load_tail("r", 0) == []
    assert await store.load_tail("r", 500) == messages  # fewer than limit: all of them
    messages.append({"i": 50})
    await cp.save(RunCheckpointState(messages=messages, iteration=2))  # an append
    assert await store.load_tail("r", 2) == [{"i": 49}, {"i": 50}]
    shrunk = [*messages[:10], {"summary": True}]  # a compacted transcript
    await cp.save(RunCheckpointState(messages=shrunk, iteration=3))
    assert await store.load_tail("r", 2) == [{"i": 9}, {"summary": True}]
    loaded = await store.load("r")
    assert loaded is not None and list(loaded.messages[-5:]) == await store.load_tail("r", 5)


async def test_tail_of_an_empty_or_missing_run(store: Any) -> None:
    await _saved(store, [])
    assert await store.load_tail("r", 5) == []
    assert await store.load_tail("nope", 5) is None
    assert await store.load_tail("x" * 10_000, 5) is None  # not a storable id: no such run


@pytest.mark.parametrize("limit", [-1, 1.5, "3", True, None])
async def test_a_bad_limit_is_a_typed_error(store: Any, limit: Any) -> None:
    await _saved(store, [{"i": 0}])
    with pytest.raises(CheckpointError, match="limit"):
        await store.load_tail("r", limit)
