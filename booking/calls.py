"""Phone calls as the ledger records them: Twilio's call statuses and their legal order.

Twilio reports a call's progress in status callbacks that may arrive late, twice, or out of order. A call
only moves forward: a ``ringing`` callback arriving after ``completed`` changes nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime


class CallStatus(enum.StrEnum):
    QUEUED = "queued"
    RINGING = "ringing"
    IN_PROGRESS = "in-progress"
    COMPLETED = "completed"
    BUSY = "busy"
    FAILED = "failed"
    NO_ANSWER = "no-answer"
    CANCELED = "canceled"

    @property
    def is_final(self) -> bool:
        return self in _FINAL

    @property
    def rank(self) -> int:
        """Progress order: a status may replace one of lower rank only."""
        return _RANK[self]


_FINAL = frozenset(
    {CallStatus.COMPLETED, CallStatus.BUSY, CallStatus.FAILED, CallStatus.NO_ANSWER, CallStatus.CANCELED}
)
_RANK = {CallStatus.QUEUED: 0, CallStatus.RINGING: 1, CallStatus.IN_PROGRESS: 2} | dict.fromkeys(_FINAL, 3)


@dataclass(frozen=True, slots=True)
class CallRecord:
    call_sid: str
    account_sid: str
    from_number: str
    to_number: str
    direction: str
    status: CallStatus
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None = None
    duration_seconds: int | None = None
    refused_reason: str | None = None
    stream_sid: str | None = None
    end_reason: str | None = None
    transcript_deleted_at: datetime | None = None
    """When retention removed the call's transcript and recording."""


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """One status callback, as Twilio sent it (``sequence`` is its SequenceNumber when present)."""

    call_sid: str
    status: CallStatus
    sequence: int | None
    duration_seconds: int | None
    at: datetime


@dataclass(frozen=True, slots=True)
class CallTurn:
    """One turn of a call's transcript as stored: role is caller, agent, tool or dtmf."""

    role: str
    text: str
    at: datetime
    truncated: bool = False
    tool: str | None = None
