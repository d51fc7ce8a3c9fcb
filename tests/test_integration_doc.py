"""The proxy block in docs/integration.md, run as written against real servers."""

from __future__ import annotations

import re
import types
from pathlib import Path

import openai
import pytest

from features.keys import KeyHasher
from serving.api.app import create_app
from serving.engine.event_log import read_event_log
from tests.conftest import TEST_SECRET, make_settings
from tests.ops_servers import serve_in_thread
from tests.support.fake_openai import MODEL, PROMPT_TOKENS, WORDS, FakeOpenAI

DOC = Path(__file__).resolve().parent.parent / "docs" / "integration.md"


def proxy_source() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    (proxy,) = [b for b in blocks if b.startswith("# proxy.py")]
    return proxy


def test_the_documented_proxy_forwards_streams_and_reports_usage(
        monkeypatch: pytest.MonkeyPatch) -> None:
    upstream = FakeOpenAI()
    kw_app = create_app(make_settings())
    with serve_in_thread(kw_app) as kw_url, serve_in_thread(upstream.app()) as up_url:
        monkeypatch.setenv("KEYWATCH_URL", kw_url)
        monkeypatch.setenv("UPSTREAM_URL", f"{up_url}/v1")
        monkeypatch.delenv("KEYWATCH_TRUSTED_PROXIES", raising=False)
        module = types.ModuleType("proxy")
        exec(compile(proxy_source(), str(DOC), "exec"), module.__dict__)
        with serve_in_thread(module.app, proxy_headers=False) as proxy_url:
            client = openai.OpenAI(api_key="sk-live-proxy-user", base_url=f"{proxy_url}/v1",
                                   max_retries=0)
            for _ in range(2):
                answer = client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}])
                assert answer.usage is not None and answer.usage.prompt_tokens == PROMPT_TOKENS
            stream = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream) == "".join(WORDS)
        kw_app.state.event_log.flush()  # the proxy's shutdown flushed its client
    assert [s["headers"]["authorization"] for s in upstream.seen] == \
        ["Bearer sk-live-proxy-user"] * 3
    key_id = KeyHasher(TEST_SECRET).key_id("sk-live-proxy-user")
    events = [e for e in read_event_log(kw_app.state.settings.data_dir / "events")
              if e["key_id"] == key_id]
    assert len(events) == 3
    assert {(e["tokens"], e["prompt_tokens"], e["completion_tokens"], e["model"])
            for e in events} == {(PROMPT_TOKENS + len(WORDS), PROMPT_TOKENS, len(WORDS), MODEL)}
