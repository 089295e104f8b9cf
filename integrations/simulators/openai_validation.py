"""Strict checks of a chat-completions request, as the API makes them (pure, no I/O). The simulator
answers 400 with the API's error body when one fails, so a protocol mistake in our adapter fails a test
instead of passing quietly."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# -- request validation ------------------------------------------------------------------------

_KNOWN_PARAMETERS = frozenset(
    {
        "model", "messages", "stream", "stream_options", "tools", "tool_choice", "parallel_tool_calls",
        "temperature", "top_p", "n", "max_tokens", "max_completion_tokens", "stop", "seed", "user",
        "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "response_format",
        "metadata", "store", "service_tier", "reasoning_effort", "modalities", "audio", "prediction",
        "safety_identifier", "prompt_cache_key", "verbosity", "web_search_options",
    }
)  # fmt: skip
_ROLES = ("system", "assistant", "user", "function", "tool", "developer")
_MESSAGE_KEYS: Mapping[str, frozenset[str]] = {
    "system": frozenset({"role", "content", "name"}),
    "developer": frozenset({"role", "content", "name"}),
    "user": frozenset({"role", "content", "name"}),
    "assistant": frozenset({"role", "content", "name", "tool_calls", "refusal", "audio", "function_call"}),
    "tool": frozenset({"role", "content", "tool_call_id"}),
}
_FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class InvalidRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _wrong_type(where: str, expected: str, value: Any) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid type for '{where}': expected {expected}, but got {_type_name(value)} instead.", where
    )


def _unexpected(keys: set[str], where: str) -> InvalidRequest:
    return InvalidRequest(
        f"Additional properties are not allowed ({', '.join(sorted(keys))} was unexpected) - '{where}'", where
    )


def _expect_string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _wrong_type(where, "a string", value)
    return value


def _check_content(content: Any, where: str, part_types: frozenset[str]) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list) or not content:
        raise InvalidRequest(
            f"Invalid type for '{where}': expected one of a string or array of objects, but got "
            f"{_type_name(content)} instead.",
            where,
        )
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in part_types:
            raise InvalidRequest(f"Invalid content part at '{where}[{index}]'.", f"{where}[{index}]")
        if part["type"] == "text":
            _expect_string(part.get("text"), f"{where}[{index}].text")


def _check_tool_calls(tool_calls: Any, where: str) -> list[str]:
    if not isinstance(tool_calls, list) or not tool_calls:
        raise InvalidRequest(f"Invalid '{where}': expected a non-empty array of tool calls.", where)
    ids: list[str] = []
    for index, call in enumerate(tool_calls):
        at = f"{where}[{index}]"
        if not isinstance(call, dict):
            raise _wrong_type(at, "an object", call)
        unexpected = set(call) - {"id", "type", "function"}
        if unexpected:
            raise _unexpected(unexpected, at)
        call_id = _expect_string(call.get("id"), f"{at}.id")
        if call.get("type") != "function":
            raise InvalidRequest(f"Invalid value for '{at}.type': expected 'function'.", f"{at}.type")
        function = call.get("function")
        if not isinstance(function, dict) or set(function) - {"name", "arguments"}:
            raise InvalidRequest(f"Invalid '{at}.function': expected {{name, arguments}}.", f"{at}.function")
        _expect_string(function.get("name"), f"{at}.function.name")
        _expect_string(function.get("arguments"), f"{at}.function.arguments")
        if call_id in ids:
            raise InvalidRequest(f"Duplicate tool call id {call_id!r} in '{where}'.", f"{at}.id")
        ids.append(call_id)
    return ids


def _unanswered(pending: list[str], index: int) -> InvalidRequest:
    return InvalidRequest(
        "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
        f"'tool_call_id'. The following tool_call_ids did not have response messages: {', '.join(pending)}",
        f"messages.[{index}].role",
    )


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array", messages)
    if not messages:
        raise InvalidRequest("[] is too short - 'messages'", "messages")
    pending: list[str] = []  # tool call ids of the last assistant message not yet answered
    pending_from = 0
    for index, message in enumerate(messages):
        where = f"messages.[{index}]"
        if not isinstance(message, dict):
            raise _wrong_type(where, "an object", message)
        role = message.get("role")
        if role not in _ROLES:
            supported = ", ".join(f"'{r}'" for r in _ROLES)
            raise InvalidRequest(f"Invalid value: {role!r}. Supported values are: {supported}.", f"{where}.role")
        if role == "function":
            raise InvalidRequest("The 'function' role is deprecated; use 'tool'.", f"{where}.role")
        unexpected = set(message) - _MESSAGE_KEYS[role]
        if unexpected:
            raise _unexpected(unexpected, where)
        if pending and role != "tool":
            raise _unanswered(pending, pending_from)
        if role in ("system", "developer", "user"):
            parts = frozenset({"text", "image_url", "input_audio", "file"}) if role == "user" else frozenset({"text"})
            _check_content(message.get("content"), f"{where}.content", parts)
        elif role == "assistant":
            content = message.get("content")
            if "tool_calls" in message:
                pending, pending_from = _check_tool_calls(message["tool_calls"], f"{where}.tool_calls"), index
                if content is not None:
                    _check_content(content, f"{where}.content", frozenset({"text", "refusal"}))
            elif content is None:
                raise InvalidRequest(
                    f"Invalid value for '{where}.content': expected a string, got null.", f"{where}.content"
                )
            else:
                _check_content(content, f"{where}.content", frozenset({"text", "refusal"}))
        else:  # tool
            call_id = _expect_string(message.get("tool_call_id"), f"{where}.tool_call_id")
            if call_id not in pending:
                raise InvalidRequest(
                    "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with "
                    "'tool_calls'.",
                    f"{where}.role",
                )
            pending.remove(call_id)
            _check_content(message.get("content"), f"{where}.content", frozenset({"text"}))
    if pending:
        raise _unanswered(pending, pending_from)


def _check_tools(tools: Any) -> list[str]:
    if not isinstance(tools, list):
        raise _wrong_type("tools", "an array", tools)
    if not tools:
        raise InvalidRequest("[] is too short - 'tools'", "tools")
    names: list[str] = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or set(tool) - {"type", "function"}:
            raise InvalidRequest(f"Invalid '{where}': expected {{type: 'function', function: {{...}}}}.", where)
        function = tool.get("function")
        if not isinstance(function, dict) or set(function) - {"name", "description", "parameters", "strict"}:
            raise InvalidRequest(f"Invalid '{where}.function'.", f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise InvalidRequest(
                f"Invalid '{where}.function.name': string does not match pattern. Expected a string that matches "
                "the pattern '^[a-zA-Z0-9_-]+$' and is at most 64 characters.",
                f"{where}.function.name",
            )
        if "description" in function:
            _expect_string(function["description"], f"{where}.function.description")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or parameters.get("type") != "object":
            raise InvalidRequest(
                f"Invalid schema for function '{name}': schema must be a JSON Schema of 'type: \"object\"'.",
                f"{where}.function.parameters",
            )
        if not isinstance(parameters.get("properties", {}), dict):
            raise InvalidRequest(f"Invalid schema for function '{name}': 'properties' must be an object.", where)
        # Two definitions of one name is an adapter bug (a tool added twice): refuse it (unverified upstream).
        if name in names:
            raise InvalidRequest(f"Duplicate function name {name!r} in 'tools'.", f"{where}.function.name")
        names.append(name)
    return names


def validate_request(body: Any) -> None:
    """Raise :class:`InvalidRequest` (message and param, as the API words them) for a request the real API
    would refuse."""
    if not isinstance(body, dict):
        raise InvalidRequest("We could not parse the JSON body of your request.")
    unknown = sorted(set(body) - _KNOWN_PARAMETERS)
    if unknown:
        raise InvalidRequest(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise InvalidRequest("you must provide a model parameter")
    _check_messages(body.get("messages"))
    names = _check_tools(body["tools"]) if "tools" in body else []
    for key in ("tool_choice", "parallel_tool_calls"):
        if key in body and not names:
            raise InvalidRequest(f"Invalid value for '{key}': '{key}' is only allowed when 'tools' are specified.", key)
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        function = choice.get("function")
        if choice.get("type") != "function" or not isinstance(function, dict) or function.get("name") not in names:
            raise InvalidRequest("Invalid value for 'tool_choice': no function of that name in 'tools'.", "tool_choice")
    elif choice is not None and choice not in ("none", "auto", "required"):
        raise InvalidRequest(
            f"Invalid value: {choice!r}. Supported values are: 'none', 'auto' and 'required'.", "tool_choice"
        )
    if "stream" in body and not isinstance(body["stream"], bool | None):
        raise InvalidRequest("Invalid type for 'stream': expected a boolean.", "stream")
    if "stream_options" in body:
        options = body["stream_options"]
        if not body.get("stream"):
            raise InvalidRequest(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options"
            )
        if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
            raise InvalidRequest("Invalid 'stream_options'.", "stream_options")
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 2
    ):
        raise InvalidRequest(f"Invalid 'temperature': {temperature!r} must be between 0 and 2.", "temperature")
    if body.get("n", 1) not in (1, None):
        raise InvalidRequest("The simulator produces one choice: 'n' must be 1.", "n")
