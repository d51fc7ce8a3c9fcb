"""Edge guards for every route: a body size limit, and the ingestion token where it applies.

Why: every route that takes a body is a way in for untrusted bytes. The size limit keeps
one client from making the server buffer an unbounded body: the ingestion endpoints take
up to `max_body_bytes` (a batch of events), every other route (admin, feedback, the
gateway pre-flight) up to `max_other_body_bytes`, which no legitimate request comes near.
A token (when the operator sets `ingest_token`) keeps anyone but the gateway from feeding
events that would poison baselines or get a victim's key banned, and from probing
`/v1/check` for which keys are banned. Both are checked before the body is read: the token
from the headers, the size first from `Content-Length` and then while the body streams in
(a chunked body without a length is cut off at the limit), so an oversized or
unauthenticated request costs almost nothing, and the route's own authentication (the
admin token) never waits for a body it would refuse.

This is a plain ASGI middleware (not `BaseHTTPMiddleware`) so that it adds no task or
copy per request on the hot path.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

INGEST_PATHS: frozenset[str] = frozenset({"/v1/events", "/v1/events:batch"})
"""Routes that take event bodies, up to `max_body_bytes`."""
TOKEN_PATHS: frozenset[str] = INGEST_PATHS | {"/v1/check"}
"""Routes covered by the ingestion token when one is set: what the gateway calls."""
OTHER_BODY_BYTES = 64 * 1024
"""Default body limit of every other route (admin acts, feedback, the pre-flight)."""


class _BodyTooLarge(HTTPException):
    """Raised from `receive` when a streamed body passes the limit.

    An HTTPException so that FastAPI's body parsing lets it through (it turns other
    errors into a 400) and the app's exception middleware answers 413.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body over {limit} bytes")


async def _reply(send: Send, status: int, body: dict[str, Any],
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


class IngestGuard:
    """Checks the body size of every request, and the ingestion token on `token_paths`."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int,
                 ingest_token: str | None = None,
                 paths: frozenset[str] = INGEST_PATHS,
                 token_paths: frozenset[str] = TOKEN_PATHS,
                 max_other_body_bytes: int = OTHER_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_other_body_bytes = max_other_body_bytes
        self._token = f"Bearer {ingest_token}".encode() if ingest_token else None
        self.paths = paths
        self.token_paths = token_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path")
        headers = dict(scope.get("headers") or [])
        if self._token is not None and path in self.token_paths:
            presented = headers.get(b"authorization", b"")
            if not hmac.compare_digest(presented, self._token):
                await _reply(send, 401, {"error": "missing or wrong ingestion token"},
                             [(b"www-authenticate", b'Bearer realm="keywatch"')])
                return
        limit = self.max_body_bytes if path in self.paths else self.max_other_body_bytes
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _reply(send, 400, {"error": "invalid Content-Length"})
                return
            if declared > limit:
                await self._too_large(send, limit)
                return

        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return message

        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._too_large(send, limit)

    @staticmethod
    async def _too_large(send: Send, limit: int) -> None:
        await _reply(send, 413, {"error": f"request body over {limit} bytes"})
