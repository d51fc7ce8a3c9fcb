"""Last line of defence against raw API keys leaking into operator-facing text.

keywatch never puts a raw key into what it writes: everything carries the HMAC `key_id`.
But free text arrives from outside (an operator's feedback note, a path logged by the
HTTP server, an exception message quoting a header), so anything that *looks* like a
credential is masked before it is logged or stored. Patterns are deliberately broad: a
false mask costs a little readability, a missed key costs a credential.

Three levels:
- `redact_text` (every log line, `/readyz`): prefixed secrets (`sk-…`), bearer tokens,
  credentials in URLs in any form (`redis://user:pass@host`, `?password=…`, `&token=…`)
  and `secret: …`-style pairs. Key ids (`k_` + 32 hex) are never masked.
- `redact_free_text` (text a person typed: admin reasons, feedback notes): also any
  raw-key-shaped token, i.e. 20+ credential characters mixing letters and digits, since a
  key pasted into a note has no telltale prefix.
- `redact_path` (access-log paths): every path segment that is key-shaped (16+ such
  characters), and the query string's credentials.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator

REDACTED = "[REDACTED]"

_KEY_ID = re.compile(r"k_[0-9a-f]{32}|al_[0-9a-f]{20}")
"""keywatch's own ids (key ids, alert ids): what it writes instead of keys, never masked."""
_SECRET_NAMES = (r"api[_-]?key|apikey|x-api-key|access[_-]?(?:token|key)|secret|client[_-]?secret"
                 r"|password|passwd|pass|pwd|token|auth|authorization|credentials?"
                 r"|private[_-]?key|signature|sig|key")


def _keep_key_ids(prefix_group: int) -> Callable[[re.Match[str]], str]:
    def sub(match: re.Match[str]) -> str:
        value = match.group(prefix_group + 1)
        if _KEY_ID.fullmatch(value):  # a key id is what we log instead of keys
            return match.group(0)
        return match.group(prefix_group) + REDACTED

    return sub


_PATTERNS: tuple[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]], ...] = (
    # credentials in a URL's authority: scheme://user:pass@host, scheme://token@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s@\"']+@"), r"\1" + REDACTED + "@"),
    # OpenAI-style and similar prefixed secrets: sk-..., sk_live_..., rk-..., pk_live_...
    (re.compile(r"\b(?:sk|rk|pk)[-_][A-Za-z0-9_-]{8,}"), REDACTED),
    # Authorization headers and bearer tokens in any text
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{6,}"), r"\1 " + REDACTED),
    # key=value pairs in query strings (?password=, &token=), JSON or log lines
    (re.compile(rf"""(?i)((?<![A-Za-z0-9])["']?(?:{_SECRET_NAMES})["']?\s*[:=]\s*["']?)"""
                r"""([^"'&\s,;}]{4,})"""), _keep_key_ids(1)),
)

_KEY_SHAPED = re.compile(r"(?<![A-Za-z0-9_.+/=-])(?=[A-Za-z0-9_.+/=-]*[0-9])"
                         r"(?=[A-Za-z0-9_.+/=-]*[A-Za-z])[A-Za-z0-9_.+/=-]{20,}")
_SEGMENT_KEY_SHAPED = re.compile(r"(?=[^/]*[0-9])(?=[^/]*[A-Za-z])[A-Za-z0-9_.+=~-]{16,}")


def redact_text(text: str) -> str:
    """`text` with anything that looks like a raw credential replaced by `[REDACTED]`."""
    if not text:
        return text
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact_free_text(text: str) -> str:
    """Text a person typed (an admin reason, a feedback note): `redact_text`, and every
    raw-key-shaped token (20+ credential characters with letters and digits) except key
    ids. A pasted key has no prefix to give it away; a note rarely needs such a token."""
    text = redact_text(text)
    if not text:
        return text

    def mask(match: re.Match[str]) -> str:
        token = match.group(0)
        return token if _KEY_ID.fullmatch(token) else REDACTED

    return _KEY_SHAPED.sub(mask, text)


FreeText = Annotated[str, AfterValidator(redact_free_text)]
"""A request field a person types (a ban's reason): stored, logged and returned redacted."""


def redact_path(path: str) -> str:
    """A request path (with its query) fit for an access log: key-shaped path segments
    (16+ characters with letters and digits, not a key id) and query credentials masked.
    A raw key pasted where a key id belongs (`/v1/keys/<raw key>`) must not be logged."""
    if not path:
        return path
    route, sep, query = path.partition("?")
    parts = route.split("/")
    for i, part in enumerate(parts):
        if _SEGMENT_KEY_SHAPED.fullmatch(part) and not _KEY_ID.fullmatch(part):
            parts[i] = REDACTED
    return redact_text("/".join(parts) + sep + redact_query(query))


def redact_query(query: str) -> str:
    """Every value in a query string that is key-shaped or named like a credential."""
    if not query:
        return query
    out = []
    for pair in query.split("&"):
        name, eq, value = pair.partition("=")
        if eq and (re.fullmatch(f"(?i){_SECRET_NAMES}", name)
                   or (_SEGMENT_KEY_SHAPED.fullmatch(value) and not _KEY_ID.fullmatch(value))):
            value = REDACTED
        out.append(name + eq + value)
    return "&".join(out)


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
