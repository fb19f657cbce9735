"""Revision 0003 over real rows written under 0002, up and down; and a rolling deploy.

Rows are written with the 0002 columns (frozen Core tables below, as the 0002 store wrote
them: a header plus one row per message in ``run_checkpoint_messages``), then the schema is
upgraded to head: every row loads and resumes from its whole transcript (no boundary was
recorded: legacy), its inputs are only its prompt; a save that completes a new phase records a
boundary. Downgrading to 0002 turns a ``failed`` run into ``dead`` and keeps every transcript;
upgrading again works. Both backends.

Rolling deploy: the store code of the previous release (commit 56556f1, REQUIRED_REVISION
0002, checked out in a git worktree) runs in a child process against a database migrated to
head, saving, loading and claiming (DESIGN: "a replica of the previous release keeps running
against a database migrated by the next one").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from executus_ckpt import (
    CheckpointStatus,
    RunCheckpointState,
    RunInfo,
    SchemaOutOfDateError,
    SQLCheckpointStore,
    StoreCheckpointerFactory,
    migrate,
)

REPO = Path(__file__).resolve().parents[2]
PREVIOUS_RELEASE = "56556f1"
PREVIOUS_REVISION = "dff9d67"  # schema 0004: the code this session's 0005 expanded
"""A commit before 0003 (its library requires revision 0002)."""

_meta = sa.MetaData()
V2 = sa.Table(
    "run_checkpoints",
    _meta,
    sa.Column("run_id", sa.String(255), primary_key=True),
    sa.Column("agent_id", sa.String(255)),
    sa.Column("agent_name", sa.String(255)),
    sa.Column("caller_id", sa.String(255)),
    sa.Column("channel_id", sa.String(255)),
    sa.Column("guild_id", sa.String(255)),
    sa.Column("prompt", sa.Text),
    sa.Column("model_tier", sa.String(255)),
    sa.Column("parent_run_id", sa.String(255)),
    sa.Column("message_count", sa.Integer),
    sa.Column("size_bytes", sa.BigInteger),
    sa.Column("iteration", sa.Integer),
    sa.Column("completed_phases", sa.LargeBinary),
    sa.Column("status", sa.String(16)),
    sa.Column("attempts", sa.Integer),
    sa.Column("last_error", sa.Text),
    sa.Column("app_version", sa.String(255)),
    sa.Column("owner", sa.String(255)),
    sa.Column("epoch", sa.BigInteger),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
)
V2_MESSAGES = sa.Table(
    "run_checkpoint_messages",
    _meta,
    sa.Column("run_id", sa.String(255), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("data", sa.LargeBinary),
)
ROWS = 24
PHASES = ("plan", "research", "write")


def transcript(i: int) -> list[Any]:
    """A mid-phase transcript: a tool call without its result at the end, for odd ``i``."""
    msgs: list[Any] = [{"role": "user", "content": f"prompt {i} ✓ 日本語"}]
    for k in range(i % 5):
        msgs.append({"role": "assistant", "n": k, "ok": 1, "x": 0.0, "data": [1.5, None, True]})
    if i % 2:
        msgs.append({"role": "assistant", "tool_calls": [{"id": f"call-{i}", "name": "search"}]})
    return msgs


def phases(i: int) -> list[str]:
    return list(PHASES[: i % 3])


def prompt(i: int) -> str | None:
    return None if i % 6 == 5 else f"prompt {i}"


def status(i: int) -> str:
    return "dead" if i % 8 == 7 else "active"


async def _write_0002_rows(url: str) -> None:
    sqlite = url.startswith("sqlite")
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    stamp = now.replace(tzinfo=None) if sqlite else now
    headers, bodies = [], []
    for i in range(ROWS):
        encoded = [orjson.dumps(m) for m in transcript(i)]
        run_id = f"run-{i:03d}"
        headers.append(
            {
                "run_id": run_id,
                "agent_id": "agent",
                "agent_name": "Researcher",
                "caller_id": None,
                "channel_id": "chan",
                "guild_id": None,
                "prompt": prompt(i),
                "model_tier": "large",
                "parent_run_id": None,
                "message_count": len(encoded),
                "size_bytes": sum(len(e) for e in encoded),
                "iteration": i,
                "completed_phases": orjson.dumps(phases(i)),
                "status": status(i),
                "attempts": i % 3,
                "last_error": "over budget" if status(i) == "dead" else None,
                "app_version": "v1",
                "owner": "boot-1",
                "epoch": i % 4,
                "created_at": stamp,
                "updated_at": stamp,
            }
        )
        bodies += [{"run_id": run_id, "seq": s, "data": e} for s, e in enumerate(encoded)]
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(V2.insert(), headers)
            await conn.execute(V2_MESSAGES.insert(), bodies)
    finally:
        await engine.dispose()


async def _check_legacy_rows(store: SQLCheckpointStore, skip: set[str]) -> None:
    """Every 0002 row loads and resumes from its whole transcript."""
    for i in range(ROWS):
        run_id = f"run-{i:03d}"
        if run_id in skip:
            continue
        cp = await store.load(run_id)
        assert cp is not None, run_id
        assert list(cp.messages) == transcript(i), run_id
        assert (cp.iteration, list(cp.completed_phases)) == (i, phases(i)), run_id
        assert str(cp.status) == status(i), run_id
        assert (cp.attempts, cp.epoch) == (i % 3, i % 4), run_id
        assert cp.boundary_message_count is None and cp.extra is None, run_id
        resume = cp.resume_state()
        assert list(resume.messages) == transcript(i), run_id
        assert resume.iteration == i and list(resume.completed_phases) == phases(i), run_id
        assert list(resume.interrupted_tail) == [] and resume.extra is None, run_id
        info = cp.run_info()
        assert dict(info.inputs) == ({} if prompt(i) is None else {"prompt": prompt(i)}), run_id
        assert (info.subject_id, info.name, info.channel_id) == ("agent", "Researcher", "chan")


async def _read_0002_rows(url: str) -> dict[str, tuple[str, list[Any]]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            heads = (await conn.execute(sa.select(V2.c.run_id, V2.c.status))).all()
            msgs = (
                await conn.execute(
                    sa.select(V2_MESSAGES.c.run_id, V2_MESSAGES.c.data).order_by(
                        V2_MESSAGES.c.run_id, V2_MESSAGES.c.seq
                    )
                )
            ).all()
    finally:
        await engine.dispose()
    found: dict[str, tuple[str, list[Any]]] = {run_id: (st, []) for run_id, st in heads}
    for run_id, data in msgs:
        found[run_id][1].append(orjson.loads(data))
    return found


@pytest.mark.timeout(120)
async def test_0002_rows_upgrade_resume_and_downgrade(empty_sql_url: str) -> None:
    url = empty_sql_url
    await migrate(url, "0002")
    await _write_0002_rows(url)
    await migrate(url)  # 0002 -> head

    async with SQLCheckpointStore.open(url) as store:
        await _check_legacy_rows(store, skip=set())
        summaries = {s.run_id: s async for s in store.iter_summaries(status=None)}
        assert len(summaries) == ROWS
        assert all(s.boundary_message_count is None for s in summaries.values())

        # A recovered legacy run (one completed phase, a dangling tool call) resumes from its
        # whole transcript; its next save that completes a phase records a boundary.
        legacy = await store.load("run-001")
        assert legacy is not None
        resume = legacy.resume_state()
        factory = StoreCheckpointerFactory(store, throttle=0)
        cp = await factory.begin(legacy.run_info())
        tool_result = {"role": "tool", "tool_call_id": "call-1", "content": "r"}
        messages: list[Any] = [*resume.messages, tool_result]
        completed = [*resume.completed_phases, "research"]
        await cp.save(RunCheckpointState(messages, 2, completed, {"tokens": 12}))
        partial: list[Any] = [*messages, {"role": "assistant", "tool_calls": [{"id": "call-x"}]}]
        await cp.save(RunCheckpointState(partial, 3, completed, {"tokens": 20}))
        await cp.aclose()
        after = await store.load("run-001")
        assert after is not None
        assert after.boundary_message_count == len(messages)
        resumed = after.resume_state()
        assert list(resumed.messages) == messages
        assert (resumed.iteration, resumed.extra) == (2, {"tokens": 12})
        assert list(resumed.completed_phases) == ["plan", "research"]
        assert list(resumed.interrupted_tail) == [partial[-1]]
        assert after.run_info().inputs == {"prompt": "prompt 1"}

        # A legacy run saved again without a new phase records no boundary: it still resumes
        # from its whole (newest) transcript.
        legacy2 = await store.load("run-002")
        assert legacy2 is not None
        cp2 = await factory.begin(legacy2.run_info())
        grown: list[Any] = [*legacy2.messages, {"role": "assistant", "content": "more"}]
        await cp2.save(RunCheckpointState(grown, 3, list(legacy2.completed_phases)))
        await cp2.aclose()
        again = await store.load("run-002")
        assert again is not None and again.boundary_message_count is None
        assert list(again.resume_state().messages) == grown
        assert list(again.resume_state().interrupted_tail) == []

        # A run that failed terminally, kept (keep_failed=True).
        legacy4 = await store.load("run-004")
        assert legacy4 is not None
        failing = await StoreCheckpointerFactory(store, keep_failed=True).begin(legacy4.run_info())
        await failing.fail(ValueError("boom"))
        kept = await store.load("run-004")
        assert kept is not None and kept.status is CheckpointStatus.FAILED

    await migrate(url, "0002")  # head -> 0002
    back = await _read_0002_rows(url)
    assert len(back) == ROWS
    for i in range(ROWS):
        run_id = f"run-{i:03d}"
        st, msgs = back[run_id]
        if run_id == "run-004":
            assert st == "dead"  # failed is a status 0002 does not know
        else:
            assert st == status(i), run_id
        if run_id == "run-001":
            assert msgs == partial
        elif run_id == "run-002":
            assert msgs == grown
        else:
            assert msgs == transcript(i), run_id

    await migrate(url)  # 0002 -> head again: nothing lost, boundaries gone (legacy again)
    async with SQLCheckpointStore.open(url) as store:
        await _check_legacy_rows(store, skip={"run-001", "run-002", "run-004"})
        again1 = await store.load("run-001")
        assert again1 is not None and again1.boundary_message_count is None
        assert list(again1.resume_state().messages) == partial
        dead4 = await store.load("run-004")
        assert dead4 is not None and dead4.status is CheckpointStatus.DEAD
        assert dead4.last_error == "ValueError: boom"
        assert await store.count() == ROWS


# -- rolling deploy: the previous release's store against head ---------------------------------


@contextlib.contextmanager
def _worktree(revision: str) -> Iterator[Path]:
    """The package at ``revision`` in a git worktree, removed at the end."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout of the repository")
    path = Path(tempfile.mkdtemp(prefix="executus_ckpt_prev_")) / "tree"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(path), revision],
        check=True,
        capture_output=True,
    )
    try:
        yield path
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)],
            capture_output=True,
        )
        shutil.rmtree(path.parent, ignore_errors=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], capture_output=True)


@pytest.fixture(scope="session")
def previous_release() -> Iterator[Path]:
    """The last landed release (schema 0002): it predates the compatibility mark."""
    with _worktree(PREVIOUS_RELEASE) as tree:
        yield tree


@pytest.fixture(scope="session")
def previous_revision() -> Iterator[Path]:
    """The code of the previous schema revision (0004), which reads the compatibility mark."""
    with _worktree(PREVIOUS_REVISION) as tree:
        yield tree


async def _previous_release_child(tree: Path, url: str, run_id: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO / "tests" / "migration" / "prev_release_child.py"),
        url,
        run_id,
        cwd=tempfile.gettempdir(),  # not the repo: the package must come from ``tree``
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(tree), "PYTHONASYNCIODEBUG": "0"},
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    lines = out.decode().splitlines()
    assert lines, err.decode()[-2000:]
    doc: dict[str, Any] = json.loads(lines[-1])
    assert str(doc["module"]).startswith(f"{tree}{os.sep}"), doc
    return doc


@pytest.mark.xfail(
    strict=True,
    raises=SchemaOutOfDateError,
    reason="issue 12 item 5: accept newer compatible revisions",
)
@pytest.mark.timeout(120)
async def test_previous_release_store_keeps_working_on_head(
    sql_url: str, previous_release: Path
) -> None:
    await _previous_code_round(sql_url, previous_release)


@pytest.mark.timeout(120)
async def test_previous_revision_store_keeps_working_on_head(
    sql_url: str, previous_revision: Path
) -> None:
    """A rolling deploy across 0005: replicas still running the 0004 code (which reads the
    compatibility mark) keep working on a database the new code migrated."""
    await _previous_code_round(sql_url, previous_revision)


async def _previous_code_round(sql_url: str, tree: Path) -> None:
    # A run the new code wrote, with a boundary, extra and inputs.
    async with SQLCheckpointStore.open(sql_url) as store:
        cp = await StoreCheckpointerFactory(store, throttle=0).begin(
            RunInfo("new-run", inputs={"prompt": "p", "k": [1]})
        )
        await cp.save(RunCheckpointState([{"role": "user", "content": "p"}], 1, ["plan"], {"t": 1}))
        await cp.aclose()

    doc = await _previous_release_child(tree, sql_url, "new-run")
    if doc.get("refused") == "SchemaOutOfDateError":
        # What issue 12 item 5 is to fix: the previous release refuses a newer revision.
        raise SchemaOutOfDateError(doc["message"], required="0002")
    assert doc["ok"], doc
    assert doc["new_run_messages"] == [{"role": "user", "content": "p"}]
    assert doc["new_run_phases"] == ["plan"]

    # What the previous release wrote, the new code reads.
    async with SQLCheckpointStore.open(sql_url) as store:
        old = await store.load("old-run")
        assert old is not None
        assert list(old.messages) == [
            {"role": "user", "content": "old"},
            {"role": "assistant", "content": "step 2"},
        ]
        assert list(old.completed_phases) == ["plan"]
        # Written without boundaries: it resumes from its whole transcript.
        assert list(old.resume_state().messages) == list(old.messages)
        claimed = await store.load("new-run")
        assert claimed is not None and claimed.epoch > 0 and claimed.owner == "old-replica"
