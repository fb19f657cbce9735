"""The executus_ckpt error tree.

::

    CheckpointError
     ├── StoreUnavailableError        the database could not be reached or failed (driver error in
     │                                __cause__); retrying later may succeed
     ├── CheckpointSerializationError a transcript is not JSON-compatible (NaN, non-str key, ...)
     ├── CheckpointTooLargeError      an encoded transcript exceeds the store's size cap
     ├── SchemaOutOfDateError         the database schema is missing or at another revision
     ├── CheckpointFencedError        a newer writer took the run over; this writer is stale
     └── CheckpointNotFoundError      an operation named a run that has no checkpoint

    ShutdownError                     not a failure: a host raises it to mean "the service is
                                      shutting down" (kept outside the tree so that a handler
                                      for CheckpointError never swallows a shutdown)

Each class docstring is its default message. Errors that concern one run carry ``run_id``.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointFencedError",
    "CheckpointNotFoundError",
    "CheckpointSerializationError",
    "CheckpointTooLargeError",
    "SchemaOutOfDateError",
    "ShutdownError",
    "StoreUnavailableError",
]


class CheckpointError(Exception):
    """A checkpoint operation failed."""

    def __init__(self, message: str | None = None, *, run_id: str | None = None) -> None:
        self.run_id = run_id
        super().__init__(message or (type(self).__doc__ or "").strip())


class StoreUnavailableError(CheckpointError):
    """The checkpoint store could not be reached or failed; the operation may be retried."""


class CheckpointSerializationError(CheckpointError, ValueError):
    """The checkpoint is not JSON-compatible and was not stored."""


class CheckpointTooLargeError(CheckpointError, ValueError):
    """The encoded checkpoint exceeds the store's size limit and was not stored."""

    def __init__(
        self,
        message: str | None = None,
        *,
        run_id: str | None = None,
        size_bytes: int = 0,
        max_bytes: int = 0,
    ) -> None:
        self.size_bytes = size_bytes
        self.max_bytes = max_bytes
        super().__init__(message, run_id=run_id)


class SchemaOutOfDateError(CheckpointError):
    """The checkpoint schema is missing or out of date; run `executus-ckpt migrate`."""

    def __init__(
        self,
        message: str | None = None,
        *,
        found: str | None = None,
        required: str | None = None,
        command: str = "executus-ckpt migrate",
    ) -> None:
        self.found = found
        self.required = required
        self.command = command
        super().__init__(message)


class CheckpointFencedError(CheckpointError):
    """A newer writer took this run over; this (stale) checkpointer may no longer write it."""

    def __init__(
        self,
        message: str | None = None,
        *,
        run_id: str | None = None,
        epoch: int | None = None,
    ) -> None:
        self.epoch = epoch
        super().__init__(message, run_id=run_id)


class CheckpointNotFoundError(CheckpointError, LookupError):
    """No checkpoint is stored for this run."""


class ShutdownError(Exception):
    """The service is shutting down: a run that ends with this keeps its checkpoint."""
