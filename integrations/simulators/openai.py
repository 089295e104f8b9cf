"""OpenAI's chat completions API on loopback: ``POST /v1/chat/completions``, streamed (server-sent events)
or not, answered by a pluggable ``ChatPolicy`` instead of a model.

Strict where the API is: the Bearer key, the request's shape (roles, content, tool calls and the tool
messages answering them, tool definitions), each refusal a 400 with the API's error body
``{"error": {message, type, param, code}}``, so a protocol mistake in an adapter fails its test. It can
also misbehave on purpose, per request number: 429 (rate limit or quota) with ``retry-after-ms`` and
``retry-after``, 500 and 503, a request that hangs until the client gives up, an ``error`` object inside
the stream, a connection dropped or stalled mid-stream. Latency is a time to first token and a token rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from integrations.simulators.openai_validation import InvalidRequest, validate_request

log = structlog.get_logger("voicebook.simulators.openai")

# -- the policy that stands in for the model -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyReply:
    """What the "model" says: text, and tool calls as (name, arguments). Arguments given as a string are
    sent verbatim, so a test can make the model emit malformed JSON."""

    text: str = ""
    tool_calls: list[tuple[str, Mapping[str, Any] | str]] = field(default_factory=list)


class ChatPolicy(Protocol):
    def __call__(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> PolicyReply | Awaitable[PolicyReply]: ...


# -- faults and configuration ------------------------------------------------------------------------

FaultKind = Literal[
    "rate_limit",  # 429 rate_limit_exceeded, with retry-after-ms / retry-after
    "insufficient_quota",  # 429 insufficient_quota (retrying does not help)
    "server_error",  # 500
    "overloaded",  # 503
    "timeout",  # no response at all until the client disconnects
    "stream_error",  # an ``error`` object inside the stream after ``after_tokens`` tokens
    "drop",  # the connection closed after ``after_tokens`` tokens
    "stall",  # the stream stops sending after ``after_tokens`` tokens, until the client gives up
]


@dataclass(frozen=True, slots=True)
class Fault:
    """Misbehave on requests ``first`` .. ``first + count - 1`` (1-based, counting every request the
    endpoint received); ``count=None`` means every request from ``first`` on. The in-stream kinds
    (``stream_error``, ``drop``, ``stall``) act on streamed requests only."""

    kind: FaultKind
    first: int = 1
    count: int | None = 1
    after_tokens: int = 0
    retry_after_ms: int | None = 20

    def applies_to(self, number: int) -> bool:
        return number >= self.first and (self.count is None or number < self.first + self.count)


@dataclass
class OpenAISimConfig:
    """Settings of one simulator, and what it saw (tests read ``requests`` and ``rejections``; they may
    change ``faults`` between requests)."""

    api_key: str = "sk-sim-0123456789"
    first_token_ms: float = 0.0
    tokens_per_second: float | None = None  # None: as fast as the socket takes them
    faults: list[Fault] = field(default_factory=list)
    # A hanging request gives up on its own after this long, so a server shutting down never waits on it.
    hang_limit_seconds: float = 30.0
    # Awaited before each streamed token with (index, total): a test hook to prove the client streams.
    token_gate: Callable[[int, int], Awaitable[None]] | None = None
    requests: list[dict[str, Any] | None] = field(default_factory=list)
    rejections: list[str] = field(default_factory=list)

    def fault_for(self, number: int) -> Fault | None:
        return next((fault for fault in self.faults if fault.applies_to(number)), None)


# -- responses --------------------------------------------------------------------------------------


def _error(
    status: int,
    message: str,
    kind: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _rate_limited(fault: Fault, model: str) -> Response:
    headers: dict[str, str] = {"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "0"}
    if fault.retry_after_ms is not None:
        headers["retry-after-ms"] = str(fault.retry_after_ms)
        headers["retry-after"] = str(math.ceil(fault.retry_after_ms / 1000))
        headers["x-ratelimit-reset-requests"] = f"{fault.retry_after_ms}ms"
    if fault.kind == "insufficient_quota":
        return _error(
            429,
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            code="insufficient_quota",
            headers=headers,
        )
    return _error(
        429,
        f"Rate limit reached for {model} on requests per min (RPM): Limit 500, Used 500, Requested 1. "
        f"Please try again in {fault.retry_after_ms or 1000}ms.",
        "requests",
        code="rate_limit_exceeded",
        headers=headers,
    )


_SERVER_ERROR = {
    "message": "The server had an error while processing your request. Sorry about that!",
    "type": "server_error",
    "param": None,
    "code": None,
}


def _tokens(text: str) -> list[str]:
    """Word-sized pieces that join back to ``text`` exactly."""
    return re.findall(r"\s*\S+|\s+$", text)


def _pieces(arguments: str, size: int = 8) -> list[str]:
    return [arguments[i : i + size] for i in range(0, len(arguments), size)] or [""]


def _arguments_text(arguments: Mapping[str, Any] | str) -> str:
    return arguments if isinstance(arguments, str) else orjson.dumps(dict(arguments)).decode()


def _usage(body: Mapping[str, Any], completion_tokens: int) -> dict[str, Any]:
    prompt_tokens = max(1, len(orjson.dumps(body.get("messages"))) // 4)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


class _SimulatedDrop(Exception):
    """Raised inside a streaming body: uvicorn closes the connection mid-response, as a network drop."""


@dataclass(frozen=True, slots=True)
class _Completion:
    id: str
    created: int
    model: str
    reply: PolicyReply
    call_ids: tuple[str, ...]

    def header(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created": self.created,
            "model": self.model,
            "service_tier": "default",
            "system_fingerprint": "fp_simulator",
        }


async def _wait_for_disconnect(request: Request, limit: float) -> None:
    """Read the request's channel until the client goes away (or ``limit`` passes)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(limit):
            while (await request.receive())["type"] != "http.disconnect":
                pass


def _event(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def _stream(
    config: OpenAISimConfig, body: Mapping[str, Any], completion: _Completion, fault: Fault | None
) -> AsyncIterator[bytes]:
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    reply = completion.reply

    def chunk(delta: Mapping[str, Any], finish: str | None = None) -> bytes:
        payload: dict[str, Any] = {
            **completion.header(),
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            payload["usage"] = None
        return _event(payload)

    # Every delta after the role: text tokens, then per tool call its opening fragment and argument pieces.
    deltas: list[dict[str, Any]] = [{"content": token} for token in _tokens(reply.text)]
    for index, ((name, arguments), call_id) in enumerate(zip(reply.tool_calls, completion.call_ids, strict=True)):
        opening = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        deltas.append({"tool_calls": [opening]})
        deltas.extend(
            {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
            for piece in _pieces(_arguments_text(arguments))
        )
    await asyncio.sleep(config.first_token_ms / 1000)
    yield chunk({"role": "assistant", "content": "" if reply.text else None, "refusal": None})
    for index, delta in enumerate(deltas):
        if fault is not None and index == fault.after_tokens:
            if fault.kind == "stream_error":
                yield _event({"error": _SERVER_ERROR})
                return
            if fault.kind == "drop":
                raise _SimulatedDrop(f"simulated connection drop after {index} tokens")
            if fault.kind == "stall":
                await asyncio.sleep(config.hang_limit_seconds)  # cancelled when the client disconnects
                return
        if config.token_gate is not None:
            await config.token_gate(index, len(deltas))
        if index and config.tokens_per_second:
            await asyncio.sleep(1 / config.tokens_per_second)
        yield chunk(delta)
    yield chunk({}, "tool_calls" if reply.tool_calls else "stop")
    if include_usage:
        yield _event(
            {
                **completion.header(),
                "object": "chat.completion.chunk",
                "choices": [],
                "usage": _usage(body, len(deltas)),
            }
        )
    yield b"data: [DONE]\n\n"


async def _whole(config: OpenAISimConfig, body: Mapping[str, Any], completion: _Completion) -> Response:
    reply = completion.reply
    tokens = len(_tokens(reply.text)) + sum(len(_pieces(_arguments_text(a))) for _, a in reply.tool_calls)
    delay = config.first_token_ms / 1000 + (tokens / config.tokens_per_second if config.tokens_per_second else 0)
    await asyncio.sleep(delay)
    message: dict[str, Any] = {"role": "assistant", "content": reply.text or None, "refusal": None, "annotations": []}
    if reply.tool_calls:
        message["tool_calls"] = [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": _arguments_text(arguments)}}
            for (name, arguments), call_id in zip(reply.tool_calls, completion.call_ids, strict=True)
        ]
    return JSONResponse(
        {
            **completion.header(),
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": "tool_calls" if reply.tool_calls else "stop",
                }
            ],
            "usage": _usage(body, tokens),
        }
    )


def create_openai_simulator(config: OpenAISimConfig, policy: ChatPolicy) -> Starlette:
    async def chat_completions(request: Request) -> Response:
        raw = await request.body()
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        config.requests.append(body if isinstance(body, dict) else None)
        number = len(config.requests)
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme != "Bearer" or key != config.api_key:
            return _error(401, "Incorrect API key provided.", "invalid_request_error", code="invalid_api_key")
        try:
            validate_request(body)
        except InvalidRequest as invalid:
            config.rejections.append(invalid.message)
            log.warning("openai_sim_rejected", request=number, message=invalid.message, param=invalid.param)
            return _error(400, invalid.message, "invalid_request_error", param=invalid.param)
        fault = config.fault_for(number)
        if fault is not None and fault.kind in ("rate_limit", "insufficient_quota"):
            return _rate_limited(fault, body["model"])
        if fault is not None and fault.kind == "server_error":
            return JSONResponse({"error": _SERVER_ERROR}, status_code=500)
        if fault is not None and fault.kind == "overloaded":
            return _error(503, "The engine is currently overloaded, please try again later.", "server_error")
        if fault is not None and fault.kind == "timeout":
            await _wait_for_disconnect(request, config.hang_limit_seconds)
            return _error(504, "Gateway timeout.", "server_error")
        answer = policy(body["messages"], body.get("tools") or [])
        reply = await answer if inspect.isawaitable(answer) else answer
        completion = _Completion(
            id=f"chatcmpl-{secrets.token_urlsafe(18)}",
            created=int(time.time()),
            model=body["model"],
            reply=reply,
            call_ids=tuple(f"call_{secrets.token_urlsafe(18)}" for _ in reply.tool_calls),
        )
        headers = {"x-request-id": f"req_{secrets.token_hex(16)}", "openai-processing-ms": "1"}
        if not body.get("stream"):
            response = await _whole(config, body, completion)
            response.headers.update(headers)
            return response
        return StreamingResponse(
            _stream(config, body, completion, fault), media_type="text/event-stream; charset=utf-8", headers=headers
        )

    return Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"])])


__all__ = [
    "ChatPolicy",
    "Fault",
    "FaultKind",
    "InvalidRequest",
    "OpenAISimConfig",
    "PolicyReply",
    "create_openai_simulator",
    "validate_request",
]
