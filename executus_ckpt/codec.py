"""Transcript encoding: JSON text, strict and lossless.

Defined behaviour, identical on every backend (the text is stored as-is):
- NaN and ±Infinity are rejected (JSON has no such numbers);
- non-``str`` mapping keys are rejected (JSON would silently turn ``1`` into ``"1"``);
- strings with lone surrogates are rejected (not valid Unicode; PostgreSQL cannot store them);
- ``"\\u0000"`` round-trips (it is escaped in the text);
- tuples are encoded as JSON arrays and come back as lists;
- anything else that is not a JSON value (datetimes, dataclasses, enums, ``uuid.UUID``,
  ``decimal.Decimal``, ``orjson.Fragment``, sets, bytes, integers beyond 64 bits, subclasses
  of dict/list/str) is rejected rather than coerced.
Each rejection is a :class:`CheckpointSerializationError` raised before anything is written.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import orjson

from .errors import CheckpointSerializationError
from .types import JSONValue

M = TypeVar("M")


@dataclass(frozen=True, slots=True)
class MessageCodec(Generic[M]):
    """How a host's own message objects (a framework's types) are stored and given back.

    Set on a factory (``StoreCheckpointerFactory(store, message_codec=...)``), it lets ``save``
    take the framework's messages: each new or replaced message is dumped once to a
    JSON-compatible value (the unchanged prefix of a transcript is recognised by identity, as
    for plain messages), and :meth:`StoreCheckpointerFactory.resume_state` loads them back.

    Args:
        dump: one message to a JSON-compatible value (``dict``/``list``/``str``/numbers/...).
        load: the stored JSON value back to a message.
        load_many: optional; loads a whole transcript at once (e.g. a pydantic ``TypeAdapter``
            over a list), used instead of ``load`` per message when given.

    Any exception from ``dump``/``load`` (or a dump that is not JSON-compatible) becomes a
    :class:`CheckpointSerializationError` naming the run, the message index and its type;
    a failed save writes nothing.
    """

    dump: Callable[[M], Any]
    load: Callable[[Any], M]
    load_many: Callable[[list[Any]], list[M]] | None = None

    def dump_one(self, message: M, index: int, run_id: str | None) -> object:
        """``dump(message)``, with its errors typed."""
        try:
            return self.dump(message)
        except Exception as exc:
            raise CheckpointSerializationError(
                f"message {index} of run {run_id!r} ({_type_name(message)}) could not be "
                f"dumped by the message codec: {exc}",
                run_id=run_id,
            ) from exc

    def load_all(self, values: Sequence[Any], run_id: str | None = None) -> list[M]:
        """Load a stored transcript (or part of it), with errors typed."""
        values = list(values)
        if self.load_many is not None:
            try:
                return list(self.load_many(values))
            except Exception as exc:
                raise CheckpointSerializationError(
                    f"transcript of run {run_id!r} could not be loaded by the message codec: {exc}",
                    run_id=run_id,
                ) from exc
        loaded: list[M] = []
        for index, value in enumerate(values):
            try:
                loaded.append(self.load(value))
            except Exception as exc:
                raise CheckpointSerializationError(
                    f"message {index} of run {run_id!r} ({_type_name(value)}) could not be "
                    f"loaded by the message codec: {exc}",
                    run_id=run_id,
                ) from exc
        return loaded


def _type_name(value: object) -> str:
    kind = type(value)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


# Without these, orjson would turn dataclasses, datetimes and str/int subclasses (enums) into
# JSON that decodes to something else; with them such values are rejected like any non-JSON type.
_STRICT = (
    orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def encode(value: object, *, run_id: str | None = None) -> bytes:
    """Encode ``value`` as compact UTF-8 JSON, or raise :class:`CheckpointSerializationError`."""
    try:
        data = orjson.dumps(value, option=_STRICT)
    except TypeError as exc:
        raise CheckpointSerializationError(
            f"checkpoint of run {run_id!r} is not JSON-compatible: {exc}", run_id=run_id
        ) from exc
    # orjson writes NaN/Infinity as null and enums as their value (silent alterations): walk the
    # value for those. The store encodes each message once, when it is new, so this is O(new).
    _reject_altered(value, run_id)
    return data


def decode(data: bytes | str) -> JSONValue:
    """Decode JSON text written by :func:`encode`."""
    return cast(JSONValue, orjson.loads(data))


def encode_messages(messages: Sequence[object], run_id: str | None = None) -> list[bytes]:
    """Encode each message once (a transcript is stored one row per message)."""
    return [encode(m, run_id=run_id) for m in messages]


def decode_messages(rows: Sequence[bytes]) -> list[JSONValue]:
    """Decode stored message rows in one pass."""
    if not rows:
        return []
    return cast(list[JSONValue], orjson.loads(b"[" + b",".join(rows) + b"]"))


_PLAIN: frozenset[type] = frozenset({str, int, bool, type(None)})
"""Types that JSON holds exactly, whatever the value."""


def _reject_altered(value: object, run_id: str | None) -> None:
    """Walk what orjson accepted and refuse what JSON cannot hold exactly: orjson writes
    NaN/Infinity as null, enums as their value, ``uuid.UUID`` as a string and an
    ``orjson.Fragment`` as whatever bytes it holds (possibly invalid JSON that would poison
    the row). Only ``dict``/``list``/``tuple`` and JSON scalars pass.

    Recursive, with the scalars of a container skipped in its own loop (a third of the cost
    of a stack walk on agent messages); orjson refused anything nested deeper than 255
    levels before this runs, so the recursion is bounded."""
    # no typing.cast here: a call per container
    kind = type(value)
    items: Iterable[object]
    if kind is dict:
        items = value.values()  # type: ignore[attr-defined]
    elif kind is list or kind is tuple:
        items = value  # type: ignore[assignment]
    elif kind in _PLAIN:
        return
    elif kind is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise CheckpointSerializationError(
                f"checkpoint of run {run_id!r} contains {value!r}, which JSON cannot represent",
                run_id=run_id,
            )
        return
    elif isinstance(value, enum.Enum):
        raise CheckpointSerializationError(
            f"checkpoint of run {run_id!r} contains the enum member {value!r}; store its "
            ".value (JSON would silently turn it into one)",
            run_id=run_id,
        )
    else:
        raise CheckpointSerializationError(
            f"checkpoint of run {run_id!r} contains a {kind.__module__}.{kind.__qualname__}, "
            "which is not a JSON value (convert it to str, int, float, bool, None, list "
            "or dict first)",
            run_id=run_id,
        )
    plain = _PLAIN
    for item in items:
        if type(item) not in plain:
            _reject_altered(item, run_id)
