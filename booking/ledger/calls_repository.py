"""The ledger's record of phone calls: written when Twilio rings us and as its status callbacks arrive."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Row, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from booking import writes
from booking.calls import CallRecord, CallStatus, CallTurn, StatusUpdate
from booking.consent import ConsentKind, ConsentMode
from booking.errors import NotFound
from booking.ledger import pii
from booking.ledger import schema as t
from booking.ledger.consent_repository import call_permission
from booking.ledger.database import Database
from booking.ledger.repository import Clock, utc_now
from booking.outbox import insert_effects_once, report_effect_row

log = structlog.get_logger("voicebook.calls")


def seal_numbers(call_sid: str, from_number: str, to_number: str) -> dict[str, str | None]:
    """A call's numbers as stored: ciphertext bound to the call, and the caller's blind index."""
    vault = pii.cipher()
    return {
        "from_number": vault.encrypt(from_number, table="calls", column="from_number", row=call_sid),
        "to_number": vault.encrypt(to_number, table="calls", column="to_number", row=call_sid),
        "from_index": vault.blind_index(from_number),
    }


def seal_turn_text(call_sid: str, position: int, text: str) -> str:
    sealed = pii.cipher().encrypt(text, table="call_turns", column="text", row=f"{call_sid}:{position}")
    assert sealed is not None
    return sealed


def open_turn_text(call_sid: str, position: int, stored: str) -> str:
    text = pii.cipher().decrypt(stored, table="call_turns", column="text", row=f"{call_sid}:{position}")
    assert text is not None
    return text


def call_from_row(row: Row[Any]) -> CallRecord:
    m = row._mapping
    vault = pii.cipher()
    return CallRecord(
        call_sid=m["call_sid"],
        account_sid=m["account_sid"],
        from_number=vault.decrypt(m["from_number"], table="calls", column="from_number", row=m["call_sid"]) or "",
        to_number=vault.decrypt(m["to_number"], table="calls", column="to_number", row=m["call_sid"]) or "",
        direction=m["direction"],
        status=CallStatus(m["status"]),
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        ended_at=m["ended_at"],
        duration_seconds=m["duration_seconds"],
        refused_reason=m["refused_reason"],
        stream_sid=m["stream_sid"],
        end_reason=m["end_reason"],
        transcript_deleted_at=m["transcript_deleted_at"],
    )


class CallLedger:
    def __init__(
        self,
        database: Database,
        *,
        clock: Clock = utc_now,
        notify_effects: Callable[[], Awaitable[None]] | None = None,
        consent_mode: ConsentMode = ConsentMode.OFF,
        via: writes.BookingWriter | None = None,
    ) -> None:
        self._db = database
        self._clock = clock
        self._notify_effects = notify_effects  # wakes the workers for the report enqueued at hang-up
        self._consent_mode = consent_mode
        """Whether a transcript needs its call's consent to be stored (booking/consent.py)."""
        self._via = via
        """Where this ledger's writes run instead of here: the booking process (``booking.writes`` says
        why). Its reads stay here."""
        self._insert: Callable[..., Any] = postgresql.insert if database.dialect == "postgresql" else sqlite.insert

    async def record_call(
        self,
        *,
        call_sid: str,
        account_sid: str,
        from_number: str,
        to_number: str,
        direction: str,
        status: CallStatus,
        refused_reason: str | None = None,
    ) -> CallRecord:
        """Record a call Twilio offered us. Twilio retries a webhook it got no answer to: the same call
        recorded twice is one row."""
        if self._via is not None:
            return await self._via.write(
                writes.record_call(
                    call_sid=call_sid,
                    account_sid=account_sid,
                    from_number=from_number,
                    to_number=to_number,
                    direction=direction,
                    status=status,
                    refused_reason=refused_reason,
                )
            )
        now = self._clock()
        stmt = (
            self._insert(t.calls)
            .values(
                call_sid=call_sid,
                account_sid=account_sid,
                **seal_numbers(call_sid, from_number, to_number),
                direction=direction,
                status=status.value,
                refused_reason=refused_reason,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=["call_sid"])
        )

        def work(conn: Connection) -> None:
            conn.execute(stmt)

        await self._db.write(work)
        return await self.require_call(call_sid)

    async def apply_status(
        self, update_: StatusUpdate, *, account_sid: str, from_number: str, to_number: str, direction: str
    ) -> tuple[CallRecord, bool]:
        """Apply one status callback. Returns the call and whether the callback was new: a replayed
        callback, or one older than what the call already shows, changes nothing."""
        if self._via is not None:
            return await self._via.write(
                writes.apply_call_status(
                    update_, account_sid=account_sid, from_number=from_number, to_number=to_number, direction=direction
                )
            )
        dedupe_key = str(update_.sequence) if update_.sequence is not None else f"status:{update_.status.value}"
        now = self._clock()
        insert_call = (
            self._insert(t.calls)
            .values(
                call_sid=update_.call_sid,
                account_sid=account_sid,
                **seal_numbers(update_.call_sid, from_number, to_number),
                direction=direction,
                status=update_.status.value,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=["call_sid"])
        )
        insert_event = (
            self._insert(t.call_status_events)
            .values(
                call_sid=update_.call_sid,
                dedupe_key=dedupe_key,
                status=update_.status.value,
                sequence=update_.sequence,
                duration_seconds=update_.duration_seconds,
                at=update_.at,
            )
            .on_conflict_do_nothing(index_elements=["call_sid", "dedupe_key"])
        )

        def work(conn: Connection) -> bool:
            # A callback may come before (or instead of) the voice webhook: the call row is made if missing.
            conn.execute(insert_call)
            if conn.execute(insert_event).rowcount == 0:
                return False
            query = select(t.calls.c.status, t.calls.c.ended_at).where(t.calls.c.call_sid == update_.call_sid)
            if self._db.dialect == "postgresql":
                query = query.with_for_update()
            row = conn.execute(query).one()
            current = CallStatus(row.status)
            values: dict[str, Any] = {"updated_at": now}
            if update_.status.rank > current.rank:
                values["status"] = update_.status.value
                current = update_.status
            if current.is_final and row.ended_at is None and update_.status.is_final:
                values["ended_at"] = update_.at
            if update_.duration_seconds is not None:
                values["duration_seconds"] = update_.duration_seconds
            conn.execute(update(t.calls).where(t.calls.c.call_sid == update_.call_sid).values(**values))
            return True

        applied = await self._db.write(work)
        return await self.require_call(update_.call_sid), applied

    async def get_call(self, call_sid: str) -> CallRecord | None:
        query = select(t.calls).where(t.calls.c.call_sid == call_sid)
        row = await self._db.read(lambda conn: conn.execute(query).first())
        return call_from_row(row) if row is not None else None

    async def require_call(self, call_sid: str) -> CallRecord:
        record = await self.get_call(call_sid)
        if record is None:
            raise NotFound(f"no call {call_sid}", call_sid=call_sid)
        return record

    async def status_events(self, call_sid: str) -> list[tuple[str, int | None, datetime]]:
        query = (
            select(t.call_status_events.c.status, t.call_status_events.c.sequence, t.call_status_events.c.at)
            .where(t.call_status_events.c.call_sid == call_sid)
            .order_by(t.call_status_events.c.at)
        )
        async with self._db.reader.connect() as conn:
            return [(row.status, row.sequence, row.at) for row in await conn.execute(query)]

    async def finish_call(
        self,
        call_sid: str,
        *,
        stream_sid: str,
        end_reason: str,
        turns: Sequence[CallTurn],
        latencies: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """Persist a call's transcript and how it ended, and enqueue its report (with the turns'
        ``latencies``), in one transaction, the moment the stream ends. Running it again (a retry)
        replaces the transcript rather than adding to it, and enqueues no second report.

        Where consent is required, the transcript is stored only as far as the call's consent reaches,
        checked in the same transaction: none of it without consent, and nothing said from a withdrawal
        on. The call and its report are filed either way."""
        if self._via is not None:
            await self._via.write(
                writes.finish_call(
                    call_sid, stream_sid=stream_sid, end_reason=end_reason, turns=turns, latencies=latencies
                )
            )
            return
        now = self._clock()
        mode = self._consent_mode

        def rows(conn: Connection) -> list[dict[str, Any]]:
            allowed = call_permission(conn, mode, ConsentKind.TRANSCRIPTION, call_sid)
            kept = [turn for turn in turns if allowed.keeps(turn.at)]
            if len(kept) < len(turns):
                log.info(
                    "transcript_not_stored",
                    call_sid=call_sid,
                    turns=len(turns),
                    kept=len(kept),
                    reason=allowed.reason,
                )
            return [
                {
                    "call_sid": call_sid,
                    "position": position,
                    "role": turn.role,
                    "text": seal_turn_text(call_sid, position, turn.text),
                    "truncated": turn.truncated,
                    "tool": turn.tool,
                    "at": turn.at,
                }
                for position, turn in enumerate(kept)
            ]

        insert_call = (
            self._insert(t.calls)
            .values(
                call_sid=call_sid,
                account_sid="",
                **seal_numbers(call_sid, "", ""),
                direction="inbound",
                status=CallStatus.IN_PROGRESS.value,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=["call_sid"])
        )

        def work(conn: Connection) -> int:
            conn.execute(insert_call)  # a stream whose webhook we never saw still gets its record
            conn.execute(
                update(t.calls)
                .where(t.calls.c.call_sid == call_sid)
                .values(stream_sid=stream_sid, end_reason=end_reason, updated_at=now)
            )
            conn.execute(delete(t.call_turns).where(t.call_turns.c.call_sid == call_sid))
            stored = rows(conn)
            if stored:
                conn.execute(insert(t.call_turns), stored)
            return insert_effects_once(conn, [report_effect_row(call_sid, now, latencies)])

        if await self._db.write(work) and self._notify_effects is not None:
            await self._notify_effects()

    async def transcript(self, call_sid: str) -> list[CallTurn]:
        query = select(t.call_turns).where(t.call_turns.c.call_sid == call_sid).order_by(t.call_turns.c.position)
        return [
            CallTurn(
                role=row.role,
                text=open_turn_text(call_sid, row.position, row.text),
                truncated=row.truncated,
                tool=row.tool,
                at=row.at,
            )
            for row in await self._db.read(lambda conn: conn.execute(query).all())
        ]
