"""Service settings, read from `KEYWATCH_*` environment variables by entry points only."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_SECRET = "keywatch-development-secret-do-not-use-in-production"
MIN_TOKEN_CHARS = 16
"""Shortest admin token, ingestion token or model signing key accepted at start."""
MIN_TOKEN_DISTINCT = 6
"""Fewest distinct characters in one: `aaaaaaaaaaaaaaaa` is as long as it is weak."""


def weak_token_reason(value: str) -> str | None:
    """Why a bearer token or key is too weak to guard anything, or None if it is not.

    Length and variety only: a token is a shared secret an operator generates (e.g. with
    `openssl rand -hex 32`), so any sensible one passes and a placeholder does not."""
    if len(value) < MIN_TOKEN_CHARS:
        return f"it has {len(value)} characters, fewer than {MIN_TOKEN_CHARS}"
    if len(set(value)) < MIN_TOKEN_DISTINCT:
        return f"it uses fewer than {MIN_TOKEN_DISTINCT} distinct characters"
    if value.strip() != value:
        return "it starts or ends with whitespace"
    return None


class SettingsError(ValueError):
    """The settings are unusable; the message says which and why."""


class Settings(BaseSettings):
    """Everything an operator can set. Library code takes parameters, not these."""

    model_config = SettingsConfigDict(env_prefix="KEYWATCH_", extra="ignore")

    env: Literal["development", "production"] = "production"
    secret: str | None = Field(default=None, repr=False)
    admin_token: str | None = Field(default=None, repr=False)
    store: str = "memory"
    redis_namespace: str = "kw"
    redis_timeout_s: float = 0.5
    model_dir: Path | None = None
    data_dir: Path = Path("var")
    dry_run: bool = False
    event_log: bool = True
    event_log_retention_days: int = Field(default=30, ge=1)
    policy: Path | None = None
    """Policy file (KEYWATCH_POLICY); None = the policy packaged with keywatch."""
    retrain_daily_at: str | None = None
    """UTC time of day (HH:MM) for the service's own retrain run; None: not scheduled."""
    model_reload_interval_s: float = Field(default=10.0, gt=0)
    """How often a running service looks for a newly promoted offline model."""
    models: bool = True
    """Run the online and offline models (KEYWATCH_MODELS=false: rules only)."""
    max_batch_events: int = 1000
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Largest body of the ingestion routes, refused (413) before it is read."""
    max_other_body_bytes: int = Field(default=64 * 1024, ge=1024)
    """Largest body of every other route (admin, feedback, /v1/check)."""
    memory_max_mb: float = Field(default=256.0, gt=0)
    """Budget of the memory store's feature state in MiB: beyond it idle addresses are
    evicted, then keys (bans, limits and the allow-list are never evicted)."""
    # operator-facing (serving/alerts/operations.py): alerts, SIEM export, key activity
    alert_min_severity: Literal["none", "low", "medium", "high", "critical"] = "medium"
    alert_dedup_window_s: float = Field(default=600.0, gt=0)
    alert_ring_size: int = Field(default=10_000, ge=1)
    alert_log: bool = True
    alert_webhook_url: str | None = Field(default=None, repr=False)
    alert_slack_webhook_url: str | None = Field(default=None, repr=False)
    alert_queue_size: int = Field(default=1000, ge=1)
    alert_webhook_timeout_s: float = Field(default=2.0, gt=0)
    alert_webhook_max_attempts: int = Field(default=4, ge=1)
    siem_log: bool = True
    siem_max_bytes: int = Field(default=50 * 1024 * 1024, ge=1024)  # also the alert log's
    siem_keep_files: int = Field(default=5, ge=0)
    key_activity_per_key: int = Field(default=50, ge=1)
    key_activity_max_keys: int = Field(default=10_000, ge=1)
    # live ingestion (serving/engine/ingest.py): one clock, each event applied once
    event_max_ahead_s: float = Field(default=300.0, ge=0)
    """Live scoring refuses (or clamps) events stamped further ahead of the server clock."""
    event_max_behind_s: float = Field(default=3600.0, ge=0)
    """...or further behind it (older history is for `keywatch replay`)."""
    event_skew_action: Literal["refuse", "clamp"] = "refuse"
    learn_writes: Literal["auto", "deferred", "immediate"] = "auto"
    """When learning reaches the store: with the next request's round trip, or in a round
    trip of its own before each request is answered (many replicas: none reads behind
    what another answered). `auto`: immediate for a service on a shared store (Redis),
    deferred on the memory store and in replays."""
    dedupe_window_s: float = Field(default=900.0, gt=0)
    """How long an `event_id` is remembered: a repeat within it changes nothing."""
    # reliability: Redis outage policy, restarts, ingestion security, stream workers
    redis_outage_policy: Literal["fail_open", "fail_closed", "error"] = "fail_open"
    redis_retry_interval_s: float = Field(default=1.0, gt=0)
    enforcement_cache_refresh_s: float = Field(default=3.0, gt=0)
    """fail_open: how often each replica re-reads the active bans, limits and allow-list
    it keeps enforcing during a Redis outage."""
    spool_dir: Path | None = None  # default: data_dir/spool
    snapshot_enabled: bool = True
    snapshot_path: Path | None = None  # default: data_dir/state.snapshot (memory store)
    enforcement_clock: Literal["wall", "event"] = "wall"
    """The service's clock for bans and limits: `wall` (the server's); `event` stamps them
    in event time, as `replay` does (a service fed a historical stream, or a test)."""
    journal_enabled: bool = True
    """Memory store: journal bans, limits and admin acts (fsync per act), so a crash
    loses none of them."""
    journal_path: Path | None = None  # default: data_dir/enforcement.journal
    ingest_token: str | None = Field(default=None, repr=False)
    stream_events: str = "kw:events"
    stream_decisions: str = "kw:decisions"
    stream_group: str = "keywatch"
    stream_decisions_maxlen: int = Field(default=1_000_000, ge=1000)
    stream_claim_idle_ms: int = Field(default=30_000, ge=100)
    stream_dedupe_ttl_s: int = Field(default=86_400, ge=60)
    stream_delete_acked: bool = True
    stream_max_deliveries: int = Field(default=5, ge=1)
    """An entry delivered this many times without completing goes to the dead letters."""
    stream_dead_letters: str | None = None
    """Dead-letter stream (default: `<stream_events>:dead`)."""
    stream_dead_letters_maxlen: int = Field(default=100_000, ge=100)
    model_signing_key: str | None = Field(default=None, repr=False)
    """HMAC key signing model manifests: when set, an unsigned or re-signed model is refused."""
    # spend and the security report (features/pricing.py, serving/reports/)
    prices: Path | None = None
    """Price file (YAML/JSON, the policy's `pricing:` schema) over the packaged prices."""
    report_daily_at: str | None = None
    """UTC time of day (HH:MM) for the daily security report; None: not scheduled."""
    report_weekly_on: str | None = None
    """Day and UTC time for the weekly report, e.g. 'mon 07:00'; None: not scheduled."""
    report_dir: Path | None = None
    """Where scheduled and API reports are written (default: <data_dir>/reports)."""
    report_webhook_url: str | None = Field(default=None, repr=False)
    """Also POST each scheduled report's summary and paths here."""

    @model_validator(mode="after")
    def _require_secret(self) -> Settings:
        if not self.secret:
            if self.env != "development":
                raise SettingsError(
                    "KEYWATCH_SECRET is not set: keywatch needs a server secret to derive key "
                    "ids from API keys. Set KEYWATCH_SECRET (e.g. `openssl rand -hex 32`), or "
                    "run in development mode (KEYWATCH_ENV=development or `keywatch serve "
                    "--dev`) to use a built-in, insecure secret."
                )
            self.secret = DEV_SECRET
        elif self.env != "development" and len(self.secret) < 16:
            raise SettingsError("KEYWATCH_SECRET must be at least 16 characters long")
        return self

    @model_validator(mode="after")
    def _strong_tokens(self) -> Settings:
        """A one-character admin token guards nothing: refuse weak tokens at start."""
        for name in ("admin_token", "ingest_token", "model_signing_key"):
            value = getattr(self, name)
            if value is None:
                continue
            reason = weak_token_reason(value)
            if reason is not None:
                raise SettingsError(
                    f"KEYWATCH_{name.upper()} is too weak: {reason}. Generate one with "
                    "`openssl rand -hex 32`.")
        return self

    @property
    def dead_letter_stream(self) -> str:
        return self.stream_dead_letters or f"{self.stream_events}:dead"

    @property
    def population_checkpoint(self) -> Path:
        return self.data_dir / "population.ckpt"

    @property
    def insecure_secret(self) -> bool:
        return self.secret == DEV_SECRET
