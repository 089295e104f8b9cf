"""What a call's turns record as facts: what the caller said, which tools ran with what result, whether
a transfer happened. Read once per report and shared by the outcome, analysis and tag rules.

Tool turns are stored as JSON ``{"id", "arguments", "result"}`` (see ``CallSession._run_tool``); the
transfer turn is plain text (``transferred to a person: ...`` or ``transfer failed: ...``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from booking.calls import CallTurn
from booking.reports.vocabulary import BookingAction

_CHANGING_STATUSES: Mapping[str, BookingAction] = {
    "booked": BookingAction.BOOKED,
    "rescheduled": BookingAction.RESCHEDULED,
    "cancelled": BookingAction.CANCELLED,
}


@dataclass(frozen=True, slots=True)
class ToolUse:
    index: int
    name: str
    arguments: Mapping[str, Any]
    result: Mapping[str, Any]

    @property
    def status(self) -> str | None:
        status = self.result.get("status")
        return status if isinstance(status, str) else None


@dataclass(frozen=True, slots=True)
class BookingChange:
    """A booking tool that changed a booking, as its result told the agent."""

    action: BookingAction
    booking_id: str | None
    service_name: str | None
    spoken_time: str | None
    resource_name: str | None


@dataclass(frozen=True, slots=True)
class CallFacts:
    caller_lines: tuple[tuple[int, str], ...]
    """(turn index, text) of every caller turn with words in it."""
    keys_pressed: str
    tool_uses: tuple[ToolUse, ...]
    changes: tuple[BookingChange, ...]
    transfer: Literal["done", "failed"] | None
    transfer_reason: str | None
    customer_name: str | None
    unavailable_answers: int
    """Times a tool answered that the wanted time was taken (and nothing was booked in its place)."""

    @property
    def caller_spoke(self) -> bool:
        return bool(self.caller_lines or self.keys_pressed)

    @property
    def caller_text(self) -> str:
        return " ".join(text for _, text in self.caller_lines)

    @property
    def caller_words(self) -> int:
        return sum(len(text.split()) for _, text in self.caller_lines)

    def used(self, tool: str) -> bool:
        return any(use.name == tool for use in self.tool_uses)


def read_facts(turns: Sequence[CallTurn]) -> CallFacts:
    caller_lines: list[tuple[int, str]] = []
    keys: list[str] = []
    uses: list[ToolUse] = []
    transfer: Literal["done", "failed"] | None = None
    transfer_reason: str | None = None
    for index, turn in enumerate(turns):
        if turn.role == "caller" and turn.text.strip():
            caller_lines.append((index, turn.text.strip()))
        elif turn.role == "dtmf":
            keys.append(turn.text)
        elif turn.role == "tool" and turn.tool == "transfer":
            if turn.text.startswith("transferred"):
                transfer = "done"  # a success after a failed attempt is what happened in the end
                transfer_reason = turn.text.partition(":")[2].strip() or None
            elif transfer is None:
                transfer = "failed"
        elif turn.role == "tool" and turn.tool is not None:
            use = _tool_use(index, turn.tool, turn.text)
            if use is not None:
                uses.append(use)
    changes = tuple(change for use in uses if (change := _change(use)) is not None)
    return CallFacts(
        caller_lines=tuple(caller_lines),
        keys_pressed="".join(keys),
        tool_uses=tuple(uses),
        changes=changes,
        transfer=transfer,
        transfer_reason=transfer_reason,
        customer_name=_customer_name(uses),
        unavailable_answers=sum(1 for use in uses if use.status == "unavailable"),
    )


def _tool_use(index: int, name: str, text: str) -> ToolUse | None:
    try:
        payload = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None  # not a tool result this version wrote: ignored rather than guessed at
    if not isinstance(payload, dict):
        return None
    arguments, result = payload.get("arguments"), payload.get("result")
    return ToolUse(
        index=index,
        name=name,
        arguments=arguments if isinstance(arguments, dict) else {},
        result=result if isinstance(result, dict) else {},
    )


def _change(use: ToolUse) -> BookingChange | None:
    action = _CHANGING_STATUSES.get(use.status or "")
    if action is None or "error" in use.result:
        return None
    if action is BookingAction.CANCELLED and use.name != "cancel_appointment":
        return None  # find_my_appointments lists cancelled bookings too: listing one changes nothing

    def text(key: str) -> str | None:
        value = use.result.get(key)
        return value if isinstance(value, str) and value else None

    return BookingChange(
        action=action,
        booking_id=text("booking_id"),
        service_name=text("service_name"),
        spoken_time=text("spoken"),
        resource_name=text("resource_name"),
    )


def _customer_name(uses: Sequence[ToolUse]) -> str | None:
    for use in reversed(uses):
        name = use.arguments.get("customer_name")
        if use.name == "book_appointment" and isinstance(name, str) and name.strip():
            return name.strip()
    return None
