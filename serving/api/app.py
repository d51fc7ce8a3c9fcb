"""The HTTP API: gateways POST events and get decisions back.

`create_app` builds everything from `Settings`; it is the only place (with the CLI) that
reads configuration. The routes live in rooms of their own: scoring (`scoring`), health
(`health`), operations (`ops_routes`), administration (`admin`, `routes_limits`) and the
dashboard; errors answer through `errors`. All scoring goes through the one `Scorer`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from serving.alerts.operations import Operations
from serving.api.admin import router as admin_router
from serving.api.dashboard import router as dashboard_router
from serving.api.errors import install_error_handlers
from serving.api.guards import IngestGuard
from serving.api.health import router as health_router
from serving.api.ops_routes import install as install_ops
from serving.api.routes_limits import active_bans, key_enforcement
from serving.api.routes_limits import router as limits_router
from serving.api.scoring import document_event_schema, scoring_router
from serving.engine import reliability as resilience
from serving.engine.event_log import EventLog
from serving.engine.factory import build_scorer, live_guards
from serving.engine.scorer import Scorer
from serving.runtime import tune_gc
from serving.schedules.retrain import RetrainScheduler
from serving.settings import Settings

log = logging.getLogger("keywatch")


def _operations(settings: Settings, scorer: Scorer, event_log: EventLog | None) -> Operations:
    """Alerts, feedback, stats and metrics, with the enforcement views they quote."""
    ops = Operations.from_settings(settings, scorer=scorer, event_log=event_log)
    ops.ban_lookup = lambda key_id: key_enforcement(scorer, key_id)["ban"]
    ops.limit_lookup = lambda key_id: key_enforcement(scorer, key_id)["limit"]
    ops.bans_active = lambda: active_bans(scorer)
    ops.metrics.store_stats = getattr(scorer.store, "stats", None)
    ops.metrics.store_outage = lambda: resilience.store_status(scorer.store)
    return ops


def _retrain_scheduler(settings: Settings) -> RetrainScheduler | None:
    if not (settings.retrain_daily_at and settings.model_dir is not None):
        return None
    return RetrainScheduler(daily_at=settings.retrain_daily_at,
                            events=settings.data_dir / "events", model_dir=settings.model_dir)


def _shutdown(settings: Settings, scorer: Scorer, event_log: EventLog | None,
              ops: Operations) -> None:
    """Flush what is buffered, checkpoint the population model and the state, close."""
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


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the background work (operations, the retrain schedule), restore the state;
    at shutdown, stop and save it all."""
    settings, scorer, event_log = app.state.settings, app.state.scorer, app.state.event_log
    tune_gc()
    if event_log is not None:
        event_log.prune()
    app.state.ops.start()
    scheduler = app.state.retrain_scheduler = _retrain_scheduler(settings)
    if scheduler is not None:
        scheduler.start()
    resilience.restore_state(scorer, settings)
    yield
    if scheduler is not None:
        scheduler.stop()
    _shutdown(settings, scorer, event_log, app.state.ops)


def create_app(settings: Settings | None = None, scorer: Scorer | None = None) -> FastAPI:
    settings = settings or Settings()
    scorer = scorer or build_scorer(settings, restore_population=True, live=True)
    live_guards(scorer, settings)
    if settings.insecure_secret:
        log.warning("development mode: key ids use a built-in, insecure secret")
    event_log = (EventLog(settings.data_dir / "events",
                          retention_days=settings.event_log_retention_days)
                 if settings.event_log else None)
    app = FastAPI(
        title="keywatch",
        version="0.1.0",
        summary="Behavioural anomaly detection and graduated response for API keys",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.scorer = scorer
    app.state.event_log = event_log
    app.state.retrain_scheduler = None
    app.add_middleware(IngestGuard, max_body_bytes=settings.max_body_bytes,
                       max_other_body_bytes=settings.max_other_body_bytes,
                       ingest_token=settings.ingest_token)
    install_error_handlers(app)
    # Routes match in the order they were added: the scoring routes come first.
    app.include_router(health_router)
    app.include_router(scoring_router(max_batch_events=settings.max_batch_events))
    install_ops(app, _operations(settings, scorer, event_log))
    app.include_router(admin_router)
    app.include_router(limits_router)
    app.include_router(dashboard_router)
    document_event_schema(app)
    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory serving.api.app:app_from_env` (settings from env)."""
    return create_app(Settings())
