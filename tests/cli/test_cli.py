"""The operator CLI through click's ``CliRunner``, on both SQL backends (``sql_url``).

Tests are sync functions: the CLI runs ``asyncio.run`` itself, so seeding and checking go
through the library in small ``asyncio.run`` helpers around each invocation. Every check of a
command's effect reads the database through the library, never through the CLI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from executus_ckpt import (
    CheckpointStatus,
    RunCheckpoint,
    RunCheckpointMeta,
    SQLCheckpointStore,
)
from executus_ckpt.cli import ENV_TIMEOUT, main
from executus_ckpt.config import ENV_DATABASE_URL, VERSION_TABLE
from executus_ckpt.schema import OLDEST_COMPATIBLE_KEY, REQUIRED_REVISION, schema_info

SECRET = "s3cr3tpw"
UNREACHABLE = f"postgresql+asyncpg://u:{SECRET}@127.0.0.1:1/x"

LIST_KEYS = {
    "run_id",
    "agent_id",
    "agent_name",
    "status",
    "iteration",
    "completed_phases",
    "message_count",
    "size_bytes",
    "attempts",
    "owner",
    "app_version",
    "epoch",
    "last_error",
    "created_at",
    "updated_at",
    "extra",
    "boundary_message_count",
    "boundary_iteration",
    "boundary_extra",
    "progress_at",
    "claimed_at",
}
SHOW_KEYS = {
    "run_id",
    "meta",
    "status",
    "iteration",
    "completed_phases",
    "message_count",
    "attempts",
    "owner",
    "owner_executor",
    "app_version",
    "epoch",
    "last_error",
    "created_at",
    "updated_at",
    "extra",
    "boundary_message_count",
    "boundary_iteration",
    "boundary_extra",
    "progress_at",
    "claimed_at",
    "messages",
}
META_KEYS = {
    "agent_id",
    "agent_name",
    "caller_id",
    "channel_id",
    "guild_id",
    "model_tier",
    "parent_run_id",
    "prompt",
    "inputs",
}
STATS_KEYS = {
    "total",
    "by_status",
    "by_agent",
    "total_size_bytes",
    "largest_size_bytes",
    "largest_run_id",
    "oldest_interrupted_run_id",
    "oldest_interrupted_at",
}


# -- invoking the CLI --------------------------------------------------------------------------


def invoke(
    args: Sequence[str],
    url: str | None = None,
    *,
    env: Mapping[str, str | None] | None = None,
    input: str | None = None,
) -> Result:
    """Run the CLI in-process; the URL env var is unset unless ``env`` sets it."""
    argv = (["--url", url] if url is not None else []) + list(args)
    full_env: dict[str, str | None] = {ENV_DATABASE_URL: None}
    full_env.update(env or {})
    return CliRunner().invoke(main, argv, env=full_env, input=input)


def ok(result: Result) -> Result:
    """Exit 0, no exception, nothing on stderr (off a terminal there is no progress)."""
    assert result.exception is None, _describe(result)
    assert result.exit_code == 0, _describe(result)
    assert result.stderr == "", _describe(result)
    return result


def failed(result: Result, code: int) -> Result:
    """Exit ``code`` through ``sys.exit`` (an expected failure), never an uncaught exception."""
    assert isinstance(result.exception, SystemExit), _describe(result)
    assert result.exit_code == code, _describe(result)
    assert "Traceback" not in result.output, _describe(result)
    return result


def one_error_line(result: Result) -> str:
    """The single stderr line of an expected operational failure (click's ``Error: ...``)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, _describe(result)
    assert lines[0].startswith("Error: "), _describe(result)
    return lines[0]


def usage_error_line(result: Result) -> str:
    """The ``Error: ...`` line of a usage error, which click prints after the usage."""
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("Usage: "), _describe(result)
    assert lines[-1].startswith("Error: "), _describe(result)
    return lines[-1]


def _describe(result: Result) -> str:
    exc = result.exception
    detail = ""
    if exc is not None and not isinstance(exc, SystemExit) and result.exc_info is not None:
        import traceback

        detail = "".join(traceback.format_exception(*result.exc_info))
    return (
        f"exit={result.exit_code} exception={exc!r}\n--- stdout\n{result.stdout}"
        f"--- stderr\n{result.stderr}{detail}"
    )


def json_lines(result: Result) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def json_doc(result: Result) -> dict[str, Any]:
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON document, got {result.stdout!r}"
    doc = json.loads(lines[0])
    assert isinstance(doc, dict)
    return doc


# -- seeding and checking through the library --------------------------------------------------


def ago(**delta: float) -> datetime:
    return datetime.now(UTC) - timedelta(**delta)


def cp(
    run_id: str,
    *,
    agent: str | None = "agent-a",
    updated: datetime | None = None,
    messages: Sequence[Any] | None = None,
    iteration: int = 2,
    phases: Sequence[str] = ("plan",),
    attempts: int = 0,
    **meta: Any,
) -> RunCheckpoint:
    updated = updated or datetime.now(UTC)
    if messages is None:
        messages = [{"role": "user", "content": f"hello from {run_id}"}]
    return RunCheckpoint(
        meta=RunCheckpointMeta(run_id=run_id, agent_id=agent, **meta),
        messages=messages,
        iteration=iteration,
        completed_phases=phases,
        created_at=updated - timedelta(seconds=30),
        updated_at=updated,
        attempts=attempts,
        owner="exec-1",
        app_version="v1",
    )


async def _seed(
    url: str, checkpoints: Iterable[RunCheckpoint], dead: Mapping[str, str], concurrent: bool
) -> None:
    async with SQLCheckpointStore.open(url) as store:
        if concurrent:
            await asyncio.gather(*(store.save(c) for c in checkpoints))
        else:
            for c in checkpoints:
                await store.save(c)
        for run_id, reason in dead.items():
            assert await store.mark_dead(run_id, reason=reason)


def seed(
    url: str,
    *checkpoints: RunCheckpoint,
    dead: Mapping[str, str] | Iterable[str] = (),
    concurrent: bool = False,
) -> None:
    reasons = dict(dead) if isinstance(dead, Mapping) else {r: "too many attempts" for r in dead}
    asyncio.run(_seed(url, checkpoints, reasons, concurrent))


def load(url: str, run_id: str) -> RunCheckpoint | None:
    async def go() -> RunCheckpoint | None:
        async with SQLCheckpointStore.open(url) as store:
            return await store.load(run_id)

    return asyncio.run(go())


def stored_ids(url: str) -> set[str]:
    async def go() -> set[str]:
        async with SQLCheckpointStore.open(url) as store:
            return {s.run_id async for s in store.iter_summaries(status=None)}

    return asyncio.run(go())


def sizes(url: str) -> dict[str, int]:
    async def go() -> dict[str, int]:
        async with SQLCheckpointStore.open(url) as store:
            return {s.run_id: s.size_bytes async for s in store.iter_summaries(status=None)}

    return asyncio.run(go())


def with_password(url: str) -> str:
    return make_url(url).set(password=SECRET).render_as_string(hide_password=False)


def assert_no_secret(result: Result, records: Sequence[logging.LogRecord] = ()) -> None:
    assert SECRET not in result.stdout, result.stdout
    assert SECRET not in result.stderr, result.stderr
    assert SECRET not in result.output
    if result.exception is not None:
        assert SECRET not in repr(result.exception)
        assert SECRET not in str(result.exception.__cause__)
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    for record in records:
        text = formatter.format(record)  # includes exc_info / stack text when present
        assert SECRET not in text, text
        assert SECRET not in repr(record.__dict__), record.__dict__


# -- list --------------------------------------------------------------------------------------


def test_list_human_table(sql_url: str) -> None:
    seed(
        sql_url,
        cp("run-alpha", agent="agent-a", updated=ago(minutes=3), iteration=7),
        cp("run-beta", agent="agent-b", updated=ago(minutes=2), phases=("plan", "act")),
        cp("run-gone", agent="agent-c", updated=ago(minutes=1)),
        dead=["run-gone"],
    )
    out = ok(invoke(["list"], url=sql_url)).stdout
    assert "run id" in out and "status" in out  # the header
    assert "run-alpha" in out and "agent-a" in out
    assert "run-beta" in out and "agent-b" in out and "plan,act" in out
    assert "active" in out
    assert "run-gone" not in out and "agent-c" not in out  # dead: not listed by default
    assert "2 run(s)" in out
    alpha_row = next(line for line in out.splitlines() if "run-alpha" in line)
    assert "7" in alpha_row.split() and "active" in alpha_row.split()

    out_all = ok(invoke(["list", "--status", "all"], url=sql_url)).stdout
    gone_row = next(line for line in out_all.splitlines() if "run-gone" in line)
    assert "dead" in gone_row.split()
    assert "3 run(s)" in out_all


def test_list_json_lines(sql_url: str) -> None:
    msgs = [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "ok"}]
    first = cp(
        "run-1",
        agent="agent-a",
        agent_name="Researcher",
        updated=ago(minutes=5),
        messages=msgs,
        iteration=4,
        phases=("plan", "research"),
    )
    seed(sql_url, first, cp("run-2", agent="agent-b", updated=ago(minutes=1)))
    group = ok(invoke(["--json", "list"], url=sql_url))
    sub = ok(invoke(["list", "--json"], url=sql_url))
    assert group.stdout == sub.stdout
    docs = json_lines(group)
    assert [d["run_id"] for d in docs] == ["run-1", "run-2"]
    for doc in docs:
        assert set(doc) == LIST_KEYS
    d = docs[0]
    assert d["agent_id"] == "agent-a"
    assert d["agent_name"] == "Researcher"
    assert d["status"] == "active"
    assert d["iteration"] == 4
    assert d["completed_phases"] == ["plan", "research"]
    assert d["message_count"] == 2
    assert d["size_bytes"] == sizes(sql_url)["run-1"] > 0
    assert d["attempts"] == 0
    assert d["owner"] == "exec-1"
    assert d["app_version"] == "v1"
    assert d["last_error"] is None
    assert datetime.fromisoformat(d["updated_at"]) == first.updated_at
    assert datetime.fromisoformat(d["created_at"]) == first.created_at
    assert datetime.fromisoformat(d["updated_at"]).utcoffset() == timedelta(0)


def test_list_status_filter(sql_url: str) -> None:
    seed(
        sql_url,
        cp("run-a1", updated=ago(minutes=4)),
        cp("run-a2", updated=ago(minutes=3)),
        cp("run-d1", updated=ago(minutes=2)),
        dead={"run-d1": "boom"},
    )

    def listed(*args: str) -> list[str]:
        return [d["run_id"] for d in json_lines(ok(invoke(["list", "--json", *args], url=sql_url)))]

    assert listed() == ["run-a1", "run-a2"]
    assert listed("--status", "active") == ["run-a1", "run-a2"]
    assert listed("--status", "dead") == ["run-d1"]
    assert listed("--status", "all") == ["run-a1", "run-a2", "run-d1"]
    dead = json_lines(ok(invoke(["list", "--json", "--status", "dead"], url=sql_url)))[0]
    assert dead["status"] == "dead" and dead["last_error"] == "boom"


def test_list_agent_filter(sql_url: str) -> None:
    seed(
        sql_url,
        cp("run-1", agent="agent-a", updated=ago(minutes=3)),
        cp("run-2", agent="agent-b", updated=ago(minutes=2)),
        cp("run-3", agent="agent-a", updated=ago(minutes=1)),
        cp("run-4", agent=None, updated=ago(minutes=1)),
    )
    docs = json_lines(ok(invoke(["list", "--agent", "agent-a", "--json"], url=sql_url)))
    assert [d["run_id"] for d in docs] == ["run-1", "run-3"]
    human = ok(invoke(["list", "--agent", "agent-b"], url=sql_url)).stdout
    assert "run-2" in human and "run-1" not in human and "run-3" not in human
    none = ok(invoke(["list", "--agent", "nobody"], url=sql_url)).stdout
    assert "no checkpoints match" in none


def test_list_older_than(sql_url: str) -> None:
    seed(sql_url, cp("run-old", updated=ago(hours=3)), cp("run-fresh", updated=ago(seconds=5)))
    for duration in ("2h", "90m", "7200s"):
        docs = json_lines(ok(invoke(["list", "--older-than", duration, "--json"], url=sql_url)))
        assert [d["run_id"] for d in docs] == ["run-old"], duration
    everything = json_lines(ok(invoke(["list", "--json"], url=sql_url)))
    assert {d["run_id"] for d in everything} == {"run-old", "run-fresh"}
    out = ok(invoke(["list", "--older-than", "1d"], url=sql_url)).stdout
    assert "no checkpoints match" in out


def test_list_order_and_limit(sql_url: str) -> None:
    # Inserted out of order: the listing orders by updated_at, not by insertion or run id.
    times = {"run-c": 5, "run-a": 4, "run-d": 3, "run-b": 2}
    seed(sql_url, *(cp(r, updated=ago(minutes=m)) for r, m in times.items()))
    oldest_first = ["run-c", "run-a", "run-d", "run-b"]

    def listed(*args: str) -> list[str]:
        return [d["run_id"] for d in json_lines(ok(invoke(["list", "--json", *args], url=sql_url)))]

    assert listed() == oldest_first
    assert listed("--newest-first") == oldest_first[::-1]
    assert listed("--limit", "2") == oldest_first[:2]
    assert listed("--limit", "2", "--newest-first") == oldest_first[::-1][:2]
    assert listed("--limit", "10") == oldest_first
    human = ok(invoke(["list", "--newest-first"], url=sql_url)).stdout
    positions = [human.index(r) for r in oldest_first[::-1]]
    assert positions == sorted(positions)


def test_list_streams_across_pages_in_order(sql_url: str) -> None:
    """More rows than one page (100), with ties on updated_at across the page boundary."""
    base = ago(hours=1)
    runs = [cp(f"run-{i:03d}", updated=base + timedelta(seconds=i // 40)) for i in range(130)]
    seed(sql_url, *runs, concurrent=True)
    expected = sorted(runs, key=lambda c: (c.updated_at, c.run_id))
    docs = json_lines(ok(invoke(["list", "--json", "--status", "all"], url=sql_url)))
    assert [d["run_id"] for d in docs] == [c.run_id for c in expected]
    newest = json_lines(ok(invoke(["list", "--json", "--newest-first", "--limit", "110"], sql_url)))
    assert [d["run_id"] for d in newest] == [c.run_id for c in expected[::-1][:110]]
    assert "130 run(s)" in ok(invoke(["list"], url=sql_url)).stdout


# -- show --------------------------------------------------------------------------------------

MESSAGES = [{"role": "user" if i % 2 else "assistant", "content": f"msg-{i:02d}"} for i in range(7)]


def _seed_show(url: str) -> RunCheckpoint:
    run = cp(
        "run-x",
        agent="agent-a",
        agent_name="Researcher",
        caller_id="user-42",
        channel_id="chan-9",
        prompt="Summarise the report",
        model_tier="large",
        messages=MESSAGES,
        iteration=9,
        phases=("plan", "research"),
        updated=ago(minutes=10),
        attempts=3,
    )
    seed(url, run, dead={"run-x": "tool exploded: KeyError('x')"})
    return run


def test_show_human(sql_url: str) -> None:
    _seed_show(sql_url)
    out = ok(invoke(["show", "run-x", "--messages", "3"], url=sql_url)).stdout
    for needle in (
        "run_id: run-x",
        "status: dead",
        "iteration: 9",
        "message_count: 7",
        "attempts: 3",
        "owner: exec-1",
        "app_version: v1",
        "agent_id: agent-a",
        "agent_name: Researcher",
        "caller_id: user-42",
        "prompt: Summarise the report",
        "model_tier: large",
        "phases done: plan, research",
        "last error: tool exploded: KeyError('x')",
        "last 3 of 7 messages:",
    ):
        assert needle in out, needle
    shown = [line for line in out.splitlines() if '"msg-' in line]
    assert len(shown) == 3
    for i, line in zip((4, 5, 6), shown, strict=True):
        assert f"msg-{i:02d}" in line
    assert "msg-03" not in out

    default = ok(invoke(["show", "run-x"], url=sql_url)).stdout
    assert "last 5 of 7 messages:" in default
    assert len([line for line in default.splitlines() if '"msg-' in line]) == 5

    none = ok(invoke(["show", "run-x", "--messages", "0"], url=sql_url)).stdout
    assert "msg-" not in none and "run_id: run-x" in none


def test_show_json(sql_url: str) -> None:
    run = _seed_show(sql_url)
    sub = json_doc(ok(invoke(["show", "run-x", "--json", "--messages", "2"], url=sql_url)))
    group = json_doc(ok(invoke(["--json", "show", "run-x", "--messages", "2"], url=sql_url)))
    assert sub == group
    assert set(sub) == SHOW_KEYS
    assert set(sub["meta"]) == META_KEYS
    assert sub["run_id"] == "run-x"
    assert sub["meta"]["agent_id"] == "agent-a"
    assert sub["meta"]["prompt"] == "Summarise the report"
    assert sub["meta"]["guild_id"] is None
    assert sub["status"] == "dead"
    assert sub["last_error"] == "tool exploded: KeyError('x')"
    assert sub["iteration"] == 9
    assert sub["completed_phases"] == ["plan", "research"]
    assert sub["message_count"] == 7
    assert sub["attempts"] == 3
    assert sub["messages"] == MESSAGES[-2:]
    assert datetime.fromisoformat(sub["updated_at"]) == run.updated_at
    assert datetime.fromisoformat(sub["created_at"]) == run.created_at

    for n in (0, 1, 7, 50):
        doc = json_doc(ok(invoke(["show", "run-x", "--json", "--messages", str(n)], sql_url)))
        assert doc["messages"] == (MESSAGES[-n:] if n else []), n


def test_show_unknown_run(sql_url: str) -> None:
    seed(sql_url, cp("run-1"))
    for args in (["show", "ghost-run"], ["--json", "show", "ghost-run"]):
        result = failed(invoke(args, url=sql_url), 1)
        line = one_error_line(result)
        assert "ghost-run" in line
        assert result.stdout == ""


# -- delete and requeue ------------------------------------------------------------------------


def test_delete_runs(sql_url: str) -> None:
    seed(sql_url, cp("run-1"), cp("run-2"), cp("run-3"), dead=["run-2"])
    out = ok(invoke(["delete", "run-1", "run-2"], url=sql_url)).stdout
    assert "deleted run-1" in out and "deleted run-2" in out
    assert load(sql_url, "run-1") is None
    assert load(sql_url, "run-2") is None
    assert stored_ids(sql_url) == {"run-3"}


def test_delete_unknown_run(sql_url: str) -> None:
    seed(sql_url, cp("run-1"), cp("run-2"))
    result = failed(invoke(["delete", "ghost"], url=sql_url), 1)
    assert "ghost" in result.output
    assert stored_ids(sql_url) == {"run-1", "run-2"}

    mixed = failed(invoke(["delete", "run-1", "ghost", "--json"], url=sql_url), 1)
    assert json_doc(mixed) == {"deleted": ["run-1"], "not_found": ["ghost"]}
    assert stored_ids(sql_url) == {"run-2"}


def test_requeue_dead_run(sql_url: str) -> None:
    seed(sql_url, cp("run-d", attempts=3), cp("run-a"), dead={"run-d": "over budget"})
    before = load(sql_url, "run-d")
    assert before is not None and before.status is CheckpointStatus.DEAD and before.attempts == 3
    out = ok(invoke(["requeue", "run-d"], url=sql_url)).stdout
    assert "requeued run-d" in out
    after = load(sql_url, "run-d")
    assert after is not None
    assert after.status is CheckpointStatus.ACTIVE
    assert after.attempts == 0
    assert after.messages == before.messages
    listed = {d["run_id"] for d in json_lines(ok(invoke(["list", "--json"], url=sql_url)))}
    assert listed == {"run-a", "run-d"}


def test_requeue_active_or_unknown_run(sql_url: str) -> None:
    seed(sql_url, cp("run-a", attempts=2), cp("run-d"), dead=["run-d"])
    result = failed(invoke(["requeue", "run-a"], url=sql_url), 1)
    assert "run-a" in result.output
    active = load(sql_url, "run-a")
    assert active is not None and active.status is CheckpointStatus.ACTIVE
    assert active.attempts == 2  # untouched
    failed(invoke(["requeue", "ghost"], url=sql_url), 1)
    assert load(sql_url, "ghost") is None

    mixed = failed(invoke(["requeue", "--json", "run-d", "run-a"], url=sql_url), 1)
    assert json_doc(mixed) == {"requeued": ["run-d"], "not_found": ["run-a"]}
    requeued = load(sql_url, "run-d")
    assert requeued is not None and requeued.status is CheckpointStatus.ACTIVE


# -- purge -------------------------------------------------------------------------------------


def _seed_purge(url: str) -> None:
    seed(
        url,
        cp("old-dead-1", updated=ago(hours=3)),
        cp("old-dead-2", updated=ago(hours=2)),
        cp("old-dead-3", updated=ago(minutes=90)),
        cp("fresh-dead", updated=ago(minutes=5)),
        cp("old-active", updated=ago(hours=5)),
        cp("fresh-active", updated=ago(seconds=10)),
        dead=["old-dead-1", "old-dead-2", "old-dead-3", "fresh-dead"],
    )


ALL_PURGE_IDS = {
    "old-dead-1",
    "old-dead-2",
    "old-dead-3",
    "fresh-dead",
    "old-active",
    "fresh-active",
}


def test_purge_dry_run_leaves_rows(sql_url: str) -> None:
    _seed_purge(sql_url)
    out = ok(invoke(["purge", "--older-than", "1h", "--dry-run"], url=sql_url)).stdout
    assert "would delete 3" in out
    assert stored_ids(sql_url) == ALL_PURGE_IDS
    doc = json_doc(ok(invoke(["purge", "--older-than", "1h", "--dry-run", "--json"], sql_url)))
    assert doc == {"dry_run": True, "would_delete": 3}
    doc = json_doc(
        ok(
            invoke(
                ["--json", "purge", "--older-than", "1h", "--status", "all", "--dry-run"], sql_url
            )
        )
    )
    assert doc == {"dry_run": True, "would_delete": 4}
    doc = json_doc(
        ok(
            invoke(
                ["purge", "--older-than", "1h", "--status", "active", "--dry-run", "--json"],
                sql_url,
            )
        )
    )
    assert doc == {"dry_run": True, "would_delete": 1}
    # --dry-run wins over --yes
    ok(invoke(["purge", "--older-than", "1h", "--dry-run", "--yes"], url=sql_url))
    assert stored_ids(sql_url) == ALL_PURGE_IDS


def test_purge_without_yes_off_terminal_refuses(sql_url: str) -> None:
    _seed_purge(sql_url)
    for input_ in (None, "y\n"):
        result = failed(invoke(["purge", "--older-than", "1h"], url=sql_url, input=input_), 2)
        assert "--yes" in usage_error_line(result)
    assert stored_ids(sql_url) == ALL_PURGE_IDS


def test_purge_deletes_only_old_runs_of_the_status(sql_url: str) -> None:
    _seed_purge(sql_url)
    args = ["purge", "--older-than", "1h", "--status", "dead", "--yes"]
    out = ok(invoke(args, url=sql_url)).stdout
    assert "deleted 3" in out
    assert stored_ids(sql_url) == {"fresh-dead", "old-active", "fresh-active"}
    # Nothing left to do: a second run deletes nothing.
    assert "deleted 0" in ok(invoke(args, url=sql_url)).stdout


def test_purge_json_all_statuses_in_small_batches(sql_url: str) -> None:
    _seed_purge(sql_url)
    args = ["purge", "--older-than", "1h", "--status", "all", "--yes", "--batch-size", "1"]
    doc = json_doc(ok(invoke(["--json", *args], url=sql_url)))
    assert doc == {"dry_run": False, "deleted": 4}
    assert stored_ids(sql_url) == {"fresh-dead", "fresh-active"}
    doc = json_doc(
        ok(
            invoke(
                ["purge", "--older-than", "1s", "--status", "active", "--yes", "--json"], sql_url
            )
        )
    )
    assert doc == {"dry_run": False, "deleted": 1}
    assert stored_ids(sql_url) == {"fresh-dead"}


def test_malformed_duration_is_a_usage_error(sql_url: str) -> None:
    _seed_purge(sql_url)
    for duration in ("5x", "abc", "", "-1h", "1.5.2h", "h"):
        for args in (
            ["purge", "--older-than", duration, "--yes"],
            ["purge", "--older-than", duration, "--dry-run"],
            ["list", "--older-than", duration],
        ):
            result = failed(invoke(args, url=sql_url), 2)
            assert "--older-than" in result.stderr, args
            assert result.stdout == "", args
    assert stored_ids(sql_url) == ALL_PURGE_IDS


# -- stats -------------------------------------------------------------------------------------


def _seed_stats(url: str) -> None:
    seed(
        url,
        cp("run-a1", agent="agent-a", updated=ago(hours=2), messages=[{"c": "x" * 2000}]),
        cp("run-a2", agent="agent-a", updated=ago(hours=1)),
        cp("run-b1", agent="agent-b", updated=ago(hours=5)),
        cp("run-n1", agent=None, updated=ago(minutes=3), messages=[]),
        dead=["run-b1"],
    )


def test_stats_json(sql_url: str) -> None:
    _seed_stats(sql_url)
    sub = json_doc(ok(invoke(["stats", "--json"], url=sql_url)))
    assert json_doc(ok(invoke(["--json", "stats"], url=sql_url))) == sub
    assert set(sub) == STATS_KEYS
    assert sub["total"] == 4
    assert sub["by_status"] == {"active": 3, "dead": 1}
    assert sub["by_agent"] == {"agent-a": 2, "agent-b": 1, "": 1}
    stored = sizes(sql_url)
    assert sub["total_size_bytes"] == sum(stored.values())
    assert sub["largest_run_id"] == "run-a1"
    assert sub["largest_size_bytes"] == stored["run-a1"] > 2000
    # The dead run-b1 is older but is not interrupted.
    assert sub["oldest_interrupted_run_id"] == "run-a1"
    oldest = load(sql_url, "run-a1")
    assert oldest is not None
    assert datetime.fromisoformat(sub["oldest_interrupted_at"]) == oldest.updated_at


def test_stats_human(sql_url: str) -> None:
    _seed_stats(sql_url)
    out = ok(invoke(["stats"], url=sql_url)).stdout
    assert "checkpoints: 4" in out
    assert "active 3" in out and "dead 1" in out
    assert "agent agent-a: 2" in out
    assert "agent agent-b: 1" in out
    assert "agent -: 1" in out
    assert "largest" in out and "(run-a1)" in out
    assert "oldest interrupted: run-a1" in out


# -- schema: current and migrate ---------------------------------------------------------------


def test_empty_database(sql_url: str) -> None:
    """A migrated, empty database: nothing listed, zero stats, schema up to date."""
    result = ok(invoke(["list"], url=sql_url))
    assert "no checkpoints match" in result.stdout
    assert ok(invoke(["list", "--json"], url=sql_url)).stdout == ""
    assert "no checkpoints match" in ok(invoke(["list", "--status", "all"], url=sql_url)).stdout
    doc = json_doc(ok(invoke(["stats", "--json"], url=sql_url)))
    assert doc == {
        "total": 0,
        "by_status": {},
        "by_agent": {},
        "total_size_bytes": 0,
        "largest_size_bytes": 0,
        "largest_run_id": None,
        "oldest_interrupted_run_id": None,
        "oldest_interrupted_at": None,
    }
    out = ok(invoke(["stats"], url=sql_url)).stdout
    assert "checkpoints: 0" in out and "oldest interrupted: none" in out
    out = ok(invoke(["current"], url=sql_url)).stdout
    assert f"found: {REQUIRED_REVISION}" in out
    assert f"required: {REQUIRED_REVISION}" in out
    assert "up to date" in out
    doc = json_doc(ok(invoke(["current", "--json"], url=sql_url)))
    assert doc == {"found": REQUIRED_REVISION, "required": REQUIRED_REVISION, "up_to_date": True}
    purge = ["purge", "--older-than", "0s", "--status", "all", "--yes", "--json"]
    assert json_doc(ok(invoke(purge, url=sql_url))) == {"dry_run": False, "deleted": 0}


def test_current_on_unmigrated_database(empty_sql_url: str) -> None:
    result = failed(invoke(["current"], url=empty_sql_url), 1)
    assert "found: none" in result.stdout
    assert f"required: {REQUIRED_REVISION}" in result.stdout
    assert "executus-ckpt migrate" in result.stdout
    doc = json_doc(failed(invoke(["--json", "current"], url=empty_sql_url), 1))
    assert doc == {"found": None, "required": REQUIRED_REVISION, "up_to_date": False}


def test_migrate_then_current(empty_sql_url: str) -> None:
    out = ok(invoke(["migrate"], url=empty_sql_url)).stdout
    assert f"revision {REQUIRED_REVISION}" in out and "was empty" in out
    assert "up to date" in ok(invoke(["current"], url=empty_sql_url)).stdout
    again = json_doc(ok(invoke(["migrate", "--json"], url=empty_sql_url)))
    assert again["from"] == again["to"] == REQUIRED_REVISION
    assert set(again) == {"url", "from", "to"}
    assert "no checkpoints match" in ok(invoke(["list"], url=empty_sql_url)).stdout
    # Down to nothing and back: current follows.
    down = json_doc(ok(invoke(["--json", "migrate", "--revision", "base"], url=empty_sql_url)))
    assert down["from"] == REQUIRED_REVISION and down["to"] is None
    failed(invoke(["current"], url=empty_sql_url), 1)
    ok(invoke(["migrate"], url=empty_sql_url))
    ok(invoke(["current"], url=empty_sql_url))


UNMIGRATED_COMMANDS = [
    ["list"],
    ["list", "--json"],
    ["show", "run-1"],
    ["delete", "run-1"],
    ["requeue", "run-1"],
    ["purge", "--older-than", "1d", "--yes"],
    ["purge", "--older-than", "1d", "--dry-run"],
    ["stats"],
]


def test_unmigrated_database_is_refused(empty_sql_url: str) -> None:
    for args in UNMIGRATED_COMMANDS:
        result = failed(invoke(args, url=empty_sql_url), 1)
        line = one_error_line(result)
        assert "executus-ckpt migrate" in line, args
        assert REQUIRED_REVISION in line, args
        assert result.stdout == "", args
    # None of them created the schema behind the operator's back.
    failed(invoke(["current"], url=empty_sql_url), 1)


def test_unmigrated_error_names_a_command_that_works(empty_sql_url: str) -> None:
    """The fix the error line names, run exactly as printed, migrates the database."""
    line = one_error_line(failed(invoke(["list"], url=empty_sql_url), 1))
    commands = [part for i, part in enumerate(line.split("`")) if i % 2 == 1]
    fix = next((c for c in commands if c.startswith("executus-ckpt ")), None)
    assert fix is not None, f"no `executus-ckpt ...` command in {line!r}"
    argv = shlex.split(fix)[1:]
    result = invoke(argv)  # no --url of ours: the printed command must carry the URL itself
    assert result.exit_code == 0, f"the suggested fix `{fix}` failed:\n{_describe(result)}"
    ok(invoke(["current"], url=empty_sql_url))
    assert "no checkpoints match" in ok(invoke(["list"], url=empty_sql_url)).stdout


def stamp(url: str, revision: str, *, oldest_compatible: str | None = None) -> None:
    """Mark the database as migrated to ``revision`` (as another release would have), whose
    schema is usable by releases requiring ``oldest_compatible`` or later (default:
    ``revision`` itself, so no older release may use it)."""

    async def go() -> None:
        engine = create_async_engine(url)
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    text(f"UPDATE {VERSION_TABLE} SET version_num = :r"), {"r": revision}
                )
                await conn.execute(
                    text(f"UPDATE {schema_info.name} SET value = :v WHERE name = :k"),
                    {"v": oldest_compatible or revision, "k": OLDEST_COMPATIBLE_KEY},
                )
        finally:
            await engine.dispose()

    asyncio.run(go())


def test_schema_of_a_newer_release_names_the_upgrade(sql_url: str) -> None:
    """Issue 10 item 8: one line, exit 1, and the fix that works (not `migrate`)."""
    stamp(sql_url, "9999")
    for args in (["migrate"], ["migrate", "--revision", "base"], ["list"], ["stats"]):
        line = one_error_line(failed(invoke(args, url=sql_url), 1))
        assert "9999" in line and REQUIRED_REVISION in line, args
        assert "upgrade executus-ckpt" in line.lower(), args
        assert "executus-ckpt migrate" not in line, args
    result = failed(invoke(["current"], url=sql_url), 1)
    assert "found: 9999" in result.stdout
    assert "upgrade executus-ckpt" in result.stdout.lower()
    assert "executus-ckpt migrate" not in result.stdout
    doc = json_doc(failed(invoke(["current", "--json"], url=sql_url), 1))
    assert doc == {
        "found": "9999",
        "required": REQUIRED_REVISION,
        "up_to_date": False,
        "compatible": False,
    }


def test_schema_of_a_newer_compatible_release_is_used(sql_url: str) -> None:
    """A rolling deploy: a newer release migrated, declaring its schema usable by this one."""
    seed(sql_url, cp("run-1"))
    stamp(sql_url, "9999", oldest_compatible=REQUIRED_REVISION)
    assert "run-1" in ok(invoke(["list"], url=sql_url)).stdout
    assert json_doc(ok(invoke(["stats", "--json"], url=sql_url)))["total"] == 1
    assert "usable as is" in ok(invoke(["current"], url=sql_url)).stdout


@pytest.mark.parametrize("revision", ["nonsense", "heads", ""])
def test_migrate_to_an_unknown_revision_is_a_usage_error(empty_sql_url: str, revision: str) -> None:
    result = failed(invoke(["migrate", "--revision", revision], url=empty_sql_url), 2)
    line = usage_error_line(result)
    assert repr(revision) in line and "head" in line and REQUIRED_REVISION in line
    assert result.stdout == ""
    failed(invoke(["current"], url=empty_sql_url), 1)  # nothing was migrated


# -- the database URL and passwords ------------------------------------------------------------


def test_url_from_environment(sql_url: str) -> None:
    seed(sql_url, cp("run-env"))
    result = ok(invoke(["list", "--json"], env={ENV_DATABASE_URL: sql_url}))
    assert [d["run_id"] for d in json_lines(result)] == ["run-env"]
    assert "up to date" in ok(invoke(["current"], env={ENV_DATABASE_URL: sql_url})).stdout
    # --url wins over the environment.
    result = ok(invoke(["list", "--json"], url=sql_url, env={ENV_DATABASE_URL: UNREACHABLE}))
    assert [d["run_id"] for d in json_lines(result)] == ["run-env"]


def test_default_url_is_the_embedded_sqlite_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    failed(invoke(["current"]), 1)
    ok(invoke(["migrate"]))
    assert (tmp_path / "executus_ckpt.db").is_file()
    assert "no checkpoints match" in ok(invoke(["list"])).stdout


ALL_COMMANDS = [
    ["list"],
    ["list", "--json"],
    ["show", "run-1"],
    ["delete", "run-1"],
    ["requeue", "run-1"],
    ["purge", "--older-than", "1d", "--yes"],
    ["purge", "--older-than", "1d", "--dry-run"],
    ["stats"],
    ["current"],
    ["migrate"],
    ["migrate", "--json"],
]


UNREACHABLE_URLS = {
    # (url, what the error line names)
    "postgres": (UNREACHABLE, "127.0.0.1:1"),
    "sqlite": (
        "sqlite+aiosqlite:////nonexistent-executus-dir/sub/ckpt.db",
        "nonexistent-executus-dir",
    ),
}


@contextmanager
def thread_errors() -> Iterator[list[str]]:
    """Collect exceptions raised in threads started meanwhile (joined before leaving).

    An expected failure must not leave a driver thread behind that dies with a traceback
    once the CLI's event loop is closed (the operator would see it on stderr).
    """
    errors: list[str] = []
    before = set(threading.enumerate())
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread is not None else "?"
        errors.append(f"{name}: {args.exc_type.__name__}: {args.exc_value}")

    threading.excepthook = hook
    try:
        yield errors
    finally:
        for thread in set(threading.enumerate()) - before:
            thread.join(timeout=10)
        threading.excepthook = previous


@pytest.mark.parametrize("args", ALL_COMMANDS, ids=lambda a: "-".join(a).replace("--", ""))
@pytest.mark.parametrize("backend", list(UNREACHABLE_URLS))
def test_unreachable_database(
    backend: str, args: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    url, named = UNREACHABLE_URLS[backend]
    caplog.set_level(logging.DEBUG)
    with thread_errors() as errors:
        result = invoke(["-vv", "--url", url, *args])
        assert_no_secret(result, caplog.records)
        failed(result, 1)
        line = one_error_line(result)
        assert named in line
        assert result.stdout == ""
        # The same through the environment variable, a few times (a thread race shows late).
        for _ in range(3):
            caplog.clear()
            result = invoke(args, env={ENV_DATABASE_URL: url})
            assert_no_secret(result, caplog.records)
            failed(result, 1)
            assert one_error_line(result) == line
    assert errors == [], "a driver thread died after the command returned"


@pytest.mark.parametrize("backend", ["postgres"])
def test_password_masked_on_reachable_postgres(
    backend: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    """The server trusts the connection, so a (fake) password in the URL is accepted and unused."""
    url = str(request.getfixturevalue("pg_url"))
    secret_url = with_password(url)
    seed(url, cp("run-1", updated=ago(hours=3)), cp("run-2"), dead=["run-1"])
    caplog.set_level(logging.DEBUG)
    for args in (
        ["list"],
        ["list", "--json", "--status", "all"],
        ["show", "run-1"],
        ["stats", "--json"],
        ["current"],
        ["current", "--json"],
        ["migrate"],
        ["migrate", "--json"],
        ["purge", "--older-than", "1h", "--dry-run"],
        ["requeue", "run-1"],
    ):
        result = invoke(["-vv", *args], url=secret_url)
        assert_no_secret(result, caplog.records)
        ok(result)
        caplog.clear()
    migrate_doc = json_doc(ok(invoke(["migrate", "--json"], url=secret_url)))
    assert "***" in migrate_doc["url"]
    for args, code in (
        (["show", "ghost"], 1),
        (["delete", "ghost"], 1),
        (["requeue", "run-2"], 1),
        (["purge", "--older-than", "1h"], 2),
    ):
        result = invoke(["-vv", *args], url=secret_url)
        assert_no_secret(result, caplog.records)
        failed(result, code)
        caplog.clear()
    # A database that does not exist on a reachable server.
    missing = make_url(secret_url).set(database="no_such_db_here")
    result = invoke(["-vv", "list"], url=missing.render_as_string(hide_password=False))
    assert_no_secret(result, caplog.records)
    failed(result, 1)
    assert "***" in one_error_line(result)


@pytest.mark.parametrize("backend", ["postgres"])
def test_password_masked_on_unmigrated_postgres(
    backend: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    secret_url = with_password(str(request.getfixturevalue("pg_empty_url")))
    caplog.set_level(logging.DEBUG)
    for args in (["list"], ["stats"], ["current"]):
        result = invoke(["-vv", *args], url=secret_url)
        assert_no_secret(result, caplog.records)
        failed(result, 1)
        caplog.clear()
    line = one_error_line(failed(invoke(["list"], url=secret_url), 1))
    assert "***" in line and "executus-ckpt migrate" in line
    result = invoke(["-vv", "migrate"], url=secret_url)
    assert_no_secret(result, caplog.records)
    ok(result)


# -- usage errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["list", "--bogus"],
        ["--bogus", "list"],
        ["nosuchcommand"],
        ["show"],
        ["delete"],
        ["requeue"],
        ["purge"],
        ["purge", "--yes"],
        ["list", "--status", "zombie"],
        ["purge", "--older-than", "1d", "--status", "zombie", "--yes"],
        ["list", "--limit", "0"],
        ["list", "--limit", "many"],
        ["show", "run-1", "--messages", "-1"],
        ["purge", "--older-than", "1d", "--batch-size", "0", "--yes"],
    ],
    ids=lambda a: "-".join(a).replace("--", "") or "none",
)
def test_usage_error_exits_2(args: list[str], tmp_path: Path) -> None:
    db = tmp_path / "never.db"
    result = failed(invoke(args, url=f"sqlite+aiosqlite:///{db}"), 2)
    assert result.stdout == ""
    assert result.stderr.strip()
    assert not db.exists(), "a usage error must not touch the database"


def test_malformed_url_is_a_usage_error() -> None:
    result = failed(invoke(["list"], url="not a url at all"), 2)
    assert "malformed" in usage_error_line(result)


MALFORMED_URLS = {
    "bad-port": "postgresql+asyncpg://u@h:notaport/db",
    "bad-ipv6-host": "postgresql+asyncpg://u@[::1/db",
    "port-out-of-range": "postgresql+asyncpg://u@127.0.0.1:99999/db",
    "negative-port": "postgresql+asyncpg://u@127.0.0.1:-1/db",
}


@pytest.mark.parametrize("url", list(MALFORMED_URLS.values()), ids=list(MALFORMED_URLS))
@pytest.mark.parametrize(
    "args", [["list"], ["current"], ["migrate"], ["stats", "--json"]], ids="-".join
)
def test_malformed_url_is_one_error_line_and_exit_2(url: str, args: list[str]) -> None:
    """Issue 10 item 11: a bad port or IPv6 host printed a ValueError traceback."""
    for result in (
        invoke(args, url=url),
        invoke(args, env={ENV_DATABASE_URL: url}),
        invoke([*args, "--url", url]),
    ):
        failed(result, 2)
        line = usage_error_line(result)
        assert "malformed" in line and "--url" in line, _describe(result)
        assert result.stdout == ""


@contextmanager
def black_hole() -> Iterator[int]:
    """A TCP port on 127.0.0.1 that accepts connections and never answers (a frozen server).

    The socket listens but is never read: the kernel completes each handshake into the
    backlog, the client's startup message goes nowhere, and no byte ever comes back.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize("args", [["list"], ["current"], ["migrate"], ["stats"]], ids="-".join)
def test_unanswering_database_fails_within_the_timeout(args: list[str]) -> None:
    """Issue 10 item 6: the CLI gave up after 62 s ("CancelledError"); now after --timeout."""
    with black_hole() as port, thread_errors() as errors:
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{port}/x"
        for how in ("option", "env"):
            started = time.monotonic()
            if how == "option":
                result = invoke(["--timeout", "2", *args], url=url)
            else:
                result = invoke(args, url=url, env={ENV_TIMEOUT: "2"})
            elapsed = time.monotonic() - started
            failed(result, 1)
            line = one_error_line(result)
            assert "unavailable" in line and f"127.0.0.1:{port}" in line, line
            assert elapsed < 5, f"{how}: took {elapsed:.1f}s with a 2 s timeout"
    assert errors == []


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_bad_timeout_is_a_usage_error(value: str, tmp_path: Path) -> None:
    db = tmp_path / "never.db"
    failed(invoke(["--timeout", value, "list"], url=f"sqlite+aiosqlite:///{db}"), 2)
    assert not db.exists()


def test_help_lists_every_command() -> None:
    out = ok(invoke(["--help"])).stdout
    for command in (
        "migrate",
        "current",
        "list",
        "show",
        "delete",
        "requeue",
        "purge",
        "stats",
        "executors",
        "demo",
    ):
        assert command in out
