"""Structured logs: JSON shape, extra fields, and raw keys redacted on the way out."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from serving.cli.main import build_parser
from serving.observability.logging_setup import configure_logging, make_handler
from serving.observability.redaction import redact_text

RAW = "sk-live-Zq8xT3vN9wLp2RkY"


@pytest.fixture
def json_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = make_handler("json", stream)
    logger = logging.getLogger("keywatch.test_logging")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_have_ts_level_logger_msg_and_extras(json_log) -> None:  # type: ignore[no-untyped-def]
    logger, stream = json_log
    logger.info("scored %d events", 3, extra={"key_id": "k_" + "a" * 32, "latency_ms": 1.5})
    (rec,) = lines(stream)
    assert rec["level"] == "info" and rec["logger"] == "keywatch.test_logging"
    assert rec["msg"] == "scored 3 events"
    assert rec["key_id"] == "k_" + "a" * 32 and rec["latency_ms"] == 1.5
    assert str(rec["ts"]).endswith("Z") and "T" in str(rec["ts"])


def test_raw_keys_are_redacted_from_message_args_extras_and_tracebacks(json_log) -> None:  # type: ignore[no-untyped-def]
    logger, stream = json_log
    logger.warning("request with %s failed", RAW)
    logger.info("GET /v1/x?api_key=%s HTTP/1.1", "plain-secret-value")
    logger.info("headers", extra={"headers": {"authorization": f"Bearer {RAW}"}})
    try:
        raise ValueError(f"bad key {RAW}")
    except ValueError:
        logger.exception("handler crashed")
    text = stream.getvalue()
    assert RAW not in text and "plain-secret-value" not in text
    recs = lines(stream)
    assert recs[0]["msg"] == "request with [REDACTED] failed"
    assert recs[1]["msg"] == "GET /v1/x?api_key=[REDACTED] HTTP/1.1"
    assert recs[2]["headers"] == {"authorization": "Bearer [REDACTED]"}
    assert "ValueError" in str(recs[3]["exc"])


def test_text_format_is_redacted_too() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("keywatch.test_logging.text")
    logger.addHandler(make_handler("text", stream))
    logger.propagate = False
    logger.error("Authorization: Bearer %s", RAW)
    assert RAW not in stream.getvalue() and "[REDACTED]" in stream.getvalue()


def test_configure_logging_routes_uvicorn_through_the_redacting_handler() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    try:
        configure_logging("json", "info", stream=stream)
        logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1", "GET",
                                                 f"/v1/keys?key={RAW}", "1.1", 200)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    (rec,) = lines(stream)
    assert rec["logger"] == "uvicorn.access" and RAW not in stream.getvalue()


def test_redaction_leaves_key_ids_and_ordinary_text_alone() -> None:
    text = "key k_3f9a00000000000000000000000000ab: 420 tokens, task-runner ok, ask-me"
    assert redact_text(text) == text


def test_serve_has_a_log_format_flag() -> None:
    args = build_parser().parse_args(["serve", "--log-format", "text"])
    assert args.log_format == "text"
    assert build_parser().parse_args(["serve"]).log_format == "json"
