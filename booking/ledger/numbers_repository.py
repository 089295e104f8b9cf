"""The registry of the business's own phone numbers: what Twilio sold us, what each number serves, where
it stands on carrier compliance, and what the last check of its Twilio configuration found.

Routing by number reads it: :meth:`NumberRegistry.serves` says which resources a called number books
(an empty tuple: the whole business; None: not one of ours). Twilio remains the authority on a number's
configuration; the registry keeps what voicebook asked for and saw, so ``voicebook numbers verify`` can
compare and an operator can see when a number was last checked.

Usage::

    registry = NumberRegistry(database)
    await registry.upsert(NumberFacts("+12125550123", "PN...", "US", NumberType.LOCAL, voice=True, sms=True, mms=True))
    await registry.assign("+12125550123", ["dr-lee"])      # this line books Dr Lee only
    await registry.serves("+12125550123")                 # ("dr-lee",)
    await registry.mark_verified("+12125550123", [])      # checked, nothing wrong
    await registry.remove("+12125550123")                 # released at Twilio

Numbers are the business's, not personal data: they are stored in plain E.164.
"""

from __future__ import annotations

import builtins
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from booking.ledger import schema as t
from booking.ledger.database import Database
from booking.ledger.repository import Clock, utc_now


class NumberType(enum.StrEnum):
    LOCAL = "local"
    MOBILE = "mobile"
    TOLL_FREE = "toll-free"


class A2PStatus(enum.StrEnum):
    """US A2P 10DLC registration: carriers filter texts from a US local number whose brand and campaign
    are not registered."""

    NOT_REQUIRED = "not_required"
    UNREGISTERED = "unregistered"
    PENDING = "pending"
    APPROVED = "approved"
    FAILED = "failed"


class TollFreeVerification(enum.StrEnum):
    """Texts from an unverified North American toll-free number are blocked."""

    NOT_REQUIRED = "not_required"
    UNVERIFIED = "unverified"
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class NumberFacts:
    """What Twilio says about a number the account owns: the part of the registry Twilio is the
    authority on, refreshed by every :meth:`NumberRegistry.upsert`."""

    number: str
    sid: str
    country: str
    type: NumberType
    voice: bool
    sms: bool
    mms: bool
    friendly_name: str | None = None


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One way a number's Twilio configuration differs from what voicebook needs. ``what`` is a stable
    name (``voice_url``, ``sms_capability``, ``not_on_account``...), ``message`` says it for a person."""

    what: str
    message: str
    expected: str | None = None
    actual: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {"what": self.what, "message": self.message, "expected": self.expected, "actual": self.actual}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Mismatch:
        return cls(str(data["what"]), str(data["message"]), data.get("expected"), data.get("actual"))


@dataclass(frozen=True, slots=True)
class RegisteredNumber:
    number: str
    sid: str
    country: str
    type: NumberType
    voice: bool
    sms: bool
    mms: bool
    messaging_service_sid: str | None
    friendly_name: str | None
    resources: tuple[str, ...]
    """The resources it books; empty: the whole business."""
    a2p_status: A2PStatus
    toll_free_verification: TollFreeVerification
    created_at: datetime
    last_verified_at: datetime | None
    last_verification: tuple[Mismatch, ...] | None
    """What the last verification found (empty: nothing wrong); None before the first."""


def default_compliance(facts: NumberFacts) -> tuple[A2PStatus, TollFreeVerification]:
    """Where a newly registered number starts: a texting US local number needs A2P 10DLC registration,
    a texting North American toll-free number needs toll-free verification; anything else needs neither."""
    a2p = A2PStatus.NOT_REQUIRED
    verification = TollFreeVerification.NOT_REQUIRED
    if facts.sms and facts.country == "US" and facts.type is NumberType.LOCAL:
        a2p = A2PStatus.UNREGISTERED
    if facts.sms and facts.number.startswith("+1") and facts.type is NumberType.TOLL_FREE:
        verification = TollFreeVerification.UNVERIFIED
    return a2p, verification


A2P_CLEARED = frozenset({A2PStatus.NOT_REQUIRED, A2PStatus.APPROVED})
TOLL_FREE_CLEARED = frozenset({TollFreeVerification.NOT_REQUIRED, TollFreeVerification.APPROVED})
"""The statuses carriers let a number's texts through with: every registration it needs approved (one it
does not need is ``not_required``). Unregistered, unverified, pending, failed and rejected are not."""


def cleared_to_text(a2p_status: A2PStatus, toll_free_verification: TollFreeVerification) -> bool:
    """Whether carriers let the number's texts through (:data:`A2P_CLEARED`, :data:`TOLL_FREE_CLEARED`)."""
    return a2p_status in A2P_CLEARED and toll_free_verification in TOLL_FREE_CLEARED


def _registered(row: Row[Any]) -> RegisteredNumber:
    m = row._mapping
    found = m["last_verification"]
    return RegisteredNumber(
        number=m["number"],
        sid=m["sid"],
        country=m["country"],
        type=NumberType(m["type"]),
        voice=bool(m["voice"]),
        sms=bool(m["sms"]),
        mms=bool(m["mms"]),
        messaging_service_sid=m["messaging_service_sid"],
        friendly_name=m["friendly_name"],
        resources=tuple(m["resources"] or ()),
        a2p_status=A2PStatus(m["a2p_status"]),
        toll_free_verification=TollFreeVerification(m["toll_free_verification"]),
        created_at=m["created_at"],
        last_verified_at=m["last_verified_at"],
        last_verification=None if found is None else tuple(Mismatch.from_json(item) for item in found),
    )


class NumberRegistry:
    def __init__(self, database: Database, *, clock: Clock = utc_now) -> None:
        self._db = database
        self._clock = clock

    async def upsert(self, facts: NumberFacts) -> RegisteredNumber:
        """Record a number from Twilio's resource. A new number starts serving the whole business with
        :func:`default_compliance`; a known one has only Twilio's facts refreshed (what it serves, its
        Messaging Service, compliance and verification stay)."""
        a2p, verification = default_compliance(facts)
        twilio_facts: dict[str, Any] = {
            "sid": facts.sid,
            "country": facts.country,
            "type": facts.type.value,
            "voice": facts.voice,
            "sms": facts.sms,
            "mms": facts.mms,
            "friendly_name": facts.friendly_name,
        }
        row: dict[str, Any] = {
            "number": facts.number,
            **twilio_facts,
            "resources": [],
            "a2p_status": a2p.value,
            "toll_free_verification": verification.value,
            "created_at": self._clock(),
        }

        def work(conn: Connection) -> RegisteredNumber:
            dialect_insert: Any = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
            conn.execute(
                dialect_insert(t.phone_numbers)
                .values(row)
                .on_conflict_do_update(index_elements=["number"], set_=twilio_facts)
            )
            found = conn.execute(select(t.phone_numbers).where(t.phone_numbers.c.number == facts.number)).one()
            return _registered(found)

        return await self._db.write(work)

    async def get(self, number: str) -> RegisteredNumber | None:
        query = select(t.phone_numbers).where(t.phone_numbers.c.number == number)
        row = await self._db.read(lambda conn: conn.execute(query).first())
        return None if row is None else _registered(row)

    async def list(self) -> builtins.list[RegisteredNumber]:
        """Every registered number, in number order."""
        async with self._db.reader.connect() as conn:
            rows = await conn.execute(select(t.phone_numbers).order_by(t.phone_numbers.c.number))
            return [_registered(row) for row in rows]

    async def serves(self, number: str) -> tuple[str, ...] | None:
        """The resource ids a call to ``number`` books (empty: the whole business), or None when the
        number is not ours."""
        query = select(t.phone_numbers.c.resources).where(t.phone_numbers.c.number == number)
        row = await self._db.read(lambda conn: conn.execute(query).first())
        return None if row is None else tuple(row.resources or ())

    async def assign(self, number: str, resources: Sequence[str]) -> bool:
        """Make ``number`` book only ``resources`` (empty: the whole business). False when unknown."""
        return await self._set(number, resources=sorted(set(resources)))

    async def set_messaging_service(self, number: str, service_sid: str | None) -> bool:
        """Record the Messaging Service whose sender pool holds ``number`` (None: none). False when unknown."""
        return await self._set(number, messaging_service_sid=service_sid)

    async def set_compliance(
        self,
        number: str,
        *,
        a2p_status: A2PStatus | None = None,
        toll_free_verification: TollFreeVerification | None = None,
    ) -> bool:
        """Record a change of A2P registration or toll-free verification (None: unchanged). False when
        the number is unknown."""
        values: dict[str, Any] = {}
        if a2p_status is not None:
            values["a2p_status"] = a2p_status.value
        if toll_free_verification is not None:
            values["toll_free_verification"] = toll_free_verification.value
        return await self._set(number, **values) if values else await self.get(number) is not None

    async def mark_verified(self, number: str, mismatches: Sequence[Mismatch], at: datetime | None = None) -> bool:
        """Keep what a verification of ``number`` found (empty: nothing wrong) and when. False when unknown."""
        return await self._set(
            number,
            last_verified_at=at or self._clock(),
            last_verification=[mismatch.to_json() for mismatch in mismatches],
        )

    async def remove(self, number: str) -> bool:
        """Forget ``number`` (released at Twilio, or never ours). False when it was not registered."""

        def work(conn: Connection) -> bool:
            result = conn.execute(delete(t.phone_numbers).where(t.phone_numbers.c.number == number))
            return bool(result.rowcount)

        return await self._db.write(work)

    async def upcoming_bookings(self, number: str) -> int:
        """How many confirmed bookings not yet over were made on ``number``: their texts go from it while
        it is registered and cleared to text."""
        query = (
            select(func.count())
            .select_from(t.bookings)
            .where(
                t.bookings.c.line_number == number,
                t.bookings.c.status == "confirmed",
                t.bookings.c.end_at > self._clock(),
            )
        )
        async with self._db.reader.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def _set(self, number: str, **values: Any) -> bool:
        def work(conn: Connection) -> bool:
            result = conn.execute(update(t.phone_numbers).where(t.phone_numbers.c.number == number).values(**values))
            return bool(result.rowcount)

        return await self._db.write(work)
