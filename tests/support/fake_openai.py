"""A small OpenAI-compatible upstream for tests: chat completions, plain and streamed.

It answers the way the OpenAI API does (the shapes the official SDK parses), streams
server-sent events with a delay before the first chunk and between chunks, so a proxy
that buffered the answer would show it in the first-chunk latency, and records every
request it got (headers and JSON body) so tests can see what the proxy sent. Imports
only Starlette, so the gateway's tests can run it without the ML stack.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL = "gpt-4o-mini-2024-07-18"
WORDS = ["Hello", " from", " the", " fake", " upstream", "."]
PROMPT_TOKENS = 11


@dataclass
class FakeOpenAI:
    """The upstream's knobs and what it saw."""

    first_chunk_delay_s: float = 0.2
    chunk_interval_s: float = 0.15
    seen: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
        ])

    async def models(self, request: Request) -> Response:
        self.seen.append({"path": "/v1/models", "headers": dict(request.headers),
                          "query": request.url.query})
        return JSONResponse({"object": "list", "data": [
            {"id": MODEL, "object": "model", "created": 1721172741, "owned_by": "system"}]})

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.seen.append({"path": "/v1/chat/completions", "headers": dict(request.headers),
                          "body": body})
        if not str(request.headers.get("authorization", "")).startswith("Bearer "):
            return JSONResponse({"error": {"message": "no key", "type": "invalid_request_error",
                                           "param": None, "code": "invalid_api_key"}},
                                status_code=401)
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": len(WORDS),
                 "total_tokens": PROMPT_TOKENS + len(WORDS)}
        if body.get("stream"):
            options = body.get("stream_options") or {}
            return StreamingResponse(self._chunks(bool(options.get("include_usage")), usage),
                                     media_type="text/event-stream")
        return JSONResponse({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
            "model": MODEL, "choices": [{
                "index": 0, "finish_reason": "stop", "logprobs": None,
                "message": {"role": "assistant", "content": "".join(WORDS)}}],
            "usage": usage})

    async def _chunks(self, include_usage: bool, usage: dict[str, int]
                      ) -> AsyncIterator[bytes]:
        def event(choices: list[dict[str, Any]], with_usage: dict[str, int] | None = None
                  ) -> bytes:
            chunk: dict[str, Any] = {"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                                     "created": int(time.time()), "model": MODEL,
                                     "choices": choices}
            if include_usage:
                chunk["usage"] = with_usage
            return f"data: {json.dumps(chunk)}\n\n".encode()

        await asyncio.sleep(self.first_chunk_delay_s)
        yield event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                      "finish_reason": None}])
        for word in WORDS:
            await asyncio.sleep(self.chunk_interval_s)
            yield event([{"index": 0, "delta": {"content": word}, "finish_reason": None}])
        yield event([{"index": 0, "delta": {}, "finish_reason": "stop"}])
        if include_usage:
            yield event([], usage)
        yield b"data: [DONE]\n\n"
