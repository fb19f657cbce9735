"""Statistics, the markdown tables, the targets of issues 5 and 9, the machine description."""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from bench.engines import FAMILIES, POSTGRES, SQLITE, label
from bench.runner import ConcurrentResult, DiagnosticResult, MemoryResult, RunResult

Window = tuple[str, int, int]  # label, first iteration, last iteration (inclusive)

BACKEND_LABEL = {SQLITE: "SQLite", POSTGRES: "PostgreSQL"}


def windows_for(iterations: int) -> list[Window]:
    """Latency windows "at" iteration 1, 25 and 200 (scaled down in quick mode)."""
    if iterations >= 200:
        return [("@1", 1, 5), ("@25", 21, 30), ("@200", 191, 200)]
    mid = max(3, iterations // 4)
    return [
        ("@1", 1, 2),
        (f"@{mid}", mid - 1, mid + 1),
        (f"@{iterations}", iterations - 2, iterations),
    ]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``q`` in [0, 100]."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _median(values: Sequence[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def fmt_ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "n/a"
    ms = seconds * 1000
    if ms < 10:
        return f"{ms:.2f} ms"
    if ms < 100:
        return f"{ms:.1f} ms"
    return f"{ms:,.0f} ms"


def fmt_s(seconds: float) -> str:
    if math.isnan(seconds):
        return "n/a"
    return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"


def fmt_bytes(n: float) -> str:
    if math.isnan(n):
        return "n/a"
    if abs(n) < 1024 * 1024:
        return f"{n / 1024:.0f} KiB"
    if abs(n) < 100 * 1024 * 1024:
        return f"{n / (1024 * 1024):.2f} MiB"
    return f"{n / (1024 * 1024):,.0f} MiB"


def fmt_ratio(r: float) -> str:
    if math.isnan(r) or math.isinf(r):
        return "n/a"
    if r >= 100:
        return f"{r:,.0f}x"
    if r >= 10:
        return f"{r:.1f}x"
    return f"{r:.2f}x"


def fmt_size(size: int) -> str:
    return f"{size // 1024} KB" if size % 1024 == 0 else f"{size} B"


Metric = Callable[[Sequence[RunResult]], float]


def _lat(lo: int, hi: int, q: float) -> Metric:
    def metric(runs: Sequence[RunResult]) -> float:
        return percentile([x for r in runs for x in r.latencies[lo - 1 : hi]], q)

    return metric


def _first(runs: Sequence[RunResult]) -> float:
    """The first save after ``begin``: the median over repetitions."""
    return _median([r.latencies[0] for r in runs if r.latencies])


def _wall(runs: Sequence[RunResult]) -> float:
    return _median([r.wall for r in runs])


def _written(runs: Sequence[RunResult]) -> float:
    return _median([float(r.written) for r in runs])


def _db_size(runs: Sequence[RunResult]) -> float:
    return _median([float(r.db_size) for r in runs])


@dataclass
class Results:
    iterations: int
    sizes: list[int]
    reps: int
    runs: list[RunResult] = field(default_factory=list)
    lockstep: list[RunResult] = field(default_factory=list)  # runner.lockstep_runs
    # issue 9's extra near-floor pairs (cli.run_bench); ``rep`` numbers the pair
    near: list[RunResult] = field(default_factory=list)
    concurrent: list[ConcurrentResult] = field(default_factory=list)
    memory: list[MemoryResult] = field(default_factory=list)
    diagnostics: list[DiagnosticResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # what was not run, and why
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def windows(self) -> list[Window]:
        return windows_for(self.iterations)

    def select(
        self,
        family: str,
        backend: str,
        size: int,
        rep: int | None = None,
        *,
        source: str = "runs",
    ) -> list[RunResult]:
        """Runs of ``family``: the sequential ``runs``, the ``lockstep`` ones or issue 9's
        ``near`` pairs (whose ``rep`` numbers the pair)."""
        return [
            r
            for r in getattr(self, source)
            if r.family == family
            and r.backend == backend
            and r.size == size
            and (rep is None or r.rep == rep)
        ]

    def value(self, family: str, backend: str, size: int, metric: Metric) -> float:
        """The metric over every repetition pooled (latency samples pooled, totals median)."""
        runs = self.select(family, backend, size)
        return metric(runs) if runs else math.nan

    def floor_ratio(self, family: str, backend: str, size: int, metric: Metric) -> float:
        """Median over repetitions of metric(engine) / metric(floor) in the same repetition."""
        return self.ratio(family, "floor", backend, size, metric)

    def ratio(self, num: str, den: str, backend: str, size: int, metric: Metric) -> float:
        return _median(self.per_rep((num, metric), (den, metric), backend, size))

    def per_rep(
        self,
        num: tuple[str, Metric],
        den: tuple[str, Metric],
        backend: str,
        size: int,
        *,
        source: str = "runs",
    ) -> list[float]:
        """metric(num family) / metric(den family) within each repetition (or pair) of
        ``source`` (see :meth:`select`)."""
        out = []
        for rep in sorted({r.rep for r in getattr(self, source)}):
            a = self.select(num[0], backend, size, rep, source=source)
            b = self.select(den[0], backend, size, rep, source=source)
            if a and b:
                vb = den[1](b)
                out.append(num[1](a) / vb if vb > 0 else math.nan)
        return out

    def backends(self) -> list[str]:
        return [b for b in (SQLITE, POSTGRES) if any(r.backend == b for r in self.runs)]

    def families(self, backend: str) -> list[str]:
        present = {r.family for r in self.runs if r.backend == backend}
        return [f for f in FAMILIES if f in present]


# -- tables ------------------------------------------------------------------------------------


def main_table(res: Results) -> str:
    wins = res.windows
    head = ["Backend", "Engine", "S", "1st save"]
    for name, _, _ in wins:
        head += [f"p50 {name}", f"p99 {name}"]
    head += ["wall/run", "written/run", "DB size/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for backend in res.backends():
        for size in res.sizes:
            for family in res.families(backend):
                if not res.select(family, backend, size):
                    continue
                cells = [BACKEND_LABEL[backend], label(family, backend), fmt_size(size)]
                metrics: list[tuple[Metric, Callable[[float], str]]] = [(_first, fmt_ms)]
                for _, lo, hi in wins:
                    metrics += [(_lat(lo, hi, 50), fmt_ms), (_lat(lo, hi, 99), fmt_ms)]
                metrics += [(_wall, fmt_s), (_written, fmt_bytes), (_db_size, fmt_bytes)]
                for metric, fmt in metrics:
                    v = res.value(family, backend, size, metric)
                    if family == "floor":
                        cells.append(fmt(v))
                    else:
                        r = res.floor_ratio(family, backend, size, metric)
                        cells.append(f"{fmt(v)} ({fmt_ratio(r)})")
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def concurrent_table(res: Results) -> str:
    head = ["Backend", "Engine", "runs x saves", "saves/s", "x floor", "p50", "p99", "errors"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for backend in (SQLITE, POSTGRES):
        floor = [c for c in res.concurrent if c.backend == backend and c.family == "floor"]
        for family in FAMILIES:
            mine = [c for c in res.concurrent if c.backend == backend and c.family == family]
            if not mine:
                continue
            rate = _median([c.saves_per_s for c in mine])
            ratios = []
            for c in mine:
                f = [x for x in floor if x.rep == c.rep]
                if f and f[0].saves_per_s > 0:
                    ratios.append(c.saves_per_s / f[0].saves_per_s)
            lat = [x for c in mine for x in c.latencies]
            errors: dict[str, int] = {}
            for c in mine:
                for k, v in c.errors.items():
                    errors[k] = errors.get(k, 0) + v
            err = "none" if not errors else "; ".join(f"{v}x {k}" for k, v in errors.items())
            reps = len(mine)
            lines.append(
                "| "
                + " | ".join(
                    [
                        BACKEND_LABEL[backend],
                        label(family, backend),
                        f"{mine[0].runs} x {mine[0].iterations}"
                        + (f" ({reps} reps)" if reps > 1 else " (1 rep)"),
                        f"{rate:,.0f}",
                        "" if family == "floor" else fmt_ratio(_median(ratios)),
                        fmt_ms(percentile(lat, 50)),
                        fmt_ms(percentile(lat, 99)),
                        err,
                    ]
                )
                + " |"
            )
    return "\n".join(lines)


def memory_windows(res: Results) -> tuple[Window, Window]:
    wins = res.windows
    return wins[1], wins[2]


def _mem_value(m: MemoryResult, win: Window, attr: str) -> float:
    _, lo, hi = win
    return _median([float(x) for x in getattr(m, attr)[lo - 1 : hi]])


def memory_table(res: Results) -> str:
    mid, last = memory_windows(res)
    head = [
        "Backend",
        "Engine",
        "S",
        f"alloc peak/save {mid[0]}",
        f"alloc peak/save {last[0]}",
        f"{last[0]} / {mid[0]}",
        f"retained/save {last[0]}",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in res.memory:
        a = _mem_value(m, mid, "peaks")
        b = _mem_value(m, last, "peaks")
        lines.append(
            "| "
            + " | ".join(
                [
                    BACKEND_LABEL[m.backend],
                    label(m.family, m.backend),
                    fmt_size(m.size),
                    fmt_bytes(a),
                    fmt_bytes(b),
                    fmt_ratio(b / a if a > 0 else math.nan),
                    fmt_bytes(_mem_value(m, last, "retained")),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def diagnostics_table(res: Results) -> str:
    head = [
        "Backend",
        "Engine",
        "S",
        "SQL statements/save",
        "driver round trips/save",
        "event-loop CPU/save",
        "wall/save",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in res.diagnostics:
        stmts = "n/a (raw driver)" if math.isnan(d.statements) else f"{d.statements:.1f}"
        lines.append(
            "| "
            + " | ".join(
                [
                    BACKEND_LABEL[d.backend],
                    label(d.family, d.backend),
                    fmt_size(d.size),
                    stmts,
                    f"{d.hops:.1f} {d.hop_kind}",
                    fmt_ms(d.loop_cpu),
                    fmt_ms(d.wall),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


# -- targets -----------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    passed: bool | None  # None: could not be evaluated
    detail: str

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "N/A"}[self.passed]
        return f"- **{verdict}** {self.name}: {self.detail}"


def _spread(values: Sequence[float]) -> str:
    return "per repetition " + _list(values)


def _list(values: Sequence[float]) -> str:
    return ", ".join(fmt_ratio(v) for v in values) or "none"


def targets_issue5(res: Results) -> list[Target]:
    """Issue 5's targets, computed from the measurements (S = 16 KB, or the largest S run).

    Every latency verdict is on the median over repetitions of the ratio within one repetition
    (the same numbers as the table's ratio columns); the pooled p50s are shown for context.
    """
    out: list[Target] = []
    size = 16384 if 16384 in res.sizes else max(res.sizes)
    _, mlo, mhi = res.windows[1]
    mid_label = res.windows[1][0]
    last_label, llo, lhi = res.windows[2]
    p50_mid = _lat(mlo, mhi, 50)
    p50_last = _lat(llo, lhi, 50)
    sz = fmt_size(size)
    for backend in (SQLITE, POSTGRES):
        name = BACKEND_LABEL[backend]
        if not res.select("ours", backend, size):
            out.append(Target(f"{name}", None, res.skipped.get(backend, "not measured")))
            continue
        a = res.value("ours", backend, size, p50_last)
        b = res.value("ours", backend, size, p50_mid)
        flat = res.per_rep(("ours", p50_last), ("ours", p50_mid), backend, size)
        r = _median(flat)
        out.append(
            Target(
                f"Flat, {name}, S={sz}",
                r <= 1.5,
                f"ours p50{last_label} / p50{mid_label} = {fmt_ratio(r)} (target <= 1.5x; "
                f"{_spread(flat)}; pooled {fmt_ms(a)} vs {fmt_ms(b)})",
            )
        )
        if res.select("langgraph", backend, size):
            ahead = res.per_rep(("langgraph", p50_last), ("ours", p50_last), backend, size)
            lr = _median(ahead)
            out.append(
                Target(
                    f"Ahead (latency), {name}, S={sz}",
                    lr >= 10,
                    f"LangGraph p50{last_label} / ours = {fmt_ratio(lr)} (target >= 10x; "
                    f"{_spread(ahead)}; pooled "
                    f"{fmt_ms(res.value('langgraph', backend, size, p50_last))} vs {fmt_ms(a)})",
                )
            )
            ours_w = res.value("ours", backend, size, _written)
            lg_w = res.value("langgraph", backend, size, _written)
            out.append(
                Target(
                    f"Ahead (bytes written/run), {name}, S={sz}",
                    ours_w * 10 <= lg_w,
                    f"ours {fmt_bytes(ours_w)} vs LangGraph {fmt_bytes(lg_w)}: ours is "
                    f"1/{lg_w / ours_w:,.1f} of it (target <= 1/10)",
                )
            )
        else:
            out.append(
                Target(
                    f"Ahead, {name}",
                    None,
                    res.skipped.get(f"langgraph/{backend}", "LangGraph not measured"),
                )
            )
        near = res.per_rep(("ours", p50_last), ("floor", p50_last), backend, size)
        fr = _median(near)
        out.append(
            Target(
                f"Near the floor, {name}, S={sz}",
                (fr <= 2.0) if near else None,
                f"ours p50{last_label} / raw floor = {fmt_ratio(fr)} (target <= 2x, same "
                f"durability; {_spread(near)}; pooled {fmt_ms(a)} vs "
                f"{fmt_ms(res.value('floor', backend, size, p50_last))})",
            )
        )
        ours_c = [c for c in res.concurrent if c.backend == backend and c.family == "ours"]
        floor_c = [c for c in res.concurrent if c.backend == backend and c.family == "floor"]
        if ours_c and floor_c:
            o = _median([c.saves_per_s for c in ours_c])
            f = _median([c.saves_per_s for c in floor_c])
            errs = sum(sum(c.errors.values()) for c in ours_c)
            locked = sum(v for c in ours_c for k, v in c.errors.items() if "locked" in k.lower())
            out.append(
                Target(
                    f"Concurrent, {name}, {ours_c[0].runs} runs at once",
                    o >= f and errs == 0,
                    f"ours {o:,.0f} saves/s vs raw floor {f:,.0f} saves/s = {fmt_ratio(o / f)} "
                    f"(target >= 1x); errors: {errs} ({locked} 'database is locked')",
                )
            )
        mem = [m for m in res.memory if m.backend == backend and m.family == "ours"]
        if mem:
            mid, last = memory_windows(res)
            a_m = _mem_value(mem[0], mid, "peaks")
            b_m = _mem_value(mem[0], last, "peaks")
            rm = b_m / a_m if a_m > 0 else math.nan
            out.append(
                Target(
                    f"Memory flat, {name}, S={fmt_size(mem[0].size)}",
                    rm <= 1.5,
                    f"tracemalloc peak per save {last[0]} {fmt_bytes(b_m)} vs {mid[0]} "
                    f"{fmt_bytes(a_m)} = {fmt_ratio(rm)} (target <= 1.5x: O(new messages))",
                )
            )
    return out


NEAR_FLOOR = {SQLITE: "floor", POSTGRES: "lean"}
"""The floor each backend's p50 target names: the raw aiosqlite floor (the durable
one-transaction-per-save append) on SQLite, the one-statement floor on PostgreSQL. The first
save and the concurrent targets are against "the floor", the raw floor of every table here;
the ratio to the lean floor is shown next to them."""


def _concurrent_rate(res: Results, family: str, backend: str) -> tuple[float, dict[int, float]]:
    """Median saves/s over repetitions, and saves/s per repetition."""
    mine = [c for c in res.concurrent if c.backend == backend and c.family == family]
    return _median([c.saves_per_s for c in mine]), {c.rep: c.saves_per_s for c in mine}


def _firsts(res: Results, floor: str, backend: str) -> list[float]:
    """Ours' first save / ``floor``'s, per (repetition, S) pair."""
    return [
        x for s in res.sizes for x in res.per_rep(("ours", _first), (floor, _first), backend, s)
    ]


def targets_issue9(res: Results) -> list[Target]:
    """Issue 9's targets (S = 16 KB, or the largest S run), as ratios within one bench run.

    Latency verdicts are on the median over repetitions of the ratio within one repetition;
    the near-floor ones over the repetitions and the extra back-to-back pairs together (the
    p50 of a run's last 10 saves is a small sample, and 3-5 repetitions of it left the
    verdict to chance within about 0.2x); the first save's on the median over every
    (repetition, S) pair of that ratio.
    """
    out: list[Target] = []
    size = 16384 if 16384 in res.sizes else max(res.sizes)
    sz = fmt_size(size)
    mid_label, mlo, mhi = res.windows[1]
    last_label, llo, lhi = res.windows[2]
    p50_mid = _lat(mlo, mhi, 50)
    p50_last = _lat(llo, lhi, 50)
    near_limit = {SQLITE: 1.3, POSTGRES: 1.2}
    for backend in (SQLITE, POSTGRES):
        name = BACKEND_LABEL[backend]
        near_floor = NEAR_FLOOR[backend]
        lean = label("lean", backend)
        if not res.select("ours", backend, size) or not res.select("floor", backend, size):
            why = res.skipped.get(backend, "ours or the raw floor not measured")
            out.append(Target(f"{name}: issue-9 targets", None, why))
            continue
        a = res.value("ours", backend, size, p50_last)
        sequential = res.per_rep(("ours", p50_last), (near_floor, p50_last), backend, size)
        pairs = res.per_rep(
            ("ours", p50_last), (near_floor, p50_last), backend, size, source="near"
        )
        near = sequential + pairs
        lockstep = res.per_rep(
            ("ours", p50_last), (near_floor, p50_last), backend, size, source="lockstep"
        )
        fr = _median(near)
        limit = near_limit[backend]
        out.append(
            Target(
                f"Near the floor, {name}, S={sz}",
                (fr <= limit) if near else None,
                f"ours p50{last_label} / {label(near_floor, backend)} = {fmt_ratio(fr)} "
                f"(target <= {limit}x; median over {len(near)} pairs of runs: "
                f"{len(sequential)} repetitions {fmt_ratio(_median(sequential))} "
                f"({_spread(sequential)}), {len(pairs)} back-to-back pairs "
                f"{fmt_ratio(_median(pairs))} (per pair {_list(pairs)}); pooled over the "
                f"repetitions {fmt_ms(a)} vs "
                f"{fmt_ms(res.value(near_floor, backend, size, p50_last))}); in lockstep "
                f"{fmt_ratio(_median(lockstep))} ({_spread(lockstep)})",
            )
        )

        first = _firsts(res, "floor", backend)
        ff = _median(first)
        medians = ", ".join(
            f"S={fmt_size(s)} {fmt_ms(res.value('ours', backend, s, _first))} vs "
            f"{fmt_ms(res.value('floor', backend, s, _first))}"
            for s in res.sizes
        )
        out.append(
            Target(
                f"First save, {name}",
                (ff <= 2.0) if first else None,
                f"ours / raw floor = {fmt_ratio(ff)} (target <= 2x; median over {len(first)} "
                f"(repetition, S) pairs: {', '.join(fmt_ratio(x) for x in first)}; medians "
                f"{medians}); ours / {lean} = {fmt_ratio(_median(_firsts(res, 'lean', backend)))}",
            )
        )
        flat = res.per_rep(("ours", p50_last), ("ours", p50_mid), backend, size)
        r = _median(flat)
        out.append(
            Target(
                f"Flat, {name}, S={sz}",
                r <= 1.2,
                f"ours p50{last_label} / p50{mid_label} = {fmt_ratio(r)} (target <= 1.2x; "
                f"{_spread(flat)}; pooled {fmt_ms(a)} vs "
                f"{fmt_ms(res.value('ours', backend, size, p50_mid))})",
            )
        )
        o, o_rep = _concurrent_rate(res, "ours", backend)
        f, f_rep = _concurrent_rate(res, "floor", backend)
        ratios = [o_rep[k] / f_rep[k] for k in sorted(o_rep) if f_rep.get(k)]
        if ratios:
            cr = _median(ratios)
            errs = sum(
                sum(c.errors.values())
                for c in res.concurrent
                if c.backend == backend and c.family == "ours"
            )
            runs = next(c.runs for c in res.concurrent if c.backend == backend)
            lean_rate, lean_rep = _concurrent_rate(res, "lean", backend)
            lean_ratios = [o_rep[k] / lean_rep[k] for k in sorted(o_rep) if lean_rep.get(k)]
            out.append(
                Target(
                    f"Concurrent, {name}, {runs} runs at once",
                    cr >= 1.5 and errs == 0,
                    f"ours / raw floor saves/s = {fmt_ratio(cr)} (target >= 1.5x; "
                    f"{_spread(ratios)}; medians {o:,.0f} vs {f:,.0f} saves/s); errors: {errs}; "
                    f"ours / {lean} = {fmt_ratio(_median(lean_ratios))} "
                    f"({lean_rate:,.0f} saves/s)",
                )
            )
    return out


# -- machine -----------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram() -> str:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / (1024 * 1024):.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_rev(root: Path) -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "executus_ckpt", "migrations"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        return rev + (" (library has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _filesystem(path: Path) -> str:
    try:
        out = subprocess.run(
            ["df", "-T", str(path)], capture_output=True, text=True, check=True, timeout=10
        ).stdout.splitlines()
        return out[-1].split()[1]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def machine_info(tmpdir: Path, pg_info: dict[str, str] | None, sqlite_version: str) -> list[str]:
    root = Path(__file__).resolve().parent.parent
    lines = [
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- CPU: {_cpu_model()}, {os.cpu_count()} cores; RAM {_ram()}",
        f"- OS: {platform.system()} {platform.release()}; SQLite files on "
        f"{_filesystem(tmpdir.parent)} ({tmpdir.parent})",
        f"- Python {platform.python_version()}; SQLite {sqlite_version}; "
        + (
            f"PostgreSQL {pg_info['server_version']} on 127.0.0.1 (loopback)"
            if pg_info
            else "PostgreSQL not measured"
        ),
        f"- executus_ckpt at {_git_rev(root)}; SQLAlchemy {_version('sqlalchemy')}, "
        f"aiosqlite {_version('aiosqlite')}, asyncpg {_version('asyncpg')}, "
        f"orjson {_version('orjson')}",
        f"- LangGraph: langgraph-checkpoint {_version('langgraph-checkpoint')}, "
        f"-sqlite {_version('langgraph-checkpoint-sqlite')}, "
        f"-postgres {_version('langgraph-checkpoint-postgres')}, psycopg {_version('psycopg')}",
    ]
    if pg_info:
        lines.append(
            "- PostgreSQL durability: "
            + ", ".join(f"{k}={v}" for k, v in pg_info.items() if k != "server_version")
        )
    return lines
