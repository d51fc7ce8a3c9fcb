"""Liveness and readiness: what an orchestrator asks before it sends traffic."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serving.engine import reliability as resilience
from serving.engine.ingest import ingest_status
from serving.engine.scorer import Scorer
from serving.observability.redaction import redact_text

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Alive: the process answers. Async, so it never queues behind scoring threads."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    """Ready: the state store answers and the models are loaded."""
    scorer: Scorer = request.app.state.scorer
    event_log = request.app.state.event_log
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
