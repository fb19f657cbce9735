"""The installed program: the ``executus-ckpt`` console script and ``python -m executus_ckpt``.

These run real processes, so logging really goes to stderr (``-vv``) and the exit code is the
process's own.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from executus_ckpt import RunCheckpoint, RunCheckpointMeta, SQLCheckpointStore
from executus_ckpt.config import ENV_DATABASE_URL
from executus_ckpt.schema import REQUIRED_REVISION

SCRIPT = Path(sys.executable).parent / "executus-ckpt"
SECRET = "s3cr3tpw"
TIMEOUT = 60


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != ENV_DATABASE_URL}
    env.update(extra)
    return env


def run(
    *args: str, cwd: Path, module: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "executus_ckpt"] if module else [str(SCRIPT)]
    return subprocess.run(
        [*argv, *args],
        cwd=cwd,
        env=env if env is not None else _env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def _describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"rc={proc.returncode}\n--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"


def _commands(help_text: str) -> list[str]:
    """The command names of a click group's --help page."""
    section = help_text.split("Commands:", 1)[1]
    return sorted(m.group(1) for m in re.finditer(r"^\s{2}(\S+)", section, flags=re.M))


def _seed(url: str, *run_ids: str) -> None:
    async def go() -> None:
        async with SQLCheckpointStore.open(url) as store:
            for run_id in run_ids:
                await store.save(
                    RunCheckpoint(
                        meta=RunCheckpointMeta(run_id=run_id, agent_id="agent-a"),
                        messages=[{"role": "user", "content": run_id}],
                        iteration=1,
                    )
                )

    asyncio.run(go())


def test_console_script_is_installed() -> None:
    assert SCRIPT.is_file(), f"console script not found next to {sys.executable}"
    assert os.access(SCRIPT, os.X_OK)


def test_console_script_list_json(sqlite_url: str, tmp_path: Path) -> None:
    _seed(sqlite_url, "run-1", "run-2")
    proc = run("--url", sqlite_url, "list", "--json", cwd=tmp_path)
    assert proc.returncode == 0, _describe(proc)
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [d["run_id"] for d in docs] == ["run-1", "run-2"]
    assert proc.stderr == ""
    # The URL from the environment, the same program through `python -m`.
    proc = run(
        "list", "--json", cwd=tmp_path, module=True, env=_env(**{ENV_DATABASE_URL: sqlite_url})
    )
    assert proc.returncode == 0, _describe(proc)
    assert [json.loads(line)["run_id"] for line in proc.stdout.splitlines()] == ["run-1", "run-2"]


def test_python_m_matches_console_script(tmp_path: Path) -> None:
    script = run("--help", cwd=tmp_path)
    module = run("--help", cwd=tmp_path, module=True)
    assert script.returncode == 0, _describe(script)
    assert module.returncode == 0, _describe(module)
    commands = _commands(script.stdout)
    expected = [
        "current",
        "delete",
        "demo",
        "executors",
        "list",
        "migrate",
        "purge",
        "requeue",
        "show",
        "stats",
    ]
    assert commands == expected
    assert _commands(module.stdout) == commands
    assert module.stdout == script.stdout  # same program, same prog name in the usage line
    assert "executus-ckpt" in module.stdout.splitlines()[0]


def test_console_script_exit_codes(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    # Usage error: 2, before touching any database.
    proc = run("--url", url, "list", "--no-such-option", cwd=tmp_path)
    assert proc.returncode == 2, _describe(proc)
    assert not (tmp_path / "fresh.db").exists()
    # Un-migrated database: 1, one line naming the fix, no traceback.
    proc = run("--url", url, "list", cwd=tmp_path)
    assert proc.returncode == 1, _describe(proc)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "executus-ckpt migrate" in lines[0], _describe(proc)
    # migrate, then current: 0.
    proc = run("--url", url, "migrate", cwd=tmp_path)
    assert proc.returncode == 0, _describe(proc)
    proc = run("--url", url, "--json", "current", cwd=tmp_path)
    assert proc.returncode == 0, _describe(proc)
    assert json.loads(proc.stdout) == {
        "found": REQUIRED_REVISION,
        "required": REQUIRED_REVISION,
        "up_to_date": True,
    }
    # Unknown run: 1.
    proc = run("--url", url, "show", "ghost", cwd=tmp_path)
    assert proc.returncode == 1, _describe(proc)
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "ghost" in proc.stderr and "Traceback" not in proc.stderr


def test_console_script_malformed_url_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = run("--url", "postgresql+asyncpg://u@h:notaport/db", "list", cwd=tmp_path)
    assert proc.returncode == 2, _describe(proc)
    assert "Traceback" not in proc.stderr, _describe(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "malformed" in errors[0], _describe(proc)


def test_console_script_against_an_unanswering_database(tmp_path: Path) -> None:
    """A server that accepts the connection and never answers: one line, in seconds."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)  # never accepted, never read: a black hole
        port = sock.getsockname()[1]
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{port}/x"
        started = time.monotonic()
        proc = run("--url", url, "--timeout", "2", "list", cwd=tmp_path)
        elapsed = time.monotonic() - started
    assert proc.returncode == 1, _describe(proc)
    assert elapsed < 5, f"took {elapsed:.1f}s with --timeout 2"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, _describe(proc)
    assert "unavailable" in lines[0].lower() and "Traceback" not in proc.stderr, _describe(proc)


def test_unreachable_postgres_with_logging_on(tmp_path: Path) -> None:
    """Real logging to stderr at -vv: the password appears nowhere, the last line is the error."""
    url = f"postgresql+asyncpg://u:{SECRET}@127.0.0.1:1/x"
    for args in (["list"], ["current"]):
        proc = run("-vv", "--url", url, *args, cwd=tmp_path)
        assert proc.returncode == 1, _describe(proc)
        assert SECRET not in proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr, _describe(proc)
        assert proc.stderr.strip().splitlines()[-1].startswith("Error: "), _describe(proc)
    quiet = run("--url", url, "stats", "--json", cwd=tmp_path)
    assert quiet.returncode == 1
    assert quiet.stdout == ""
    assert len(quiet.stderr.strip().splitlines()) == 1, _describe(quiet)
    assert SECRET not in quiet.stderr


@pytest.mark.parametrize("backend", ["postgres"])
def test_password_masked_in_real_logs_on_postgres(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = make_url(str(request.getfixturevalue("pg_empty_url")))
    secret_url = url.set(password=SECRET).render_as_string(hide_password=False)
    for args in (["list"], ["migrate"], ["current"]):
        proc = run("-vv", "--url", secret_url, *args, cwd=tmp_path)
        assert SECRET not in proc.stdout + proc.stderr, _describe(proc)
        assert "Traceback" not in proc.stderr, _describe(proc)
        # list before migrate is refused; everything after it works
        assert proc.returncode == (1 if args == ["list"] else 0), _describe(proc)


def test_demo_crash_then_inspect(tmp_path: Path) -> None:
    """The README's transcript: crash the demo, then look at what it left with the CLI."""
    db = tmp_path / "demo.db"
    proc = run(
        "demo", "--crash-only", "--db", str(db), "--runs", "3", "--latency", "0.02", cwd=tmp_path
    )
    assert proc.returncode == 0, _describe(proc)
    match = re.search(r"left (\d+) interrupted run", proc.stdout)
    assert match, proc.stdout
    left = int(match.group(1))
    assert left >= 1
    url = f"sqlite+aiosqlite:///{db}"
    proc = run("--url", url, "list", "--json", cwd=tmp_path)
    assert proc.returncode == 0, _describe(proc)
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(docs) == left
    assert all(d["status"] == "active" and d["message_count"] > 0 for d in docs)
    proc = run("--url", url, "--json", "stats", cwd=tmp_path)
    assert proc.returncode == 0, _describe(proc)
    stats = json.loads(proc.stdout)
    assert stats["total"] == left
    assert stats["oldest_interrupted_run_id"] in {d["run_id"] for d in docs}
    first = docs[0]["run_id"]
    proc = run("--url", url, "show", first, "--messages", "2", cwd=tmp_path)
    assert proc.returncode == 0, _describe(proc)
    assert f"run_id: {first}" in proc.stdout and "last 2 of" in proc.stdout
