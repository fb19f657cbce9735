"""`make bench` must keep running on a fresh clone: its quick mode, as a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run_bench(
    module: str, *args: str, timeout: float, **env: str
) -> subprocess.CompletedProcess[str]:
    """``python -m <module> <args>`` from the repository, as `make bench` runs it (no asyncio
    debug mode: a benchmark, not a debug run); fails the test unless it exits 0."""
    environ = {**os.environ, "PYTHONPATH": str(REPO), **env}
    environ.pop("PYTHONASYNCIODEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bench_quick_runs_ours_and_the_floors(tmp_path: Path) -> None:
    backends = "sqlite,postgresql" if os.environ.get("EXECUTUS_CKPT_TEST_PG_URL") else "sqlite"
    proc = _run_bench(
        "bench",
        "--quick",
        "--engines",
        "ours,floor,lean",
        "--backends",
        backends,
        "--tmpdir",
        str(tmp_path),
        "--no-write",
        "--near-pairs",
        "1",
        timeout=230,
    )
    out = proc.stdout
    assert "## Targets (issue 9)" in out and "## Targets (issue 5)" in out
    assert "executus_ckpt" in out and "raw floor" in out and "one-hop floor" in out
    if "postgresql" in backends:
        assert "one-statement floor" in out
    assert "database is locked" not in proc.stderr
    # the near-floor ratios were also measured in lockstep, on every backend run
    assert len(re.findall(r"in lockstep \d+\.\d+x", out)) == len(backends.split(","))
    # and over one more back-to-back pair of runs, counted in the verdict's median
    assert len(re.findall(r"median over 2 pairs of runs: ", out)) == len(backends.split(","))
    assert len(re.findall(r"1 back-to-back pairs \d+\.\d+x", out)) == len(backends.split(","))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_layers_breaks_a_postgres_save_down(pg_url: str) -> None:
    """`python -m bench.layers` (the cost of each layer of a PostgreSQL save) keeps running."""
    layers = _run_bench(
        "bench.layers", "--runs", "1", timeout=110, EXECUTUS_CKPT_TEST_PG_URL=pg_url
    ).stdout
    ways = r"(ours|store\.append|our statement|lean statement|lean floor)"
    found = re.findall(rf"(?m)^{ways} +\d+\.\d+ ms +\d+\.\d+x the lean floor$", layers)
    assert len(found) == 5, layers
    no_io = _run_bench("bench.layers", "--runs", "1", "--no-io", timeout=110).stdout
    assert re.search(r"save path without I/O: \d+\.\d+ us per save", no_io), no_io
