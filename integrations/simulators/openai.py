"""OpenAI's chat completions API on loopback: ``POST /v1/chat/completions``, streamed (server-sent events)
or not, answered by a pluggable ``ChatPolicy`` instead of a model.

Strict where the API is: the Bearer key, the request's shape (roles, content, tool calls and the tool
messages answering them, tool definitions), each refusal a 400 with the API's error body
``{"error": {message, type, param, code}}``, so a protocol mistake in an adapter fails its test. It can
also misbehave on purpose, per request number: 429 (rate limit or quota) with ``retry-after-ms`` and
``retry-after``, 500 and 503, a request that hangs until the client gives up, an ``error`` object inside
the stream, a connection dropped or stalled mid-stream. Latency is a time to first token and a token rate.

A request with ``response_format`` (structured output) is answered by a ``StructuredPolicy`` instead:
with ``json_schema`` and ``strict: true`` the schema must follow strict mode's rules (every object closed
and all its properties required) and the answer is checked against it, as the API guarantees it.
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
    refusal: str | None = None  # said instead of an answer (structured output)


class ChatPolicy(Protocol):
    def __call__(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> PolicyReply | Awaitable[PolicyReply]: ...


@dataclass(frozen=True, slots=True)
class Refusal:
    """The "model" declines to answer a structured request (``message.refusal``, no content)."""

    message: str


StructuredAnswer = Mapping[str, Any] | str | Refusal
"""A mapping is checked against a strict schema and sent as JSON; a string is sent verbatim, unchecked, so
a test can make the model emit what strict mode would never let through."""


class StructuredPolicy(Protocol):
    def __call__(self, body: dict[str, Any]) -> StructuredAnswer | Awaitable[StructuredAnswer]: ...


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
    "garbled",  # a data line after ``after_tokens`` tokens that is JSON but not a chunk object
]


@dataclass(frozen=True, slots=True)
class Fault:
    """Misbehave on requests ``first`` .. ``first + count - 1`` (1-based, counting every request the
    endpoint received); ``count=None`` means every request from ``first`` on. The in-stream kinds
    (``stream_error``, ``drop``, ``stall``, ``garbled``) act on streamed requests only."""

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
    # The snapshot an alias answers as (``gpt-4o-mini`` -> ``gpt-4o-mini-2024-07-18``), as the API reports it.
    model_versions: dict[str, str] = field(default_factory=dict)
    requests: list[dict[str, Any] | None] = field(default_factory=list)
    rejections: list[str] = field(default_factory=list)

    def fault_for(self, number: int) -> Fault | None:
        return next((fault for fault in self.faults if fault.applies_to(number)), None)


# -- structured output ------------------------------------------------------------------------------

_SCHEMA_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# The strict-mode keywords this simulator checks answers against. Others the API accepts ($ref, $defs,
# format, multipleOf) are refused as unsupported here, so no test passes on a schema left unchecked.
_STRICT_KEYWORDS = frozenset(
    {
        "type", "description", "title", "properties", "required", "additionalProperties", "items", "enum",
        "const", "anyOf", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems",
        "pattern",
    }
)  # fmt: skip
_JSON_TYPES: Mapping[str, Callable[[Any], bool]] = {
    "object": lambda value: isinstance(value, dict),
    "array": lambda value: isinstance(value, list),
    "string": lambda value: isinstance(value, str),
    "integer": lambda value: isinstance(value, int) and not isinstance(value, bool),
    "number": lambda value: isinstance(value, int | float) and not isinstance(value, bool),
    "boolean": lambda value: isinstance(value, bool),
    "null": lambda value: value is None,
}


class StructuredMismatch(Exception):
    """A structured policy answered a strict request with a mapping that breaks its schema: a test bug."""


def _types_of(node: Mapping[str, Any]) -> list[str]:
    kind = node.get("type")
    return [kind] if isinstance(kind, str) else list(kind) if isinstance(kind, list) else []


def _check_strict_schema(node: Any, name: str, context: tuple[str, ...] = ()) -> None:
    def refuse(problem: str) -> InvalidRequest:
        return InvalidRequest(
            f"Invalid schema for response_format '{name}': In context={context}, {problem}", "response_format"
        )

    if not isinstance(node, dict):
        raise refuse("a schema must be an object.")
    unsupported = sorted(set(node) - _STRICT_KEYWORDS)
    if unsupported:
        raise refuse(f"'{unsupported[0]}' is not supported by this simulator.")
    if "anyOf" in node:
        if not isinstance(node["anyOf"], list) or not node["anyOf"]:
            raise refuse("'anyOf' must be a non-empty array.")
        for index, branch in enumerate(node["anyOf"]):
            _check_strict_schema(branch, name, (*context, "anyOf", str(index)))
        return
    types = _types_of(node)
    if (not types and "enum" not in node and "const" not in node) or any(kind not in _JSON_TYPES for kind in types):
        raise refuse(f"'type' must be one of {', '.join(_JSON_TYPES)}.")
    if "object" in types:
        properties = node.get("properties", {})
        if not isinstance(properties, dict):
            raise refuse("'properties' must be an object.")
        if node.get("additionalProperties") is not False:
            raise refuse("'additionalProperties' is required to be supplied and to be false.")
        required = node.get("required")
        missing = [key for key in properties if not isinstance(required, list) or key not in required]
        if not isinstance(required, list) or missing:
            raise refuse(
                "'required' is required to be supplied and to be an array including every key in properties. "
                f"Missing '{missing[0] if missing else ''}'."
            )
        extra = [key for key in required if key not in properties]
        if extra:
            raise refuse(f"'required' names '{extra[0]}', which is not in properties.")
        for key, sub in properties.items():
            _check_strict_schema(sub, name, (*context, "properties", key))
    if "array" in types:
        if "items" not in node:
            raise refuse("an array schema needs 'items'.")
        _check_strict_schema(node["items"], name, (*context, "items"))


def check_response_format(body: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidRequest` for a ``response_format`` the API would refuse, strict mode's schema
    rules included."""
    spec = body.get("response_format")
    if spec is None:
        return
    if not isinstance(spec, dict) or spec.get("type") not in ("text", "json_object", "json_schema"):
        raise InvalidRequest(
            "Invalid value for 'response_format.type': supported values are 'text', 'json_object' and 'json_schema'.",
            "response_format.type",
        )
    unexpected = set(spec) - ({"type", "json_schema"} if spec["type"] == "json_schema" else {"type"})
    if unexpected:
        raise InvalidRequest(f"Unrecognized request argument supplied: response_format.{min(unexpected)}")
    if spec["type"] == "json_object":
        if not any("json" in str(message.get("content")).lower() for message in body["messages"]):
            raise InvalidRequest(
                "'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'.",
                "messages",
            )
        return
    if spec["type"] == "text":
        return
    json_schema = spec.get("json_schema")
    if not isinstance(json_schema, dict):
        raise InvalidRequest("Missing required parameter: 'response_format.json_schema'.", "response_format")
    unexpected = set(json_schema) - {"name", "description", "schema", "strict"}
    if unexpected:
        raise _unexpected_keys(unexpected, "response_format.json_schema")
    name = json_schema.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
        raise InvalidRequest(
            "Invalid 'response_format.json_schema.name': expected a string of a-z, A-Z, 0-9, underscores and "
            "dashes, at most 64 long.",
            "response_format.json_schema.name",
        )
    schema = json_schema.get("schema", {})
    if not isinstance(schema, dict):
        raise InvalidRequest("Invalid type for 'response_format.json_schema.schema': expected an object.")
    if json_schema.get("strict"):
        if schema.get("type") != "object":
            raise InvalidRequest(
                f"Invalid schema for response_format '{name}': schema must be a JSON Schema of 'type: \"object\"'.",
                "response_format",
            )
        _check_strict_schema(schema, name)


def _unexpected_keys(keys: set[str], where: str) -> InvalidRequest:
    return InvalidRequest(
        f"Additional properties are not allowed ({', '.join(sorted(keys))} was unexpected) - '{where}'", where
    )


def schema_mismatch(value: Any, schema: Mapping[str, Any], where: str = "answer") -> str | None:
    """The first way ``value`` breaks ``schema`` (a schema :func:`check_response_format` accepted as
    strict), or None when it fits."""
    if "anyOf" in schema:
        if all(schema_mismatch(value, branch, where) for branch in schema["anyOf"]):
            return f"{where}: fits no branch of anyOf"
        return None
    types = _types_of(schema)
    if types and not any(_JSON_TYPES[kind](value) for kind in types):
        return f"{where}: expected {' or '.join(types)}, got {value!r}"
    if "const" in schema and value != schema["const"]:
        return f"{where}: {value!r} is not {schema['const']!r}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where}: {value!r} is not one of {schema['enum']}"
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = sorted(set(value) - set(properties))
        missing = [key for key in schema.get("required", []) if key not in value]
        if extra or missing:
            return f"{where}: unexpected key {extra[0]!r}" if extra else f"{where}: missing key {missing[0]!r}"
        for key, item in value.items():
            if problem := schema_mismatch(item, properties[key], f"{where}.{key}"):
                return problem
    elif isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            return f"{where}: {len(value)} items is outside minItems/maxItems"
        for index, item in enumerate(value):
            if problem := schema_mismatch(item, schema.get("items", {}), f"{where}[{index}]"):
                return problem
    elif isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            return f"{where}: {value!r} does not match {schema['pattern']!r}"
    elif _JSON_TYPES["number"](value):
        low, high = schema.get("minimum", -math.inf), schema.get("maximum", math.inf)
        above, below = schema.get("exclusiveMinimum", -math.inf), schema.get("exclusiveMaximum", math.inf)
        if not (low <= value <= high and above < value < below):
            return f"{where}: {value!r} is out of range"
    return None


def _wants_structure(body: Mapping[str, Any]) -> bool:
    spec = body.get("response_format")
    return isinstance(spec, dict) and spec.get("type") in ("json_schema", "json_object")


async def _structured_reply(structured: StructuredPolicy, body: dict[str, Any]) -> PolicyReply:
    answer = structured(body)
    answer = await answer if inspect.isawaitable(answer) else answer
    if isinstance(answer, Refusal):
        return PolicyReply(refusal=answer.message)
    if isinstance(answer, str):
        return PolicyReply(answer)
    json_schema = body["response_format"].get("json_schema") or {}
    if json_schema.get("strict"):
        problem = schema_mismatch(answer, json_schema.get("schema", {}))
        if problem is not None:
            raise StructuredMismatch(problem)
    return PolicyReply(orjson.dumps(dict(answer)).decode())


def _report_policy(body: dict[str, Any]) -> StructuredAnswer:
    # Imported on first use: the call-report policy loads the report analysers (VADER, YAKE).
    from integrations.simulators.openai_reports import call_report_policy

    return call_report_policy(body)


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


def _event(payload: object) -> bytes:
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
    deltas.extend({"refusal": token} for token in _tokens(reply.refusal or ""))
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
            if fault.kind == "garbled":
                yield _event(["not", "a", "chunk"])
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
    tokens += len(_tokens(reply.refusal or ""))
    delay = config.first_token_ms / 1000 + (tokens / config.tokens_per_second if config.tokens_per_second else 0)
    await asyncio.sleep(delay)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": reply.text or None,
        "refusal": reply.refusal,
        "annotations": [],
    }
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


def create_openai_simulator(
    config: OpenAISimConfig, policy: ChatPolicy, structured: StructuredPolicy | None = None
) -> Starlette:
    """``policy`` answers conversations; ``structured`` answers requests with a ``response_format`` (by
    default :func:`integrations.simulators.openai_reports.call_report_policy`). Faults apply to both."""
    structured_policy: StructuredPolicy = structured or _report_policy

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
            check_response_format(body)
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
        if _wants_structure(body):
            try:
                reply = await _structured_reply(structured_policy, body)
            except StructuredMismatch as mismatch:
                log.error("openai_sim_structured_mismatch", request=number, problem=str(mismatch))
                return _error(500, f"Simulator: the structured policy broke the schema: {mismatch}", "server_error")
        else:
            answer = policy(body["messages"], body.get("tools") or [])
            reply = await answer if inspect.isawaitable(answer) else answer
        completion = _Completion(
            id=f"chatcmpl-{secrets.token_urlsafe(18)}",
            created=int(time.time()),
            model=config.model_versions.get(body["model"], body["model"]),
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
    "Refusal",
    "StructuredAnswer",
    "StructuredMismatch",
    "StructuredPolicy",
    "check_response_format",
    "create_openai_simulator",
    "schema_mismatch",
    "validate_request",
]
