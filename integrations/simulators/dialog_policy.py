"""The OpenAI simulator's "model": the offline booking dialog, reading the chat history the adapter sends.

The dialog agent is a pure function of the conversation, so it can sit behind the chat-completions wire
protocol: the messages are turned back into turns (user lines, assistant lines, tool calls paired with
their results), the dialog answers, and its answer goes out as content and tool calls. The production
agent adapter, the SDK and the simulator's strict checks are then exercised by a model that makes
sensible booking calls.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson

from booking.business import Business
from integrations.openai_agent import INTERRUPTED_MARKER
from integrations.simulators.openai import ChatPolicy, PolicyReply
from voice_server.dialog import DialogAgent
from voice_server.ports import CallInfo, EndCall, TextDelta, ToolCall, TransferCall, Turn

_PRESSED = re.compile(r"^\(pressed ([0-9*#])\)$")
_ANONYMOUS = CallInfo("CAsimulator", "MZsimulator", "", "")


def messages_to_turns(messages: Sequence[Mapping[str, Any]], at: datetime) -> list[Turn]:
    """The conversation behind chat ``messages`` (the inverse of the adapter's conversion)."""
    turns: list[Turn] = []
    results = {m.get("tool_call_id"): m.get("content") or "" for m in messages if m.get("role") == "tool"}
    for message in messages:
        role, content = message.get("role"), message.get("content")
        text = content if isinstance(content, str) else ""
        if role == "user":
            pressed = _PRESSED.match(text.strip())
            turns.append(Turn("dtmf", pressed.group(1), at) if pressed else Turn("caller", text, at))
        elif role == "assistant":
            if text:
                truncated = text.endswith(INTERRUPTED_MARKER)
                turns.append(Turn("agent", text.removesuffix(INTERRUPTED_MARKER), at, truncated=truncated))
            for call in message.get("tool_calls") or ():
                function = call.get("function", {})
                try:
                    arguments = orjson.loads(function.get("arguments") or "{}")
                    result = orjson.loads(results.get(call.get("id"), "{}"))
                except orjson.JSONDecodeError:
                    arguments, result = {}, {"error": {"code": "invalid_json"}}
                record = {"id": call.get("id"), "arguments": arguments, "result": result}
                turns.append(Turn("tool", orjson.dumps(record).decode(), at, tool=function.get("name")))
    return turns


def dialog_policy(business: Business, clock: Callable[[], datetime]) -> ChatPolicy:
    agent = DialogAgent(business, clock=clock)

    async def policy(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> PolicyReply:
        text: list[str] = []
        calls: list[tuple[str, Mapping[str, Any] | str]] = []
        async for event in agent.respond(messages_to_turns(messages, clock()), _ANONYMOUS):
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, ToolCall):
                calls.append((event.name, dict(event.arguments)))
            elif isinstance(event, EndCall):
                calls.append(("end_call", {"reason": event.reason}))
            elif isinstance(event, TransferCall):
                calls.append(("transfer_to_human", {"reason": event.reason}))
        return PolicyReply("".join(text), calls)

    return policy
