"""The agent on OpenAI's chat completions API: the conversation becomes chat messages, the reply streams
back as text deltas (spoken sentence by sentence by the session) and tool calls.

A caller on the phone must never hear dead air or a crash. The SDK's own retries are silent, so they are
kept at zero by default: on a rate limit, an outage, a timeout or a dropped stream this adapter says a
short holding line once, retries a few times with a short backoff, and if the model is still unreachable
says a fallback line offering a call back. ``respond()`` never raises (cancellation aside).

Requests go through the client's own ``post()`` (which the SDK offers for requests its typed methods do
not cover) rather than ``chat.completions.create()``: same base URL, auth, timeout and stream parsing, but
not the walk ``create()`` makes through every message and tool to transform them for the wire. Ours are
the wire's JSON already, and that walk cost 2.2 ms on the event loop for a 12-message conversation, on
every request of every turn. For the same reason the streamed chunks are read as the JSON they are
(``AsyncStream[object]``: the SDK's own SSE decoding and in-stream error handling, without building a
``ChatCompletionChunk`` model per chunk, which was a quarter of the agent's time on the loop under load).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import structlog
from openai import (
    APIConnectionError,
    APIError,
    APIStatusError,
    AsyncOpenAI,
    AsyncStream,
    RateLimitError,
)
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCallParam,
    ChatCompletionMessageParam,
)

from integrations.metrics import provider_stream
from voice_server.ports import AgentEvent, CallInfo, EndCall, TextDelta, ToolCall, ToolSpec, TransferCall, Turn

log = structlog.get_logger("voicebook.openai")

INTERRUPTED_MARKER = " [interrupted by the caller]"
HOLDING_LINE = "One moment."
FALLBACK_LINE = (
    "I'm having trouble with my system right now. I can have someone call you back at this number. "
    "Is there anything you'd like me to pass on?"
)
EMPTY_REPLY_LINE = "Sorry, could you say that again?"
CONTINUE_NOTE = (
    "Your reply above was cut off by a connection problem after those words. Continue it from exactly where "
    "it stopped, without repeating anything."
)
_SENTENCE_ENDS = (".", "!", "?")
_PROMPT_CACHE_SIZE = 1024


def _reason_schema(purpose: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"reason": {"type": "string", "description": purpose}},
        "required": ["reason"],
        "additionalProperties": False,
    }


END_CALL_SPEC = ToolSpec(
    "end_call",
    "End the call after you have said goodbye, when the caller has nothing more.",
    _reason_schema("Why the call ends, e.g. 'booking done, caller said goodbye'."),
)
TRANSFER_SPEC = ToolSpec(
    "transfer_to_human",
    "Put the caller through to a person at the business, when they ask for one or you cannot help them.",
    _reason_schema("Why a person is needed, in a few words."),
)
CALL_CONTROL_SPECS: tuple[ToolSpec, ...] = (END_CALL_SPEC, TRANSFER_SPEC)


# -- the conversation as chat messages (pure) -------------------------------------------------------------


@dataclass(slots=True)
class _ToolRound:
    """Consecutive tool turns: one assistant message with their calls, then one tool message each."""

    calls: list[ChatCompletionMessageFunctionToolCallParam] = field(default_factory=list)
    results: list[tuple[str, str]] = field(default_factory=list)  # (tool call id, result JSON)


def _tool_record(turn: Turn) -> tuple[str, Mapping[str, Any], Any] | None:
    """(id, arguments, result) of a tool turn written by the session, or None for a note such as a
    failed transfer, which has no tool call behind it."""
    try:
        record = orjson.loads(turn.text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("id"), str) or turn.tool is None:
        return None
    arguments = record.get("arguments")
    return record["id"], arguments if isinstance(arguments, dict) else {}, record.get("result")


def conversation_to_messages(system_prompt: str, conversation: Sequence[Turn]) -> list[ChatCompletionMessageParam]:
    """The chat messages for ``conversation``. Every tool call is answered by its tool message, as the API
    demands; an agent turn directly followed by tool turns becomes one assistant message with both its
    words and its calls (the model said them in one reply)."""
    messages: list[ChatCompletionMessageParam] = [{"role": "system", "content": system_prompt}]
    spoken: str | None = None  # an agent turn not yet written: tool turns may follow it
    tool_round: _ToolRound | None = None
    used_ids: set[str] = set()

    def flush() -> None:
        nonlocal spoken, tool_round
        if tool_round is not None:
            messages.append({"role": "assistant", "content": spoken, "tool_calls": tool_round.calls})
            messages.extend({"role": "tool", "tool_call_id": i, "content": r} for i, r in tool_round.results)
        elif spoken is not None:
            messages.append({"role": "assistant", "content": spoken})
        spoken, tool_round = None, None

    for turn in conversation:
        if turn.role == "tool":
            record = _tool_record(turn)
            if record is not None and turn.tool is not None:
                call_id, arguments, result = record
                if call_id in used_ids:  # ids must be unique within a request; keep the pairing intact
                    call_id = f"{call_id}_{len(used_ids)}"
                used_ids.add(call_id)
                tool_round = tool_round or _ToolRound()
                tool_round.calls.append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": turn.tool, "arguments": orjson.dumps(dict(arguments)).decode()},
                    }
                )
                tool_round.results.append((call_id, orjson.dumps(result).decode()))
                continue
            flush()
            messages.append({"role": "system", "content": f"({turn.tool or 'note'}: {turn.text})"})
            continue
        flush()
        if turn.role == "agent":
            if turn.text:  # an empty truncated turn: the caller heard nothing of it
                spoken = turn.text + (INTERRUPTED_MARKER if turn.truncated else "")
        elif turn.role == "dtmf":
            messages.append({"role": "user", "content": f"(pressed {turn.text})"})
        else:
            messages.append({"role": "user", "content": turn.text})
    flush()
    return messages


def tool_definitions(specs: Sequence[ToolSpec]) -> list[ChatCompletionFunctionToolParam]:
    """``specs`` in the shape of the API's ``tools``, plus end_call and transfer_to_human if missing."""
    names = {spec.name for spec in specs}
    every = [*specs, *(spec for spec in CALL_CONTROL_SPECS if spec.name not in names)]
    return [
        {
            "type": "function",
            "function": {"name": spec.name, "description": spec.description, "parameters": dict(spec.parameters)},
        }
        for spec in every
    ]


# -- one streamed request -----------------------------------------------------------------------


@dataclass(slots=True)
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


def _finished_call(partial: _PartialCall) -> AgentEvent:
    text = "".join(partial.arguments)
    try:
        parsed = orjson.loads(text) if text.strip() else {}
    except orjson.JSONDecodeError:
        parsed = None
    # Malformed arguments go to the tool runner as they are: it answers invalid_argument and the model
    # hears why, which is how it fixes them.
    arguments: Mapping[str, Any] = parsed if isinstance(parsed, dict) else {"_raw": text}
    if partial.name in (END_CALL_SPEC.name, TRANSFER_SPEC.name):
        reason = arguments.get("reason")
        reason_text = reason if isinstance(reason, str) and reason else partial.name
        return EndCall(reason_text) if partial.name == END_CALL_SPEC.name else TransferCall(reason_text)
    return ToolCall(partial.id, partial.name, arguments)


class _Prefix:
    """Drops the start of a retried reply that repeats what the caller was already told. A reply that
    goes its own way (a continuation, or new words) is passed on whole."""

    def __init__(self, said: str) -> None:
        self._said = said
        self._held = ""
        self._decided = not said

    def feed(self, text: str) -> str:
        if self._decided:
            return text
        self._held += text
        if self._said.startswith(self._held):
            return ""  # still repeating: wait
        self._decided = True
        if self._held.startswith(self._said):
            return self._held[len(self._said) :]
        return self._held

    def leftover(self) -> str:
        """At the end of the reply: whatever was held back and is not a pure repeat."""
        return "" if self._decided or self._said.startswith(self._held) else self._held


# -- failures -------------------------------------------------------------------------------------------

Failure = Literal["transient", "permanent"]


def classify(error: Exception) -> Failure:
    """Transient: worth another try in a moment (rate limit, server error, timeout, dropped stream, an error
    reported inside the stream). Permanent: a refused request, a bad key, no quota, or a bug."""
    if isinstance(error, RateLimitError):
        return "permanent" if error.code == "insufficient_quota" else "transient"
    if isinstance(error, APIStatusError):
        return "transient" if error.status_code in (408, 409) or error.status_code >= 500 else "permanent"
    if isinstance(error, APIConnectionError):  # includes APITimeoutError
        return "transient"
    if isinstance(error, APIError):  # an ``error`` object inside the stream
        return "permanent" if error.type == "invalid_request_error" else "transient"
    return "permanent"


def _retry_after(error: Exception) -> float | None:
    if not isinstance(error, APIStatusError):
        return None
    headers = error.response.headers
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                seconds = float(str(value)) / scale
            except ValueError:
                continue
            return max(0.0, seconds)
    return None


class OpenAIAgent:
    """Implements ``voice_server.ports.Agent`` on OpenAI chat completions (or any compatible server).

    ``system_prompt`` is a fixed string or an async function of the call, built once per call and reused
    for its turns (the model sees the same facts all call long, and the prompt prefix stays cacheable).
    ``retries`` are this adapter's own, audible ones; ``sdk_retries`` are the SDK's silent ones."""

    def __init__(
        self,
        client: AsyncOpenAI,
        *,
        model: str,
        tools: Sequence[ToolSpec],
        system_prompt: Callable[[CallInfo], Awaitable[str]] | str,
        temperature: float | None = 0.3,
        retries: int = 2,
        request_timeout: float = 5.0,
        sdk_retries: int = 0,
        backoff: float = 0.25,
        max_wait: float = 2.0,
        holding_line: str = HOLDING_LINE,
        fallback: str = FALLBACK_LINE,
        empty_reply: str = EMPTY_REPLY_LINE,
    ) -> None:
        self._client = client.with_options(max_retries=sdk_retries, timeout=request_timeout)
        self._model = model
        self._tools = tool_definitions(tools)
        self._system_prompt = system_prompt
        self._prompts: OrderedDict[str, str] = OrderedDict()
        self._temperature = temperature
        self._retries = retries
        self._backoff = backoff
        self._max_wait = max_wait
        self._holding_line = holding_line
        self._fallback = fallback
        self._empty_reply = empty_reply

    async def _prompt_for(self, call: CallInfo) -> str:
        if isinstance(self._system_prompt, str):
            return self._system_prompt
        prompt = self._prompts.get(call.call_sid)
        if prompt is None:
            prompt = await self._system_prompt(call)
            self._prompts[call.call_sid] = prompt
            while len(self._prompts) > _PROMPT_CACHE_SIZE:  # calls long over
                self._prompts.popitem(last=False)
        return prompt

    def _wait_before_retry(self, error: Exception, attempt: int) -> float | None:
        """Seconds to wait before the next try, or None when the wait would leave the caller hanging."""
        hinted = _retry_after(error)
        if hinted is not None:
            return hinted if hinted <= self._max_wait else None
        return min(self._max_wait, self._backoff * 2.0**attempt) * (0.5 + random.random() / 2)

    async def respond(self, conversation: Sequence[Turn], call: CallInfo) -> AsyncIterator[AgentEvent]:
        try:
            system = await self._prompt_for(call)
        except Exception:
            log.exception("agent_prompt_failed", call_sid=call.call_sid)
            yield TextDelta(self._fallback)
            return
        messages = conversation_to_messages(system, conversation)
        said = ""  # words of this reply already passed to the session (spoken or about to be)
        announced = False
        for attempt in range(self._retries + 1):
            request: list[ChatCompletionMessageParam] = messages
            if said:  # a stream broke mid-reply: let the model continue rather than start over
                request = [
                    *messages,
                    {"role": "assistant", "content": said},
                    {"role": "system", "content": CONTINUE_NOTE},
                ]
            prefix = _Prefix(said)
            produced = False
            try:
                # One provider request per chat completion, however many chunks it streams.
                chat = provider_stream("openai", "chat", self._stream(request, call))
                async with contextlib.aclosing(chat) as events:
                    async for event in events:
                        if isinstance(event, TextDelta):
                            text = prefix.feed(event.text)
                            if not text:
                                continue
                            said += text
                            event = TextDelta(text)
                        produced = True
                        yield event
                rest = prefix.leftover()
                if rest:
                    said += rest
                    produced = True
                    yield TextDelta(rest)
                if not produced and not said:
                    log.warning("agent_empty_reply", call_sid=call.call_sid)
                    yield TextDelta(self._empty_reply)
                return
            except Exception as error:
                failure = classify(error)
                log.warning(
                    "agent_request_failed",
                    call_sid=call.call_sid,
                    attempt=attempt + 1,
                    failure=failure,
                    error=f"{type(error).__name__}: {error}",
                    mid_reply=bool(said),
                )
                if failure == "permanent" or attempt == self._retries:
                    break
                wait = self._wait_before_retry(error, attempt)
                if wait is None:
                    break
                if not said and not announced:
                    # Only before the reply has begun: mid-reply the caller is still hearing words, and a
                    # holding line there would break the sentence in two.
                    announced = True
                    yield TextDelta(self._holding_line + " ")
                await asyncio.sleep(wait)
        log.error("agent_unavailable", call_sid=call.call_sid)
        # A sentence left unfinished is closed first, so the fallback is not read as part of it.
        joiner = "... " if said.strip() and not said.rstrip().endswith(_SENTENCE_ENDS) else ""
        yield TextDelta(joiner + self._fallback)

    async def _stream(
        self, messages: list[ChatCompletionMessageParam], call: CallInfo
    ) -> AsyncGenerator[AgentEvent, None]:
        """One request: text deltas as they arrive, then the tool calls once the model has finished."""
        body: dict[str, Any] = {
            "model": self._model,
            "messages": messages,
            "tools": self._tools,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self._temperature is not None:
            body["temperature"] = self._temperature
        stream = await self._client.post(
            "/chat/completions",
            cast_to=ChatCompletion,
            body=body,
            stream=True,
            stream_cls=AsyncStream[object],  # each chunk's JSON as it came: no model built (module doc)
        )
        partials: dict[int, _PartialCall] = {}
        finished = False
        async with stream:
            try:
                async for chunk in stream:
                    if not isinstance(chunk, dict):
                        raise ValueError(f"OpenAI streamed a chunk that is not a JSON object: {chunk!r:.200}")
                    usage = chunk.get("usage")
                    if usage:
                        log.debug(
                            "agent_usage",
                            call_sid=call.call_sid,
                            prompt_tokens=usage.get("prompt_tokens"),
                            completion_tokens=usage.get("completion_tokens"),
                        )
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta") or {}
                        content = delta.get("content")
                        if content:
                            yield TextDelta(content)
                        for fragment in delta.get("tool_calls") or ():
                            partial = partials.setdefault(fragment.get("index", 0), _PartialCall())
                            partial.id = fragment.get("id") or partial.id
                            function = fragment.get("function")
                            if function:
                                partial.name = function.get("name") or partial.name
                                if function.get("arguments"):
                                    partial.arguments.append(function["arguments"])
                        reason = choice.get("finish_reason")
                        if reason is not None:
                            finished = True
                            if reason not in ("stop", "tool_calls"):
                                log.warning("agent_reply_cut", call_sid=call.call_sid, reason=reason)
            except Exception as error:
                # After the model finished, a lost usage chunk or [DONE] costs nothing: keep the reply.
                if not finished:
                    raise
                log.info("agent_stream_tail_lost", call_sid=call.call_sid, error=repr(error))
        for index in sorted(partials):
            yield _finished_call(partials[index])


__all__ = [
    "CALL_CONTROL_SPECS",
    "CONTINUE_NOTE",
    "END_CALL_SPEC",
    "FALLBACK_LINE",
    "HOLDING_LINE",
    "INTERRUPTED_MARKER",
    "TRANSFER_SPEC",
    "OpenAIAgent",
    "classify",
    "conversation_to_messages",
    "tool_definitions",
]
