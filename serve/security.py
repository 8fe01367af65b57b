"""Bearer-token auth and the request-body limit, as one pure ASGI middleware (it runs before any route parses)."""

from __future__ import annotations

import hmac
import json

OPEN_PATHS = ("/healthz",)


async def _send_error(send, status: int, limit: str | None, message: str, headers=()) -> None:
    body = json.dumps({"error": {"message": message, "limit": limit}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """401 without the right token (constant-time compare; the token is never logged); 413 past max_body_bytes."""

    def __init__(self, app, token: str | None, max_body_bytes: int):
        """``token="env"``: TURBOBOOTH_API_TOKEN, read in the process that serves (a Ray replica, not the driver)."""
        self.app, self.max_body = app, max_body_bytes
        self._given = token
        self._token: bytes | None | str = "unresolved"
        self.scope_app = None

    def _resolve(self) -> bytes | None:
        if self._token == "unresolved":
            from .config import api_token

            token = api_token() if self._given == "env" else self._given
            self._token = token.encode() if token else None
        return self._token

    def _authorized(self, headers: dict) -> bool:
        token = self._resolve()
        if token is None:
            return True
        given = headers.get(b"authorization", b"")
        scheme, _, value = given.partition(b" ")
        return hmac.compare_digest(value.strip() if scheme.lower() == b"bearer" else b"", token)

    def _reject(self, limit: str) -> None:
        st = getattr(getattr(self.scope_app, "state", None), "tb", None)
        if st is not None:
            st.metrics.rejected.labels(limit=limit).inc()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        self.scope_app = scope.get("app")
        if scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            self._reject("auth")
            return await _send_error(send, 401, "auth", "missing or wrong bearer token (Authorization: Bearer ...)",
                                     [(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            self._reject("max_body_bytes")
            return await _send_error(send, 413, "max_body_bytes",
                                     f"request body is over max_body_bytes={self.max_body}")
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            return await self._buffered(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _buffered(self, scope, receive, send):
        """A body without Content-Length (chunked): read it up to the limit first, then replay it."""
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.max_body:
                self._reject("max_body_bytes")
                return await _send_error(send, 413, "max_body_bytes",
                                         f"request body is over max_body_bytes={self.max_body}")
            if not message.get("more_body"):
                break
        body, sent = b"".join(chunks), [False]

        async def replay():
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
