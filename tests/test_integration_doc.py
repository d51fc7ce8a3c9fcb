"""The proxy example in docs/integration.md, run as written against real servers."""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from features.keys import KeyHasher
from serving.api.app import create_app
from serving.engine.event_log import read_event_log
from tests.conftest import TEST_SECRET, make_settings
from tests.ops_servers import serve_in_thread

DOC = Path(__file__).resolve().parent.parent / "docs" / "integration.md"


def proxy_source() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    (proxy,) = [b for b in blocks if b.startswith("# proxy.py")]
    return proxy


def fake_upstream(seen: list[str]) -> FastAPI:
    upstream = FastAPI()

    @upstream.post("/v1/chat/completions")
    async def completions(request: Request) -> dict[str, Any]:
        seen.append(request.headers.get("authorization", ""))
        return {"id": "chatcmpl-1", "model": "gpt-4o-mini", "choices": [],
                "usage": {"prompt_tokens": 9, "completion_tokens": 21, "total_tokens": 30}}

    return upstream


def test_the_documented_proxy_forwards_and_reports_usage(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    seen: list[str] = []
    kw_app = create_app(make_settings())
    with serve_in_thread(kw_app) as kw_url, serve_in_thread(fake_upstream(seen)) as up_url:
        monkeypatch.setenv("KEYWATCH_URL", kw_url)
        monkeypatch.setenv("UPSTREAM_URL", up_url)
        module = types.ModuleType("proxy")
        exec(compile(proxy_source(), str(DOC), "exec"), module.__dict__)
        with TestClient(module.app) as c:
            for _ in range(3):
                r = c.post("/v1/chat/completions", json={"model": "gpt-4o-mini"},
                           headers={"Authorization": "Bearer sk-live-proxy-user"})
                assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 30
        kw_app.state.event_log.flush()
    assert seen == ["Bearer sk-live-proxy-user"] * 3
    key_id = KeyHasher(TEST_SECRET).key_id("sk-live-proxy-user")
    events = [e for e in read_event_log(kw_app.state.settings.data_dir / "events")
              if e["key_id"] == key_id]
    assert len(events) == 3
    assert {(e["tokens"], e["prompt_tokens"], e["completion_tokens"], e["model"])
            for e in events} == {(30, 9, 21, "gpt-4o-mini")}
