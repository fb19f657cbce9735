"""OpenTelemetry spans and metrics, and the one log helper (the ``otel`` extra).

Only the OpenTelemetry *API* is used (``pip install "executus-ckpt[otel]"``): without an SDK,
or without OpenTelemetry at all, nothing is recorded and the cost is one check per operation.
The host configures OpenTelemetry as usual (``trace.set_tracer_provider``,
``metrics.set_meter_provider``, or ``opentelemetry-instrument``), before or after importing
this library; :func:`configure` hands it providers directly instead (tests, hosts that keep
their own), or drops the per-save span. Tracer and meter: ``"executus_ckpt"``, the package's
version.

Spans (attribute names are the fields below with the ``executus_ckpt.`` prefix; a field
whose value is unknown is left out):

- ``executus_ckpt.begin``: ``factory.begin`` writing the run's initial row. ``run_id``,
  ``agent_id``, ``executor_id``, ``epoch``.
- ``executus_ckpt.save``: one write of a run's state (a save, a flush or a trailing flush;
  saves coalesced by the throttle are one write). ``run_id``, ``epoch``, ``iteration``,
  ``store`` (``memory``, ``sqlite``, ``postgresql``), ``path``, ``messages_written``,
  ``bytes`` (encoded message bytes written), ``message_count`` (transcript length after),
  ``batch_size`` (writes sharing its SQLite transaction or PostgreSQL append statement).
  ``path``: ``append`` (only the new messages and the header), ``rewrite`` (the host
  replaced a message it had saved before: the transcript rewritten in full), ``fallback``
  (the guarded append matched nothing, e.g. a shorter, compacted transcript or a run
  another writer changed: rewritten in full in the same save), ``upsert``
  (``CheckpointStore.save``, for a store without appends).
- ``executus_ckpt.complete`` / ``executus_ckpt.fail``: finalizing a run. ``run_id``,
  ``epoch``, ``result`` (``deleted``, ``kept_failed``, ``fenced``: a newer writer owns the
  run and nothing changed, ``skipped``: already released), ``error`` (the run's exception
  type). A ``fail`` span has status ERROR and the run's exception as an event.
- ``executus_ckpt.release``: a shutdown handing the run back for recovery. ``run_id``,
  ``epoch``, ``result`` (``released``, ``fenced``).
- ``executus_ckpt.recovery``: a recovery pass (``recover_interrupted``, each ``Executor``
  sweep) that tried to claim a run (an idle sweep emits none). ``executor_id``,
  ``max_attempts``, ``concurrency``, ``runs_recovered``, ``runs_dead``, ``runs_quarantined``,
  ``runs_failed``, ``runs_lost``.
- ``executus_ckpt.claim``: one claim in a pass, a child of its ``recovery`` span. ``run_id``,
  ``epoch`` (after the claim), ``executor_id`` (the claimer), ``previous_owner``,
  ``attempt`` (claims without progress, this one included), ``outcome`` (``recovered``:
  handed to ``dispatch``; ``dead``; ``quarantined``; ``lost``: claimed elsewhere). The
  recovered run's own spans (``begin``, ``save``...) are its children.
- ``executus_ckpt.drain``: ``Executor.drain``. ``executor_id``, ``executor_name``, ``grace``,
  ``runs_cancelled`` (still running after ``grace``: cancelled, each releases itself),
  ``runs_released`` (still owned at the end: released by the drain).

An operation that raises has status ERROR and its exception recorded (a cancellation is
not an error).

Metrics (attribute names prefixed too):

- ``executus_ckpt.save.duration`` (histogram, ``s``): seconds per write of a run's state;
  ``store``, ``path``, and ``error`` (the exception type) on a failed write.
- ``executus_ckpt.save.bytes`` (observable counter, ``By``): encoded message bytes written;
  ``store``, ``path``.
- ``executus_ckpt.group_commit.batch_size`` (histogram, ``{write}``): writes per SQLite
  transaction or per PostgreSQL append statement; ``store``.
- ``executus_ckpt.fenced_writes`` (counter, ``{write}``): writes refused because a newer
  writer owns the run; ``operation`` (``begin``, ``save``, ``complete``, ``fail``,
  ``release``).
- ``executus_ckpt.recovery.runs`` (counter, ``{run}``): runs handled by recovery passes;
  ``outcome`` (``recovered``: ``dispatch`` returned, ``dead``, ``quarantined``, ``failed``:
  ``dispatch``, ``accept`` or the store raised, ``lost``).
- ``executus_ckpt.executor.heartbeat_age`` (observable gauge, ``s``): seconds since each
  running ``Executor`` of this process last heartbeat successfully; ``executor_id``,
  ``executor_name``.

Logs: the records of these events are emitted by :func:`log`, whose ``extra`` is ``action``
plus the event's fields under their plain names (``record.run_id``, ``record.epoch``...):
the same fields as the span's attributes (:data:`FIELDS` lists them all).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

try:
    from opentelemetry import context as _context
    from opentelemetry import metrics as _metrics
    from opentelemetry import trace as _trace
except ImportError:  # the `otel` extra is not installed: telemetry is off, logs still work
    OTEL_AVAILABLE = False
else:
    OTEL_AVAILABLE = True

__all__ = [
    "FIELDS",
    "NAME",
    "OTEL_AVAILABLE",
    "PREFIX",
    "Operation",
    "SaveRecord",
    "configure",
    "count_fenced",
    "count_recovery",
    "enabled",
    "log",
    "note_batch",
    "note_save",
    "operation",
    "record_batch",
    "save_started",
    "store_kind",
    "unwatch_executor",
    "watch_executor",
]

NAME = "executus_ckpt"
"""The tracer's and meter's name, and the prefix of every span, metric and attribute."""

PREFIX = NAME + "."

FIELDS = (
    "run_id",
    "agent_id",
    "executor_id",
    "executor_name",
    "previous_owner",
    "epoch",
    "iteration",
    "store",
    "path",
    "messages_written",
    "bytes",
    "message_count",
    "batch_size",
    "result",
    "error",
    "attempt",
    "outcome",
    "operation",
    "max_attempts",
    "concurrency",
    "runs_recovered",
    "runs_dead",
    "runs_quarantined",
    "runs_failed",
    "runs_lost",
    "grace",
    "runs_cancelled",
    "runs_released",
)
"""Every field an instrumented event carries: span and metric attributes are these names with
:data:`PREFIX`, log records carry them as attributes (``extra``) under the plain names."""

_MISSING = object()

_DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


# -- the one log helper ---------------------------------------------------------------------


def log(
    logger: logging.Logger,
    level: int,
    msg: str,
    *args: object,
    action: str,
    exc_info: BaseException | bool | None = None,
    **fields: Any,
) -> None:
    """Log an instrumented event: ``extra`` is ``action`` plus ``fields``, the event's span
    attributes without their ``executus_ckpt.`` prefix (``None`` values included)."""
    _emit(logger, level, msg, args, action, exc_info, fields, 3)


def _emit(
    logger: logging.Logger,
    level: int,
    msg: str,
    args: tuple[object, ...],
    action: str,
    exc_info: BaseException | bool | None,
    fields: Mapping[str, Any],
    stacklevel: int,
) -> None:
    """``stacklevel``: frames from here up to the library code that logs (its line and
    function go on the record)."""
    if logger.isEnabledFor(level):
        logger.log(
            level,
            msg,
            *args,
            extra={"action": action, **fields},
            exc_info=exc_info,
            stacklevel=stacklevel,
        )


def _attributes(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Span/metric attributes: prefixed names, ``None`` left out, other values than
    ``str``/``bool``/``int``/``float`` as text."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if value is None:
            continue
        if not isinstance(value, str | bool | int | float):
            value = str(value)
        out[PREFIX + key] = value
    return out


# -- providers, tracer and instruments ------------------------------------------------------


class _Instruments:
    """The metric instruments, created once per meter."""

    def __init__(self, meter: Any) -> None:
        self.save_duration = _histogram(
            meter,
            PREFIX + "save.duration",
            "s",
            "Seconds per write of a run's checkpoint",
            _DURATION_BUCKETS,
        )
        # Observed: a save adds to a plain dict (a synchronous counter's add() costs the
        # SDK several microseconds per save); the SDK reads the totals when it collects.
        self.bytes_written: dict[tuple[str, str], int] = {}
        self.save_bytes = meter.create_observable_counter(
            PREFIX + "save.bytes",
            callbacks=[self._observe_bytes],
            unit="By",
            description="Encoded message bytes written",
        )
        self.batch_size = _histogram(
            meter,
            PREFIX + "group_commit.batch_size",
            "{write}",
            "Writes sharing one transaction or statement",
            _BATCH_BUCKETS,
        )
        self.fenced = meter.create_counter(
            PREFIX + "fenced_writes",
            unit="{write}",
            description="Writes refused because a newer writer owns the run",
        )
        self.recovery = meter.create_counter(
            PREFIX + "recovery.runs", unit="{run}", description="Runs handled by recovery passes"
        )
        self.heartbeat_age = meter.create_observable_gauge(
            PREFIX + "executor.heartbeat_age",
            callbacks=[_observe_heartbeats],
            unit="s",
            description="Seconds since the executor's last successful heartbeat",
        )

    def _observe_bytes(self, options: Any) -> list[Any]:
        totals = dict(self.bytes_written)  # one C-level copy: safe from the export thread
        return [
            _metrics.Observation(total, {PREFIX + "store": store, PREFIX + "path": path})
            for (store, path), total in totals.items()
        ]


def _histogram(meter: Any, name: str, unit: str, description: str, buckets: Iterable[float]) -> Any:
    try:
        return meter.create_histogram(
            name,
            unit=unit,
            description=description,
            explicit_bucket_boundaries_advisory=list(buckets),
        )
    except TypeError:  # opentelemetry-api < 1.30: no advisory boundaries
        return meter.create_histogram(name, unit=unit, description=description)


class _State:
    """What is on: ``tracer`` once a tracer provider is there, ``instruments`` once a meter
    provider is; ``complete`` when both are (then nothing is looked up again)."""

    __slots__ = (
        "complete",
        "instruments",
        "meter_provider",
        "save_spans",
        "tracer",
        "tracer_provider",
    )

    def __init__(self) -> None:
        self.save_spans = True
        self.tracer: Any = None
        self.instruments: _Instruments | None = None
        self.tracer_provider: Any = None  # from configure(); None: the global one
        self.meter_provider: Any = None
        self.complete = False


_state = _State()
_lock = threading.Lock()


def _version() -> str:
    from . import __version__

    return __version__


def _globals_of(module: Any, name: str) -> Any:
    """``module`` if it holds the API's global provider as ``name``, else None."""
    return module if getattr(module, name, _MISSING) is not _MISSING else None


# The API modules' globals are read directly: one attribute read per check, where
# ``get_tracer_provider()`` also looks up an environment variable. An API without them falls
# back to the public calls.
_TRACE_GLOBALS: Any = _globals_of(_trace, "_TRACER_PROVIDER") if OTEL_AVAILABLE else None
_METRICS_GLOBALS: Any = (
    _globals_of(getattr(_metrics, "_internal", None), "_METER_PROVIDER") if OTEL_AVAILABLE else None
)

_FAST_CHECK = _TRACE_GLOBALS is not None and _METRICS_GLOBALS is not None


def _global_tracer_provider() -> Any:
    """The global tracer provider once one is set, else None."""
    if _TRACE_GLOBALS is not None:
        return _TRACE_GLOBALS._TRACER_PROVIDER
    provider = _trace.get_tracer_provider()
    return None if isinstance(provider, _trace.ProxyTracerProvider) else provider


def _global_meter_provider() -> Any:
    """The global meter provider once one is set, else None."""
    if _METRICS_GLOBALS is not None:
        return _METRICS_GLOBALS._METER_PROVIDER
    provider = _metrics.get_meter_provider()
    return None if type(provider).__name__ == "_ProxyMeterProvider" else provider


def _load_env_providers() -> None:
    """Providers named by ``OTEL_PYTHON_TRACER_PROVIDER``/``OTEL_PYTHON_METER_PROVIDER`` are
    loaded by the API's first ``get_*_provider()`` call: make it."""
    import os

    if "OTEL_PYTHON_TRACER_PROVIDER" in os.environ:
        _trace.get_tracer_provider()
    if "OTEL_PYTHON_METER_PROVIDER" in os.environ:
        _metrics.get_meter_provider()


def _refresh() -> bool:
    """Pick up providers set since the last look; True if tracing or metrics are on."""
    state = _state
    if (
        _FAST_CHECK
        and _TRACE_GLOBALS._TRACER_PROVIDER is None
        and _METRICS_GLOBALS._METER_PROVIDER is None
        and state.tracer_provider is None
        and state.meter_provider is None
    ):
        return False  # the common "no SDK" case: two attribute reads
    if not OTEL_AVAILABLE:
        return False
    tracer_provider = state.tracer_provider or _global_tracer_provider()
    meter_provider = state.meter_provider or _global_meter_provider()
    if (tracer_provider is not None and state.tracer is None) or (
        meter_provider is not None and state.instruments is None
    ):
        with _lock:
            if tracer_provider is not None and state.tracer is None:
                state.tracer = _trace.get_tracer(NAME, _version(), tracer_provider=tracer_provider)
            if meter_provider is not None and state.instruments is None:
                state.instruments = _instruments_of(meter_provider)
            state.complete = state.tracer is not None and state.instruments is not None
    return state.tracer is not None or state.instruments is not None


_by_provider: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()


def _instruments_of(meter_provider: Any) -> _Instruments:
    """The instruments on ``meter_provider``, created once per provider (an SDK meter hands
    back an observable instrument created before with its first callbacks)."""
    try:
        inst = _by_provider.get(meter_provider)
    except TypeError:  # a provider that cannot be weakly referenced: not cached
        inst = None
    if inst is None:
        inst = _Instruments(_metrics.get_meter(NAME, _version(), meter_provider=meter_provider))
        with contextlib.suppress(TypeError):
            _by_provider[meter_provider] = inst
    return inst


def enabled() -> bool:
    """True if spans or metrics are recorded (an SDK, or another implementation, is set)."""
    return _state.complete or _refresh()


def _tracer() -> Any:
    return _state.tracer if _state.complete or _refresh() else None


def _instruments() -> _Instruments | None:
    return _state.instruments if _state.complete or _refresh() else None


def configure(
    *, tracer_provider: Any = None, meter_provider: Any = None, save_spans: bool = True
) -> None:
    """Record through these providers instead of the global ones (tests; hosts that keep
    their own providers). ``configure()`` goes back to the global providers.

    ``save_spans=False`` records no ``executus_ckpt.save`` span (the save metrics and the
    other spans stay): with the SDK, a recorded span costs tens of microseconds of CPU per
    save (README, "Observability"), a lot for a host whose runs save many times a second.

    Raises:
        RuntimeError: a provider is given but OpenTelemetry is not installed.
    """
    if not OTEL_AVAILABLE:
        if tracer_provider is not None or meter_provider is not None:
            raise RuntimeError('OpenTelemetry is not installed: pip install "executus-ckpt[otel]"')
        return
    with _lock:
        _state.save_spans = save_spans
        _state.tracer_provider = tracer_provider
        _state.meter_provider = meter_provider
        _state.tracer = None
        _state.instruments = None
        _state.complete = False
    _refresh()


if OTEL_AVAILABLE:
    _load_env_providers()


# -- operations (spans) ---------------------------------------------------------------------


class Operation:
    """One instrumented operation: its fields (span attributes and log ``extra``) and, when
    tracing is on, its span.

    ``with operation:`` makes the span current and records an exception that escapes
    (cancellation is not an error); or call :meth:`end`. A ``lazy`` operation starts its span
    only when a child needs it (:meth:`context`) or it fails: an idle sweep emits nothing.
    """

    __slots__ = (
        "_ended",
        "_lazy",
        "_parent",
        "_span",
        "_start_ns",
        "_token",
        "_tracer",
        "fields",
        "name",
    )

    def __init__(
        self,
        name: str,
        fields: dict[str, Any],
        tracer: Any,
        parent: Operation | None,
        lazy: bool,
    ) -> None:
        self.name = name
        self.fields = fields
        self._tracer = tracer
        self._parent = parent
        self._span: Any = None
        self._token: Any = None
        self._ended = False
        self._lazy = lazy
        self._start_ns = time.time_ns() if tracer is not None else 0
        if tracer is not None and not lazy:
            self._start()

    def _start(self) -> Any:
        if self._span is None and self._tracer is not None:
            parent = self._parent.context() if self._parent is not None else None
            self._span = self._tracer.start_span(
                self.name,
                context=parent,
                attributes=_attributes(self.fields),
                start_time=self._start_ns,
            )
        return self._span

    def set(self, **fields: Any) -> None:
        """Add or change fields (set on the span when it ends)."""
        self.fields.update(fields)

    def context(self) -> Any:
        """A context whose current span is this operation's (None when tracing is off)."""
        span = self._start()
        return None if span is None else _trace.set_span_in_context(span)

    def fail(self, error: BaseException | None, description: str | None = None) -> None:
        """Mark the operation failed: status ERROR, ``error`` (if any) recorded as an event."""
        span = self._start()
        if span is not None and not self._ended:
            if error is not None:
                span.record_exception(error)
                description = description or f"{type(error).__name__}: {error}"
            span.set_status(_trace.Status(_trace.StatusCode.ERROR, description))

    def end(self) -> None:
        """End the span (idempotent); its attributes are the fields as they are now."""
        if self._ended:
            return
        self._ended = True
        span = self._span
        if span is None and not self._lazy:
            span = self._start()
        if span is not None:
            span.set_attributes(_attributes(self.fields))
            span.end()

    def log(
        self,
        logger: logging.Logger,
        level: int,
        msg: str,
        *args: object,
        action: str,
        exc_info: BaseException | bool | None = None,
    ) -> None:
        """:func:`log` with this operation's fields."""
        _emit(logger, level, msg, args, action, exc_info, self.fields, 3)

    @contextlib.contextmanager
    def activated(self) -> Iterator[None]:
        """Make this operation's span the current one (its parent for what runs inside),
        even after it ended."""
        ctx = self.context()
        if ctx is None:
            yield
            return
        token = _context.attach(ctx)
        try:
            yield
        finally:
            _context.detach(token)

    def __enter__(self) -> Operation:
        ctx = self.context()
        if ctx is not None:
            self._token = _context.attach(ctx)
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        token, self._token = self._token, None
        if token is not None:
            _context.detach(token)
        if isinstance(exc, Exception):
            self.fail(exc)
        self.end()


def operation(
    name: str, *, parent: Operation | None = None, lazy: bool = False, **fields: Any
) -> Operation:
    """Start an instrumented operation (span ``executus_ckpt.<name>``) with ``fields``.

    ``parent``: the operation whose span is this one's parent (default: the current span).
    """
    return Operation(PREFIX + name, fields, _tracer(), parent, lazy)


# -- the save hot path ----------------------------------------------------------------------


class SaveRecord:
    """One write of a run's state, filled in by the store (:func:`note_save`,
    :func:`note_batch`) and finished by the checkpointer (:meth:`finish`)."""

    __slots__ = (
        "_inst",
        "_logger",
        "_start_ns",
        "_t0",
        "_token",
        "_tracer",
        "batch_size",
        "bytes",
        "message_count",
        "messages",
        "path",
        "run_id",
        "store",
    )

    def __init__(
        self, logger: logging.Logger, run_id: str, store: str, path: str, tracer: Any, inst: Any
    ) -> None:
        self._logger = logger
        self.run_id = run_id
        self.store = store
        self.path = path
        self.messages: int | None = None
        self.bytes: int | None = None
        self.message_count: int | None = None
        self.batch_size: int | None = None
        self._tracer = tracer
        self._inst = inst
        self._start_ns = time.time_ns() if tracer is not None else 0
        self._t0 = time.perf_counter()
        self._token = _CURRENT.set(self)

    def fields(self, epoch: int | None, iteration: int) -> dict[str, Any]:
        """The save's fields (span attributes and log ``extra``)."""
        return {
            "run_id": self.run_id,
            "epoch": epoch,
            "iteration": iteration,
            "store": self.store,
            "path": self.path,
            "messages_written": self.messages,
            "bytes": self.bytes,
            "message_count": self.message_count,
            "batch_size": self.batch_size,
        }

    def finish(self, epoch: int | None, iteration: int, error: BaseException | None) -> None:
        """The write returned (``error`` None) or raised: emit its span, metrics and log (a
        write cancelled at loop shutdown only ends its span)."""
        duration = time.perf_counter() - self._t0
        _CURRENT.reset(self._token)
        failed = isinstance(error, Exception)
        tracer = self._tracer
        if tracer is not None:
            # The attributes of fields(), built directly: this runs once per save.
            attributes: dict[str, Any] = {
                _RUN_ID: self.run_id,
                _ITERATION: iteration,
                _STORE: self.store,
                _PATH: self.path,
            }
            if epoch is not None:
                attributes[_EPOCH] = epoch
            if self.messages is not None:
                attributes[_MESSAGES] = self.messages
                attributes[_BYTES] = self.bytes
                attributes[_COUNT] = self.message_count
            if self.batch_size is not None:
                attributes[_BATCH] = self.batch_size
            span = tracer.start_span(_SAVE, attributes=attributes, start_time=self._start_ns)
            if error is not None and failed:
                span.record_exception(error)
                span.set_status(
                    _trace.Status(_trace.StatusCode.ERROR, f"{type(error).__name__}: {error}")
                )
            span.end()
        inst = self._inst
        if inst is not None and (error is None or failed):
            key = (self.store, self.path)
            if error is None:
                attrs = _METRIC_ATTRIBUTES.get(key)
                if attrs is None:
                    attrs = _METRIC_ATTRIBUTES[key] = {_STORE: self.store, _PATH: self.path}
            else:
                attrs = {_STORE: self.store, _PATH: self.path, _ERROR: type(error).__name__}
            inst.save_duration.record(duration, attrs)
            if error is None and self.bytes:
                totals = inst.bytes_written
                totals[key] = totals.get(key, 0) + self.bytes
        if error is None and self._logger.isEnabledFor(logging.DEBUG):
            _log_save(self._logger, self.fields(epoch, iteration))


_SAVE = PREFIX + "save"
_RUN_ID, _EPOCH, _ITERATION, _STORE, _PATH, _MESSAGES, _BYTES, _COUNT, _BATCH, _ERROR = (
    PREFIX + name
    for name in (
        "run_id",
        "epoch",
        "iteration",
        "store",
        "path",
        "messages_written",
        "bytes",
        "message_count",
        "batch_size",
        "error",
    )
)
_METRIC_ATTRIBUTES: dict[tuple[str, str], dict[str, str]] = {}
"""The save metrics' attributes by (store, path), built once (never mutated)."""


_CURRENT: contextvars.ContextVar[SaveRecord | None] = contextvars.ContextVar(
    "executus_ckpt_save", default=None
)


def save_started(logger: logging.Logger, run_id: str, store: str, path: str) -> SaveRecord | None:
    """Start recording a write of ``run_id``'s state in the current task, or None when
    nobody listens (no tracing, no metrics, ``logger`` not at DEBUG). ``path`` is the
    default if the store does not report one."""
    state = _state
    if state.complete or _refresh():
        tracer = state.tracer if state.save_spans else None
        return SaveRecord(logger, run_id, store, path, tracer, state.instruments)
    if logger.isEnabledFor(logging.DEBUG):
        return SaveRecord(logger, run_id, store, path, None, None)
    return None


def note_save(
    logger: logging.Logger,
    run_id: str,
    iteration: int,
    path: str,
    messages: int,
    nbytes: int,
    message_count: int,
) -> None:
    """A store wrote ``messages`` messages (``nbytes`` encoded bytes) by ``path``.

    Inside a checkpointer's write the numbers go to its save record (one span, one log
    line); a direct store call logs them at DEBUG on ``logger``.
    """
    record = _CURRENT.get()
    if record is not None and record.run_id == run_id:
        record.path = path
        record.messages = messages
        record.bytes = nbytes
        record.message_count = message_count
    elif logger.isEnabledFor(logging.DEBUG):
        _log_save(
            logger,
            {
                "run_id": run_id,
                "iteration": iteration,
                "path": path,
                "messages_written": messages,
                "bytes": nbytes,
                "message_count": message_count,
            },
        )


def note_batch(size: int) -> None:
    """The current write shared its transaction (or statement) with ``size - 1`` others."""
    record = _CURRENT.get()
    if record is not None and size:
        record.batch_size = size


def _log_save(logger: logging.Logger, fields: dict[str, Any]) -> None:
    args = (fields["run_id"], fields["iteration"], fields["path"])
    counts = (fields["messages_written"], fields["bytes"])
    _emit(logger, logging.DEBUG, _SAVED, args + counts, "save_checkpoint", None, fields, 4)


_SAVED = "saved run %s at iteration %d: %s, %s messages (%s bytes)"


# -- metrics --------------------------------------------------------------------------------


def record_batch(store: str, size: int) -> None:
    """A group commit of ``size`` writes (one transaction or statement)."""
    inst = _instruments()
    if inst is not None:
        inst.batch_size.record(size, {PREFIX + "store": store})


def count_fenced(operation: str) -> None:
    """A write refused because a newer writer owns the run (``operation``: ``begin``,
    ``save``, ``complete``, ``fail``, ``release``)."""
    inst = _instruments()
    if inst is not None:
        inst.fenced.add(1, {PREFIX + "operation": operation})


def count_recovery(outcome: str, count: int = 1) -> None:
    """Runs a recovery pass handled (``outcome``: ``recovered``, ``dead``, ``quarantined``,
    ``failed``, ``lost``)."""
    inst = _instruments()
    if inst is not None and count:
        inst.recovery.add(count, {PREFIX + "outcome": outcome})


_executors: dict[str, tuple[str | None, Callable[[], float | None]]] = {}
_executors_lock = threading.Lock()


def watch_executor(executor_id: str, name: str | None, age: Callable[[], float | None]) -> None:
    """Report ``age()`` (seconds since the executor's last heartbeat, None if unknown) in
    the heartbeat-age gauge until :func:`unwatch_executor`."""
    with _executors_lock:
        _executors[executor_id] = (name, age)
    _refresh()


def unwatch_executor(executor_id: str) -> None:
    """Stop reporting the executor's heartbeat age."""
    with _executors_lock:
        _executors.pop(executor_id, None)


def _observe_heartbeats(options: Any) -> list[Any]:
    """The gauge's callback (may run on the SDK's export thread)."""
    with _executors_lock:
        watched = list(_executors.items())
    observations = []
    for executor_id, (name, age) in watched:
        value = age()
        if value is not None:
            attrs = _attributes({"executor_id": executor_id, "executor_name": name})
            observations.append(_metrics.Observation(value, attrs))
    return observations


def store_kind(store: object) -> str:
    """The ``store`` attribute of a store: its SQL dialect, ``memory``, or its class name."""
    dialect = getattr(store, "dialect", None)
    if isinstance(dialect, str):
        return dialect
    name = type(store).__name__
    return "memory" if name == "InMemoryCheckpointStore" else name
