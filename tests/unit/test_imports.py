"""``import executus_ckpt`` stays light: no alembic (only migrations need it), no asyncpg
(a SQLite host never needs it)."""

from __future__ import annotations

import subprocess
import sys


def test_import_does_not_load_alembic_or_asyncpg() -> None:
    code = (
        "import sys, executus_ckpt\n"
        "print(sorted(m for m in ('alembic', 'asyncpg', 'rich') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
