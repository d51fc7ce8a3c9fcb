"""Logging for `keywatch serve`: JSON lines for log pipelines, or text for a terminal.

JSON records carry `ts` (RFC 3339, UTC, milliseconds), `level`, `logger`, `msg`, any
`extra={...}` fields, and `exc` for exceptions, one object per line, which is what
Loki, Elasticsearch, CloudWatch and Datadog parse without a grok pattern.

`RedactingFilter` sits on the handler, so it sees every record that is emitted, including
those from uvicorn and third-party libraries that propagate to the root logger. keywatch
itself only ever logs key ids; the filter is the last line of defence for text that came
from outside (a request path with `?api_key=`, an exception quoting a header). Access-log
paths get `redact_path`: a raw key pasted into a URL has no prefix to match on.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from serving.observability.redaction import redact_path, redact_text, redact_value

LogFormat = Literal["json", "text"]

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName", "color_message"}

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class RedactingFilter(logging.Filter):
    """Masks raw-key-looking text in the message, its arguments and `extra` fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5 \
                and isinstance(args[2], str):  # (client, method, path, version, status)
            record.args = (args[0], args[1], redact_path(args[2]), *args[3:])
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: log it as given rather than drop it
            message = str(record.msg)
        redacted = redact_text(message)
        if redacted != message or record.args:
            record.msg = redacted
            record.args = None
        for name, value in list(vars(record).items()):
            if name not in _STANDARD_ATTRS and isinstance(value, str | dict | list | tuple):
                setattr(record, name, redact_value(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(
                logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD_ATTRS and name not in entry:
                entry[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str, ensure_ascii=False)


def make_handler(fmt: LogFormat = "json", stream: TextIO | None = None) -> logging.Handler:
    """A stream handler with the chosen formatter and the redacting filter."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RedactingFilter())
    return handler


def configure_logging(fmt: LogFormat = "json", level: str | int = "info",
                      stream: TextIO | None = None) -> logging.Handler:
    """Route the root logger (and uvicorn's, which then propagate) to one handler.

    Call before `uvicorn.run(..., log_config=None)` so uvicorn keeps this setup instead
    of installing its own formatters.
    """
    if fmt not in ("json", "text"):
        raise ValueError("log format must be 'json' or 'text'")
    handler = make_handler(fmt, stream)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
        lg.disabled = False
        lg.setLevel(logging.NOTSET)  # uvicorn.run(log_level=...) sets its own afterwards
    return handler
