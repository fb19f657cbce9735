"""Defaults and environment names, in one place."""

from __future__ import annotations

from typing import Final

ENV_DATABASE_URL: Final = "EXECUTUS_CKPT_DATABASE_URL"
"""Environment variable naming the database URL (alembic, the CLI)."""

DEFAULT_DATABASE_URL: Final = "sqlite+aiosqlite:///executus_ckpt.db"
"""The embedded default: a SQLite file in the working directory."""

VERSION_TABLE: Final = "executus_ckpt_alembic_version"
"""alembic's version table for our migrations, apart from the host's own history."""

DEFAULT_THROTTLE: Final = 0.0
"""Seconds between persisted saves of one run; ``<= 0`` persists every save."""

DEFAULT_MAX_CHECKPOINT_BYTES: Final = 64 * 1024 * 1024
"""Largest encoded transcript a store accepts (bytes)."""

DEFAULT_SQLITE_BUSY_TIMEOUT: Final = 30.0
"""Seconds a SQLite connection waits for another process's write lock before failing."""

DEFAULT_CONNECT_TIMEOUT: Final = 10.0
"""Seconds to open a database connection before the operation fails (PostgreSQL)."""

DEFAULT_OPERATION_TIMEOUT: Final = 30.0
"""Seconds one store operation may take, all included (waiting for a pooled connection, its
statements, the commit) before it fails with ``StoreUnavailableError``."""

DEFAULT_SHUTDOWN_FLUSH_TIMEOUT: Final = 5.0
"""Seconds ``checkpointed_run`` spends flushing a pending state when the run is shut down."""

DEFAULT_MAX_ATTEMPTS: Final = 3
"""Recovery claims a run gets before it is marked dead."""

DEFAULT_RECOVERY_CONCURRENCY: Final = 8
"""Recovered runs dispatched at once."""

DEFAULT_PAGE_SIZE: Final = 100
"""Rows fetched per round trip when streaming listings."""

DEFAULT_HEARTBEAT_INTERVAL: Final = 5.0
"""Seconds between an executor's heartbeats (one per process)."""

DEFAULT_STALE_AFTER: Final = 30.0
"""Seconds without a heartbeat, by the database's clock, after which an executor's runs are
taken over by peers."""

DEFAULT_SWEEP_INTERVAL: Final = 5.0
"""Seconds between an executor's recovery sweeps."""

DEFAULT_DRAIN_GRACE: Final = 20.0
"""Seconds ``Executor.drain`` waits for owned runs to end before cancelling them."""

MAX_CLOCK_SKEW: Final = 5.0
"""Host-vs-database clock difference (seconds) above which an executor logs a WARNING."""
