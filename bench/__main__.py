"""Entry point: ``python -m bench [--quick] [--profile] ...``."""

from __future__ import annotations

from bench.cli import main

raise SystemExit(main())
