"""Fixed calls for the report tests: a call record, transcript lines five seconds apart, tool turns as
the agent files them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from booking.calls import CallRecord, CallStatus, CallTurn

START = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)
CALLER = "+16465550199"
CLINIC = "+12125550100"
GREETING = ("agent", "Thanks for calling Riverside Family Clinic, how can I help?")


def record(**changes: Any) -> CallRecord:
    fields: dict[str, Any] = {
        "call_sid": "CA" + "1" * 32,
        "account_sid": "AC" + "0" * 32,
        "from_number": CALLER,
        "to_number": CLINIC,
        "direction": "inbound",
        "status": CallStatus.COMPLETED,
        "created_at": START,
        "updated_at": START + timedelta(minutes=3),
        "ended_at": START + timedelta(minutes=3),
        "duration_seconds": 180,
        "stream_sid": "MZ" + "2" * 32,
        "end_reason": "stop",
    }
    fields.update(changes)
    return CallRecord(**fields)


def turns(*lines: tuple[str, str] | tuple[str, str, str]) -> list[CallTurn]:
    """(role, text) or ("tool", name, text) lines, five seconds apart."""
    made = []
    for index, line in enumerate(lines):
        at = START + timedelta(seconds=5 * index)
        if len(line) == 3:
            made.append(CallTurn(role=line[0], tool=line[1], text=line[2], at=at))
        else:
            made.append(CallTurn(role=line[0], text=line[1], at=at))
    return made


def tool(name: str, arguments: dict[str, Any], result: dict[str, Any]) -> tuple[str, str, str]:
    return ("tool", name, orjson.dumps({"id": f"call_{name}", "arguments": arguments, "result": result}).decode())
