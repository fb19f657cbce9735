"""Spans, metrics and log fields of the OpenTelemetry instrumentation (``telemetry.py``),
recorded with the SDK's in-memory exporter and reader, on every store."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

from executus_ckpt import (
    CheckpointFencedError,
    Executor,
    InMemoryCheckpointStore,
    RunCheckpoint,
    RunCheckpointState,
    RunInfo,
    StoreCheckpointerFactory,
    checkpointed_run,
    recover_interrupted,
    telemetry,
)
from executus_ckpt.checkpointer import StoreCheckpointer

from .conftest import Otel, attrs, by


def _msgs(n: int) -> list[dict[str, Any]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(n)]


def _kind(store: Any) -> str:
    return "memory" if isinstance(store, InMemoryCheckpointStore) else str(store.dialect)


def _log_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The telemetry fields a log record carries (its ``extra``), None values left out."""
    return {k: v for k in telemetry.FIELDS if (v := record.__dict__.get(k, None)) is not None}


def _records(caplog: pytest.LogCaptureFixture, action: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.__dict__.get("action") == action]


def _sum(points: list[Any]) -> float:
    return sum(p.value for p in points)


# -- begin, save, complete ----------------------------------------------------------------


async def test_begin_save_complete(
    store: Any, otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    """One run under a host span: begin, two appends, an edit of an older message (a
    rewrite), a shorter transcript (a compaction: the append's guard fails, ``fallback``),
    complete. Each is a span child of the host's span with the documented attributes; the
    save metrics count them by path; the log records carry the spans' fields."""
    caplog.set_level(logging.DEBUG, logger="executus_ckpt")
    kind = _kind(store)
    factory = StoreCheckpointerFactory(store, throttle=0, executor_id=None)
    with otel.tracer.start_as_current_span("host-run") as host:
        async with checkpointed_run(factory, RunInfo("r-1", subject_id="agent-7")) as cp:
            await cp.save(RunCheckpointState(messages=_msgs(3), iteration=1))
            messages = _msgs(5)
            await cp.save(RunCheckpointState(messages=messages, iteration=2))
            edited = [{"role": "user", "content": "edited"}, *messages[1:], *_msgs(1)]
            await cp.save(RunCheckpointState(messages=edited, iteration=3))
            await cp.save(RunCheckpointState(messages=_msgs(2), iteration=4))  # compacted

    host_id = host.get_span_context().span_id
    begin = otel.spans("begin")
    assert len(begin) == 1
    assert begin[0].parent is not None and begin[0].parent.span_id == host_id
    assert attrs(begin[0]) == {"run_id": "r-1", "agent_id": "agent-7", "epoch": 0}

    saves = otel.spans("save")
    assert [attrs(s)["path"] for s in saves] == ["append", "append", "rewrite", "fallback"]
    assert all(s.parent is not None and s.parent.span_id == host_id for s in saves)
    first, second, third, fourth = (attrs(s) for s in saves)
    assert first["run_id"] == "r-1" and first["store"] == kind and first["epoch"] == 0
    assert (first["messages_written"], first["message_count"], first["iteration"]) == (3, 3, 1)
    assert (second["messages_written"], second["message_count"]) == (2, 5)
    assert (third["messages_written"], third["message_count"]) == (6, 6)
    assert (fourth["messages_written"], fourth["message_count"]) == (2, 2)
    assert all(a["bytes"] > 0 for a in (first, second, third, fourth))
    if kind == "memory":
        assert "batch_size" not in first  # no batching in memory
    else:
        assert first["batch_size"] >= 1 and third.get("batch_size", 1) >= 1

    complete = otel.spans("complete")
    assert len(complete) == 1
    assert attrs(complete[0]) == {"run_id": "r-1", "epoch": 0, "result": "deleted"}
    assert complete[0].status.status_code is StatusCode.UNSET

    durations = by(otel.points("save.duration"), "path")
    assert durations["append"].count == 2 and durations["rewrite"].count == 1
    assert durations["fallback"].count == 1
    assert attrs(durations["append"]) == {"store": kind, "path": "append"}
    assert 0 < durations["append"].sum < 10
    written = by(otel.points("save.bytes"), "path")
    assert written["append"].value == first["bytes"] + second["bytes"]
    assert written["rewrite"].value == third["bytes"]
    batches = otel.points("group_commit.batch_size")
    if kind == "memory":
        assert batches == []
    else:
        assert batches and all(attrs(p) == {"store": kind} for p in batches)

    # Logs: the same fields as the spans, under the plain names.
    began = _records(caplog, "run_began")
    assert [_log_fields(r) for r in began] == [attrs(begin[0])]
    saved = _records(caplog, "save_checkpoint")
    assert [_log_fields(r) for r in saved] == [attrs(s) for s in saves]
    assert saved[0].name == "executus_ckpt.checkpointer"
    assert saved[0].funcName == "_store_write"  # the record points at the library's code
    completed = _records(caplog, "run_completed")
    assert [_log_fields(r) for r in completed] == [attrs(complete[0])]


async def test_fail_span_has_error_status(store: Any, otel: Otel) -> None:
    """A run that fails: the ``fail`` span has status ERROR, the run's exception as an
    event and its type as ``error``; with ``keep_failed`` the result says so."""
    for keep_failed, run_id in ((False, "r-del"), (True, "r-kept")):
        factory = StoreCheckpointerFactory(store, throttle=0, keep_failed=keep_failed)
        with pytest.raises(ValueError, match="boom"):
            async with checkpointed_run(factory, RunInfo(run_id)) as cp:
                await cp.save(RunCheckpointState(messages=_msgs(1), iteration=1))
                raise ValueError("boom")
    fails = otel.spans("fail")
    assert [attrs(s)["run_id"] for s in fails] == ["r-del", "r-kept"]
    assert [attrs(s)["result"] for s in fails] == ["deleted", "kept_failed"]
    for span in fails:
        assert attrs(span)["error"] == "ValueError"
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == "run failed: ValueError"
        assert [e.name for e in span.events] == ["exception"]
        assert span.events[0].attributes is not None
        assert str(span.events[0].attributes["exception.type"]).endswith("ValueError")
    assert otel.spans("complete") == []


async def test_fenced_writes(store: Any, otel: Otel, caplog: pytest.LogCaptureFixture) -> None:
    """A stale writer: its save raises CheckpointFencedError (an ERROR save span, one fenced
    write ``save``), and a stale ``complete`` changes nothing (result ``fenced``, one fenced
    write ``complete``)."""
    caplog.set_level(logging.DEBUG, logger="executus_ckpt")
    factory = StoreCheckpointerFactory(store, throttle=0)
    stale = await factory.begin(RunInfo("r-f"))
    newer = await factory.begin(RunInfo("r-f"))  # takes the run over: epoch 1
    with pytest.raises(CheckpointFencedError):
        await stale.save(RunCheckpointState(messages=_msgs(2), iteration=1))
    other = await factory.begin(RunInfo("r-g"))
    await factory.begin(RunInfo("r-g"))
    await other.complete()  # fenced: another writer holds r-g
    await newer.complete()

    saves = otel.spans("save")
    assert len(saves) == 1
    assert saves[0].status.status_code is StatusCode.ERROR
    assert saves[0].events[0].attributes is not None
    assert str(saves[0].events[0].attributes["exception.type"]).endswith("CheckpointFencedError")
    assert attrs(saves[0])["epoch"] == 0
    fenced = by(otel.points("fenced_writes"), "operation")
    assert fenced["save"].value == 1 and fenced["complete"].value == 1
    assert set(fenced) == {"save", "complete"}
    results = {attrs(s)["run_id"]: attrs(s)["result"] for s in otel.spans("complete")}
    assert results == {"r-g": "fenced", "r-f": "deleted"}
    assert [r.run_id for r in _records(caplog, "fenced")] == ["r-f"]  # type: ignore[attr-defined]
    finalize = _records(caplog, "finalize_fenced")
    assert [_log_fields(r) for r in finalize] == [
        attrs(s) for s in otel.spans("complete") if attrs(s)["run_id"] == "r-g"
    ]


# -- recovery --------------------------------------------------------------------------------


async def _interrupted(store: Any, run_id: str, app_version: str = "v1") -> None:
    """A run begun and saved, then abandoned (no owner: interrupted at once)."""
    factory = StoreCheckpointerFactory(store, throttle=0, app_version=app_version)
    cp = await factory.begin(RunInfo(run_id, inputs={"prompt": "go"}))
    await cp.save(RunCheckpointState(messages=_msgs(2), iteration=1))


async def test_recovery_pass_claims(
    store: Any, otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    """Two passes: the first recovers ``r-ok`` (finished by dispatch) and ``r-stuck`` (no
    progress) and quarantines ``r-old``; the second marks ``r-stuck`` dead. Claims are
    children of their pass, the recovered run's spans children of its claim; the counter
    counts each outcome; the log records carry the claim spans' fields."""
    caplog.set_level(logging.DEBUG, logger="executus_ckpt")
    for run_id in ("r-ok", "r-stuck"):
        await _interrupted(store, run_id)
    await _interrupted(store, "r-old", app_version="v0")
    factory = StoreCheckpointerFactory(store, throttle=0, app_version="v1")

    async def dispatch(cp: RunCheckpoint) -> None:
        if cp.run_id == "r-ok":
            async with checkpointed_run(factory, cp.run_info()) as run:
                await run.save(RunCheckpointState(messages=_msgs(4), iteration=2))

    def accept(cp: RunCheckpoint) -> bool:
        return cp.app_version == "v1"

    first = await recover_interrupted(store, dispatch, max_attempts=1, accept=accept)
    assert sorted(first.dispatched) == ["r-ok", "r-stuck"] and first.quarantined == ("r-old",)
    second = await recover_interrupted(store, dispatch, max_attempts=1, accept=accept)
    assert second.dead == ("r-stuck",)
    idle = await recover_interrupted(store, dispatch, max_attempts=1, accept=accept)
    assert idle.total == 0

    passes = otel.spans("recovery")
    assert len(passes) == 2  # the idle pass emits no span
    assert attrs(passes[0]) == {
        "max_attempts": 1,
        "concurrency": 8,
        "runs_recovered": 2,
        "runs_dead": 0,
        "runs_quarantined": 1,
        "runs_failed": 0,
        "runs_lost": 0,
    }
    assert attrs(passes[1])["runs_dead"] == 1 and attrs(passes[1])["runs_recovered"] == 0
    claims = otel.spans("claim")
    outcomes = [(attrs(c)["run_id"], attrs(c)["outcome"]) for c in claims]
    assert sorted(outcomes[:3]) == [
        ("r-ok", "recovered"),
        ("r-old", "quarantined"),
        ("r-stuck", "recovered"),
    ]
    assert outcomes[3:] == [("r-stuck", "dead")]
    pass_ids = [p.context.span_id for p in passes]
    assert all(c.parent is not None and c.parent.span_id == pass_ids[0] for c in claims[:3])
    assert claims[3].parent is not None and claims[3].parent.span_id == pass_ids[1]
    dead = attrs(claims[3])
    assert dead["attempt"] == 2 and dead["epoch"] >= 2

    # The recovered run: begin, save and complete under its claim.
    ok_claim = next(c for c in claims if attrs(c)["run_id"] == "r-ok")
    for name in ("begin", "save", "complete"):
        span = [s for s in otel.spans(name) if attrs(s)["run_id"] == "r-ok"][-1]
        assert span.parent is not None and span.parent.span_id == ok_claim.context.span_id

    counts = by(otel.points("recovery.runs"), "outcome")
    assert {k: v.value for k, v in counts.items()} == {
        "recovered": 2,
        "quarantined": 1,
        "dead": 1,
    }
    (marked,) = _records(caplog, "mark_dead")
    assert marked.levelno == logging.ERROR
    assert _log_fields(marked) == dead
    (quarantine,) = _records(caplog, "quarantine")
    assert _log_fields(quarantine) == attrs(
        next(c for c in claims if attrs(c)["run_id"] == "r-old")
    )
    passes_logged = _records(caplog, "recovery_pass")
    assert [_log_fields(r) for r in passes_logged[:2]] == [attrs(p) for p in passes]


async def test_failed_dispatch_and_lost_claim(otel: Otel) -> None:
    """A dispatch that raises counts as ``failed``; a run claimed by someone else between
    listing and claiming as ``lost`` (its claim span says so)."""
    store = InMemoryCheckpointStore()
    await _interrupted(store, "r-bad")
    await _interrupted(store, "r-gone")

    original_claim = store.claim

    async def claim(run_id: str, **kwargs: Any) -> RunCheckpoint | None:
        if run_id == "r-gone":
            return None
        return await original_claim(run_id, **kwargs)

    store.claim = claim  # type: ignore[method-assign]

    async def dispatch(cp: RunCheckpoint) -> None:
        raise RuntimeError("no agent for this run")

    report = await recover_interrupted(store, dispatch)
    assert list(report.failed) == ["r-bad"] and report.lost == ("r-gone",)
    counts = by(otel.points("recovery.runs"), "outcome")
    assert {k: v.value for k, v in counts.items()} == {"failed": 1, "lost": 1}
    outcomes = {attrs(c)["run_id"]: attrs(c)["outcome"] for c in otel.spans("claim")}
    assert outcomes == {"r-bad": "recovered", "r-gone": "lost"}
    (pass_span,) = otel.spans("recovery")
    assert attrs(pass_span)["runs_failed"] == 1 and attrs(pass_span)["runs_lost"] == 1


# -- group commit ----------------------------------------------------------------------------


async def test_group_commit_batch_sizes(sql_store: Any, otel: Otel) -> None:
    """Runs saving at once: every write of a SQL store is in exactly one batch (the batch
    histogram's sum is the number of writes it batched), and on SQLite some share one. (The
    memory store does not batch: it records no batch size, see test_begin_save_complete.)"""
    store = sql_store
    kind = _kind(store)
    factory = StoreCheckpointerFactory(store, throttle=0)
    runs = 12
    saves = 5
    checkpointers = [await factory.begin(RunInfo(f"g-{i}")) for i in range(runs)]
    before = sum(p.sum for p in otel.points("group_commit.batch_size"))

    async def work(cp: Any) -> None:
        for i in range(1, saves + 1):
            await cp.save(RunCheckpointState(messages=_msgs(2 * i), iteration=i))

    await asyncio.gather(*(work(cp) for cp in checkpointers))
    (point,) = otel.points("group_commit.batch_size")
    assert point.sum - before == runs * saves
    sizes = [attrs(s)["batch_size"] for s in otel.spans("save")]
    assert len(sizes) == runs * saves and min(sizes) >= 1
    if kind == "sqlite":
        assert point.max > 1 and max(sizes) > 1
    for cp in checkpointers:
        await cp.complete()


# -- the executor: drain, heartbeat age ------------------------------------------------------


async def test_executor_drain_and_heartbeat_age(
    store: Any, otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    """While an executor runs, the heartbeat-age gauge reports it; its drain is a span with
    the runs it cancelled and released, the cancelled run's release is a span of its own, and
    the gauge forgets the executor once it stopped."""
    caplog.set_level(logging.DEBUG, logger="executus_ckpt")
    executor = Executor(
        store, name="ex-1", heartbeat_interval=0.05, stale_after=2.0, sweep_interval=0.05
    )
    started = asyncio.Event()
    async with executor:
        factory = executor.factory(throttle=0)

        async def run() -> None:
            async with checkpointed_run(factory, RunInfo("r-x")) as cp:
                await cp.save(RunCheckpointState(messages=_msgs(2), iteration=1))
                started.set()
                await asyncio.sleep(60)

        task = asyncio.create_task(run())
        await started.wait()
        await asyncio.sleep(0.15)
        ages = by(otel.points("executor.heartbeat_age"), "executor_id")
        assert executor.id in ages
        point = ages[executor.id]
        assert attrs(point) == {"executor_id": executor.id, "executor_name": "ex-1"}
        assert 0 <= point.value < 2.0
        await executor.drain(grace=0.05)
    assert task.done()

    (drain,) = otel.spans("drain")
    assert attrs(drain) == {
        "executor_id": executor.id,
        "executor_name": "ex-1",
        "grace": 0.05,
        "runs_cancelled": 1,
        "runs_released": 0,
    }
    (release,) = otel.spans("release")
    assert attrs(release) == {"run_id": "r-x", "epoch": 0, "result": "released"}
    (begin,) = otel.spans("begin")
    assert attrs(begin)["executor_id"] == executor.id
    assert executor.id not in by(otel.points("executor.heartbeat_age"), "executor_id")
    logged = _records(caplog, "executor_stopped")
    assert [_log_fields(r) for r in logged] == [attrs(drain)]
    assert logged[0].executor_id == executor.id  # type: ignore[attr-defined]


async def test_executor_sweep_claims_carry_the_executor(otel: Otel) -> None:
    """An executor's sweep is a recovery pass of that executor: its claim spans name it and
    the runs it rescued from their previous owner."""
    store = InMemoryCheckpointStore()
    await _interrupted(store, "r-orphan")
    recovered = asyncio.Event()

    async def dispatch(cp: RunCheckpoint) -> None:
        recovered.set()

    async with Executor(store, heartbeat_interval=0.05, stale_after=1.0) as executor:
        executor.recover(dispatch)
        await asyncio.wait_for(recovered.wait(), 5)
    (claim,) = otel.spans("claim")
    assert attrs(claim)["executor_id"] == executor.id and attrs(claim)["outcome"] == "recovered"
    (sweep,) = otel.spans("recovery")
    assert attrs(sweep)["executor_id"] == executor.id


# -- throttle, fields --------------------------------------------------------------------------


async def test_one_save_span_per_write(otel: Otel) -> None:
    """Saves coalesced by the throttle are one write: one span, one duration data point."""
    from executus_ckpt.testing import ManualClock

    clock = ManualClock()
    store = InMemoryCheckpointStore()
    factory = StoreCheckpointerFactory(store, throttle=10.0, clock=clock)
    cp = await factory.begin(RunInfo("r-t"))
    assert isinstance(cp, StoreCheckpointer)
    for i in range(1, 6):
        await cp.save(RunCheckpointState(messages=_msgs(i), iteration=i))
    await clock.run_for(10.0)  # the trailing flush writes the newest state
    saves = otel.spans("save")
    assert [attrs(s)["iteration"] for s in saves] == [1, 5]
    assert [attrs(s)["messages_written"] for s in saves] == [1, 4]
    (point,) = otel.points("save.duration")
    assert point.count == 2
    await cp.complete()


def test_fields_are_valid_log_extra() -> None:
    """Every field can go in a log record's ``extra`` (no clash with LogRecord's own
    attributes) and becomes one prefixed attribute."""
    logger = logging.getLogger("executus_ckpt.test")
    extra = {"action": "x", **{k: 1 for k in telemetry.FIELDS}}
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "m", (), None, extra=extra)
    assert all(getattr(record, k) == 1 for k in telemetry.FIELDS)
    assert len(set(telemetry.FIELDS)) == len(telemetry.FIELDS)


def test_spans_use_only_documented_fields(otel: Otel) -> None:
    """The module docstring lists every span, metric and field the library emits."""
    doc = telemetry.__doc__ or ""
    for field in telemetry.FIELDS:
        assert f"``{field}``" in doc, field
    for name in ("begin", "save", "complete", "fail", "release", "recovery", "claim", "drain"):
        assert f"``executus_ckpt.{name}``" in doc, name
    for metric in (
        "save.duration",
        "save.bytes",
        "group_commit.batch_size",
        "fenced_writes",
        "recovery.runs",
        "executor.heartbeat_age",
    ):
        assert f"``executus_ckpt.{metric}``" in doc, metric


def test_configure_without_providers_goes_back_to_the_globals(otel: Otel) -> None:
    """``configure()`` drops the injected providers (when this process set no global ones)."""
    assert telemetry.enabled()
    if telemetry._global_tracer_provider() or telemetry._global_meter_provider():
        pytest.skip("another test set a global OpenTelemetry provider in this process")
    telemetry.configure()
    try:
        assert not telemetry.enabled()
        assert telemetry.save_started(logging.getLogger("quiet"), "r", "memory", "append") is None
        op = telemetry.operation("begin", run_id="r")
        op.end()  # a no-op operation: fields only
        assert op.fields == {"run_id": "r"}
    finally:
        telemetry.configure(
            tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider
        )
    assert otel.spans() == []


async def test_save_spans_can_be_left_out(otel: Otel) -> None:
    """``configure(save_spans=False)``: no save span, the save metrics and the other spans
    stay."""
    telemetry.configure(
        tracer_provider=otel.tracer_provider,
        meter_provider=otel.meter_provider,
        save_spans=False,
    )
    factory = StoreCheckpointerFactory(InMemoryCheckpointStore(), throttle=0)
    async with checkpointed_run(factory, RunInfo("r-s")) as cp:
        await cp.save(RunCheckpointState(messages=_msgs(2), iteration=1))
    assert otel.spans("save") == []
    assert len(otel.spans("begin")) == 1 and len(otel.spans("complete")) == 1
    (point,) = otel.points("save.duration")
    assert point.count == 1
    (written,) = otel.points("save.bytes")
    assert written.value > 0
