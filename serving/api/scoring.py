"""The scoring routes: gateways POST events and get decisions back, and ask before a call.

All scoring goes through the one `Scorer` (`app.state.scorer`); every scored event is
appended to the event log and counted by the operations state (`app.state.ops`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from features.contract import Event, JsonRefused, load_json
from features.validation import field_problems
from serving.api.errors import BadRequest, summary
from serving.engine.decision import Decision
from serving.engine.scorer import Scorer

_EVENT_LIST = TypeAdapter(list[Event])
_DECISION_LIST = TypeAdapter(list[Decision])
_EVENT_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/Event"}}}}}


def document_event_schema(app: FastAPI) -> None:
    """The scoring routes read their bodies themselves (see `parse_event`), so FastAPI does
    not see the Event model: add its schema to the OpenAPI components they refer to."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            event = Event.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(event.pop("$defs", {}))
            components["Event"] = event
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def parse_event(raw: bytes) -> Event:
    """The request body as an Event, in one pass of pydantic's JSON parser. Errors are
    raised as FastAPI's own body errors, so they answer exactly as a declared body would."""
    try:
        return Event.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in exc.errors()]) from None


class RawBodyRoute(APIRoute):
    """A route whose endpoint takes the `Request` and returns the `Response` itself.

    FastAPI still documents it (its declared body and response model are in the OpenAPI
    document), but requests skip dependency solving and response-model serialisation: on
    the scoring path that machinery cost more per request than routing and parsing did.
    Errors raised by the endpoint still reach the app's exception handlers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return self.endpoint  # type: ignore[no-any-return]


class CheckRequest(BaseModel):
    """Gateway pre-flight: may this key, from this address, make a call now?"""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    api_key: str = Field(min_length=1, max_length=512, exclude=True, repr=False)
    source_ip: str | None = Field(default=None, max_length=64)

    @field_validator("source_ip")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        return Event._check_ip(value)  # the event contract's own rule


class CheckLimit(BaseModel):
    """A limit metering the caller: while one holds, every call should be checked."""

    scope: Literal["key", "ip"]
    limit_per_min: int
    burst: int
    until: str
    by: str | None = None


class CheckResponse(BaseModel):
    """`allowed: false` says what refuses the call (`refused`: key, address or throttle,
    `scope` key or ip), until when (`until`, None when permanent) and when to try again
    (`retry_after_s`); `reason` says it in a sentence."""

    key_id: str
    allowed: bool
    reason: str | None = None
    retry_after_s: int | None = None
    dry_run: bool = False
    refused: Literal["key", "address", "throttle"] | None = None
    scope: Literal["key", "ip"] | None = None
    until: str | None = None
    limit: CheckLimit | None = None


def record(app: FastAPI, events: list[Event], decisions: list[Decision],
           elapsed_s: float) -> None:
    """Log the scored events and count them in the operations state."""
    event_log = app.state.event_log
    if event_log is not None:
        for event, decision in zip(events, decisions, strict=True):
            event_log.append(event, decision.key_id, decision)
    app.state.ops.observe(events, decisions, elapsed_s)


def _score_one(app: FastAPI, event: Event) -> Decision:
    t0 = time.perf_counter()
    decision = app.state.scorer.score(event)
    record(app, [event], [decision], time.perf_counter() - t0)
    return decision


async def score_event(request: Request) -> Response:
    """Score one event and return the decision for it.

    Scoring runs in the thread pool on every store: on the event loop, even in-process
    scoring held up every other request (health checks waited 0.8 s behind a batch)."""
    event = parse_event(await request.body())
    decision = await run_in_threadpool(_score_one, request.app, event)
    return Response(decision.model_dump_json(), media_type="application/json")


def _score_pinned(scorer: Scorer, events: list[Event]) -> list[Decision]:
    """The batch under one policy version: a reload never lands between its events."""
    with scorer.policy_source.pinned():
        return scorer.score_many(events)


def batch_events(raw: bytes, *, max_body_bytes: int, max_events: int) -> list[Event]:
    """The batch's events, or a `BadRequest` naming what is wrong: a batch with one bad
    event is refused whole."""
    if len(raw) > max_body_bytes:
        raise BadRequest(413, f"request body over {max_body_bytes} bytes")
    try:
        body = load_json(raw)
    except JsonRefused as exc:
        raise BadRequest(400, f"the request body is refused: {exc}") from None
    items = body.get("events") if isinstance(body, dict) else body
    if not isinstance(items, list):
        raise BadRequest(422, "the body must be a list of events or {\"events\": [...]}")
    if len(items) > max_events:
        raise BadRequest(413, f"batch of {len(items)} events is over the limit of "
                              f"{max_events}")
    if not items:
        raise BadRequest(422, "the batch is empty")
    try:
        return _EVENT_LIST.validate_python(items)
    except ValidationError as exc:
        detail = field_problems(exc)
        first = detail[0]["field"].split(".", 1)[0]
        raise BadRequest(422, f"event {first} is invalid, batch refused: "
                              f"{summary(detail)}", detail) from None


async def score_batch(request: Request) -> Response:
    """Score a list of events in order; a batch with one bad event is refused whole."""
    settings = request.app.state.settings
    events = batch_events(await request.body(), max_body_bytes=settings.max_body_bytes,
                          max_events=settings.max_batch_events)
    t0 = time.perf_counter()
    decisions = await run_in_threadpool(_score_pinned, request.app.state.scorer, events)
    record(request.app, events, decisions, time.perf_counter() - t0)
    return Response(_DECISION_LIST.dump_json(decisions), media_type="application/json")


def check(body: CheckRequest, request: Request) -> dict[str, Any]:
    """Pre-flight for gateways: is the key or the address banned, or over a limit? One
    store round trip; an allowed call under a limit takes its place in it."""
    return request.app.state.scorer.check(body.api_key, body.source_ip).as_dict()


def _batch_body(max_events: int) -> dict[str, Any]:
    events = {"type": "array", "items": {"$ref": "#/components/schemas/Event"},
              "maxItems": max_events}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "oneOf": [events, {"type": "object", "required": ["events"],
                           "properties": {"events": events}}]}}}}}


def scoring_router(*, max_batch_events: int) -> APIRouter:
    """The scoring routes, documented with the batch limit in force."""
    router = APIRouter(tags=["scoring"])
    router.add_api_route("/v1/events", score_event, methods=["POST"],
                         response_model=Decision, openapi_extra=_EVENT_BODY,
                         route_class_override=RawBodyRoute)
    router.add_api_route("/v1/events:batch", score_batch, methods=["POST"],
                         response_model=list[Decision], route_class_override=RawBodyRoute,
                         openapi_extra=_batch_body(max_batch_events))
    router.add_api_route("/v1/check", check, methods=["POST"], response_model=CheckResponse)
    return router
