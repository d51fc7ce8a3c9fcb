"""One wording for validation problems, whatever reader refused the input.

Why: the HTTP API, replay, the stream worker, the settings and the price file all turn
pydantic's errors into messages that name the field. Doing it once keeps the wording the
same everywhere a user meets it ("tokens: Input should be greater than or equal to 0").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError


def field_problems(exc: ValidationError | Sequence[Mapping[str, Any]], *, drop_prefix: int = 0,
                   empty: str = "body") -> list[dict[str, Any]]:
    """Each error (of a pydantic or a FastAPI validation error) as `{field, message, type}`,
    with a dotted field path."""
    out = []
    for err in (exc.errors() if isinstance(exc, ValidationError) else exc):
        loc = [str(p) for p in err.get("loc", ())][drop_prefix:]
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        out.append({"field": ".".join(loc) or empty, "message": msg, "type": err.get("type")})
    return out


def describe(exc: ValidationError, *, empty: str = "event", limit: int | None = None) -> str:
    """The errors in one line: `field: message; field: message`."""
    problems = field_problems(exc, empty=empty)[:limit]
    return "; ".join(f"{p['field']}: {p['message']}" for p in problems)
