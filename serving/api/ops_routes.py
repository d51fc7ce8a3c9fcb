"""Operator endpoints: alerts, feedback, suppressions, the key page, and `/metrics`.

Everything here except `/metrics` needs `Authorization: Bearer <KEYWATCH_ADMIN_TOKEN>`,
compared in constant time; with no admin token configured these endpoints answer 503
rather than run unprotected. `/metrics` is open, as Prometheus scrapers expect, and
carries no key ids or addresses.

`install(app, ops)` is the one call `create_app` makes: it stores `ops` on `app.state`,
adds the routes and the error handler that gives them the API's `{"error": ...}` shape.
"""

from __future__ import annotations

import hmac
import math
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse

from features.contract import parse_timestamp
from features.keys import looks_like_key_id
from serving.alerts.feedback import FeedbackIn
from serving.alerts.operations import Operations
from serving.alerts.pipeline import STATUSES, AlertQuery
from serving.engine.decision import SEVERITIES
from serving.observability.metrics import CONTENT_TYPE


class OpsError(Exception):
    """An operator request refused; rendered as `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def get_ops(request: Request) -> Operations:
    return request.app.state.ops


def require_admin(request: Request) -> None:
    """Bearer admin token, compared in constant time; 503 if none is configured."""
    token: str | None = request.app.state.settings.admin_token
    if not token:
        raise OpsError(503, "the admin API is disabled: set KEYWATCH_ADMIN_TOKEN to enable it")
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(),
                                                             token.encode()):
        raise OpsError(401, "missing or wrong admin token",
                       headers={"WWW-Authenticate": 'Bearer realm="keywatch-admin"'})


OpsDep = Annotated[Operations, Depends(get_ops)]
admin = [Depends(require_admin)]

router = APIRouter()


def _time_param(name: str, value: str | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        return parse_timestamp(value, now=math.inf)
    except ValueError as exc:
        raise OpsError(422, f"{name}: {exc}") from None


def _key_id_param(key_id: str) -> str:
    if not looks_like_key_id(key_id):
        # never echo it: a raw key pasted into a URL must not travel further
        raise OpsError(422, "key_id must be a keywatch key id (k_ and 32 hex characters); "
                            "never put a raw API key in a URL")
    return key_id


@router.get("/v1/alerts", tags=["alerts"], dependencies=admin)
def list_alerts(
    ops: OpsDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
    key_id: str | None = None,
    source_ip: str | None = None,
    code: str | None = None,
    min_severity: str | None = None,
    since: Annotated[str | None, Query(description="RFC 3339 or epoch seconds")] = None,
    until: Annotated[str | None, Query(description="RFC 3339 or epoch seconds")] = None,
    status: str | None = None,
) -> dict[str, Any]:
    """Alerts, newest first; pass `next_cursor` back as `cursor` for the next page."""
    if min_severity is not None and min_severity not in SEVERITIES:
        raise OpsError(422, f"min_severity must be one of {', '.join(SEVERITIES)}")
    if status is not None and status not in STATUSES:
        raise OpsError(422, f"status must be one of {', '.join(STATUSES)}")
    if key_id is not None:
        _key_id_param(key_id)
    seq: int | None = None
    if cursor:
        try:
            seq = int(cursor)
        except ValueError:
            raise OpsError(422, "cursor is not one this API returned") from None
    q = AlertQuery(key_id=key_id, source_ip=source_ip, code=code, min_severity=min_severity,
                   since=_time_param("since", since), until=_time_param("until", until),
                   status=status)
    page, next_seq = ops.alerts.query(q, limit=limit, cursor=seq)
    return {"alerts": page, "count": len(page),
            "next_cursor": str(next_seq) if next_seq is not None else None}


@router.get("/v1/alerts/{alert_id}", tags=["alerts"], dependencies=admin)
def get_alert(alert_id: str, ops: OpsDep) -> dict[str, Any]:
    """One alert with the feedback given on it."""
    alert = ops.alerts.get(alert_id)
    if alert is None:
        raise OpsError(404, "no such alert (it may have aged out of the ring)")
    return {"alert": alert.to_dict(), "feedback": ops.feedback.for_alert(alert_id)}


@router.post("/v1/alerts/{alert_id}/feedback", tags=["alerts"], dependencies=admin,
             status_code=201)
def alert_feedback(alert_id: str, body: FeedbackIn, ops: OpsDep) -> dict[str, Any]:
    """Mark an alert false_positive or confirmed; `allowlist_rule` silences the rule
    for this key from now on (lift it with `DELETE /v1/suppressions/{key_id}/{code}`)."""
    try:
        result = ops.give_feedback(alert_id, body)
    except OSError as exc:
        raise OpsError(503, f"feedback not recorded, the disk refused it: "
                            f"{type(exc).__name__}") from None
    if result is None:
        raise OpsError(404, "no such alert (it may have aged out of the ring)")
    return result


@router.get("/v1/suppressions", tags=["alerts"], dependencies=admin)
def list_suppressions(ops: OpsDep, key_id: str | None = None) -> dict[str, Any]:
    """(key_id, rule code) pairs an operator silenced through feedback."""
    return {"suppressions": ops.feedback.suppressions(key_id)}


@router.delete("/v1/suppressions/{key_id}/{code}", tags=["alerts"], dependencies=admin)
def lift_suppression(key_id: str, code: str, ops: OpsDep) -> dict[str, Any]:
    """Let `code` alert for `key_id` again."""
    _key_id_param(key_id)
    try:
        lifted = ops.feedback.unsuppress(key_id, code)
    except OSError as exc:
        raise OpsError(503, f"not recorded, the disk refused it: {type(exc).__name__}") from None
    if not lifted:
        raise OpsError(404, "that rule is not suppressed for that key")
    return {"key_id": key_id, "code": code, "suppressed": False}


@router.get("/v1/keys/{key_id}", tags=["keys"], dependencies=admin)
def key_page(key_id: str, ops: OpsDep) -> dict[str, Any]:
    """A key's recent non-trivial decisions, active alerts and baseline summary.

    Recent decisions and the baseline are what this replica has seen since it started.
    """
    return ops.key_report(_key_id_param(key_id))


@router.get("/v1/report", tags=["report"], dependencies=admin)
def security_report(
    ops: OpsDep,
    since: Annotated[str, Query(description="RFC 3339, epoch seconds, or 24h / 7d")] = "24h",
    until: Annotated[str | None, Query(description="RFC 3339 or epoch seconds")] = None,
    format: Annotated[str, Query(pattern="^(markdown|json|html)$")] = "markdown",
) -> Response:
    """The security report for a period: written under the report folder (with plots)
    and returned as Markdown, HTML or JSON (the full data plus the written paths)."""
    import json
    import time

    from serving.reports.content import parse_when
    from serving.reports.render import render_html, render_markdown

    now = time.time()
    try:
        end = parse_when(until, now=now) or now
        start = parse_when(since, now=end)
    except ValueError as exc:
        raise OpsError(422, f"since/until: {exc}") from None
    if start is None or start >= end:
        raise OpsError(422, "since must be before until")
    report, paths = ops.generate_report(start, end)
    plots = {k[5:]: Path(v).name for k, v in paths.items() if k.startswith("plot_")}
    if format == "json":
        body = json.dumps({**report.as_dict(), "paths": paths}, default=str)
        return Response(content=body, media_type="application/json")
    if format == "html":
        return Response(content=render_html(report, plots), media_type="text/html")
    return Response(content=render_markdown(report, plots),
                    media_type="text/markdown; charset=utf-8")


@router.get("/metrics", tags=["health"], include_in_schema=False)
def metrics(ops: OpsDep) -> Response:
    """Prometheus text exposition."""
    return Response(content=ops.metrics.render(), media_type=CONTENT_TYPE)


def install(app: FastAPI, ops: Operations) -> None:
    """Wire operations into an app: state, routes, error shape."""
    app.state.ops = ops

    @app.exception_handler(OpsError)
    async def _ops_error(_: Request, exc: OpsError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"error": exc.message},
                            headers=exc.headers)

    app.include_router(router)
