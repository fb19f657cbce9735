"""Fixtures for the fault tests."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from typing import Any

import pytest

UNRETRIEVED = "Future exception was never retrieved"


@pytest.fixture
async def unretrieved() -> AsyncIterator[list[dict[str, Any]]]:
    """Collect the loop's "never retrieved" reports instead of failing the test on them.

    A write that timed out leaves its driver error on a future nobody awaits (the PostgreSQL
    append's, the SQLite group-commit writer's), reported when the future is collected:
    pinned by tests (test_timed_out_append_leaves_no_unretrieved_error,
    test_timed_out_write_leaves_no_unretrieved_error). Tests whose subject is something else
    collect them here, with a garbage collection at teardown so that none is reported later.
    Every other loop error still fails the test (tests/conftest.py).
    """
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    found: list[dict[str, Any]] = []

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == UNRETRIEVED:
            found.append(context)
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    try:
        yield found
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
