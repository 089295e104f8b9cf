"""Consent as the ledger keeps it: what a person agreed to, refused or withdrew, when, how, and to which
wording.

Three things need consent: keeping a call's **recording** (every Twilio message of it), keeping its
**transcription** (its turns and everything derived from them), and sending **sms**. Each decision is
one row, never updated: the history is the proof (GDPR art. 7(1): the controller must be able to show
consent was given; art. 7(3): withdrawing must be as easy as giving, and honoured from then on).

How a call gathers consent is the deployment's choice (:class:`ConsentMode`, ``VOICEBOOK_CONSENT_MODE``):

- ``off``: nothing is asked or recorded, and storage needs no consent (where no law requires a notice);
- ``notice``: the notice is spoken before the call connects; a caller who stays on the line is taken to
  agree (one-party-consent jurisdictions, "this call may be recorded"). That grant is *implied*;
- ``explicit``: after the notice the caller presses 1 or says yes to agree, 2 or no to refuse; silence is
  a refusal. Recording and transcript storage refuse to proceed without a grant for that call.

A person's standing decision, which later calls honour, is their newest decision that they *made*: an
explicit grant, a refusal, a withdrawal. An implied grant from a notice never overrides a withdrawal, so
someone who said "stop recording me" once is not recorded again because they heard the notice on their
next call; they may agree again explicitly.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime


class ConsentMode(enum.StrEnum):
    OFF = "off"
    NOTICE = "notice"
    EXPLICIT = "explicit"

    @property
    def required(self) -> bool:
        """Whether storing a recording or transcript needs the call's consent."""
        return self is not ConsentMode.OFF


class ConsentKind(enum.StrEnum):
    RECORDING = "recording"
    TRANSCRIPTION = "transcription"
    SMS = "sms"


CALL_KINDS = (ConsentKind.RECORDING, ConsentKind.TRANSCRIPTION)
"""What one answer to the call's notice covers."""


class Decision(enum.StrEnum):
    GRANTED = "granted"
    DECLINED = "declined"  # asked and said no (or did not answer)
    REVOKED = "revoked"  # had agreed, and withdrew

    @property
    def permits(self) -> bool:
        return self is Decision.GRANTED


class Channel(enum.StrEnum):
    VOICE_NOTICE = "voice-notice"  # heard the notice and stayed on the line (implied)
    VOICE_KEYPAD = "voice-keypad"  # pressed a key
    VOICE_SPEECH = "voice-speech"  # said so
    VOICE_SILENCE = "voice-silence"  # asked, gave no answer: taken as a refusal
    SMS_KEYWORD = "sms-keyword"  # texted STOP or START
    BOOKING = "booking"  # answered the texts question when booking (by phone or through the API)
    OPERATOR = "operator"  # an operator recorded what the person asked for (``voicebook consent``)
    CARRIER = "carrier"  # the carrier or Twilio holds the person's opt-out (error 21610)

    @property
    def implied(self) -> bool:
        """A decision the person did not make in so many words: it never overrides one they did."""
        return self is Channel.VOICE_NOTICE


SMS_QUESTION = "Can we text you a confirmation and a reminder for this appointment?"
"""How the agent asks about texts on the phone (the booking tool tells the model to ask it so): the
wording version of a texts answer given on a call."""
UNRECORDED_WORDING = "unrecorded"
"""The wording version of an answer whose words the client did not send (the booking API without
``sms_consent_wording``)."""


def wording_version(text: str) -> str:
    """A wording's version when configuration gives none: its text's hash, so any edit is a new version."""
    return "sha256:" + hashlib.sha256(" ".join(text.split()).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class ConsentRecord:
    kind: ConsentKind
    decision: Decision
    channel: Channel
    wording_version: str
    at: datetime
    call_sid: str | None = None
    booking_id: str | None = None
    id: int | None = None


def in_order(records: Iterable[ConsentRecord]) -> list[ConsentRecord]:
    """Oldest first: by the ledger's id when every record has one (the order they were written, whatever
    clocks stamped them), else by time."""
    listed = list(records)
    if all(r.id is not None for r in listed):
        return sorted(listed, key=lambda r: r.id or 0)
    return sorted(listed, key=lambda r: r.at)


def standing(records: Iterable[ConsentRecord], kind: ConsentKind) -> ConsentRecord | None:
    """A person's newest decision of ``kind`` that they made themselves (implied grants skipped)."""
    made = [r for r in in_order(records) if r.kind is kind and not r.channel.implied]
    return made[-1] if made else None


_WITHDRAWAL = re.compile(
    r"\b(?:stop|quit|don'?t|do not|no)\s+(?:the\s+)?(?:record|recording|transcrib\w*|transcript\w*)"
    r"|\b(?:withdraw|revoke|take back)\s+(?:my\s+)?consent"
    r"|\bdon'?t\s+(?:want|wish)\s+(?:to\s+be|this\s+call|it)\s+(?:to\s+be\s+)?(?:recorded|transcribed)"
    r"|\bdo not\s+(?:want|wish)\s+(?:to\s+be|this\s+call|it)\s+(?:to\s+be\s+)?(?:recorded|transcribed)",
    re.IGNORECASE,
)


def withdraws_consent(said: str) -> bool:
    """Whether a caller's words withdraw their consent to recording ("stop recording", "don't record
    this", "I withdraw my consent", "I don't want to be recorded"). Pure."""
    return _WITHDRAWAL.search(" ".join(said.replace("\u2019", "'").split())) is not None


@dataclass(frozen=True, slots=True)
class StoragePermission:
    """Whether a call's recording or transcription may be kept, and up to when (a withdrawal during the
    call keeps what came before it)."""

    allowed: bool
    until: datetime | None = None
    reason: str = ""

    def keeps(self, at: datetime) -> bool:
        return self.allowed and (self.until is None or at < self.until)


def permission(
    mode: ConsentMode,
    kind: ConsentKind,
    call_sid: str,
    call_records: Iterable[ConsentRecord],
    person_records: Iterable[ConsentRecord],
) -> StoragePermission:
    """What ``mode`` allows for ``kind`` on call ``call_sid``, given the call's own decisions and the
    caller's whole history (``person_records``; empty for a withheld number)."""
    if not mode.required:
        return StoragePermission(True, reason="consent not required")
    own = in_order(r for r in call_records if r.kind is kind and r.call_sid == call_sid)
    grant = next((r for r in own if r.decision.permits), None)
    if grant is None:
        refusal = own[-1].decision.value if own else "not asked"
        return StoragePermission(False, reason=f"no consent for this call ({refusal})")
    withdrawn = next((r for r in own[own.index(grant) :] if r.decision is Decision.REVOKED), None)
    if grant.channel.implied:
        # The notice alone: a withdrawal the caller made before (on any call) still stands.
        history = in_order(person_records)
        before = history[: history.index(grant)] if grant in history else [r for r in history if r.at <= grant.at]
        earlier = standing(before, kind)
        if earlier is not None and not earlier.decision.permits:
            return StoragePermission(False, reason=f"the caller {earlier.decision.value} it on {earlier.at:%Y-%m-%d}")
    if withdrawn is not None:
        return StoragePermission(True, until=withdrawn.at, reason="withdrawn during the call")
    return StoragePermission(True, reason=f"{grant.channel.value} ({grant.wording_version})")
