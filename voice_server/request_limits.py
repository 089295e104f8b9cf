"""Request size limits: a body larger than ``VOICEBOOK_MAX_REQUEST_BYTES`` is refused with 413.

Twilio's webhooks are a few kilobytes of form fields and the admin API takes small JSON, so nothing
legitimate comes near the default of 64 KiB; a bigger body is a mistake or an attempt to make the server
buffer it. This pure ASGI middleware refuses it before any handler reads it:

- by ``Content-Length`` when the client declares one (nothing of the body is read);
- by counting the chunks as the handler receives them when it does not (``Transfer-Encoding: chunked``):
  the chunk that crosses the limit is never handed on, the handler sees a disconnect, and the client gets
  the 413 unless the handler has started answering already.

WebSocket messages are bounded by the server instead: ``MEDIA_WS_MAX_BYTES`` is uvicorn's ``ws_max_size``
(``voicebook serve``), far above a Twilio Media Streams message (a ``media`` frame is under 1 KB, a
``start`` with custom parameters a few KB) and far below uvicorn's default of 16 MiB.
"""

from __future__ import annotations

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from voice_server.api.responses import problem

log = structlog.get_logger("voicebook.limits")

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024
MEDIA_WS_MAX_BYTES = 64 * 1024
"""The largest WebSocket message the server accepts (a larger one closes the socket with 1009)."""


class RequestTooLarge(Exception):
    """Raised inside ``receive`` when a streamed body passes the limit; caught by the middleware."""


class RequestSizeLimit:
    """Refuse HTTP request bodies over ``max_bytes`` with a 413 problem (see the module's docstring)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._answer(scope, send, declared)
            return
        received = 0
        started = refused = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if not started and not refused:
                        refused = True
                        await self._answer(scope, send, received)
                    raise RequestTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if refused:  # answered 413 already: what an error handler sends after it is dropped
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except RequestTooLarge:
            pass  # answered in counting_receive (or the handler had started its answer: nothing more to say)

    async def _answer(self, scope: Scope, send: Send, size: int) -> None:
        log.warning("request_too_large", path=scope.get("path"), bytes=size, limit=self.max_bytes)
        response = problem(
            413,
            "request_too_large",
            "Request too large",
            f"the request body is larger than {self.max_bytes} bytes (VOICEBOOK_MAX_REQUEST_BYTES)",
        )
        response.headers["connection"] = "close"  # the rest of the body is not read
        await response(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None
