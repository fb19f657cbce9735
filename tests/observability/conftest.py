"""The OpenTelemetry SDK's in-memory exporter and reader, handed to the library per test
(``telemetry.configure``: the global providers can be set only once per process)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from executus_ckpt import telemetry

PREFIX = telemetry.PREFIX


class Otel:
    """What the library recorded in one test."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.tracer = self.tracer_provider.get_tracer("tests")

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        """Finished spans, oldest first; ``name`` without the ``executus_ckpt.`` prefix."""
        spans = list(self.exporter.get_finished_spans())
        if name is None:
            return spans
        return [s for s in spans if s.name == PREFIX + name]

    def points(self, metric: str) -> list[Any]:
        """The data points of ``metric`` (name without the prefix) collected now."""
        data = self.reader.get_metrics_data()
        found: list[Any] = []
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for m in scope.metrics:
                    if m.name == PREFIX + metric:
                        found.extend(m.data.data_points)
        return found


def attrs(item: Any) -> dict[str, Any]:
    """A span's or data point's attributes, prefix stripped."""
    return {k.removeprefix(PREFIX): v for k, v in (item.attributes or {}).items()}


def by(points: list[Any], key: str) -> dict[Any, Any]:
    """Data points keyed by one attribute (prefix stripped)."""
    return {attrs(p).get(key): p for p in points}


@pytest.fixture
def otel() -> Iterator[Otel]:
    recorded = Otel()
    telemetry.configure(
        tracer_provider=recorded.tracer_provider, meter_provider=recorded.meter_provider
    )
    try:
        yield recorded
    finally:
        telemetry.configure()
        recorded.meter_provider.shutdown()
        recorded.tracer_provider.shutdown()
