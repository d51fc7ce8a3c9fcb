"""How refusals answer: every error the API raises becomes a JSON body that names the
problem (`error`, and `detail` per field where there is one), with the right status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from features.stores.base import StoreError
from features.stores.resilient import StoreUnavailable
from features.validation import field_problems
from serving.api.admin import AdminError
from serving.engine import reliability as resilience
from serving.engine.ingest import EventInFlight, EventTimeRefused
from serving.observability.redaction import redact_value

log = logging.getLogger("keywatch")


class BadRequest(Exception):
    """A request refused before anything was applied."""

    def __init__(self, status: int, message: str, detail: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail or []


def summary(detail: list[dict[str, Any]]) -> str:
    """The first few field problems in one line."""
    return "; ".join(f"{d['field']}: {d['message']}" for d in detail[:5])


async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    # a problem may quote the value it refuses: a raw key in the wrong field is never echoed
    detail = redact_value(field_problems(exc.errors(), drop_prefix=1))
    if any(d["type"] == "json_invalid" for d in detail):
        return JSONResponse(status_code=400, content={
            "error": "the request body is not valid JSON", "detail": detail})
    return JSONResponse(status_code=422, content=jsonable_encoder(
        {"error": f"invalid event: {summary(detail)}", "detail": detail}))


async def _bad(_: Request, exc: BadRequest) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content=redact_value(
        {"error": exc.message, "detail": exc.detail}))


async def _skewed(_: Request, exc: EventTimeRefused) -> JSONResponse:
    field = "timestamp" if exc.index is None else f"{exc.index}.timestamp"
    return JSONResponse(status_code=422, content={"error": f"invalid event: {exc}",
                                                  "detail": [{"field": field,
                                                              "message": str(exc)}]})


async def _in_flight(_: Request, exc: EventInFlight) -> JSONResponse:
    return JSONResponse(status_code=409, content={"error": str(exc),
                                                  "event_id": exc.event_id})


async def _admin(_: Request, exc: AdminError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content={"error": exc.message},
                        headers=exc.headers)


async def _store_down(request: Request, exc: Exception) -> JSONResponse:
    log.error("state store error: %s", exc)
    request.app.state.ops.store_error()
    return JSONResponse(status_code=503, content={"error": "state store unavailable"})


def install_error_handlers(app: FastAPI) -> None:
    """Register every handler on the app."""
    app.add_exception_handler(StoreUnavailable, resilience.store_unavailable_handler)
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(BadRequest, _bad)  # type: ignore[arg-type]
    app.add_exception_handler(EventTimeRefused, _skewed)  # type: ignore[arg-type]
    app.add_exception_handler(EventInFlight, _in_flight)  # type: ignore[arg-type]
    app.add_exception_handler(AdminError, _admin)  # type: ignore[arg-type]
    app.add_exception_handler(StoreError, _store_down)
