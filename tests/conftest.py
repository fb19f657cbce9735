"""Shared fixtures: one ``store`` fixture over memory, SQLite and PostgreSQL.

PostgreSQL comes from ``EXECUTUS_CKPT_TEST_PG_URL`` (any database on the server; the tests
create their own) or else from a throwaway server started from the installed binaries. If
neither works the PostgreSQL cases skip with a loud reason, unless ``EXECUTUS_CKPT_REQUIRE_PG=1``,
which makes that a failure. A template database is migrated once per session and cloned for
every test.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from executus_ckpt import InMemoryCheckpointStore, SQLCheckpointStore, migrate
from tests.pgcluster import TempCluster

REQUIRE_PG = os.environ.get("EXECUTUS_CKPT_REQUIRE_PG") == "1"
BACKENDS = ["memory", "sqlite", "postgres"]
SQL_BACKENDS = ["sqlite", "postgres"]


def _dsn(url: str, database: str | None = None) -> str:
    u = make_url(url)
    if database is not None:
        u = u.set(database=database)
    return u.set(drivername="postgresql").render_as_string(hide_password=False)


class PgServer:
    def __init__(self, url: str, cluster: TempCluster | None) -> None:
        self.url = url
        self.cluster = cluster
        self.template = f"executus_ckpt_tpl_{os.getpid()}"

    def database_url(self, name: str) -> str:
        return make_url(self.url).set(database=name).render_as_string(hide_password=False)

    async def admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(_dsn(self.url))

    async def create_database(self, name: str, template: str | None = None) -> None:
        conn = await self.admin()
        try:
            tpl = f" TEMPLATE {template} STRATEGY FILE_COPY" if template else ""
            await conn.execute(f'CREATE DATABASE "{name}"{tpl}')
        finally:
            await conn.close()

    async def drop_database(self, name: str) -> None:
        conn = await self.admin()
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


def _start_pg() -> PgServer:
    url = os.environ.get("EXECUTUS_CKPT_TEST_PG_URL")
    if url:
        return PgServer(url, None)
    cluster = TempCluster().init().start()
    return PgServer(cluster.url(), cluster)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    try:
        server = _start_pg()
        asyncio.run(_probe(server))
    except Exception as exc:  # any failure here means "no PostgreSQL"
        reason = (
            f"PostgreSQL NOT TESTED: no server reachable ({type(exc).__name__}: {exc}); set "
            "EXECUTUS_CKPT_TEST_PG_URL or install PostgreSQL (initdb, pg_ctl)"
        )
        if REQUIRE_PG:
            pytest.fail(f"EXECUTUS_CKPT_REQUIRE_PG=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    asyncio.run(_make_template(server))
    yield server
    asyncio.run(server.drop_database(server.template))
    if server.cluster is not None:
        server.cluster.destroy()


async def _probe(server: PgServer) -> None:
    conn = await asyncio.wait_for(server.admin(), 15)
    await conn.close()


async def _make_template(server: PgServer) -> None:
    await server.drop_database(server.template)
    await server.create_database(server.template)
    await migrate(server.database_url(server.template))


@pytest.fixture
async def pg_url(pg_server: PgServer) -> AsyncIterator[str]:
    """A fresh, migrated PostgreSQL database (cloned from the template) for one test."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    await pg_server.create_database(name, template=pg_server.template)
    try:
        yield pg_server.database_url(name)
    finally:
        await pg_server.drop_database(name)


@pytest.fixture
async def pg_empty_url(pg_server: PgServer) -> AsyncIterator[str]:
    """A fresh, empty (un-migrated) PostgreSQL database for one test."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    await pg_server.create_database(name)
    try:
        yield pg_server.database_url(name)
    finally:
        await pg_server.drop_database(name)


@pytest.fixture
async def sqlite_url(tmp_path: Any) -> str:
    """A fresh, migrated SQLite file for one test."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'ckpt.db'}"
    await migrate(url)
    return url


@pytest.fixture(params=SQL_BACKENDS)
def sql_url(request: pytest.FixtureRequest) -> str:
    """A migrated database URL, once per SQL backend."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture(params=SQL_BACKENDS)
def empty_sql_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """An un-migrated database URL, once per SQL backend."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
    return str(request.getfixturevalue("pg_empty_url"))


@pytest.fixture
async def sql_store(sql_url: str) -> AsyncIterator[SQLCheckpointStore]:
    async with SQLCheckpointStore.open(sql_url) as store:
        yield store


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest) -> str | None:
    """``None`` for the in-memory store, else a migrated database URL."""
    if request.param == "memory":
        return None
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
async def store(store_url: str | None) -> AsyncIterator[Any]:
    """Every CheckpointStore implementation: the contract suite runs on each."""
    if store_url is None:
        yield InMemoryCheckpointStore()
        return
    async with SQLCheckpointStore.open(store_url) as sql:
        yield sql


@pytest.fixture(autouse=True)
async def _fail_on_loop_errors() -> AsyncIterator[None]:
    """Fail a test that left an unhandled exception on the loop (asyncpg's _testbase rule)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    yield
    loop.set_exception_handler(None)
    if errors:
        pytest.fail(f"unhandled errors on the event loop: {errors}", pytrace=False)


# -- per-backend counts, printed at the end and enforced when PostgreSQL is required ----------

BACKEND_PARAMS = ("store_url", "sql_url", "empty_sql_url", "bulk_backend", "backend")
"""Parameters whose value names the backend a test runs on: the parametrized fixtures above
(and ``bulk_backend`` in test_recovery), and a test's own ``backend`` parametrize argument."""

_counts: Counter[tuple[str, str]] = Counter()


def _backend(item: pytest.Item) -> str | None:
    """The backend ``item`` runs on: a backend parameter, else a database fixture it uses."""
    callspec = getattr(item, "callspec", None)
    params: dict[str, Any] = callspec.params if callspec is not None else {}
    for name in BACKEND_PARAMS:
        if params.get(name) in BACKENDS:
            return str(params[name])
    fixtures = set(getattr(item, "fixturenames", ()))
    if "pg_server" in fixtures:
        return "postgres"
    if "sqlite_url" in fixtures:
        return "sqlite"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        backend = _backend(item)
        if backend is not None:
            # carried by every report, so the tally also works with pytest-xdist, whose
            # controller never sees the items
            item.user_properties.append(("backend", backend))
        if item.get_closest_marker("slow") is not None:
            # `make test` runs with `-n 2 --dist loadgroup`: the slow multi-process suites
            # (replicas, faults) run one after another on one worker, never two at once, so
            # that their timing bounds hold on a two-core machine
            item.add_marker(pytest.mark.xdist_group("slow"))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    backend = dict(report.user_properties).get("backend")
    if backend is None:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _counts[(backend, report.outcome)] += 1


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    if not _counts:
        return
    terminalreporter.section("tests per backend")
    for name in BACKENDS:
        row = {o: _counts[(name, o)] for o in ("passed", "failed", "skipped")}
        terminalreporter.write_line(
            f"{name:>9}: {row['passed']} passed, {row['failed']} failed, {row['skipped']} skipped"
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: the controller holds the whole tally
    if REQUIRE_PG and _counts and _counts[("postgres", "passed")] == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
