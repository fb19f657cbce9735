from __future__ import annotations

from executus_ckpt import RunCheckpoint, RunCheckpointMeta


async def test_round_trip(store) -> None:
    await store.save(RunCheckpoint(RunCheckpointMeta("r1"), messages=[{"a": 1}], iteration=2))
    loaded = await store.load("r1")
    assert loaded is not None and loaded.messages == [{"a": 1}] and loaded.iteration == 2
