"""The database schema as SQLAlchemy Core tables, shared by the store and alembic's env.py."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.types import TypeDecorator

REQUIRED_REVISION: Final = "0006"
"""The alembic revision this version of the library reads and writes."""

metadata = MetaData()


class UTCDateTime(TypeDecorator[datetime]):
    """``timestamptz`` on PostgreSQL; naive-UTC text on SQLite. Always aware UTC in Python."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given for a UTC column")
        value = value.astimezone(UTC)
        # SQLite has no time zones: store naive UTC so that text order is time order.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


run_checkpoints = Table(
    "run_checkpoints",
    metadata,
    Column("run_id", String(255), primary_key=True),
    # identity (RunCheckpointMeta)
    Column("agent_id", String(255)),
    Column("agent_name", String(255)),
    Column("caller_id", String(255)),
    Column("channel_id", String(255)),
    Column("guild_id", String(255)),
    Column("prompt", Text),
    Column("model_tier", String(255)),
    Column("parent_run_id", String(255)),
    Column("inputs", LargeBinary),  # JSON; NULL (rows before 0003): no inputs
    # state: the transcript lives in run_checkpoint_messages; the header keeps its length and
    # encoded size so that an append can be checked against it without reading it
    Column("message_count", Integer, nullable=False, server_default=text("0")),
    Column("size_bytes", BigInteger, nullable=False, server_default=text("0")),
    Column("iteration", Integer, nullable=False, server_default=text("0")),
    Column("completed_phases", LargeBinary, nullable=False),
    # bookkeeping
    Column("status", String(16), nullable=False, server_default=text("'active'")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text),
    Column("app_version", String(255)),
    Column("owner", String(255)),
    Column("epoch", BigInteger, nullable=False, server_default=text("0")),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # resume (0003): the host's state, and the state at the last phase boundary (NULL: not
    # recorded, the run resumes from its whole transcript)
    Column("extra", LargeBinary),
    Column("boundary_message_count", Integer),
    Column("boundary_iteration", Integer),
    Column("boundary_extra", LargeBinary),
    # crash loops (0003): the last save and the last recovery claim
    Column("progress_at", UTCDateTime),
    Column("claimed_at", UTCDateTime),
    # No index holds updated_at (0006): every save sets it, and an indexed column that
    # changes makes each save write an entry in every index (no in-place HOT update on
    # PostgreSQL). Listings filter through these and sort the matching rows.
    Index("ix_run_checkpoints_status", "status"),
    Index("ix_run_checkpoints_agent_status", "agent_id", "status"),
    Index("ix_run_checkpoints_owner", "owner"),
)


run_checkpoint_messages = Table(
    "run_checkpoint_messages",
    metadata,
    # No foreign key: the store deletes a run's messages in the transaction that deletes its
    # header, and an append never needs the database to look the header up again.
    Column("run_id", String(255), primary_key=True),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    # one message as UTF-8 JSON, encoded once and stored as-is on every backend
    Column("data", LargeBinary, nullable=False),
)


executors = Table(
    "executus_ckpt_executors",
    metadata,
    # A fresh id per start (uuid4 hex); ``name`` is only a label and may repeat.
    Column("id", String(64), primary_key=True),
    Column("name", String(255)),
    Column("host", String(255)),
    Column("pid", Integer),
    Column("app_version", String(255)),
    Column("state", String(16), nullable=False),  # running, draining, stopped
    Column("stale_after", Float, nullable=False),
    # seconds since the epoch by the database's clock (never a host's)
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),  # heartbeat_at + stale_after
    Column("stopped_at", Float),
    # The judge's own health (0005): a heartbeat more than two intervals after the previous
    # one restarts ``healthy_since``; a claim of a stale owner's run needs its claimer healthy
    # for ``stale_after`` (a stall that delayed everyone's heartbeats convicts nobody).
    Column("heartbeat_interval", Float),
    Column("healthy_since", Float),
)
"""Running service instances: a run whose owner is not a live row here is interrupted."""


schema_info = Table(
    "executus_ckpt_schema_info",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", String(64), nullable=False),
)
"""Facts about the schema for older releases. ``oldest_compatible_revision``: a release that
requires this revision or a later one may use the database even when it is at a newer
revision than that release knows (expand-only migrations: rolling deploys keep working)."""

OLDEST_COMPATIBLE_KEY: Final = "oldest_compatible_revision"
