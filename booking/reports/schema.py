"""The end-of-call report, versioned (``schema_version``), as stored and served.

Every field an analyser or a rule set produces is an :class:`Automated` value: the value, a confidence
in 0..1 and its provenance (component and version). Facts read from the ledger (ids, numbers, times,
the raw transcript, bookings touched, measured latencies) are plain fields. A report survives a JSON
round trip exactly: ``CallReport.from_json(report.to_json()) == report``.
"""

from __future__ import annotations

import enum
from typing import Generic, Literal, TypeVar

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from booking.domain import Booking
from booking.reports.vocabulary import BookingAction, Intent, LifecycleStage, Outcome, SentimentLabel, Tag

SCHEMA_VERSION: Literal[1] = 1

T = TypeVar("T")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Provenance(_Model):
    component: str
    version: str


class Automated(_Model, Generic[T]):
    """A value produced by an analyser or a rule set, with how sure it is and what produced it."""

    value: T
    confidence: float = Field(ge=0.0, le=1.0)
    provenance: Provenance


class ParticipantRole(enum.StrEnum):
    CALLER = "caller"
    AGENT = "agent"  # the voice agent answering for the business
    STAFF = "staff"  # a person at the business the call was transferred to


class Participant(_Model):
    role: ParticipantRole
    number: str | None = None
    name: str | None = None


class TranscriptTurn(_Model):
    """One turn; ``index`` is its position in the raw transcript, so a cleaned turn points back to it."""

    index: int = Field(ge=0)
    role: str
    text: str
    at: AwareDatetime
    truncated: bool = False
    tool: str | None = None


class BookingTouched(_Model):
    booking_id: str
    action: BookingAction
    service_id: str
    resource_id: str
    start: AwareDatetime
    end: AwareDatetime
    status: str

    @classmethod
    def from_booking(cls, booking: Booking, action: BookingAction) -> BookingTouched:
        """The booking as the call left it."""
        return cls(
            booking_id=booking.id,
            action=action,
            service_id=booking.service_id,
            resource_id=booking.resource_id,
            start=booking.start,
            end=booking.end,
            status=booking.status.value,
        )


class SentimentScore(_Model):
    label: SentimentLabel
    compound: float = Field(ge=-1.0, le=1.0)
    """Polarity from -1 (most negative) to +1 (most positive)."""


class TurnSentiment(_Model):
    turn: int = Field(ge=0, description="index of the turn in the raw transcript")
    label: SentimentLabel
    compound: float = Field(ge=-1.0, le=1.0)


class ScoreReason(_Model):
    rule: str
    """The condition that matched (``outcome:booked``)."""
    label: str
    points: int


class LeadScore(_Model):
    points: int = Field(ge=0, le=100)
    reasons: tuple[ScoreReason, ...]
    high_value: bool


class Lifecycle(_Model):
    stage: LifecycleStage
    reason: str


class TurnLatency(_Model):
    """One caller turn's measured latency parts in seconds (``voice_to_voice_server``, ``tool``, ...)."""

    trigger: str
    parts: dict[str, float]


class CallReport(_Model):
    schema_version: Literal[1] = SCHEMA_VERSION
    builder: Provenance
    call_sid: str
    stream_sid: str | None
    direction: str
    caller_number: str
    business_number: str
    participants: tuple[Participant, ...]
    started_at: AwareDatetime
    ended_at: AwareDatetime | None
    duration_seconds: float | None
    end_reason: str | None
    outcome: Automated[Outcome]
    bookings_touched: tuple[BookingTouched, ...]
    transcript: tuple[TranscriptTurn, ...]
    cleaned_transcript: Automated[tuple[TranscriptTurn, ...]]
    summary: Automated[str]
    sentiment: Automated[SentimentScore]
    turn_sentiments: tuple[Automated[TurnSentiment], ...]
    key_phrases: Automated[tuple[str, ...]]
    intents: tuple[Automated[Intent], ...]
    tags: tuple[Automated[Tag], ...]
    lead_score: Automated[LeadScore]
    lifecycle: Automated[Lifecycle]
    turn_latencies: tuple[TurnLatency, ...] | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def from_json(cls, data: bytes | str) -> CallReport:
        return cls.model_validate(orjson.loads(data))

    def automated_fields(self) -> dict[str, Automated[object]]:
        """Every automated value by a dotted name (``intents[0]``), for audits and provenance checks."""
        found: dict[str, Automated[object]] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, Automated):
                found[name] = value
            elif isinstance(value, tuple):
                for index, item in enumerate(value):
                    if isinstance(item, Automated):
                        found[f"{name}[{index}]"] = item
        return found
