"""The operator dashboard: one static page plus the two aggregates it draws from.

`GET /dashboard` serves `serving/api/static/dashboard.html` (with its script and stylesheet),
shipped as package data: no front-end toolchain, nothing to build. The page holds no data
and is served without the admin token; everything it shows comes from admin endpoints it
calls with `Authorization: Bearer <token>`, the token typed in once (kept in the tab's
sessionStorage) or passed as `#token=…` in the URL fragment, which browsers never send
to the server. A strict Content-Security-Policy (scripts and styles from this origin
only, no inline code) backs up the script's rule of never rendering API strings as HTML.

The aggregates added here, both behind the admin token:

- `GET /v1/stats/decisions?bucket=300&buckets=60`: decisions per event-time bucket by
  verdict and severity, from the bounded ring the ops hook feeds (`DecisionStats`);
- `GET /v1/stats/keys?limit=10`: keys ranked by their alerts (worst severity, volume,
  recency), from the alert ring.

Everything else the page shows comes from existing endpoints: `GET /v1/alerts`,
`GET /v1/keys/{key_id}`, `GET /admin/bans` and `POST /admin/unban`.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from serving.api.ops_routes import OpsDep, OpsError, require_admin

STATIC_PACKAGE = "serving.api"
STATIC_DIR = "static"
ASSETS: dict[str, str] = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
"""The only files served besides the page: a fixed list, so no path reaches the disk."""

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}

MAX_STATS_BUCKET_S = 86_400
MAX_STATS_BUCKETS = 500

router = APIRouter()
admin = [Depends(require_admin)]


@cache
def static_bytes(name: str) -> bytes:
    """A packaged static file, read once: the files never change while a server runs."""
    return resources.files(STATIC_PACKAGE).joinpath(STATIC_DIR, name).read_bytes()


@router.get("/dashboard", tags=["dashboard"], include_in_schema=False)
def dashboard_page() -> Response:
    """The dashboard page; it holds no data, so it needs no token."""
    return Response(static_bytes("dashboard.html"), media_type="text/html; charset=utf-8",
                    headers=SECURITY_HEADERS)


@router.get("/dashboard/{asset}", tags=["dashboard"], include_in_schema=False)
def dashboard_asset(asset: str) -> Response:
    """The page's script and stylesheet."""
    media_type = ASSETS.get(asset)
    if media_type is None:
        raise OpsError(404, "no such dashboard file")
    return Response(static_bytes(asset), media_type=media_type, headers=SECURITY_HEADERS)


@router.get("/v1/stats/decisions", tags=["dashboard"], dependencies=admin)
def decision_stats(
    ops: OpsDep,
    bucket: Annotated[int, Query(ge=1, le=MAX_STATS_BUCKET_S,
                                 description="bucket size in seconds")] = 60,
    buckets: Annotated[int, Query(ge=1, le=MAX_STATS_BUCKETS)] = 60,
) -> dict[str, Any]:
    """Decisions per time bucket (event time) by verdict and severity, oldest first,
    ending at the newest event this replica scored; for the dashboard's chart."""
    try:
        return ops.decision_stats.series(bucket_s=bucket, buckets=buckets)
    except ValueError as exc:
        raise OpsError(422, f"bucket: {exc}") from None


@router.get("/v1/stats/keys", tags=["dashboard"], dependencies=admin)
def riskiest_keys(ops: OpsDep,
                  limit: Annotated[int, Query(ge=1, le=100)] = 10) -> dict[str, Any]:
    """The riskiest keys by their alerts: worst severity, then volume, then recency.
    Alerts an operator marked false_positive do not count."""
    keys = ops.alerts.riskiest_keys(limit)
    return {"keys": keys, "count": len(keys)}
