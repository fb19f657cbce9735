"""``make bench``: executus_ckpt against LangGraph's savers and the raw-driver floor.

Run ``python -m bench`` (full, writes ``bench/RESULTS.md``) or ``python -m bench --quick``
(tiny sizes, every engine, < 60 s, writes nothing outside ``bench/out/``). See
``python -m bench --help`` and ``bench/RESULTS.md`` for what is measured and how.
"""

from __future__ import annotations
