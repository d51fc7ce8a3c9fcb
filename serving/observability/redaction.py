"""Last line of defence against raw API keys leaking into operator-facing text.

keywatch never puts a raw key into what it writes: everything carries the HMAC `key_id`.
But free text arrives from outside (an operator's feedback note, a path logged by the
HTTP server, an exception message quoting a header), so anything that *looks* like a
credential is masked before it is logged or stored. Patterns are deliberately broad: a
false mask costs a little readability, a missed key costs a credential.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

REDACTED = "[REDACTED]"

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # OpenAI-style and similar prefixed secrets: sk-..., sk_live_..., rk-..., pk_live_...
    (re.compile(r"\b(?:sk|rk|pk)[-_][A-Za-z0-9_-]{8,}"), REDACTED),
    # Authorization headers and bearer tokens in any text
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{6,}"), r"\1 " + REDACTED),
    # key=value pairs in query strings, JSON or log lines
    (re.compile(r"""(?i)(["']?(?:api[_-]?key|x-api-key|access[_-]?token|secret|password|token)"""
                r"""["']?\s*[:=]\s*["']?)[^"'&\s,;}]{4,}"""), r"\1" + REDACTED),
)


def redact_text(text: str) -> str:
    """`text` with anything that looks like a raw credential replaced by `[REDACTED]`."""
    if not text:
        return text
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact_value(value: Any) -> Any:
    """Redact strings inside (nested) dicts, lists and tuples; other values pass through."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value


_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+/=-]{11,511}")


def redact_known_keys(text: str, key_id_of: Callable[[str], str],
                      is_known: Callable[[str], bool]) -> str:
    """Mask tokens that *are* API keys keywatch has seen, whatever they look like.

    Patterns cannot recognise a key with no telltale prefix; keywatch can, by hashing
    each candidate token (12+ credential-like characters) into a key id and asking
    whether that key id is one it knows. Only for small operator-typed text (feedback
    notes): it costs one HMAC per candidate token.
    """
    if not text:
        return text

    def mask(match: re.Match[str]) -> str:
        token = match.group(0)
        return REDACTED if is_known(key_id_of(token)) else token

    return _TOKEN.sub(mask, text)
