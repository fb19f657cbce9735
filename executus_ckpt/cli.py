"""The ``executus-ckpt`` operator command (also ``python -m executus_ckpt``).

Every action is a library call on the store; this module only presents it. It is the only
place with ``asyncio.run`` and logging set-up. Exit codes: 0 success, 1 operational error
(database unreachable, schema out of date, run not found: a :class:`click.ClickException`),
2 usage error (a :class:`click.UsageError`). The JSON shapes live in :mod:`._render`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

import click
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from ._render import executor_json, show_json, stats_json, summary_json
from .config import DEFAULT_DATABASE_URL, ENV_DATABASE_URL
from .errors import CheckpointError, CheckpointNotFoundError
from .protocols import AdminStore, ExecutorStore
from .types import (
    CheckpointStats,
    CheckpointStatus,
    CheckpointSummary,
    ExecutorInfo,
    RunCheckpoint,
    utcnow,
)

T = TypeVar("T")

ENV_TIMEOUT = "EXECUTUS_CKPT_TIMEOUT"
"""The environment variable behind ``--timeout``."""
DEFAULT_TIMEOUT = 10.0
"""Seconds the CLI waits to connect, and for each database operation, before giving up."""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_STATUSES: dict[str, CheckpointStatus | None] = {
    **{status.value: status for status in CheckpointStatus},
    "all": None,
}


def parse_duration(text: str) -> float:
    """``"30m"``, ``"2h"``, ``"7d"``, ``"45s"``, ``"1w"`` → seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"invalid duration {text!r}: use a number and a unit, e.g. 30m, 2h, 7d")
    return float(match.group(1)) * _UNITS[match.group(2)]


class Duration(click.ParamType):  # type: ignore[type-arg,unused-ignore]
    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


_URL_EXAMPLE = "expected e.g. sqlite+aiosqlite:///file.db or postgresql+asyncpg://user@host/db"


class DatabaseURL(click.ParamType):  # type: ignore[type-arg,unused-ignore]
    """A database URL SQLAlchemy can read, checked before anything connects.

    A bad port or IPv6 host made ``make_url`` raise ``ValueError`` deep inside a command,
    which printed a traceback; here it is a usage error (exit 2) with one error line. The
    URL itself is not repeated: an unreadable URL cannot be printed with its password masked.
    """

    name = "url"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        try:
            port = make_url(text).port
        except ArgumentError:
            self.fail(f"the database URL is malformed; {_URL_EXAMPLE}", param, ctx)
        except ValueError:
            self.fail(
                "the database URL is malformed: its host or port cannot be read (the port is "
                "a number, an IPv6 host is written in brackets: [::1])",
                param,
                ctx,
            )
        if port is not None and not 0 < port < 65536:
            self.fail(f"the database URL is malformed: port {port} is not in 1-65535", param, ctx)
        return text


def _positive_seconds(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"{value!r} is not a positive number of seconds", ctx, param)
    return value


def safe_url(url: str) -> str:
    """The URL with any password masked, ``?password=`` too (never print a secret)."""
    from .stores._errors import safe_url as safe

    try:
        return safe(make_url(url))
    except ArgumentError:
        return "<unparseable URL>"


@dataclass
class Settings:
    url: str
    json: bool
    timeout: float = DEFAULT_TIMEOUT


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; expected failures become one error line (click prints it)."""
    try:
        return asyncio.run(coro)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    except ArgumentError as exc:
        raise click.UsageError(
            "the database URL is malformed; expected e.g. sqlite+aiosqlite:///file.db "
            "or postgresql+asyncpg://user@host/db"
        ) from exc
    except (ModuleNotFoundError, ImportError) as exc:
        hint = " (pip install 'executus-ckpt[postgres]')" if "asyncpg" in str(exc) else ""
        raise click.ClickException(f"a database driver is missing: {exc}{hint}") from exc


class OperatorStore(AdminStore, ExecutorStore, Protocol):
    """What the CLI needs of a store: the admin calls and the executor listing."""


@asynccontextmanager
async def _store(settings: Settings) -> AsyncIterator[OperatorStore]:
    from .stores.sql import SQLCheckpointStore

    async with SQLCheckpointStore.open(
        settings.url, connect_timeout=settings.timeout, operation_timeout=settings.timeout
    ) as store:
        yield store


def _emit_json(document: Any) -> None:
    click.echo(json.dumps(document, ensure_ascii=False))


def _age(ts: datetime) -> str:
    seconds = max(0.0, (utcnow() - ts).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _seconds(seconds: float) -> str:
    """A duration for a table: ``0.4s``, ``12s``, ``3.5m``, ``2.0h``, ``1.5d``."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


# -- the command group -----------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--url",
    type=DatabaseURL(),
    envvar=ENV_DATABASE_URL,
    default=DEFAULT_DATABASE_URL,
    show_default=True,
    help=f"Database URL; else ${ENV_DATABASE_URL}, else the embedded SQLite default.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (see README).")
@click.option(
    "--timeout",
    type=float,
    envvar=ENV_TIMEOUT,
    default=DEFAULT_TIMEOUT,
    show_default=True,
    callback=_positive_seconds,
    help=f"Seconds to wait for the database to connect and to answer each operation "
    f"(migrate: to connect); else ${ENV_TIMEOUT}.",
)
@click.option("-v", "--verbose", count=True, help="Log to stderr (-v info, -vv debug).")
@click.pass_context
def main(ctx: click.Context, url: str, as_json: bool, timeout: float, verbose: int) -> None:
    """See and act on executus_ckpt run checkpoints without writing SQL."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    ctx.obj = Settings(url=url, json=as_json, timeout=timeout)


def _json_flag(f: Callable[..., Any]) -> Callable[..., Any]:
    """Accept ``--json`` and ``--url`` after the subcommand too."""
    f = click.option(
        "--url",
        "sub_url",
        type=DatabaseURL(),
        help="Database URL (overrides the one before the subcommand).",
    )(f)
    return click.option("--json", "sub_json", is_flag=True, help="Machine-readable output.")(f)


def _settings(ctx: click.Context, sub_json: bool) -> Settings:
    s: Settings = ctx.obj
    if sub_json:
        s.json = True
    sub_url = ctx.params.get("sub_url")
    if sub_url:
        s.url = sub_url
    return s


@main.command()
@click.option("--revision", default="head", show_default=True, help="Target revision.")
@_json_flag
@click.pass_context
def migrate(ctx: click.Context, revision: str, sub_json: bool, sub_url: str | None = None) -> None:
    """Bring the schema to REVISION (default: the newest)."""
    from .migrate import check_target, current_revision
    from .migrate import migrate as run_migrations
    from .stores.sql import SQLCheckpointStore

    s = _settings(ctx, sub_json)
    try:
        check_target(revision)  # a bad argument is a usage error, before any connection
    except CheckpointError as exc:
        raise click.BadParameter(str(exc), ctx, param_hint="'--revision'") from exc

    async def go() -> tuple[str | None, str | None]:
        # Only connecting is bounded by --timeout: a migration's statements may run long
        # (they keep the library's own operation timeout).
        store = SQLCheckpointStore.from_url(s.url, connect_timeout=s.timeout)
        try:
            before = await current_revision(store.engine)
            await run_migrations(store.engine, revision)
            return before, await current_revision(store.engine)
        finally:
            await store.aclose()

    if not s.json and sys.stderr.isatty():
        click.echo(f"migrating {safe_url(s.url)} to {revision}...", err=True)
    before, after = _run(go())
    if s.json:
        _emit_json({"url": safe_url(s.url), "from": before, "to": after})
    else:
        click.echo(f"schema at revision {after} (was {before or 'empty'}) - {safe_url(s.url)}")


@main.command()
@_json_flag
@click.pass_context
def current(ctx: click.Context, sub_json: bool, sub_url: str | None = None) -> None:
    """Show the schema revision found and the one this version needs.

    Exits 0 if this version can use the database: up to date, or migrated by a newer release
    that declared it compatible (a rolling deploy); 1 otherwise."""
    from .migrate import is_newer, schema_status
    from .schema import REQUIRED_REVISION
    from .stores.sql import SQLCheckpointStore

    s = _settings(ctx, sub_json)

    async def go() -> tuple[str | None, bool]:
        store = SQLCheckpointStore.from_url(
            s.url, connect_timeout=s.timeout, operation_timeout=s.timeout
        )
        try:
            # schema_status maps driver failures itself (StoreUnavailableError).
            return await schema_status(store.engine)
        finally:
            await store.aclose()

    found, usable = _run(go())
    up_to_date = found == REQUIRED_REVISION
    if s.json:
        doc: dict[str, object] = {
            "found": found,
            "required": REQUIRED_REVISION,
            "up_to_date": up_to_date,
        }
        if not up_to_date and is_newer(found):
            doc["compatible"] = usable
        _emit_json(doc)
    else:
        if up_to_date:
            advice = "(up to date)"
        elif usable:
            advice = "(a newer release wrote it and declared it compatible: usable as is)"
        elif is_newer(found):
            advice = "(a newer release wrote it: upgrade executus-ckpt)"
        else:
            advice = "(run: executus-ckpt migrate)"
        click.echo(f"found: {found or 'none'}  required: {REQUIRED_REVISION}  {advice}")
    if not usable:
        ctx.exit(1)


@main.command("list")
@click.option("--status", type=click.Choice(list(_STATUSES)), default="active", show_default=True)
@click.option("--agent", help="Only runs of this agent id.")
@click.option("--older-than", type=Duration(), help="Not updated for this long (30m, 2h, 7d).")
@click.option("--limit", type=click.IntRange(min=1), help="At most N runs.")
@click.option("--newest-first", is_flag=True, help="Newest first (default: oldest first).")
@_json_flag
@click.pass_context
def list_(
    ctx: click.Context,
    status: str,
    agent: str | None,
    older_than: float | None,
    limit: int | None,
    newest_first: bool,
    sub_json: bool,
    sub_url: str | None = None,
) -> None:
    """List checkpoints (streams: memory stays flat on any number of rows).

    --json prints one JSON object per line.
    """
    s = _settings(ctx, sub_json)

    async def go() -> int:
        shown = 0
        table = None if s.json else _Table(LIST_COLUMNS)
        async with _store(s) as store:
            async for summary in store.iter_summaries(
                status=_STATUSES[status],
                agent_id=agent,
                older_than=older_than,
                limit=limit,
                newest_first=newest_first,
            ):
                shown += 1
                if table is None:
                    _emit_json(summary_json(summary))
                else:
                    table.add(_summary_row(summary))
        if table is not None:
            if shown:
                table.flush()
                click.echo(f"{shown} run(s)")
            else:
                click.echo("no checkpoints match")
        return shown

    _run(go())


LIST_COLUMNS = (
    "run id",
    "agent",
    "iter",
    "phases",
    "msgs",
    "size",
    "age",
    "tries",
    "owner",
    "status",
)
"""``list``'s table; ``owner`` is the id of the executor that owns the run (``-``: none)."""

EXECUTOR_COLUMNS = (
    "id",
    "name",
    "host",
    "pid",
    "app version",
    "heartbeat age",
    "runs owned",
    "state",
)
"""``executors``' table; the heartbeat age is by the database's clock."""


def _summary_row(s: CheckpointSummary) -> tuple[str, ...]:
    return (
        s.run_id,
        s.meta.agent_id or "-",
        str(s.iteration),
        ",".join(s.completed_phases) or "-",
        str(s.message_count),
        _size(s.size_bytes),
        _age(s.updated_at),
        str(s.attempts),
        s.owner or "-",
        str(s.status),
    )


def _executor_state(e: ExecutorInfo) -> str:
    """``running``, ``draining`` or ``stopped``; ``(stale)`` when its heartbeat expired."""
    if e.alive or e.state == "stopped":
        return e.state
    return f"{e.state} (stale)"


def _executor_row(e: ExecutorInfo) -> tuple[str, ...]:
    return (
        e.id,
        e.name or "-",
        e.host or "-",
        "-" if e.pid is None else str(e.pid),
        e.app_version or "-",
        _seconds(e.heartbeat_age),
        str(e.runs_owned),
        _executor_state(e),
    )


class _Table:
    """Prints rows in aligned columns, in chunks so that a huge listing never sits in memory.

    Plain ``str.ljust`` over computed widths: a width only grows from one chunk to the next, so
    the columns stay aligned down the listing. Nothing is ever truncated (a pipe gets it all).
    """

    CHUNK = 500
    GAP = "  "

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = tuple(columns)
        self.rows: list[tuple[str, ...]] = []
        self.widths = [len(col) for col in self.columns]
        self.header_done = False

    def add(self, row: tuple[str, ...]) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.CHUNK:
            self.flush()

    def _line(self, cells: Sequence[str]) -> str:
        return self.GAP.join(c.ljust(w) for c, w in zip(cells, self.widths, strict=True)).rstrip()

    def flush(self) -> None:
        """Print the rows added so far (the header first, once)."""
        for row in self.rows:
            self.widths = [max(w, len(c)) for w, c in zip(self.widths, row, strict=True)]
        if not self.header_done:
            click.echo(self._line(self.columns))
            self.header_done = True
        for row in self.rows:
            click.echo(self._line(row))
        self.rows.clear()


@main.command()
@click.argument("run_id")
@click.option(
    "--messages",
    "last",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Show the last N messages.",
)
@_json_flag
@click.pass_context
def show(
    ctx: click.Context, run_id: str, last: int, sub_json: bool, sub_url: str | None = None
) -> None:
    """Show one run: meta, bookkeeping, last error and its last messages."""
    s = _settings(ctx, sub_json)

    async def go() -> tuple[RunCheckpoint, ExecutorInfo | None]:
        async with _store(s) as store:
            cp: RunCheckpoint | None = await store.load(run_id)
            if cp is None:
                raise CheckpointNotFoundError(
                    f"no checkpoint for run {run_id!r} (see `executus-ckpt list --status all`)",
                    run_id=run_id,
                )
            owner = None
            if cp.owner is not None:
                executors = await store.list_executors(include_stopped=True)
                owner = next((e for e in executors if e.id == cp.owner), None)
        return cp, owner

    cp, owner = _run(go())
    doc = show_json(cp, last, owner)
    if s.json:
        _emit_json(doc)
        return
    for key in (
        "run_id",
        "status",
        "iteration",
        "message_count",
        "attempts",
        "owner",
        "app_version",
        "epoch",
    ):
        value = _owner_text(cp.owner, owner) if key == "owner" else doc[key]
        click.echo(f"{key:>16}: {value}")
    for key, value in doc["meta"].items():
        if value is not None:
            click.echo(f"{key:>16}: {value}")
    click.echo(f"{'phases done':>16}: {', '.join(doc['completed_phases']) or '-'}")
    click.echo(f"{'created':>16}: {cp.created_at.isoformat()} ({_age(cp.created_at)} ago)")
    click.echo(f"{'updated':>16}: {cp.updated_at.isoformat()} ({_age(cp.updated_at)} ago)")
    click.echo(f"{'last error':>16}: {cp.last_error or '-'}")
    if last:
        click.echo(f"last {len(doc['messages'])} of {doc['message_count']} messages:")
        for msg in doc["messages"]:
            text = json.dumps(msg, ensure_ascii=False)
            click.echo("  " + (text if len(text) <= 200 else text[:197] + "..."))


def _owner_text(owner_id: str | None, owner: ExecutorInfo | None) -> str:
    """``show``'s owner line: the id, then who that executor is and whether it is alive."""
    if owner_id is None:
        return "-"
    if owner is None:
        return f"{owner_id} (not a registered executor)"
    where = f" on {owner.host}" if owner.host else ""
    if owner.alive:
        health = "alive"
    elif owner.state == "stopped":
        health = "not alive: stopped"
    else:
        health = f"not alive: {owner.state}, no heartbeat for {_seconds(owner.heartbeat_age)}"
    return f"{owner_id} (executor {owner.name or 'unnamed'}{where}, {health})"


RunAction = Callable[[AdminStore, str], Awaitable[bool]]
"""One store call on one run id; True if it acted (the run existed, in the right status)."""


def _each_run(action: str, call: RunAction, verb: str) -> Callable[..., None]:
    @click.argument("run_ids", nargs=-1, required=True)
    @_json_flag
    @click.pass_context
    def command(
        ctx: click.Context, run_ids: tuple[str, ...], sub_json: bool, sub_url: str | None = None
    ) -> None:
        s = _settings(ctx, sub_json)

        async def go() -> dict[str, bool]:
            async with _store(s) as store:
                return {run_id: await call(store, run_id) for run_id in run_ids}

        done = _run(go())
        missing = [r for r, ok in done.items() if not ok]
        if s.json:
            _emit_json({verb: [r for r, ok in done.items() if ok], "not_found": missing})
        else:
            for run_id, ok in done.items():
                if ok:
                    click.echo(f"{verb} {run_id}")
                else:
                    click.echo(f"Error: not {verb} {run_id}: {action}", err=True)
        if missing:
            ctx.exit(1)

    return command


main.command("delete", help="Delete the checkpoints of RUN_IDS.")(
    _each_run("no such checkpoint", lambda store, run_id: store.delete(run_id), "deleted")
)
main.command(
    "requeue", help="Make dead or failed RUN_IDS recoverable again (status active, attempts reset)."
)(_each_run("no such dead or failed run", lambda store, run_id: store.requeue(run_id), "requeued"))


@main.command()
@click.option("--older-than", type=Duration(), required=True, help="Age, e.g. 7d.")
@click.option("--status", type=click.Choice(list(_STATUSES)), default="dead", show_default=True)
@click.option("--dry-run", is_flag=True, help="Only say how many would be removed.")
@click.option("--yes", is_flag=True, help="Do not ask (required when not on a terminal).")
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=500, show_default=True)
@_json_flag
@click.pass_context
def purge(
    ctx: click.Context,
    older_than: float,
    status: str,
    dry_run: bool,
    yes: bool,
    batch_size: int,
    sub_json: bool,
    sub_url: str | None = None,
) -> None:
    """Delete checkpoints not updated for --older-than, in bounded batches."""
    s = _settings(ctx, sub_json)
    wanted = _STATUSES[status]

    async def count() -> int:
        async with _store(s) as store:
            return await store.purge(older_than=older_than, status=wanted, dry_run=True)

    if dry_run:
        n = _run(count())
        if s.json:
            _emit_json({"dry_run": True, "would_delete": n})
        else:
            click.echo(f"would delete {n} checkpoint(s) ({status}, older than {older_than:g}s)")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError(
                "purge deletes checkpoints: pass --yes to confirm when not on a terminal", ctx
            )
        n = _run(count())
        click.confirm(f"delete {n} checkpoint(s) ({status})?", abort=True)
    interactive = not s.json and sys.stderr.isatty()

    async def go() -> int:
        async with _store(s) as store:
            progress = (
                (lambda done: click.echo(f"\rdeleted {done}...", nl=False, err=True))
                if (interactive)
                else None
            )
            return await store.purge(
                older_than=older_than,
                status=wanted,
                batch_size=batch_size,
                on_progress=progress,
            )

    n = _run(go())
    if interactive:
        click.echo("", err=True)
    if s.json:
        _emit_json({"dry_run": False, "deleted": n})
    else:
        click.echo(f"deleted {n} checkpoint(s)")


@main.command()
@_json_flag
@click.pass_context
def stats(ctx: click.Context, sub_json: bool, sub_url: str | None = None) -> None:
    """Counts by status and agent, stored sizes, the oldest interrupted run."""
    s = _settings(ctx, sub_json)

    async def go() -> CheckpointStats:
        async with _store(s) as store:
            return await store.stats()

    st = _run(go())
    if s.json:
        _emit_json(stats_json(st))
        return
    click.echo(
        f"checkpoints: {st.total}  ("
        + ", ".join(f"{k} {v}" for k, v in sorted(st.by_status.items()))
        + ")"
    )
    for agent, n in sorted(st.by_agent.items(), key=lambda kv: (-kv[1], kv[0])):
        click.echo(f"  agent {agent or '-'}: {n}")
    click.echo(
        f"stored: {_size(st.total_size_bytes)} in all, largest {_size(st.largest_size_bytes)}"
        + (f" ({st.largest_run_id})" if st.largest_run_id else "")
    )
    if st.oldest_interrupted_run_id and st.oldest_interrupted_at:
        click.echo(
            f"oldest interrupted: {st.oldest_interrupted_run_id}, "
            f"updated {_age(st.oldest_interrupted_at)} ago"
        )
    else:
        click.echo("oldest interrupted: none")


@main.command()
@click.option(
    "--all", "include_stopped", is_flag=True, help="Include stopped (deregistered) executors."
)
@_json_flag
@click.pass_context
def executors(
    ctx: click.Context, include_stopped: bool, sub_json: bool, sub_url: str | None = None
) -> None:
    """Service instances (executors) on this database: heartbeat age by the database's clock,
    runs owned, state (running, draining, stopped; "stale" once the heartbeat expired).

    --json prints one JSON object per line.
    """
    s = _settings(ctx, sub_json)

    async def go() -> list[ExecutorInfo]:
        async with _store(s) as store:
            return await store.list_executors(include_stopped=include_stopped)

    found = _run(go())
    if s.json:
        for info in found:
            _emit_json(executor_json(info))
        return
    if not found:
        click.echo(
            "no executors registered"
            if include_stopped
            else "no running executors (--all includes stopped ones)"
        )
        return
    table = _Table(EXECUTOR_COLUMNS)
    for info in found:
        table.add(_executor_row(info))
    table.flush()
    alive = sum(1 for info in found if info.alive)
    click.echo(f"{len(found)} executor(s), {alive} alive")


@main.command()
@click.option("--db", default="executus_ckpt_demo.db", show_default=True, help="SQLite file.")
@click.option("--runs", default=4, show_default=True, type=click.IntRange(2, 50))
@click.option("--latency", default=0.05, show_default=True, type=float, help="Seconds per step.")
@click.option(
    "--crash-only",
    is_flag=True,
    help="Stop after the crash: leave the interrupted runs in --db to look at with the CLI.",
)
@click.pass_context
def demo(ctx: click.Context, db: str, runs: int, latency: float, crash_only: bool) -> None:
    """Crash a simulated agent service with SIGKILL mid-run, then recover its runs; then
    three replicas share runs: one is SIGKILLed, one drained, the third resumes both sets."""
    from . import demo as demo_module

    summary = _run(demo_module.run_demo(db, runs=runs, latency=latency, crash_only=crash_only))
    if crash_only:
        ctx.exit(0 if summary.killed > 0 else 1)
    replicas = _run(demo_module.run_replicas_demo(demo_module.replicas_db_for(db)))
    ctx.exit(0 if summary.ok and replicas.ok else 1)
