"""`make bench` must keep running on a fresh clone: its quick mode, as a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bench_quick_runs_ours_and_the_floors(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PYTHONASYNCIODEBUG", None)  # a benchmark, not a debug run
    backends = "sqlite,postgresql" if os.environ.get("EXECUTUS_CKPT_TEST_PG_URL") else "sqlite"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--engines",
            "ours,floor,lean",
            "--backends",
            backends,
            "--tmpdir",
            str(tmp_path),
            "--no-write",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "## Targets (issue 9)" in out and "## Targets (issue 5)" in out
    assert "executus_ckpt" in out and "raw floor" in out and "one-hop floor" in out
    if "postgresql" in backends:
        assert "one-statement floor" in out
    assert "database is locked" not in proc.stderr
    # the near-floor ratios were also measured in lockstep, on every backend run
    assert len(re.findall(r"in lockstep \d+\.\d+x", out)) == len(backends.split(","))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_layers_breaks_a_postgres_save_down(pg_url: str) -> None:
    """`python -m bench.layers` (the cost of each layer of a PostgreSQL save) keeps running."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "EXECUTUS_CKPT_TEST_PG_URL": pg_url}
    env.pop("PYTHONASYNCIODEBUG", None)
    for args, pattern in (
        (
            ["--runs", "1"],
            r"(?m)^(ours|store\.append|our statement|lean statement|lean floor) "
            r"+\d+\.\d+ ms +\d+\.\d+x the lean floor$",
        ),
        (["--runs", "1", "--no-io"], r"save path without I/O: \d+\.\d+ us per save"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "bench.layers", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=110,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        found = re.findall(pattern, proc.stdout)
        assert len(found) == (5 if "--no-io" not in args else 1), proc.stdout
