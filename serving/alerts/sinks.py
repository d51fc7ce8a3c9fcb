"""Where alerts go: HTTP webhooks (generic JSON or Slack-compatible), off the scoring path.

Each sink owns a bounded queue and one daemon thread that drains it, so a slow or dead
receiver costs the scoring path one `put_nowait`, never a network wait. When the queue
is full the alert is dropped for that sink and counted (the alert itself is still in the
ring, the alert log and the SIEM file). Delivery retries transient failures (network
errors, timeouts, 408/425/429/5xx) with capped exponential backoff and jitter, a bounded
number of times; other 4xx are not retried because resending the same body cannot help.
The retry policy is the gateway client's (`keywatch_gateway.retry`, on tenacity).

Webhook URLs often embed a secret (Slack's do), so a sink is logged by its name only.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Literal

import httpx

from keywatch_gateway.retry import Backoff, send_with_retries

log = logging.getLogger("keywatch.alerts")

Notification = dict[str, Any]
"""`{"type": "keywatch.alert", "event": "raised" | "escalated", "alert": {...}}`"""

SEVERITY_EMOJI = {"none": ":white_circle:", "low": ":large_blue_circle:",
                  "medium": ":large_orange_circle:", "high": ":warning:",
                  "critical": ":rotating_light:"}


def json_body(notification: Notification) -> dict[str, Any]:
    """The generic webhook body: the notification as is."""
    return notification


def slack_body(notification: Notification) -> dict[str, Any]:
    """A Slack incoming-webhook body (`text` fallback plus Block Kit `blocks`).

    Also accepted by Mattermost and Rocket.Chat incoming webhooks, which read `text`.
    """
    a = notification["alert"]
    verb = "escalated" if notification.get("event") == "escalated" else "alert"
    headline = (f"keywatch {verb}: {a['severity'].upper()} {a['code']} "
                f"on key {a['key_id']} → {a['decision']}")
    emoji = SEVERITY_EMOJI.get(a["severity"], "")
    action = a.get("action") or {}
    action_text = action.get("type", "none")
    if action.get("retry_after_s"):
        action_text += f" (retry after {action['retry_after_s']} s)"
    fields = [
        {"type": "mrkdwn", "text": f"*Key*\n`{a['key_id']}`"},
        {"type": "mrkdwn", "text": f"*Source IP*\n{a.get('source_ip') or 'unknown'}"},
        {"type": "mrkdwn", "text": f"*Severity*\n{a['severity']}"},
        {"type": "mrkdwn", "text": f"*Action*\n{action_text}"},
    ]
    reasons = "\n".join(f"• `{r['code']}` ({r['severity']}): {r['message']}"
                        for r in a.get("reasons", [])[:5]) or a.get("title", "")
    money = a.get("money") or {}
    if money.get("burn_usd_per_h") or money.get("key_spend_usd_24h"):
        fields.append({"type": "mrkdwn", "text": (
            f"*Money at stake*\n${money.get('key_spend_usd_24h', 0):,.2f} in 24 h, "
            f"burning ${money.get('burn_usd_per_h', 0):,.2f}/h")})
    context = (f"alert `{a['alert_id']}` · first seen {a.get('first_seen')} · "
               f"{a.get('count', 1)} event(s)" + (" · dry run" if a.get("dry_run") else ""))
    return {
        "text": f"{emoji} {headline}: {a.get('title', '')}"[:3000],
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": headline[:150],
                                        "emoji": True}},
            {"type": "section", "text": {"type": "mrkdwn", "text": reasons[:3000]}},
            {"type": "section", "fields": fields},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": context[:3000]}]},
        ],
    }


BODY_FORMATS: dict[str, Callable[[Notification], dict[str, Any]]] = {
    "json": json_body,
    "slack": slack_body,
}


class WebhookSink:
    """POSTs notifications to one URL from a background thread, with bounded retries."""

    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        body_format: Literal["json", "slack"] = "json",
        timeout_s: float = 2.0,
        max_attempts: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        queue_size: int = 1000,
        headers: dict[str, str] | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.url = url
        self.name = name or body_format
        self.render = BODY_FORMATS[body_format]
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.headers = {"user-agent": "keywatch-alerts/0.1", **(headers or {})}
        self._queue: queue.Queue[Notification] = queue.Queue(maxsize=queue_size)
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self.sent = 0
        self.dropped = 0
        self.failed_attempts = 0
        self.gave_up = 0
        self.last_error: str | None = None

    def __repr__(self) -> str:  # the URL may hold a secret token
        return f"WebhookSink(name={self.name!r})"

    # ---- scoring side -----------------------------------------------------------------
    def submit(self, notification: Notification) -> bool:
        """Queue without waiting; False (and counted as dropped) if the queue is full."""
        if self._closing.is_set():
            self._count("dropped")
            return False
        self._ensure_started()
        try:
            self._queue.put_nowait(notification)
        except queue.Full:
            self._count("dropped")
            return False
        return True

    # ---- delivery side ----------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=f"keywatch-sink-{self.name}")
                self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout_s, headers=self.headers) as client:
            while True:
                try:
                    item = self._queue.get(timeout=0.1)
                except queue.Empty:
                    if self._closing.is_set():
                        return
                    continue
                try:
                    self._deliver(client, item)
                except Exception:  # never let one bad payload kill the sink thread
                    log.exception("alert sink %s: unexpected error", self.name)
                    self._count("gave_up")
                finally:
                    self._queue.task_done()

    def _deliver(self, client: httpx.Client, notification: Notification) -> None:
        body = self.render(notification)
        response = send_with_retries(
            lambda: client.post(self.url, json=body),
            Backoff(self.max_attempts, self.backoff_s, self.max_backoff_s),
            stop=self._closing, on_error=self._fail)
        if response is not None and response.is_success:
            self._count("sent")
            return
        self._count("gave_up")
        log.warning("alert sink %s gave up on alert %s: %s", self.name,
                    notification.get("alert", {}).get("alert_id"), self.last_error)

    def _fail(self, error: str) -> None:
        with self._stats_lock:
            self.failed_attempts += 1
            self.last_error = error

    def _count(self, field: str) -> None:
        with self._stats_lock:
            setattr(self, field, getattr(self, field) + 1)

    # ---- lifecycle --------------------------------------------------------------------
    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Block until the queue is drained and the in-flight delivery is done (tests)."""
        done = threading.Event()

        def waiter() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=waiter, daemon=True).start()
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (one attempt each once closing) for up to `timeout` s."""
        self._closing.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        leftover = 0
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
            self._queue.task_done()
            leftover += 1
        if leftover:
            with self._stats_lock:
                self.dropped += leftover
            log.warning("alert sink %s closed with %d undelivered alerts", self.name, leftover)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            return {"name": self.name, "sent": self.sent, "dropped": self.dropped,
                    "failed_attempts": self.failed_attempts, "gave_up": self.gave_up,
                    "queued": self.queued, "last_error": self.last_error}
