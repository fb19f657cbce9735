"""Message codec hook (issue 13, item 1), on every store: a host saves its framework's message
objects and gets them back from ``resume_state``; each message is dumped once; codec errors are
typed, name the message and leave the stored state unchanged."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import pytest

from executus_ckpt import (
    CheckpointSerializationError,
    Executor,
    MessageCodec,
    RunCheckpointState,
    RunInfo,
    StoreCheckpointerFactory,
)


@dataclass(frozen=True)
class Msg:
    role: str
    text: str


class Counting:
    """A codec over :class:`Msg` that counts its calls."""

    def __init__(self) -> None:
        self.dumps = 0
        self.loads = 0

    def dump(self, m: Msg) -> dict[str, Any]:
        self.dumps += 1
        return asdict(m)

    def load(self, v: Any) -> Msg:
        self.loads += 1
        return Msg(**v)

    def codec(self) -> MessageCodec[Msg]:
        return MessageCodec(dump=self.dump, load=self.load)


async def test_framework_objects_are_saved_and_given_back_at_the_boundary(store: Any) -> None:
    counting = Counting()
    factory = StoreCheckpointerFactory(store, throttle=0, message_codec=counting.codec())
    cp = await factory.begin(RunInfo("r"))
    plan = [Msg("user", "hi"), Msg("assistant", "plan")]
    await cp.save(RunCheckpointState(messages=plan, iteration=1, completed_phases=["plan"]))
    act = [*plan, Msg("assistant", "tool call"), Msg("tool", "half")]
    await cp.save(RunCheckpointState(messages=act, iteration=2, completed_phases=["plan"]))
    stored = await store.load("r")
    assert stored is not None
    assert list(stored.messages) == [asdict(m) for m in act]  # stored as JSON values
    resumed = factory.resume_state(stored)
    assert list(resumed.messages) == plan and all(type(m) is Msg for m in resumed.messages)
    assert list(resumed.interrupted_tail) == act[2:]
    assert resumed.iteration == 1 and list(resumed.completed_phases) == ["plan"]
    assert factory.message_codec is not None
    assert stored.resume_state(codec=factory.message_codec) == resumed
    assert stored.resume_state().messages == [asdict(m) for m in plan]  # without: JSON


async def test_each_message_is_dumped_once_for_an_appending_host(store: Any) -> None:
    counting = Counting()
    factory = StoreCheckpointerFactory(store, throttle=0, message_codec=counting.codec())
    cp = await factory.begin(RunInfo("r"))
    messages: list[Msg] = []
    saves = 60
    for i in range(saves):
        messages.append(Msg("assistant", f"step {i}"))
        await cp.save(RunCheckpointState(messages=messages, iteration=i))
    # one dump per new message, plus the last two of each previous save (streamed into
    # in place by some hosts): flat per save, never the whole transcript
    assert counting.dumps <= 3 * saves, counting.dumps
    stored = await store.load("r")
    assert stored is not None and len(stored.messages) == saves
    # a replaced object (same position, new object) is dumped and stored (with what follows
    # it: an edit of an old message rewrites from there)
    messages[0] = Msg("assistant", "edited")
    await cp.save(RunCheckpointState(messages=messages, iteration=saves))
    stored = await store.load("r")
    assert stored is not None and stored.messages[0] == {"role": "assistant", "text": "edited"}


class Unserializable:
    pass


async def test_a_dump_error_names_the_message_and_writes_nothing(store: Any) -> None:
    def dump(m: Any) -> Any:
        if isinstance(m, Unserializable):
            raise ValueError("no schema for it")
        return asdict(m)

    factory = StoreCheckpointerFactory(
        store, throttle=0, message_codec=MessageCodec(dump=dump, load=lambda v: Msg(**v))
    )
    cp = await factory.begin(RunInfo("r"))
    good = [Msg("user", "hi")]
    await cp.save(RunCheckpointState(messages=good, iteration=1))
    with pytest.raises(CheckpointSerializationError, match=r"message 2 .*Unserializable") as info:
        await cp.save(
            RunCheckpointState(messages=[*good, Msg("a", "b"), Unserializable()], iteration=2)
        )
    assert info.value.run_id == "r"
    stored = await store.load("r")
    assert stored is not None and stored.iteration == 1 and len(stored.messages) == 1


async def test_a_dump_that_is_not_json_names_the_message(store: Any) -> None:
    factory = StoreCheckpointerFactory(
        store, throttle=0, message_codec=MessageCodec(dump=lambda m: {"s": {1, 2}}, load=dict)
    )
    cp = await factory.begin(RunInfo("r"))
    with pytest.raises(CheckpointSerializationError, match=r"message 0\b.*set"):
        await cp.save(RunCheckpointState(messages=[Msg("u", "x")], iteration=1))
    stored = await store.load("r")
    assert stored is not None and list(stored.messages) == []


async def test_a_load_error_names_the_message_and_its_type(store: Any) -> None:
    def load(v: Any) -> Msg:
        if v.get("text") == "bad":
            raise KeyError("text")
        return Msg(**v)

    factory = StoreCheckpointerFactory(
        store, throttle=0, message_codec=MessageCodec(dump=asdict, load=load)
    )
    cp = await factory.begin(RunInfo("r"))
    messages = [Msg("u", "ok"), Msg("a", "bad")]
    await cp.save(RunCheckpointState(messages=messages, iteration=1, completed_phases=["p"]))
    stored = await store.load("r")
    assert stored is not None
    with pytest.raises(CheckpointSerializationError, match=r"message 1 .*dict"):
        factory.resume_state(stored)


async def test_load_many_loads_the_transcript_in_one_call(store: Any) -> None:
    calls: list[int] = []

    def load_many(values: list[Any]) -> list[Msg]:
        calls.append(len(values))
        return [Msg(**v) for v in values]

    def no_single_load(v: Any) -> Msg:
        raise AssertionError("load_many is given")

    codec = MessageCodec(dump=asdict, load=no_single_load, load_many=load_many)
    factory = StoreCheckpointerFactory(store, throttle=0, message_codec=codec)
    cp = await factory.begin(RunInfo("r"))
    messages = [Msg("u", str(i)) for i in range(5)]
    await cp.save(RunCheckpointState(messages=messages, iteration=1, completed_phases=["p"]))
    stored = await store.load("r")
    assert stored is not None
    assert list(factory.resume_state(stored).messages) == messages
    assert calls == [5]


async def test_an_executors_factory_takes_the_codec(store: Any) -> None:
    counting = Counting()
    async with Executor(store, heartbeat_interval=0.2, stale_after=1.0) as ex:
        factory = ex.factory(throttle=0, message_codec=counting.codec())
        cp = await factory.begin(RunInfo("r"))
        await cp.save(RunCheckpointState(messages=[Msg("u", "x")], iteration=1))
        stored = await store.load("r")
        assert stored is not None and stored.messages == [{"role": "u", "text": "x"}]
        assert factory.resume_state(stored).messages == []  # no boundary yet
        assert counting.dumps == 1
        await cp.complete()
