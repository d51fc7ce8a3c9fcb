"""An OpenAI-compatible proxy: keywatch's verdict at the edge, every call reported.

    python -m keywatch_gateway.proxy --upstream https://api.openai.com/v1 \\
        --keywatch http://keywatch:8000 --port 8080
    keywatch proxy --upstream URL …     (the same verb, from the full install)

Clients point their SDK at `http://proxy:8080/v1`; a request for `/v1/<path>` goes to
`<upstream>/<path>`, method, query, headers and body unchanged (the caller's key too,
unless `--upstream-key-env` names a variable holding the key to use upstream).

- **Before the call** `KeywatchMiddleware` asks `POST /v1/check` (key and client
  address) and refuses a banned key, a banned address or a throttled key with OpenAI's
  error body, the right status and `Retry-After` (see `keywatch_gateway.refusal`).
- **Streaming** (`"stream": true`) is relayed event by event as the upstream sends it;
  nothing waits for the end of the answer.
- **Usage** (tokens, model) is reported with the call: read from a plain answer's
  `usage`, and for a stream from its usage chunk. The proxy asks the upstream for that
  chunk (`stream_options.include_usage`) and, when the caller did not ask for it,
  takes it out of the stream, so the caller sees what it asked for.
- **Addresses**: `X-Forwarded-For` is believed only from `--trusted-proxy` addresses.

Imports no ML library: a gateway runs it with `pip install ./gateway` alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from keywatch_gateway.addresses import ClientAddress
from keywatch_gateway.client import KeywatchClient
from keywatch_gateway.middleware import USAGE_STATE_KEY, KeywatchMiddleware

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate",
                        "proxy-authorization", "te", "trailer", "transfer-encoding",
                        "upgrade", "host", "content-length"})
"""Headers that belong to one connection, not to the message (RFC 9110 §7.6.1)."""
STREAM_OPTION_PATHS = ("chat/completions", "completions")
"""Endpoints that accept `stream_options.include_usage`."""
SSE_EVENT_END = re.compile(rb"\r?\n\r?\n")
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def openai_error(status: int, message: str, code: str, kind: str = "server_error"
                 ) -> JSONResponse:
    """An error in OpenAI's shape, for what goes wrong in the proxy itself."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": None,
                                   "code": code}}, status_code=status)


def usage_of(payload: dict[str, Any]) -> dict[str, Any]:
    """Tokens and model from an answer or a stream chunk (chat, completions, responses)."""
    if payload.get("type") == "response.completed" and isinstance(payload.get("response"),
                                                                   dict):
        payload = payload["response"]
    found: dict[str, Any] = {}
    if isinstance(payload.get("model"), str):
        found["model"] = payload["model"][:128]
    usage = payload.get("usage")
    if isinstance(usage, dict):
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens"))
        total = usage.get("total_tokens")
        for name, value in (("prompt_tokens", prompt), ("completion_tokens", completion),
                            ("tokens", total)):
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                found[name] = value
        if "tokens" not in found and {"prompt_tokens", "completion_tokens"} <= found.keys():
            found["tokens"] = found["prompt_tokens"] + found["completion_tokens"]
    return found


def ask_for_usage(path: str, body: bytes) -> tuple[bytes, bool]:
    """For a streamed completion, ask the upstream for the usage chunk.

    Returns the body to send and whether the caller had *not* asked for usage itself
    (then the usage chunk is ours, and is taken out of the stream).
    """
    if not path.endswith(STREAM_OPTION_PATHS) or b'"stream"' not in body:
        return body, False
    try:
        payload = json.loads(body)
    except ValueError:
        return body, False
    if not isinstance(payload, dict) or payload.get("stream") is not True:
        return body, False
    options = payload.get("stream_options")
    options = options if isinstance(options, dict) else {}
    if options.get("include_usage") is True:
        return body, False
    payload["stream_options"] = {**options, "include_usage": True}
    return json.dumps(payload, separators=(",", ":")).encode(), True


class StreamUsage:
    """Reads usage from server-sent events as they pass, and drops our own usage chunk.

    Bytes go out as soon as an event is complete; a partial event waits for the rest of
    itself only (it means nothing to the caller on its own).
    """

    def __init__(self, strip_usage_chunk: bool) -> None:
        self.strip = strip_usage_chunk
        self.usage: dict[str, Any] = {}
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        self._pending += data
        out = []
        start = 0
        for end in SSE_EVENT_END.finditer(self._pending):
            event = self._pending[start:end.end()]
            start = end.end()
            if self._keep(event):
                out.append(event)
        self._pending = self._pending[start:]
        return b"".join(out)

    def close(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest if rest and self._keep(rest) else b""

    def _keep(self, event: bytes) -> bool:
        data = b"\n".join(line[5:].strip() for line in event.splitlines()
                          if line.startswith(b"data:"))
        if not data or data == b"[DONE]":
            return True
        if b'"usage"' not in data and "model" in self.usage:
            return True  # an ordinary chunk: nothing to learn from it
        try:
            payload = json.loads(data)
        except ValueError:
            return True
        if not isinstance(payload, dict):
            return True
        found = usage_of(payload)
        if "model" in found:
            self.usage.setdefault("model", found.pop("model"))
        self.usage.update(found)
        usage_only = payload.get("choices") == [] and isinstance(payload.get("usage"), dict)
        return not (self.strip and usage_only)


def _upstream_headers(request: Request, upstream_key: str | None,
                      key_header: str | None) -> dict[str, str]:
    headers = {k: v for k, v in request.headers.items() if k not in HOP_BY_HOP}
    headers.pop("accept-encoding", None)  # httpx asks for what it can decode
    if upstream_key:  # the caller's key is for keywatch; the upstream gets ours
        for name in ("api-key", key_header):
            if name:
                headers.pop(name.lower(), None)
        headers["authorization"] = f"Bearer {upstream_key}"
    return headers


def _downstream_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items()
            if k not in HOP_BY_HOP and k != "content-encoding"}


async def _relay(response: httpx.Response, reader: StreamUsage,
                 state: dict[str, Any]) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_bytes():
            out = reader.feed(chunk)
            if out:
                yield out
        tail = reader.close()
        if tail:
            yield tail
    finally:
        await response.aclose()
        if reader.usage:
            state[USAGE_STATE_KEY] = reader.usage


def _forward_endpoint(upstream_key: str | None, key_header: str | None
                      ) -> Callable[[Request], Awaitable[Response]]:
    async def forward(request: Request) -> Response:
        http: httpx.AsyncClient = request.app.state.upstream
        path = request.path_params["path"]
        body, strip_usage = ask_for_usage(path, await request.body())
        raw = request.scope.get("raw_path")  # as sent: percent-escapes kept
        url = raw.decode("latin-1").removeprefix("/v1") if raw else "/" + path
        url += f"?{request.url.query}" if request.url.query else ""
        outgoing = http.build_request(request.method, url, content=body,
                                      headers=_upstream_headers(request, upstream_key,
                                                                key_header))
        try:
            response = await http.send(outgoing, stream=True)
        except httpx.TimeoutException:
            return openai_error(504, "The upstream API did not answer in time.",
                                "upstream_timeout")
        except httpx.HTTPError:
            return openai_error(502, "The upstream API could not be reached.",
                                "upstream_unavailable")
        state = request.scope.setdefault("state", {})
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(_relay(response, StreamUsage(strip_usage), state),
                                     status_code=response.status_code,
                                     headers=_downstream_headers(response))
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        if response.headers.get("content-type", "").startswith("application/json"):
            try:
                payload = json.loads(content)
            except ValueError:
                payload = None
            if isinstance(payload, dict) and (found := usage_of(payload)):
                state[USAGE_STATE_KEY] = found
        return Response(content, status_code=response.status_code,
                        headers=_downstream_headers(response))

    return forward


async def _not_found(request: Request) -> Response:
    return openai_error(404, "This proxy serves the API under /v1/ only.", "not_found",
                        "invalid_request_error")


async def _healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def create_proxy_app(
    upstream_url: str,
    client: KeywatchClient,
    *,
    trusted_proxies: Iterable[str] = (),
    upstream_api_key: str | None = None,
    key_header: str | None = None,
    timeout_s: float = 600.0,
    check_cache_s: float = 0.25,
    enforce: bool = True,
) -> Starlette:
    """The proxy as an ASGI app; it closes `client` when it shuts down.

    Raises ValueError for a trusted proxy that is not an address or a network, now
    rather than at the first request (Starlette builds middleware lazily).
    """
    trusted_proxies = list(trusted_proxies)
    ClientAddress(trusted_proxies)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.upstream = httpx.AsyncClient(
            base_url=upstream_url.rstrip("/") + "/",
            timeout=httpx.Timeout(timeout_s, connect=10.0))
        try:
            yield
        finally:
            await app.state.upstream.aclose()
            await client.aclose()

    app = Starlette(routes=[
        Route("/healthz", _healthz, methods=["GET"]),
        Route("/v1/{path:path}", _forward_endpoint(upstream_api_key, key_header), methods=METHODS),
        Route("/{path:path}", _not_found, methods=METHODS),
    ], lifespan=lifespan)
    app.add_middleware(KeywatchMiddleware, client=client, enforce=enforce,
                       key_header=key_header, cache_ttl_s=check_cache_s,
                       trusted_proxies=trusted_proxies, exclude_paths=("/healthz",))
    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The proxy's options (shared by `python -m keywatch_gateway.proxy` and the CLI)."""
    env = os.environ.get
    parser.add_argument("--upstream", required=True,
                        help="the upstream API's base URL, e.g. https://api.openai.com/v1")
    parser.add_argument("--keywatch", default=env("KEYWATCH_URL", "http://127.0.0.1:8000"),
                        help="keywatch's URL (default: $KEYWATCH_URL or %(default)s)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--trusted-proxy", action="append", default=None,
                        metavar="ADDRESS_OR_CIDR",
                        help="believe X-Forwarded-For from this peer (repeatable; "
                             "default: $KEYWATCH_TRUSTED_PROXIES, comma-separated; none)")
    parser.add_argument("--upstream-key-env", metavar="VAR",
                        help="call the upstream with the key in this environment variable "
                             "instead of the caller's")
    parser.add_argument("--key-header", help="also read the caller's key from this header "
                                             "(e.g. api-key); Authorization: Bearer always")
    parser.add_argument("--check-cache-s", type=float, default=0.25,
                        help="reuse an allowance this long per key and address "
                             "(never while a limit meters the key)")
    parser.add_argument("--fail-closed", action="store_true",
                        help="refuse calls (503) when keywatch cannot answer the check")
    parser.add_argument("--timeout-s", type=float, default=600.0,
                        help="upstream read timeout")
    parser.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    trusted = args.trusted_proxy
    if trusted is None:
        trusted = [p for p in os.environ.get("KEYWATCH_TRUSTED_PROXIES", "").split(",")
                   if p.strip()]
    upstream_key = None
    if args.upstream_key_env:
        upstream_key = os.environ.get(args.upstream_key_env)
        if not upstream_key:
            print(f"keywatch proxy: ${args.upstream_key_env} is empty", file=sys.stderr)
            return 2
    client = KeywatchClient(args.keywatch, fail_open=not args.fail_closed,
                            ingest_token=os.environ.get("KEYWATCH_INGEST_TOKEN") or None)
    try:
        app = create_proxy_app(args.upstream, client, trusted_proxies=trusted,
                               upstream_api_key=upstream_key, key_header=args.key_header,
                               timeout_s=args.timeout_s, check_cache_s=args.check_cache_s)
    except ValueError as exc:
        print(f"keywatch proxy: {exc}", file=sys.stderr)
        return 2
    # proxy_headers=False: uvicorn would otherwise believe X-Forwarded-For from 127.0.0.1;
    # the middleware decides whom to believe, from --trusted-proxy alone.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                proxy_headers=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keywatch_gateway.proxy",
                                     description="OpenAI-compatible proxy enforcing keywatch")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
