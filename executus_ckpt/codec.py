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
from collections.abc import Sequence
from typing import cast

import orjson

from .errors import CheckpointSerializationError
from .types import JSONValue

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


def _reject_altered(value: object, run_id: str | None) -> None:
    """Walk what orjson accepted and refuse what JSON cannot hold exactly: orjson writes
    NaN/Infinity as null, enums as their value, ``uuid.UUID`` as a string and an
    ``orjson.Fragment`` as whatever bytes it holds (possibly invalid JSON that would poison
    the row). Only ``dict``/``list``/``tuple`` and JSON scalars pass."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str or kind is int or kind is bool or item is None:
            continue
        if kind is float:
            if not math.isfinite(item):  # type: ignore[arg-type]
                raise CheckpointSerializationError(
                    f"checkpoint of run {run_id!r} contains {item!r}, which JSON cannot represent",
                    run_id=run_id,
                )
        elif kind is dict:
            stack.extend(cast(dict[str, object], item).values())
        elif kind is list or kind is tuple:
            stack.extend(cast(Sequence[object], item))
        elif isinstance(item, enum.Enum):
            raise CheckpointSerializationError(
                f"checkpoint of run {run_id!r} contains the enum member {item!r}; store its "
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
