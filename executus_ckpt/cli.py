"""The ``executus-ckpt`` command (also ``python -m executus_ckpt``).

The only place with ``asyncio.run`` and logging set-up.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import click

from .config import DEFAULT_DATABASE_URL, ENV_DATABASE_URL
from .errors import CheckpointError

T = TypeVar("T")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Inspect and manage executus_ckpt run checkpoints."""


@main.command()
@click.option("--url", envvar=ENV_DATABASE_URL, default=DEFAULT_DATABASE_URL, show_default=True)
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def migrate(url: str, revision: str) -> None:
    """Bring the checkpoint schema to REVISION (default: the newest)."""
    from .migrate import migrate as run_migrations

    _run(run_migrations(url, revision))
    click.echo(f"schema at {revision}")


@main.command()
@click.option("--db", default="executus_ckpt_demo.db", show_default=True, help="SQLite file.")
@click.option("--runs", default=4, show_default=True, type=click.IntRange(2, 50))
@click.option("--latency", default=0.05, show_default=True, type=float, help="Seconds per step.")
@click.option("--child", is_flag=True, hidden=True)
@click.option("--url", hidden=True)
def demo(db: str, runs: int, latency: float, child: bool, url: str | None) -> None:
    """Crash a simulated agent service with SIGKILL mid-run, then recover its runs."""
    from . import demo as demo_module

    if child:
        assert url is not None
        _run(demo_module.run_child(url, runs, latency))
        return
    summary = _run(demo_module.run_demo(db, runs=runs, latency=latency))
    sys.exit(0 if summary.ok else 1)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
