"""A call's results as bytes and back, exactly: what the stream worker's once-cache keeps.

Why: a call computed on the entity's copy never has Redis read the fields before the ops,
so a worker that must answer a repeated event as the first delivery was answered keeps
the results the client computed. They are lists of None, numbers, text and packed
fields (bytes); JSON keeps numbers exactly (a float's repr round trips, infinities and
NaN included) and bytes travel as base64 in a one-key object.
"""

from __future__ import annotations

import base64
import json
from typing import Any

_BYTES = "$b"


def _tag(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {_BYTES: base64.b64encode(bytes(value)).decode()}
    raise TypeError(f"a result of type {type(value).__name__} is not kept")


def _untag(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and _BYTES in obj:
        return base64.b64decode(obj[_BYTES])
    return obj


_encoder = json.JSONEncoder(default=_tag, separators=(",", ":"))
_decoder = json.JSONDecoder(object_hook=_untag)


def encode_results(results: list[Any]) -> bytes:
    """JSON of `results` (tuples come back as lists); TypeError when one holds an object
    JSON does not carry: the caller then has the call applied in the script."""
    return _encoder.encode(results).encode()


def decode_results(blob: bytes) -> list[Any]:
    out: list[Any] = _decoder.decode(blob.decode())
    return out
