"""The CLI on executors (issue 12 item 4): ``executors [--all]`` and owners in ``list``/``show``.

An :class:`Executor` runs in the test's event loop (its heartbeat has its own thread) while the
CLI, which calls ``asyncio.run`` itself, runs in a worker thread (``asyncio.to_thread``).
Both SQL backends.
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import fields, replace
from typing import Any

from click.testing import Result

from executus_ckpt import (
    Executor,
    ExecutorInfo,
    RunInfo,
    SQLCheckpointStore,
    StoreCheckpointerFactory,
)
from tests.cli.test_cli import cp, invoke, json_doc, json_lines, ok

EXECUTOR_KEYS = [f.name for f in fields(ExecutorInfo)]
SETTINGS: dict[str, Any] = {"heartbeat_interval": 0.2, "stale_after": 1.0, "sweep_interval": 0.1}


async def cli(url: str, *args: str) -> Result:
    """``executus-ckpt --url URL ARGS`` in a worker thread; it must succeed quietly."""
    return ok(await asyncio.to_thread(invoke, list(args), url))


def row_of(out: str, needle: str) -> list[str]:
    """The cells of the one table row containing ``needle`` (cells are 2+ spaces apart)."""
    rows = [line for line in out.splitlines() if needle in line]
    assert len(rows) == 1, out
    return [cell.strip() for cell in rows[0].split("  ") if cell.strip()]


def header_of(out: str) -> list[str]:
    return [cell.strip() for cell in out.splitlines()[0].split("  ") if cell.strip()]


async def test_executors_lists_running_then_stopped_executor(sql_url: str) -> None:
    async with SQLCheckpointStore.open(sql_url) as store:
        async with Executor(store, name="web-1", app_version="v7", **SETTINGS) as ex:
            factory = ex.factory()
            for run_id in ("run-a", "run-b"):
                await factory.begin(RunInfo(run_id, subject_id="agent-a"))

            out = (await cli(sql_url, "executors")).stdout
            assert header_of(out) == [
                "id",
                "name",
                "host",
                "pid",
                "app version",
                "heartbeat age",
                "runs owned",
                "state",
            ]
            cells = row_of(out, ex.id)
            assert cells[:5] == [ex.id, "web-1", socket.gethostname(), str(os.getpid()), "v7"]
            assert cells[5].endswith("s"), cells  # seconds by the database clock
            assert cells[6:] == ["2", "running"]
            assert out.splitlines()[-1] == "1 executor(s), 1 alive"

            for args in (("executors", "--json"), ("--json", "executors")):
                (doc,) = json_lines(await cli(sql_url, *args))
                assert list(doc) == EXECUTOR_KEYS
                assert doc["id"] == ex.id and doc["name"] == "web-1"
                assert doc["host"] == socket.gethostname() and doc["pid"] == os.getpid()
                assert doc["app_version"] == "v7"
                assert doc["state"] == "running" and doc["alive"] is True
                assert doc["runs_owned"] == 2
                assert doc["stale_after"] == 1.0
                assert 0 <= doc["heartbeat_age"] < 1.0

        # Left the block: deregistered (stopped), its runs released.
        out = (await cli(sql_url, "executors")).stdout
        assert ex.id not in out
        assert "no running executors" in out
        assert json_lines(await cli(sql_url, "executors", "--json")) == []

        out = (await cli(sql_url, "executors", "--all")).stdout
        cells = row_of(out, ex.id)
        assert cells[1] == "web-1" and cells[6:] == ["0", "stopped"]
        assert "stale" not in out
        assert out.splitlines()[-1] == "1 executor(s), 0 alive"

        (doc,) = json_lines(await cli(sql_url, "--json", "executors", "--all"))
        assert doc["id"] == ex.id
        assert doc["state"] == "stopped" and doc["alive"] is False and doc["runs_owned"] == 0


async def test_executors_lists_newest_first_with_several(sql_url: str) -> None:
    async with (
        SQLCheckpointStore.open(sql_url) as store,
        Executor(store, name="web-1", **SETTINGS) as first,
    ):
        async with Executor(store, name="web-2", **SETTINGS) as second:
            docs = json_lines(await cli(sql_url, "executors", "--json"))
            assert [d["id"] for d in docs] == [second.id, first.id]
            out = (await cli(sql_url, "executors")).stdout
            assert row_of(out, first.id)[-1] == "running"
            assert row_of(out, second.id)[-1] == "running"
            assert out.splitlines()[-1] == "2 executor(s), 2 alive"
        # web-2 stopped: only web-1 without --all, both with it
        docs = json_lines(await cli(sql_url, "executors", "--json"))
        assert [d["id"] for d in docs] == [first.id]
        docs = json_lines(await cli(sql_url, "executors", "--json", "--all"))
        assert {d["id"]: d["state"] for d in docs} == {
            first.id: "running",
            second.id: "stopped",
        }


async def test_list_and_show_name_the_owner(sql_url: str) -> None:
    async with SQLCheckpointStore.open(sql_url) as store:
        await store.save(cp("run-foreign"))  # owner "exec-1": never registered
        await StoreCheckpointerFactory(store).begin(RunInfo("run-nobody", subject_id="agent-a"))
        async with Executor(store, name="web-1", **SETTINGS) as ex:
            await ex.factory().begin(RunInfo("run-mine", subject_id="agent-a"))

            out = (await cli(sql_url, "list")).stdout
            header = header_of(out)
            assert "owner" in header
            owner_col = header.index("owner")
            assert row_of(out, "run-mine")[owner_col] == ex.id
            assert row_of(out, "run-foreign")[owner_col] == "exec-1"
            assert row_of(out, "run-nobody")[owner_col] == "-"
            owners = {
                d["run_id"]: d["owner"] for d in json_lines(await cli(sql_url, "list", "--json"))
            }
            assert owners == {"run-mine": ex.id, "run-foreign": "exec-1", "run-nobody": None}

            out = (await cli(sql_url, "show", "run-mine")).stdout
            host = socket.gethostname()
            assert f"owner: {ex.id} (executor web-1 on {host}, alive)" in out
            doc = json_doc(await cli(sql_url, "show", "run-mine", "--json"))
            assert doc["owner"] == ex.id
            keys = list(doc)
            assert keys[keys.index("owner") + 1] == "owner_executor"
            owner = doc["owner_executor"]
            assert list(owner) == EXECUTOR_KEYS
            assert owner["id"] == ex.id and owner["name"] == "web-1"
            assert owner["alive"] is True and owner["state"] == "running"
            assert owner["runs_owned"] == 1

            out = (await cli(sql_url, "show", "run-foreign")).stdout
            assert "owner: exec-1 (not a registered executor)" in out
            doc = json_doc(await cli(sql_url, "show", "run-foreign", "--json"))
            assert doc["owner"] == "exec-1" and doc["owner_executor"] is None

            out = (await cli(sql_url, "show", "run-nobody")).stdout
            assert "owner: -" in out
            doc = json_doc(await cli(sql_url, "show", "run-nobody", "--json"))
            assert doc["owner"] is None and doc["owner_executor"] is None

        # The executor left: its run was released (no owner), a peer may claim it.
        out = (await cli(sql_url, "list")).stdout
        assert row_of(out, "run-mine")[header_of(out).index("owner")] == "-"
        assert "owner: -" in (await cli(sql_url, "show", "run-mine")).stdout


async def test_show_names_a_stopped_owner(sql_url: str) -> None:
    """A run whose owner deregistered without releasing it (e.g. written by a zombie)."""
    async with SQLCheckpointStore.open(sql_url) as store:
        async with Executor(store, name="web-9", **SETTINGS) as ex:
            pass
        await store.save(replace(cp("run-orphan"), owner=ex.id))
        out = (await cli(sql_url, "show", "run-orphan")).stdout
        assert f"owner: {ex.id} (executor web-9 on {socket.gethostname()}" in out
        assert "not alive: stopped" in out
        doc = json_doc(await cli(sql_url, "--json", "show", "run-orphan"))
        assert doc["owner_executor"]["state"] == "stopped"
        assert doc["owner_executor"]["alive"] is False


async def test_stale_executor_is_marked_stale(sql_url: str) -> None:
    """An executor whose heartbeat expired (a SIGKILLed or frozen replica) shows ``stale``."""
    async with SQLCheckpointStore.open(sql_url) as store:
        await store.register_executor(
            "dead-beef", name="web-3", host="pod-3", pid=77, app_version=None, stale_after=0.3
        )
        await store.save(replace(cp("run-stuck"), owner="dead-beef"))
        await asyncio.sleep(0.8)

        out = (await cli(sql_url, "executors")).stdout
        cells = row_of(out, "dead-beef")
        assert cells[:4] == ["dead-beef", "web-3", "pod-3", "77"]
        assert cells[4] == "-"  # no app version
        assert cells[-2:] == ["1", "running (stale)"]
        assert out.splitlines()[-1] == "1 executor(s), 0 alive"
        (doc,) = json_lines(await cli(sql_url, "executors", "--json"))
        assert doc["state"] == "running" and doc["alive"] is False
        assert doc["app_version"] is None
        assert doc["heartbeat_age"] >= 0.3

        out = (await cli(sql_url, "show", "run-stuck")).stdout
        assert "owner: dead-beef (executor web-3 on pod-3, not alive: running, no heartbeat" in out
