"""From a finished call in the ledger to a stored report version, and what the report sets off.

The ``report.build`` effect, enqueued with the call's transcript at hang-up, runs :meth:`ReportPipeline.build`:

1. read the call, its transcript and what it did to bookings (booking events whose actor is the call);
2. build the report (the configured analyser, the offline one when that fails);
3. archive the transcript (and the call's recording when there is one) to object storage;
4. store the report as the call's next version and, in the same transaction, enqueue its follow-on
   effects (the CRM sync of the call, the triggers its rules fire), so none is lost or doubled.

Running it again for the same hang-up (a worker died after step 4, a dead letter replayed) stores no
second version: the hang-up's version is found and its follow-ons, keyed on it, are already queued.
:meth:`ReportPipeline.regenerate` is the operator's way to a new version.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import orjson
import structlog
from sqlalchemy import select
from sqlalchemy.engine import Connection

from booking.business import Business
from booking.calls import CallRecord
from booking.domain import Booking, ensure_utc
from booking.errors import NotFound
from booking.ledger import pii
from booking.ledger import schema as t
from booking.ledger.calls_repository import CallLedger
from booking.ledger.database import Database
from booking.ledger.reports_repository import AuditAction, ReportLedger, StoredReport
from booking.ledger.repository import Clock, Ledger, utc_now
from booking.outbox import insert_effects_once
from booking.reports.builder import build_report
from booking.reports.ports import Analyser
from booking.reports.provenance import operator
from booking.reports.schema import Automated, BookingTouched, CallReport, Lifecycle, TurnLatency
from booking.reports.vocabulary import BookingAction

log = structlog.get_logger("voicebook.reports")

HANG_UP = "hang-up"
"""The reason of the version built when the call ended (one per call)."""

FollowUps = Callable[[CallReport, int, datetime], Sequence[dict[str, Any]]]
"""Given a report, its version and now: the effect rows it sets off (keys derived from the version)."""


class Archive(Protocol):
    """Where transcripts and recordings are kept (integrations.storage satisfies it)."""

    async def put(self, key: str, data: bytes, *, content_type: str) -> object: ...


SEALED_CONTENT_TYPE = "application/vnd.voicebook.sealed"
"""Archived transcripts and recordings are sealed like the ledger's personal data (booking/ledger/pii.py),
bound to their object key: a copy of the bucket alone yields no speech and no words."""


def seal_archived(key: str, data: bytes) -> bytes:
    sealed = pii.cipher().encrypt(base64.b64encode(data).decode(), table="archive", column="object", row=key)
    assert sealed is not None
    return sealed.encode()


def open_archived(key: str, data: bytes) -> bytes:
    opened = pii.cipher().decrypt(data.decode(), table="archive", column="object", row=key)
    assert opened is not None
    return base64.b64decode(opened)


# -- the local recording spool -------------------------------------------------------------------------

SPOOL_FORMAT = "voicebook.recording.sealed"
"""The first line of a sealed spool file names the format, the call and how many lines follow."""


class SpoolError(ValueError):
    """A spool file that cannot be opened: malformed, edited, moved between calls, or sealed with a key
    this process does not hold. The message names the line."""


def seal_spool(call_sid: str, lines: Sequence[bytes]) -> bytes:
    """A call's recording lines (each a JSON object) as a sealed spool file: a plain header line, then
    each line sealed on its own (``booking/ledger/pii.py``) to the call, its position and the count.

    A value per line rather than one for the file: the file stays lines (readers and tools stream it
    line by line, and a line that fails names its number), and binding each to ``call_sid:n/count``
    still makes a line moved from another call, a reordered line and a cut-short file fail to open."""
    cipher = pii.cipher()
    count = len(lines)
    header = orjson.dumps({"format": SPOOL_FORMAT, "version": 1, "call_sid": call_sid, "lines": count})
    sealed = [header]
    for number, line in enumerate(lines, start=1):
        value = cipher.encrypt(line.decode(), table="recordings", column="line", row=f"{call_sid}:{number}/{count}")
        assert value is not None
        sealed.append(value.encode())
    return b"\n".join(sealed) + b"\n"


def open_spool(data: bytes, *, call_sid: str | None = None) -> tuple[str | None, list[bytes]]:
    """The call sid (None for a file written before spools were sealed) and the plain lines of a spool
    file, sealed or not. With ``call_sid``, a sealed file of another call is refused."""
    lines = [line for line in data.splitlines() if line.strip()]
    header = _spool_header(lines[0]) if lines else None
    if header is None:
        return None, lines  # a recording from before spools were sealed: plain JSON lines
    sealed_sid, count = header
    if call_sid is not None and sealed_sid != call_sid:
        raise SpoolError(f"the spool belongs to call {sealed_sid}, not {call_sid}")
    if len(lines) - 1 != count:
        raise SpoolError(f"the spool of {sealed_sid} should hold {count} lines and holds {len(lines) - 1}")
    try:
        cipher = pii.cipher()
    except pii.PiiKeyError as error:
        raise SpoolError(f"the spool of {sealed_sid} is sealed: {error}") from None
    opened: list[bytes] = []
    for number, line in enumerate(lines[1:], start=1):
        try:
            plain = cipher.decrypt(
                line.decode("ascii"), table="recordings", column="line", row=f"{sealed_sid}:{number}/{count}"
            )
        except (UnicodeDecodeError, pii.PiiDecryptError, pii.PiiKeyError) as error:
            raise SpoolError(f"line {number + 1} of the spool of {sealed_sid} does not open: {error}") from None
        assert plain is not None
        opened.append(plain.encode())
    return sealed_sid, opened


def reseal_spool(path: Path) -> bool:
    """Re-seal the spool file at ``path`` under the active key when any line is under another (or the
    file is a plain one from before spools were sealed, named ``<CallSid>.jsonl``); the new file replaces
    the old in one rename, so a reader sees one or the other. Returns whether it was rewritten. Part of
    ``voicebook keys rotate``: once every spool is re-sealed, the old key can go."""
    data = path.read_bytes()
    lines = [line for line in data.splitlines() if line.strip()]
    cipher = pii.cipher()
    if lines and _spool_header(lines[0]) is not None:
        if not any(cipher.needs_rotation(line.decode("ascii", "replace")) for line in lines[1:]):
            return False
        call_sid, opened = open_spool(data)
        assert call_sid is not None
    else:
        call_sid, opened = path.stem, lines
    fresh = path.with_name(path.name + ".resealing")
    fresh.write_bytes(seal_spool(call_sid, opened))
    os.replace(fresh, path)
    return True


def _spool_header(line: bytes) -> tuple[str, int] | None:
    try:
        header = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise SpoolError("the spool's first line is not JSON") from None
    if not isinstance(header, dict) or header.get("format") != SPOOL_FORMAT:
        return None
    call_sid, count = header.get("call_sid"), header.get("lines")
    if header.get("version") != 1 or not isinstance(call_sid, str) or not isinstance(count, int):
        raise SpoolError(f"unknown spool header {line[:120]!r}")
    return call_sid, count


def transcript_key(call: CallRecord) -> str:
    day = ensure_utc(call.created_at).strftime("%Y/%m/%d")
    return f"transcripts/{day}/{call.call_sid}.json"


def recording_key(call: CallRecord) -> str:
    day = ensure_utc(call.created_at).strftime("%Y/%m/%d")
    return f"recordings/{day}/{call.call_sid}.jsonl"


_ACTIONS: Mapping[str, BookingAction] = {
    "created": BookingAction.BOOKED,
    "rescheduled": BookingAction.RESCHEDULED,
    "cancelled": BookingAction.CANCELLED,
}


@dataclass(frozen=True, slots=True)
class BuiltReport:
    stored: StoredReport
    report: CallReport
    new: bool
    """False when the hang-up's version already existed (a repeated run)."""


class ReportPipeline:
    def __init__(
        self,
        database: Database,
        business: Business,
        *,
        analyser: Analyser | None = None,
        archive: Archive | None = None,
        recordings_dir: Path | None = None,
        follow_ups: FollowUps | None = None,
        after_edit: FollowUps | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self._db = database
        self._business = business
        self._analyser = analyser
        self._archive = archive
        self._recordings_dir = recordings_dir
        self._follow_ups = follow_ups
        self._after_edit = after_edit
        self._clock = clock
        self._calls = CallLedger(database, clock=clock)
        self._ledger = Ledger(database, clock=clock)
        self.reports = ReportLedger(database, clock=clock)

    async def build(self, call_sid: str, *, latencies: Sequence[Mapping[str, Any]] = ()) -> BuiltReport:
        """The hang-up version of the call's report: built and stored once, found thereafter."""
        for stored in await self.reports.versions(call_sid):
            if stored.reason == HANG_UP:
                return BuiltReport(stored, CallReport.model_validate(stored.body), new=False)
        return await self._make(call_sid, latencies, reason=HANG_UP, actor="worker")

    async def regenerate(self, call_sid: str, *, actor: str, reason: str = "regenerated") -> BuiltReport:
        """A new version from what the ledger holds now (latencies carried over from the last version)."""
        versions = await self.reports.versions(call_sid)
        latencies: list[dict[str, Any]] = []
        if versions:
            latencies = list(versions[-1].body.get("turn_latencies") or [])
        return await self._make(call_sid, latencies, reason=reason, actor=actor)

    async def edit(
        self,
        call_sid: str,
        *,
        actor: str,
        summary: str | None = None,
        lifecycle: Lifecycle | None = None,
        reason: str = "edited",
    ) -> BuiltReport:
        """A new version with a person's corrections: each corrected field says who set it (provenance
        ``operator:<actor>``, confidence 1). Only :data:`after_edit` follow-ons run (the CRM learns the
        correction; triggers do not fire again)."""
        versions = await self.reports.versions(call_sid)
        if not versions:
            raise NotFound(f"call {call_sid} has no report to edit", call_sid=call_sid)
        report = CallReport.model_validate(versions[-1].body)
        changes: dict[str, Any] = {}
        if summary is not None:
            changes["summary"] = Automated[str](value=summary, confidence=1.0, provenance=operator(actor))
        if lifecycle is not None:
            changes["lifecycle"] = Automated[Lifecycle](value=lifecycle, confidence=1.0, provenance=operator(actor))
        edited = report.model_copy(update=changes)
        return await self._store(edited, reason=reason, actor=actor, action=AuditAction.EDITED, hook=self._after_edit)

    async def _make(
        self, call_sid: str, latencies: Sequence[Mapping[str, Any]], *, reason: str, actor: str
    ) -> BuiltReport:
        call = await self._calls.require_call(call_sid)
        turns = await self._calls.transcript(call_sid)
        touched, known = await self._call_context(call)
        report = await build_report(
            call,
            turns,
            business=self._business,
            bookings_touched=touched,
            known_customer=known,
            latencies=[TurnLatency.model_validate(item) for item in latencies],
            analyser=self._analyser,
        )
        await self._archive_call(call, report)
        return await self._store(
            report, reason=reason, actor=actor, action=AuditAction.GENERATED, hook=self._follow_ups
        )

    async def _store(
        self, report: CallReport, *, reason: str, actor: str, action: AuditAction, hook: FollowUps | None
    ) -> BuiltReport:
        call_sid = report.call_sid
        body = report.model_dump(mode="json")
        produced_by = f"{report.builder.component}/{report.builder.version}"
        now = self._clock()

        def enqueue(conn: Connection, version: int) -> None:
            if hook is not None:
                insert_effects_once(conn, list(hook(report, version, now)))

        version = await self.reports.add_version(
            call_sid,
            body,
            schema_version=report.schema_version,
            produced_by=produced_by,
            reason=reason,
            actor=actor,
            action=action,
            also=enqueue,
            created_at=now,
        )
        stored = StoredReport(
            call_sid=call_sid,
            version=version,
            schema_version=report.schema_version,
            body=body,
            produced_by=produced_by,
            reason=reason,
            created_at=now,
        )
        log.info(
            "call_report_stored",
            call_sid=call_sid,
            version=version,
            outcome=report.outcome.value.value,
            lead_score=report.lead_score.value.points,
        )
        return BuiltReport(stored, report, new=True)

    async def _call_context(self, call: CallRecord) -> tuple[list[BookingTouched], bool]:
        """What the call did to bookings (in order; a booking touched twice appears once, as the call
        left it, with its last action), and whether the caller was a customer before the call."""
        events = t.booking_events.c
        query = (
            select(events.booking_id, events.kind).where(events.actor == f"call:{call.call_sid}").order_by(events.id)
        )
        caller = call.to_number if call.direction.startswith("outbound") else call.from_number
        customers = t.customers.c
        known_query = select(customers.id).where(
            customers.phone_index == pii.cipher().blind_index(caller), customers.created_at < call.created_at
        )

        def read(conn: Connection) -> tuple[Sequence[Any], bool]:
            return conn.execute(query).all(), bool(caller) and conn.execute(known_query.limit(1)).first() is not None

        rows, known = await self._db.read(read)
        actions: dict[str, BookingAction] = {}
        for booking_id, kind in rows:
            action = _ACTIONS.get(kind)
            if action is None:
                continue
            if actions.get(booking_id) is BookingAction.BOOKED and action is not BookingAction.CANCELLED:
                continue  # booked and then moved in the same call: still a booking the call made
            actions[booking_id] = action
        bookings: dict[str, Booking] = {b.id: b for b in await self._ledger.get_bookings(list(actions))}
        touched = [
            BookingTouched.from_booking(bookings[booking_id], action)
            for booking_id, action in actions.items()
            if booking_id in bookings
        ]
        return touched, known

    async def _archive_call(self, call: CallRecord, report: CallReport) -> None:
        """The transcript (raw and cleaned, with the report's ids) and the recording into the archive;
        overwriting on a repeat is harmless."""
        if self._archive is None:
            return
        document = {
            "call_sid": call.call_sid,
            "schema_version": report.schema_version,
            "started_at": report.started_at.isoformat(),
            "transcript": [turn.model_dump(mode="json") for turn in report.transcript],
            "cleaned_transcript": [turn.model_dump(mode="json") for turn in report.cleaned_transcript.value],
        }
        key = transcript_key(call)
        await self._archive.put(key, seal_archived(key, orjson.dumps(document)), content_type=SEALED_CONTENT_TYPE)
        if self._recordings_dir is not None:
            path = self._recordings_dir / f"{call.call_sid}.jsonl"
            if path.is_file():
                # Archived as the plain lines, sealed whole to the object key like the transcript (the
                # privacy export reads it so); a spool that does not open is left where it is.
                try:
                    _, lines = await asyncio.to_thread(lambda: open_spool(path.read_bytes(), call_sid=call.call_sid))
                except SpoolError as error:
                    log.error("recording_spool_unreadable", call_sid=call.call_sid, error=str(error))
                    return
                plain = b"".join(line + b"\n" for line in lines)
                key = recording_key(call)
                await self._archive.put(key, seal_archived(key, plain), content_type=SEALED_CONTENT_TYPE)
