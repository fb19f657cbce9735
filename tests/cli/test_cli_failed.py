"""The CLI on failed runs (``keep_failed=True``): list, show, requeue, purge, stats.

Failed runs are made the way a host makes them: ``StoreCheckpointerFactory(store,
keep_failed=True)``, a few saves, then ``fail(ValueError("boom"))``. Both SQL backends.
"""

from __future__ import annotations

import asyncio

import pytest

from executus_ckpt import (
    CheckpointStatus,
    RunCheckpointState,
    RunInfo,
    SQLCheckpointStore,
    StoreCheckpointerFactory,
)
from tests.cli.test_cli import (
    failed,
    invoke,
    json_doc,
    json_lines,
    load,
    ok,
    stored_ids,
)

ERROR = "ValueError: boom"


async def _seed(url: str) -> None:
    """Two failed runs, one active run, one dead run."""
    async with SQLCheckpointStore.open(url) as store:
        factory = StoreCheckpointerFactory(store, keep_failed=True, throttle=0)
        for run_id in ("fail-1", "fail-2", "live-1", "dead-1"):
            checkpointer = await factory.begin(
                RunInfo(run_id, subject_id="agent-a", inputs={"prompt": f"task {run_id}"})
            )
            messages = [{"role": "user", "content": f"task {run_id}"}]
            await checkpointer.save(RunCheckpointState(messages, 1, ["plan"]))
            if run_id.startswith("fail"):
                await checkpointer.fail(ValueError("boom"))
            else:
                await checkpointer.aclose()
        assert await store.mark_dead("dead-1", reason="over budget")


def seed(url: str) -> None:
    asyncio.run(_seed(url))


def status_of(url: str, run_id: str) -> CheckpointStatus | None:
    cp = load(url, run_id)
    return None if cp is None else cp.status


def test_list_failed_runs(sql_url: str) -> None:
    seed(sql_url)
    out = ok(invoke(["list", "--status", "failed"], url=sql_url)).stdout
    rows = [line.split() for line in out.splitlines()]
    assert [r[0] for r in rows if r[0].startswith(("fail", "live", "dead"))] == [
        "fail-1",
        "fail-2",
    ]
    assert all(r[-1] == "failed" for r in rows if r[0].startswith("fail"))
    assert "2 run(s)" in out
    docs = json_lines(ok(invoke(["list", "--status", "failed", "--json"], url=sql_url)))
    assert [(d["run_id"], d["status"], d["last_error"]) for d in docs] == [
        ("fail-1", "failed", ERROR),
        ("fail-2", "failed", ERROR),
    ]
    # Not interrupted: the default listing (active) leaves them out; "all" has them.
    active = {d["run_id"] for d in json_lines(ok(invoke(["list", "--json"], url=sql_url)))}
    assert active == {"live-1"}
    every = json_lines(ok(invoke(["list", "--status", "all", "--json"], url=sql_url)))
    assert {d["run_id"] for d in every} == {"fail-1", "fail-2", "live-1", "dead-1"}


def test_show_failed_run_names_its_error(sql_url: str) -> None:
    seed(sql_url)
    out = ok(invoke(["show", "fail-1"], url=sql_url)).stdout
    fields = {
        key.strip(): value.strip()
        for key, sep, value in (line.partition(":") for line in out.splitlines())
        if sep
    }
    assert fields["status"] == "failed"
    assert fields["last error"] == ERROR
    assert fields["prompt"] == "task fail-1"
    doc = json_doc(ok(invoke(["show", "fail-1", "--json"], url=sql_url)))
    assert (doc["status"], doc["last_error"]) == ("failed", ERROR)
    assert doc["messages"] == [{"role": "user", "content": "task fail-1"}]


def test_requeue_failed_run_makes_it_active(sql_url: str) -> None:
    seed(sql_url)
    out = ok(invoke(["requeue", "fail-1"], url=sql_url)).stdout
    assert "requeued fail-1" in out
    after = load(sql_url, "fail-1")
    assert after is not None
    assert after.status is CheckpointStatus.ACTIVE and after.attempts == 0
    assert after.messages == [{"role": "user", "content": "task fail-1"}]
    listed = {d["run_id"] for d in json_lines(ok(invoke(["list", "--json"], url=sql_url)))}
    assert listed == {"fail-1", "live-1"}
    # An active run is not requeue-able; the message names what is.
    result = failed(invoke(["requeue", "live-1"], url=sql_url), 1)
    assert "not requeued live-1: no such dead or failed run" in result.stderr
    doc = json_doc(failed(invoke(["requeue", "--json", "fail-2", "live-1"], url=sql_url), 1))
    assert doc == {"requeued": ["fail-2"], "not_found": ["live-1"]}
    assert status_of(sql_url, "fail-2") is CheckpointStatus.ACTIVE


def test_purge_failed_runs_only(sql_url: str) -> None:
    seed(sql_url)
    # Just failed: not older than an hour.
    doc = json_doc(
        ok(
            invoke(
                ["purge", "--older-than", "1h", "--status", "failed", "--json", "--yes"], sql_url
            )
        )
    )
    assert doc == {"dry_run": False, "deleted": 0}
    dry = ["purge", "--older-than", "0s", "--status", "failed", "--dry-run"]
    assert "would delete 2 checkpoint(s) (failed" in ok(invoke(dry, url=sql_url)).stdout
    out = ok(invoke(["purge", "--older-than", "0s", "--status", "failed", "--yes"], sql_url))
    assert "deleted 2" in out.stdout
    assert stored_ids(sql_url) == {"live-1", "dead-1"}


def test_stats_counts_failed_runs(sql_url: str) -> None:
    seed(sql_url)
    doc = json_doc(ok(invoke(["stats", "--json"], url=sql_url)))
    assert doc["total"] == 4
    assert doc["by_status"] == {"active": 1, "dead": 1, "failed": 2}
    # Failed runs are not interrupted.
    assert doc["oldest_interrupted_run_id"] == "live-1"
    out = ok(invoke(["stats"], url=sql_url)).stdout
    assert "checkpoints: 4  (active 1, dead 1, failed 2)" in out


@pytest.mark.parametrize("command", ["list", "purge"])
def test_status_options_accept_every_checkpoint_status(command: str) -> None:
    result = invoke([command, "--help"])
    assert result.exit_code == 0, result.output
    choices = result.stdout.split("--status [", 1)[1].split("]", 1)[0].split("|")
    assert choices == [status.value for status in CheckpointStatus] + ["all"]


def test_requeue_help_names_failed_runs() -> None:
    result = invoke(["requeue", "--help"])
    assert result.exit_code == 0
    assert "dead or failed" in result.stdout
