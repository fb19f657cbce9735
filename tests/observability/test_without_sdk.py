"""Without OpenTelemetry, or with its API and no SDK, the library works and records nothing;
an SDK set up after the import (the global providers) is picked up. Each case runs in a
fresh interpreter: the global providers can be set only once per process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

RUN = textwrap.dedent(
    """
    import asyncio, logging
    from executus_ckpt import (
        Executor, InMemoryCheckpointStore, RunCheckpointState, RunInfo, SQLCheckpointStore,
        StoreCheckpointerFactory, checkpointed_run, migrate, recover_interrupted, telemetry,
    )

    async def exercise(store):
        factory = StoreCheckpointerFactory(store, throttle=0)
        async with checkpointed_run(factory, RunInfo("r-1")) as cp:
            for i in range(1, 4):
                state = RunCheckpointState(messages=[{"i": j} for j in range(i)], iteration=i)
                await cp.save(state)
        assert await store.load("r-1") is None  # complete() deleted it
        try:
            async with checkpointed_run(factory, RunInfo("r-2")) as cp:
                await cp.save(RunCheckpointState(messages=[{"i": 0}], iteration=1))
                raise ValueError("boom")
        except ValueError:
            pass
        abandoned = await factory.begin(RunInfo("r-3"))
        await abandoned.save(RunCheckpointState(messages=[{"i": 0}], iteration=1))
        seen = []
        async def dispatch(cp):
            seen.append(cp.run_id)
        report = await recover_interrupted(store, dispatch)
        assert report.dispatched == ("r-3",), report
        async with Executor(store, heartbeat_interval=0.05, stale_after=1.0) as executor:
            async with checkpointed_run(executor.factory(throttle=0), RunInfo("r-4")) as cp:
                await cp.save(RunCheckpointState(messages=[{"i": 0}], iteration=1))

    async def main(sqlite_url):
        await exercise(InMemoryCheckpointStore())
        await migrate(sqlite_url)
        async with SQLCheckpointStore.open(sqlite_url) as store:
            await exercise(store)
    """
)


def _python(code: str, tmp_path: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code, f"sqlite+aiosqlite:///{tmp_path / 'ckpt.db'}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_works_without_opentelemetry(tmp_path: Path) -> None:
    """``opentelemetry`` not importable: save, complete, fail, recovery and an executor work,
    and the log records still carry their fields."""
    code = (
        "import sys\nsys.modules['opentelemetry'] = None\n"
        + RUN
        + textwrap.dedent(
            """
            records = []
            class Keep(logging.Handler):
                def emit(self, record):
                    records.append(record)
            logging.getLogger("executus_ckpt").addHandler(Keep())
            logging.getLogger("executus_ckpt").setLevel(logging.DEBUG)
            assert not telemetry.OTEL_AVAILABLE and not telemetry.enabled()
            asyncio.run(main(sys.argv[1]))
            saves = [r for r in records if getattr(r, "action", None) == "save_checkpoint"]
            assert saves and all(r.run_id and r.path and r.bytes for r in saves)
            assert any(getattr(r, "action", None) == "run_failed" for r in records)
            try:
                telemetry.configure(tracer_provider=object())
            except RuntimeError:
                pass
            else:
                raise AssertionError("configure() accepted a provider without OpenTelemetry")
            print("ok", "opentelemetry" in sys.modules and sys.modules["opentelemetry"] is not None)
            """
        )
    )
    assert _python(code, tmp_path) == "ok False"


def test_api_without_sdk_then_global_providers(tmp_path: Path) -> None:
    """The API alone records nothing (no save record is even made); global providers set
    after the import are picked up at the next operation, without ``configure``."""
    code = RUN + textwrap.dedent(
        """
        import sys
        assert telemetry.OTEL_AVAILABLE and not telemetry.enabled()
        assert telemetry.save_started(logging.getLogger("x"), "r", "memory", "append") is None
        asyncio.run(main(sys.argv[1]))
        assert not telemetry.enabled()

        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        asyncio.run(main(sys.argv[1].replace("ckpt.db", "ckpt2.db")))
        names = sorted({s.name for s in exporter.get_finished_spans()})
        scope = {s.instrumentation_scope.name for s in exporter.get_finished_spans()}
        version = {s.instrumentation_scope.version for s in exporter.get_finished_spans()}
        data = reader.get_metrics_data()
        metric_names = sorted(
            m.name for r in data.resource_metrics for sm in r.scope_metrics for m in sm.metrics
        )
        import executus_ckpt
        assert scope == {"executus_ckpt"} and version == {executus_ckpt.__version__}
        print(" ".join(names))
        print(" ".join(metric_names))
        """
    )
    spans, metrics = _python(code, tmp_path).splitlines()
    assert spans.split() == [
        "executus_ckpt.begin",
        "executus_ckpt.claim",
        "executus_ckpt.complete",
        "executus_ckpt.drain",
        "executus_ckpt.fail",
        "executus_ckpt.recovery",
        "executus_ckpt.save",
    ]
    assert set(metrics.split()) >= {
        "executus_ckpt.save.duration",
        "executus_ckpt.save.bytes",
        "executus_ckpt.group_commit.batch_size",
        "executus_ckpt.recovery.runs",
    }
