"""A correlation id for every HTTP request and WebSocket, in every log line it causes.

``CorrelationMiddleware`` (pure ASGI, so it also sees WebSockets and streams nothing through a task
group) binds ``correlation_id``, ``method`` and ``path`` into structlog's context variables for the
request, and Twilio's ``I-Twilio-Idempotency-Token`` as ``twilio_idempotency_token`` when present. The id
is the caller's ``X-Request-Id`` when that is a sane token (a proxy or client that already has one keeps
it), else a new one; it goes back as ``X-Request-Id`` on the response (on the WebSocket's accept too).
Afterwards the context is put back as it was, whatever the app bound meanwhile (a call's SIDs), so
nothing leaks into the next request served by the same task.
"""

from __future__ import annotations

import re
import uuid

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID = 128
_SANE_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:-]{{0,{MAX_REQUEST_ID - 1}}}")
_RESPONSE_STARTS = frozenset({"http.response.start", "websocket.accept", "websocket.http.response.start"})


def new_correlation_id() -> str:
    return uuid.uuid4().hex


def sane_id(value: str | None) -> str | None:
    """``value`` if it is a token we are willing to log and echo (letters, digits, ``._:-``, at most
    ``MAX_REQUEST_ID`` long), else None."""
    if value is None or _SANE_ID.fullmatch(value) is None:
        return None
    return value


class CorrelationMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        incoming: str | None = None
        idempotency: str | None = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
            elif name == b"i-twilio-idempotency-token":
                idempotency = value.decode("latin-1")
        correlation_id = sane_id(incoming) or new_correlation_id()
        fields: dict[str, str] = {
            "correlation_id": correlation_id,
            "method": scope.get("method", "WEBSOCKET"),  # a WebSocket scope has no method
            "path": scope["path"],
        }
        if (token := sane_id(idempotency)) is not None:
            fields["twilio_idempotency_token"] = token
        header = (b"x-request-id", correlation_id.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] in _RESPONSE_STARTS:
                headers = list(message.get("headers", ()))
                if not any(name.lower() == b"x-request-id" for name, _ in headers):
                    message = {**message, "headers": [*headers, header]}
            await send(message)

        before = structlog.contextvars.get_contextvars()
        structlog.contextvars.bind_contextvars(**fields)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(**before)
