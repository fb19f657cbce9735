"""executus_ckpt: durable, asyncio-native run checkpoints for LLM agent services."""

from __future__ import annotations

from .checkpointer import (
    NoopCheckpointer,
    StoreCheckpointer,
    StoreCheckpointerFactory,
    new_checkpointer,
)
from .codec import MessageCodec
from .errors import (
    CheckpointError,
    CheckpointFencedError,
    CheckpointNotFoundError,
    CheckpointSerializationError,
    CheckpointTooLargeError,
    SchemaOutOfDateError,
    ShutdownError,
    StoreUnavailableError,
)
from .executor import Executor
from .lifecycle import Outcome, checkpointed_run, classify_outcome
from .migrate import migrate
from .protocols import Checkpointer, CheckpointerFactory, CheckpointStore
from .recovery import RecoveryReport, recover_interrupted
from .stores.memory import InMemoryCheckpointStore
from .stores.sql import SQLCheckpointStore
from .types import (
    CheckpointStats,
    CheckpointStatus,
    CheckpointSummary,
    ExecutorInfo,
    ExecutorStats,
    JSONValue,
    PhaseSkipper,
    ResumeState,
    RunCheckpoint,
    RunCheckpointMeta,
    RunCheckpointState,
    RunInfo,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointFencedError",
    "CheckpointNotFoundError",
    "CheckpointSerializationError",
    "CheckpointStats",
    "CheckpointStatus",
    "CheckpointStore",
    "CheckpointSummary",
    "CheckpointTooLargeError",
    "Checkpointer",
    "CheckpointerFactory",
    "Executor",
    "ExecutorInfo",
    "ExecutorStats",
    "InMemoryCheckpointStore",
    "JSONValue",
    "MessageCodec",
    "NoopCheckpointer",
    "Outcome",
    "PhaseSkipper",
    "RecoveryReport",
    "ResumeState",
    "RunCheckpoint",
    "RunCheckpointMeta",
    "RunCheckpointState",
    "RunInfo",
    "SQLCheckpointStore",
    "SchemaOutOfDateError",
    "ShutdownError",
    "StoreCheckpointer",
    "StoreCheckpointerFactory",
    "StoreUnavailableError",
    "__version__",
    "checkpointed_run",
    "classify_outcome",
    "migrate",
    "new_checkpointer",
    "recover_interrupted",
]
