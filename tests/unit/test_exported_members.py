"""The public API is what DESIGN.md names: pin it so a rename or a dropped export fails."""

from __future__ import annotations

import dataclasses

import pytest

import executus_ckpt

DESIGN_NAMES = {
    "RunInfo",
    "RunCheckpointMeta",
    "RunCheckpointState",
    "RunCheckpoint",
    "ResumeState",
    "PhaseSkipper",
    "Checkpointer",
    "CheckpointerFactory",
    "CheckpointStore",
    "new_checkpointer",
    "NoopCheckpointer",
    "StoreCheckpointerFactory",
    "SQLCheckpointStore",
    "InMemoryCheckpointStore",
    "migrate",
    "checkpointed_run",
    "classify_outcome",
    "Outcome",
    "ShutdownError",
    "recover_interrupted",
    "RecoveryReport",
    "CheckpointError",
    "StoreUnavailableError",
    "CheckpointSerializationError",
    "CheckpointTooLargeError",
    "SchemaOutOfDateError",
    "CheckpointFencedError",
    "Executor",
    "CheckpointStatus",
}


def test_design_names_are_exported() -> None:
    assert set(executus_ckpt.__all__) >= DESIGN_NAMES
    for name in executus_ckpt.__all__:
        assert hasattr(executus_ckpt, name), name


def test_all_is_pinned() -> None:
    assert sorted(executus_ckpt.__all__) == sorted(
        DESIGN_NAMES
        | {
            "CheckpointNotFoundError",
            "CheckpointStats",
            "ExecutorInfo",
            "ExecutorStats",
            "CheckpointSummary",
            "JSONValue",
            "MessageCodec",
            "StoreCheckpointer",
            "__version__",
        }
    )


def test_error_tree() -> None:
    for name in (
        "StoreUnavailableError",
        "CheckpointSerializationError",
        "CheckpointTooLargeError",
        "SchemaOutOfDateError",
        "CheckpointFencedError",
        "CheckpointNotFoundError",
    ):
        assert issubclass(getattr(executus_ckpt, name), executus_ckpt.CheckpointError)
    # A shutdown is not a checkpoint failure: `except CheckpointError` never swallows it.
    assert not issubclass(executus_ckpt.ShutdownError, executus_ckpt.CheckpointError)


def test_types_are_frozen_and_need_only_run_id() -> None:
    info = executus_ckpt.RunInfo(run_id="r")
    meta = executus_ckpt.RunCheckpointMeta(run_id="r")
    assert info.subject_id is None and dict(info.inputs) == {}
    assert meta.agent_id is None and meta.prompt is None
    for value in (info, meta, executus_ckpt.RunCheckpointState(), executus_ckpt.ResumeState()):
        assert dataclasses.is_dataclass(value)
        first = dataclasses.fields(value)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, first, None)


def test_meta_from_run_info() -> None:
    info = executus_ckpt.RunInfo(
        run_id="r", subject_id="a", name="n", inputs={"prompt": "p"}, parent_run_id="pr"
    )
    meta = executus_ckpt.RunCheckpointMeta.from_run_info(info)
    assert (meta.agent_id, meta.agent_name, meta.prompt, meta.parent_run_id) == (
        "a",
        "n",
        "p",
        "pr",
    )
