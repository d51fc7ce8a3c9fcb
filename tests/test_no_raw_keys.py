"""No raw API key in anything the operations side writes or says.

Drives real traffic with known raw keys through the middleware and the client into a
real keywatch (uvicorn), raising alerts, a ban and feedback, then scans everything:
alert log, SIEM file, feedback log, event log, webhook and Slack bodies, admin API
responses, `/metrics`, and every log record emitted meanwhile — captured by a handler
*without* the redacting filter, so the redaction safety net cannot hide a leak.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.testclient import TestClient

from features.keys import KeyHasher
from keywatch_gateway.client import KeywatchClient
from keywatch_gateway.middleware import KeywatchMiddleware
from serving.api.app import create_app
from serving.observability.logging_setup import JsonFormatter
from tests.conftest import ADMIN_TOKEN, TEST_SECRET, make_settings
from tests.ops_servers import RecordingWebhook, serve_in_thread
from tests.test_gateway import add_check_stand_in

# One key shaped like an OpenAI key (which the redactor would catch) and others that no
# pattern would: these can only stay out of the output if they never get into it.
FAILING_KEYS = ["sk-live-CanaryFail0001xyz", "canaryplain0002failingkey"]
SWEEP_KEYS = [f"canarysweep{i:04d}zz" for i in range(24)]
ALL_KEYS = FAILING_KEYS + SWEEP_KEYS
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_no_raw_key_reaches_any_output() -> None:
    captured = io.StringIO()
    raw_handler = logging.StreamHandler(captured)
    raw_handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    saved_level = root.level
    root.addHandler(raw_handler)
    root.setLevel(logging.DEBUG)
    outputs: list[str] = []
    settings = make_settings()
    hasher = KeyHasher(TEST_SECRET)
    try:
        with RecordingWebhook() as hook, RecordingWebhook() as slack:
            settings = make_settings(alert_webhook_url=hook.url,
                                     alert_slack_webhook_url=slack.url)
            kw_app = create_app(settings)
            add_check_stand_in(kw_app)
            with serve_in_thread(kw_app) as url:
                client = KeywatchClient(url, flush_interval_s=0.05, batch_size=50)
                gw = FastAPI()

                @gw.post("/v1/chat/completions")
                async def chat(request: Request) -> Response:
                    return Response(status_code=int(request.headers.get("x-status", "200")))

                gw.add_middleware(KeywatchMiddleware, client=client, enforce=True,
                                  trusted_proxies=["10.0.0.0/8"], cache_ttl_s=0.0)
                with TestClient(gw, client=("10.0.0.1", 50000)) as g:
                    for key in FAILING_KEYS:  # failure-rate alerts
                        for _ in range(25):
                            g.post("/v1/chat/completions", headers={
                                "Authorization": f"Bearer {key}", "x-status": "400",
                                "x-forwarded-for": "81.2.69.160"})
                    assert client.flush(10)
                    for key in SWEEP_KEYS:  # credential stuffing from one address
                        r = g.post("/v1/chat/completions", headers={
                            "Authorization": f"Bearer {key}", "x-status": "401",
                            "x-forwarded-for": "203.0.113.9"})
                        outputs.append(r.text)
                    assert client.flush(10)
                    for key in SWEEP_KEYS[-3:]:  # a banned key refused by the middleware
                        outputs.append(g.post("/v1/chat/completions", headers={
                            "Authorization": f"Bearer {key}",
                            "x-forwarded-for": "203.0.113.9"}).text)
                client.close()
                outputs.append(repr(client) + repr(client.stats()))

                admin = TestClient(kw_app)
                alerts = admin.get("/v1/alerts", params={"limit": 500}, headers=AUTH).json()
                codes = {a["code"] for a in alerts["alerts"]}
                assert "failure_rate" in codes
                assert codes & {"credential_stuffing", "credential_stuffing_failed_keys"}
                outputs.append(str(alerts))
                first = alerts["alerts"][-1]
                outputs.append(admin.post(
                    f"/v1/alerts/{first['alert_id']}/feedback", headers=AUTH,
                    json={"verdict": "confirmed", "allowlist_rule": True,
                          "note": f"seen with {FAILING_KEYS[0]} and {FAILING_KEYS[1]}"}).text)
                for key in ALL_KEYS[:4]:
                    outputs.append(admin.get(f"/v1/keys/{hasher.key_id(key)}",
                                             headers=AUTH).text)
                outputs.append(admin.get("/metrics").text)
                assert hook.wait_for(2) and slack.wait_for(2)
            outputs.extend(str(b) for b in hook.bodies + slack.bodies)
    finally:
        root.removeHandler(raw_handler)
        root.setLevel(saved_level)

    files = [p for p in Path(settings.data_dir).rglob("*") if p.is_file()]
    names = {p.relative_to(settings.data_dir).parts[0] for p in files}
    assert {"alerts", "siem", "feedback.jsonl", "events"} <= names
    # bytes, decoded leniently: other components may keep binary state (checkpoints) here
    outputs.extend(p.read_bytes().decode("utf-8", errors="replace") for p in files)
    outputs.append(captured.getvalue())
    everything = "\n".join(outputs)

    assert hasher.key_id(FAILING_KEYS[0]) in everything  # we did scan real output
    leaked = [key for key in ALL_KEYS if key in everything]
    assert leaked == [], f"raw keys found in output: {leaked}"
