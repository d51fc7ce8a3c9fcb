"""The HTTP API: gateways POST events and get decisions back.

`create_app` builds everything from `Settings`; it is the only place (with the CLI) that
reads configuration. All scoring goes through the one `Scorer`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from features.contract import Event, JsonRefused, load_json
from features.stores.base import StoreError
from features.stores.resilient import StoreUnavailable
from features.validation import field_problems
from serving.alerts.operations import Operations
from serving.api.admin import AdminError
from serving.api.admin import router as admin_router
from serving.api.dashboard import router as dashboard_router
from serving.api.guards import IngestGuard
from serving.api.ops_routes import install as install_ops
from serving.api.routes_limits import active_bans, key_enforcement
from serving.api.routes_limits import router as limits_router
from serving.engine import reliability as resilience
from serving.engine.decision import Decision
from serving.engine.event_log import EventLog
from serving.engine.factory import build_scorer, live_guards
from serving.engine.ingest import EventInFlight, EventTimeRefused, ingest_status
from serving.engine.scorer import Scorer
from serving.observability.redaction import redact_text
from serving.runtime import tune_gc
from serving.schedules.retrain import RetrainScheduler
from serving.settings import Settings

log = logging.getLogger("keywatch")

_EVENT_LIST = TypeAdapter(list[Event])
_DECISION_LIST = TypeAdapter(list[Decision])


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


class BadRequest(Exception):
    """A request refused before anything was applied."""

    def __init__(self, status: int, message: str, detail: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail or []


def _summary(detail: list[dict[str, Any]]) -> str:
    return "; ".join(f"{d['field']}: {d['message']}" for d in detail[:5])


async def get_scorer(request: Request) -> Scorer:
    """Async on purpose: FastAPI runs a plain `def` dependency in its thread pool, and that
    hop cost more than the rest of request handling on the scoring path."""
    return request.app.state.scorer


ScorerDep = Annotated[Scorer, Depends(get_scorer)]


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


def create_app(settings: Settings | None = None, scorer: Scorer | None = None) -> FastAPI:
    settings = settings or Settings()
    scorer = scorer or build_scorer(settings, restore_population=True, live=True)
    live_guards(scorer, settings)
    if settings.insecure_secret:
        log.warning("development mode: key ids use a built-in, insecure secret")
    event_log = (
        EventLog(settings.data_dir / "events",
                 retention_days=settings.event_log_retention_days)
        if settings.event_log else None
    )
    ops = Operations.from_settings(settings, scorer=scorer, event_log=event_log)
    ops.ban_lookup = lambda key_id: key_enforcement(scorer, key_id)["ban"]
    ops.limit_lookup = lambda key_id: key_enforcement(scorer, key_id)["limit"]
    ops.bans_active = lambda: active_bans(scorer)
    ops.metrics.store_stats = getattr(scorer.store, "stats", None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        tune_gc()
        if event_log is not None:
            event_log.prune()
        ops.start()
        scheduler = None
        if settings.retrain_daily_at and settings.model_dir is not None:
            scheduler = RetrainScheduler(daily_at=settings.retrain_daily_at,
                                         events=settings.data_dir / "events",
                                         model_dir=settings.model_dir)
            scheduler.start()
        app.state.retrain_scheduler = scheduler
        resilience.restore_state(scorer, settings)
        yield
        if scheduler is not None:
            scheduler.stop()
        try:
            scorer.flush()
            if scorer.detectors is not None:
                scorer.detectors.save_population(settings.population_checkpoint,
                                                  signing_key=settings.model_signing_key)
        finally:
            if event_log is not None:
                event_log.flush()
            resilience.save_state(scorer, settings)
            scorer.store.close()
            ops.close()

    app = FastAPI(
        title="keywatch",
        version="0.1.0",
        summary="Behavioural anomaly detection and graduated response for API keys",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.scorer = scorer
    app.state.event_log = event_log
    app.add_middleware(IngestGuard, max_body_bytes=settings.max_body_bytes,
                       max_other_body_bytes=settings.max_other_body_bytes,
                       ingest_token=settings.ingest_token)
    app.add_exception_handler(StoreUnavailable, resilience.store_unavailable_handler)

    def record(events: list[Event], decisions: list[Decision], elapsed_s: float) -> None:
        if event_log is not None:
            for event, decision in zip(events, decisions, strict=True):
                event_log.append(event, decision.key_id, decision)
        ops.observe(events, decisions, elapsed_s)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = field_problems(exc.errors(), drop_prefix=1)
        if any(d["type"] == "json_invalid" for d in detail):
            return JSONResponse(status_code=400, content={
                "error": "the request body is not valid JSON", "detail": detail})
        return JSONResponse(status_code=422, content=jsonable_encoder(
            {"error": f"invalid event: {_summary(detail)}", "detail": detail}))

    @app.exception_handler(BadRequest)
    async def _bad(_: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse(status_code=exc.status,
                            content={"error": exc.message, "detail": exc.detail})

    @app.exception_handler(EventTimeRefused)
    async def _skewed(_: Request, exc: EventTimeRefused) -> JSONResponse:
        field = "timestamp" if exc.index is None else f"{exc.index}.timestamp"
        return JSONResponse(status_code=422, content={"error": f"invalid event: {exc}",
                                                      "detail": [{"field": field,
                                                                  "message": str(exc)}]})

    @app.exception_handler(EventInFlight)
    async def _in_flight(_: Request, exc: EventInFlight) -> JSONResponse:
        return JSONResponse(status_code=409, content={"error": str(exc),
                                                      "event_id": exc.event_id})

    @app.exception_handler(AdminError)
    async def _admin(_: Request, exc: AdminError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"error": exc.message},
                            headers=exc.headers)

    @app.exception_handler(StoreError)
    async def _store_down(_: Request, exc: StoreError) -> JSONResponse:
        log.error("state store error: %s", exc)
        ops.store_error()
        return JSONResponse(status_code=503, content={"error": "state store unavailable"})

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Alive: the process answers. Async, so it never queues behind scoring threads."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz(scorer: ScorerDep) -> JSONResponse:
        """Ready: the state store answers and the models are loaded."""
        store_ok = scorer.store.ping()
        outage = resilience.store_status(scorer.store)  # degraded while Redis is down
        store_ok = store_ok and (outage is None or outage["state"] == "ok")
        model_error = scorer.detectors.load_error if scorer.detectors else None
        ready = store_ok and model_error is None  # the configured model must be the one used
        body = {
            "status": "ready" if ready else "degraded",
            "store": {"backend": redact_text(scorer.store.describe()), "reachable": store_ok,
                      **({"outage": outage} if outage is not None else {})},
            "models": scorer.model_versions(),
            "model_error": model_error,
            "dry_run": scorer.dry_run or scorer.policy.dry_run,
            "policy": {"version": scorer.policy_source.version,
                       "last_error": scorer.policy_source.last_error},
            "event_log": event_log.status() if event_log is not None else None,
            "ingest": ingest_status(scorer),
        }
        return JSONResponse(status_code=200 if ready else 503, content=body)

    def score_one(event: Event, scorer: Scorer) -> Decision:
        t0 = time.perf_counter()
        decision = scorer.score(event)
        record([event], [decision], time.perf_counter() - t0)
        return decision

    event_body = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Event"}}}}}
    async def score_event(request: Request) -> Response:
        """Score one event and return the decision for it.

        Scoring runs in the thread pool on every store: on the event loop, even in-process
        scoring held up every other request (health checks waited 0.8 s behind a batch)."""
        event = parse_event(await request.body())
        decision = await run_in_threadpool(score_one, event, request.app.state.scorer)
        return Response(decision.model_dump_json(), media_type="application/json")

    app.router.add_api_route("/v1/events", score_event, methods=["POST"], tags=["scoring"],
                             response_model=Decision, openapi_extra=event_body,
                             route_class_override=RawBodyRoute)

    def score_pinned(scorer: Scorer, events: list[Event]) -> list[Decision]:
        """The batch under one policy version: a reload never lands between its events."""
        with scorer.policy_source.pinned():
            return scorer.score_many(events)

    async def score_batch(request: Request) -> Response:
        """Score a list of events in order; a batch with one bad event is refused whole."""
        raw = await request.body()
        if len(raw) > settings.max_body_bytes:
            raise BadRequest(413, f"request body over {settings.max_body_bytes} bytes")
        try:
            body = load_json(raw)
        except JsonRefused as exc:
            raise BadRequest(400, f"the request body is refused: {exc}") from None
        items = body.get("events") if isinstance(body, dict) else body
        if not isinstance(items, list):
            raise BadRequest(422, "the body must be a list of events or {\"events\": [...]}")
        if len(items) > settings.max_batch_events:
            raise BadRequest(413, f"batch of {len(items)} events is over the limit of "
                                  f"{settings.max_batch_events}")
        if not items:
            raise BadRequest(422, "the batch is empty")
        try:
            events = _EVENT_LIST.validate_python(items)
        except ValidationError as exc:
            detail = field_problems(exc)
            first = detail[0]["field"].split(".", 1)[0]
            raise BadRequest(422, f"event {first} is invalid, batch refused: "
                                  f"{_summary(detail)}", detail) from None
        scorer: Scorer = request.app.state.scorer
        t0 = time.perf_counter()
        decisions = await run_in_threadpool(score_pinned, scorer, events)
        record(events, decisions, time.perf_counter() - t0)
        return Response(_DECISION_LIST.dump_json(decisions), media_type="application/json")

    app.router.add_api_route(
        "/v1/events:batch", score_batch, methods=["POST"], tags=["scoring"],
        response_model=list[Decision], route_class_override=RawBodyRoute,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {
                    "oneOf": [
                        {"type": "array", "items": {"$ref": "#/components/schemas/Event"},
                         "maxItems": settings.max_batch_events},
                        {"type": "object", "required": ["events"], "properties": {
                            "events": {"type": "array",
                                       "items": {"$ref": "#/components/schemas/Event"},
                                       "maxItems": settings.max_batch_events}}},
                    ]}}},
            }
        },
    )

    @app.post("/v1/check", tags=["scoring"], response_model=CheckResponse)
    def check(body: CheckRequest, scorer: ScorerDep) -> dict[str, Any]:
        """Pre-flight for gateways: is the key or the address banned, or over a limit? One
        store round trip; an allowed call under a limit takes its place in it."""
        return scorer.check(body.api_key, body.source_ip).as_dict()

    # Routes match in the order they were added: the scoring routes above come first.
    install_ops(app, ops)
    app.include_router(admin_router)
    app.include_router(limits_router)
    app.include_router(dashboard_router)
    document_event_schema(app)
    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory serving.api.app:app_from_env` (settings from env)."""
    return create_app(Settings())
