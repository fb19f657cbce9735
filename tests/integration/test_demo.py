"""The SIGKILL demo, end to end: in process (``run_demo``) and as the ``demo`` command."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

from executus_ckpt.demo import run_demo


async def test_run_demo_recovers_every_killed_run(tmp_path: Path) -> None:
    lines: list[str] = []
    summary = await run_demo(tmp_path / "demo.db", runs=3, latency=0.01, out=lines.append)
    assert summary.problems == []
    assert summary.ok
    assert summary.started == 3
    assert summary.killed >= 1
    assert summary.finished_before_crash == 3 - summary.killed
    assert summary.interrupted_listed == summary.killed
    assert summary.recovered == summary.killed
    assert summary.phases_skipped >= 1, "resumed runs skipped the phases they had completed"
    assert summary.phases_rerun >= summary.killed, "each resumed run re-ran at least one phase"
    assert summary.finished == 3
    assert summary.checkpoints_left == 0

    text = "\n".join(lines)
    assert "kill -9" in text
    assert "== summary ==" in text
    assert f"killed mid-run (SIGKILL):   {summary.killed}" in text
    assert f"recovered and resumed:      {summary.recovered}" in text
    assert "checkpoints left:           0" in text
    assert lines[-1].split() == ["result:", "OK"]
    assert "PROBLEM" not in text
    assert "skipped (completed before the crash)" in text
    # every resumed run prints the boundary it continues from
    resumed = [line for line in lines if "from its last phase boundary:" in line]
    assert len(resumed) == summary.recovered, resumed
    assert all(
        re.search(r"\d+ phases done, iteration \d+, \d+ of \d+ messages", r) for r in resumed
    )


async def test_run_demo_recreates_its_database(tmp_path: Path) -> None:
    db = tmp_path / "again.db"
    db.write_bytes(b"not a database")  # a leftover file is replaced, not trusted
    summary = await run_demo(db, runs=2, latency=0.01, out=lambda _line: None)
    assert summary.ok and summary.checkpoints_left == 0


async def test_demo_command_exits_zero_and_prints_ok(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "executus_ckpt",
        "demo",
        "--db",
        str(tmp_path / "d.db"),
        "--runs",
        "3",
        "--latency",
        "0.01",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=90)
    out = stdout.decode()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{stderr.decode()}"
    assert "kill -9" in out
    result = [line for line in out.splitlines() if "result:" in line]
    assert len(result) == 1 and result[0].split() == ["result:", "OK"]
    assert (tmp_path / "d.db").exists()
