"""A person's rights (booking/privacy.py, ``voicebook privacy``) and key rotation (``voicebook keys``):
an export holds everything about the person and nothing about anyone else; after an erasure the person
is in no store (ledger, archive, CRM), only the audit entry saying it happened; a rotation re-seals
every value under the new key while the old one still reads."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from sqlalchemy import select

from booking.business import Business
from booking.calls import CallStatus, CallTurn
from booking.ledger import pii
from booking.ledger import schema as t
from booking.ledger.audit import verify_audit
from booking.ledger.calls_repository import CallLedger
from booking.ledger.database import Database
from booking.ledger.pii import FieldCipher, new_key
from booking.ledger.pii_rotation import SEALED_COLUMNS, rotate_keys
from booking.ledger.reports_repository import ReportLedger
from booking.ledger.repository import CustomerDetails
from booking.ledger.sms_repository import SmsLedger, SuppressionSource
from booking.outbox import REWRITE_DETAILS, EffectKind, booking_from_payload, effect_from_row
from booking.privacy import erase_person, export_person
from booking.reports.pipeline import seal_archived, transcript_key
from booking.service import Booked, BookingService, BookRequest
from integrations.airtable import CONTACTS, AirtableCRM, CallRow, ContactRow
from integrations.google_calendar import GoogleCalendar
from integrations.redis_rate_limit import RedisRateLimiter
from integrations.simulators.airtable import AirtableState, create_airtable_simulator
from integrations.simulators.google_calendar import CalendarState, service_account_info
from integrations.storage import LocalFolderStorage
from tests.conftest import TEST_PII_INDEX_KEY, FrozenClock, serving
from voice_server.cli import main
from voice_server.report_effects import CrmErase

PERSON = "+16465550142"
OTHER = "+16465550177"
NAME, SAID = "Margaret Oyelaran", "I have asthma and my date of birth is the fourth of july"
CALL, OTHER_CALL = "CA" + "1" * 32, "CA" + "2" * 32


async def _populate(
    database: Database, service: BookingService, clock: FrozenClock, archive: LocalFolderStorage
) -> str:
    """The person and someone else, each with a booking, a call with transcript and report, a text."""
    booking_id = ""
    for phone, name, call_sid, hour in ((PERSON, NAME, CALL, 14), (OTHER, "Other Person", OTHER_CALL, 15)):
        outcome = await service.book(
            BookRequest("checkup", datetime(2026, 12, 1, hour, tzinfo=UTC), CustomerDetails(phone, name), notes=SAID)
        )
        assert isinstance(outcome, Booked)
        booking_id = booking_id or outcome.booking.id
        calls = CallLedger(database, clock=clock)
        await calls.record_call(
            call_sid=call_sid,
            account_sid="AC" + "9" * 32,
            from_number=phone,
            to_number="+12125550100",
            direction="inbound",
            status=CallStatus.RINGING,
        )
        await calls.finish_call(
            call_sid,
            stream_sid="MZ1",
            end_reason="hangup",
            turns=[CallTurn("caller", f"this is {name}: {SAID}", clock())],
        )
        await ReportLedger(database, clock=clock).add_version(
            call_sid, {"summary": f"{name} called"}, schema_version=1, produced_by="t", reason="t", actor="t"
        )
        await SmsLedger(database, clock=clock).record_sent(
            message_sid="SM" + call_sid[2:],
            to_number=phone,
            status="sent",
            segments=1,
            effect_key=f"k{call_sid}",
            booking_id=None,
        )
        call = await calls.require_call(call_sid)
        key = transcript_key(call)
        await archive.put(key, seal_archived(key, orjson.dumps({"transcript": [SAID]})), content_type="x")
    return booking_id


@pytest.fixture
def archive(tmp_path: Path) -> LocalFolderStorage:
    return LocalFolderStorage(tmp_path / "archive")


async def test_an_export_holds_everything_about_the_person_and_no_one_else(
    database: Database, service: BookingService, clock: FrozenClock, archive: LocalFolderStorage
) -> None:
    await _populate(database, service, clock, archive)
    document = await export_person(database, PERSON, archive=archive, actor="test", clock=clock)
    assert document["customer"]["phone"] == PERSON and document["customer"]["name"] == NAME
    assert [b["notes"] for b in document["bookings"]] == [SAID]
    assert document["bookings"][0]["history"][0]["kind"] == "created"
    [call] = document["calls"]
    assert call["call_sid"] == CALL and call["transcript"][0]["text"] == f"this is {NAME}: {SAID}"
    assert call["reports"][0]["body"] == {"summary": f"{NAME} called"}
    assert [m["to"] for m in document["messages"]] == [PERSON]
    assert {e["kind"] for e in document["effects"]} >= {"calendar.create", "sms.confirmation", "report.build"}
    assert document["archive"][0]["content"] == {"transcript": [SAID]}
    text_of = orjson.dumps(document).decode()
    assert OTHER not in text_of and "Other Person" not in text_of and OTHER_CALL not in text_of
    verification = await verify_audit(database)
    assert verification.ok
    async with database.reader.connect() as conn:
        actions = list((await conn.execute(select(t.audit_events.c.action))).scalars())
    assert "exported" in actions


async def _opened(database: Database) -> list[str]:
    """Every sealed value of the ledger, decrypted with the installed keys."""
    vault = pii.cipher()
    parts: list[str] = []
    async with database.reader.connect() as conn:
        for spec in SEALED_COLUMNS:
            for row in await conn.execute(select(spec.table).order_by(*(spec.table.c[k] for k in spec.key))):
                m = row._mapping
                value = m[spec.column]
                if value is None:
                    continue
                where: dict[str, Any] = {"table": spec.table.name, "column": spec.column, "row": spec.row_id(m)}
                parts.append(repr(vault.decrypt_json(value, **where) if spec.json else vault.decrypt(value, **where)))
    return parts


async def _everything_readable(database: Database) -> str:
    """Every row of every table as stored, and every sealed value decrypted: all the ledger could tell
    anyone holding the keys."""
    parts: list[str] = []
    async with database.reader.connect() as conn:
        for table in t.metadata.sorted_tables:
            for row in await conn.execute(select(table)):
                parts.append(repr(tuple(row)))
    return "\n".join(parts + await _opened(database))


async def test_an_erased_person_is_in_no_store(
    database: Database,
    service: BookingService,
    clock: FrozenClock,
    archive: LocalFolderStorage,
    redis_client: aioredis.Redis,
) -> None:
    await _populate(database, service, clock, archive)
    await SmsLedger(database, clock=clock).set_opted_out(PERSON, True, keyword="STOP", source=SuppressionSource.INBOUND)
    state = AirtableState(token="pat-test", rate=1000)
    state.add_base("appPRIVACY")
    async with serving(create_airtable_simulator(state)) as url:
        crm = AirtableCRM(
            "pat-test",
            "appPRIVACY",
            RedisRateLimiter(redis_client, "airtable", limit=1000, window=1.0),
            endpoint_url=url,
        )
        try:
            assert (await crm.ensure_schema(create=True)).ok
            for phone, name, call_sid in ((PERSON, NAME, CALL), (OTHER, "Other Person", OTHER_CALL)):
                await crm.sync(contacts=[ContactRow(phone, name=name)], calls=[CallRow(call_sid, contact_phone=phone)])

            # The server's local spool of the call's recording (and another caller's, which must stay).
            spool = archive.root.parent / "recordings"
            spool.mkdir(parents=True, exist_ok=True)
            for sid in (CALL, OTHER_CALL):
                (spool / f"{sid}.jsonl").write_bytes(b"{}\n")
            erasure = await erase_person(
                database, PERSON, archive=archive, crm=True, actor="test", clock=clock, recordings_dir=spool
            )
            assert (erasure.customers, erasure.calls, erasure.messages) == (1, 1, 1) and erasure.crm_effect
            assert not (spool / f"{CALL}.jsonl").exists() and (spool / f"{OTHER_CALL}.jsonl").exists()

            # The CRM's copy goes through the outbox, as an effect retried like any other.
            async with database.reader.connect() as conn:
                rows = await conn.execute(select(t.effects).where(t.effects.c.kind == EffectKind.CRM_ERASE.value))
                [erase_effect] = [effect_from_row(row) for row in rows]
            await CrmErase(database, crm)(erase_effect)
        finally:
            crm.close()
        contacts = [record.fields.get("Phone") for record in state.records("appPRIVACY", CONTACTS)]
        assert contacts == [OTHER]

    readable = await _everything_readable(database)
    # The name is in the person's customer record, transcript, report and CRM payloads: none may remain.
    for trace in (PERSON, PERSON[2:], NAME):
        assert trace not in readable, trace
    assert SAID in readable  # the other person's notes and transcript are untouched
    assert OTHER in readable and "Other Person" in readable
    assert not (archive.root / transcript_key(await CallLedger(database).require_call(CALL))).exists()
    # What must be kept is kept: the opt-out (by its hash), the bookings as the business's record.
    assert await SmsLedger(database, clock=clock).is_suppressed(PERSON)
    assert await service.find_bookings(PERSON, upcoming_only=False) == []
    assert (await export_person(database, PERSON, actor="test", clock=clock))["customer"] is None
    async with database.reader.connect() as conn:
        audit = [tuple(r) for r in await conn.execute(select(t.audit_events.c.action, t.audit_events.c.details))]
    assert any(action == "erased" for action, _ in audit)
    assert PERSON not in repr(audit) and NAME not in repr(audit)
    assert (await verify_audit(database)).ok
    # Again: nothing is found under the number any more.
    again = await erase_person(database, PERSON, archive=archive, actor="test", clock=clock)
    assert (again.customers, again.calls, again.messages) == (0, 0, 0)


async def test_rotation_reseals_every_value_under_the_new_key_without_losing_one(
    database: Database, service: BookingService, clock: FrozenClock, archive: LocalFolderStorage
) -> None:
    old = pii.cipher()
    await _populate(database, service, clock, archive)
    before = await _opened(database)
    both = FieldCipher(
        {"new": FieldCipher.parse(f"x={new_key()}", TEST_PII_INDEX_KEY).keys["x"], **old.keys}, "new", old.index_key
    )
    pii.install(both)
    report = await rotate_keys(database, batch=2, actor="test")
    assert report.active == "new" and report.total > 0
    assert set(report.resealed) >= {"customers.phone", "calls.from_number", "call_turns.text", "effects.payload"}
    only_new = FieldCipher({"new": both.keys["new"]}, "new", old.index_key)
    pii.install(only_new)  # the old key is gone: everything must still read
    assert await _opened(database) == before
    assert (await rotate_keys(database, actor="test")).total == 0  # nothing left under an old key
    [booking] = await service.find_bookings(PERSON, upcoming_only=False)
    assert booking.customer.name == NAME
    async with database.reader.connect() as conn:
        actions = list((await conn.execute(select(t.audit_events.c.action))).scalars())
    assert actions.count("key_rotated") == 2


async def test_a_row_written_during_rotation_is_not_overwritten(database: Database, service: BookingService) -> None:
    """Compare and set: a value a server rewrote between the rotation's read and its write stays."""
    outcome = await service.book(
        BookRequest("checkup", datetime(2026, 12, 1, 14, tzinfo=UTC), CustomerDetails(PERSON, NAME))
    )
    assert isinstance(outcome, Booked)
    old = pii.cipher()
    both = FieldCipher(
        {"new": FieldCipher.parse(f"x={new_key()}", TEST_PII_INDEX_KEY).keys["x"], **old.keys}, "new", old.index_key
    )
    from booking.ledger import pii_rotation

    original = pii_rotation._write_batch

    def racing(conn: Any, **kwargs: Any) -> int:
        if kwargs["spec"].name == "customers.name":  # a server renames the customer just before
            index = old.blind_index(PERSON)
            sealed = both.encrypt("Maggie", table="customers", column="name", row=index)
            conn.execute(t.customers.update().where(t.customers.c.phone_index == index).values(name=sealed))
        return original(conn, **kwargs)

    pii.install(both)
    pii_rotation._write_batch = racing  # type: ignore[assignment]
    try:
        report = await rotate_keys(database, actor="test")
    finally:
        pii_rotation._write_batch = original  # type: ignore[assignment]
    assert report.skipped.get("customers.name") == 1
    [booking] = await service.find_bookings(PERSON, upcoming_only=False)
    assert booking.customer.name == "Maggie"


def test_the_commands_export_erase_and_rotate(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOICEBOOK_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DATABASE_URL", database_url)
    for name in ("VOICEBOOK_PII_KEYS", "VOICEBOOK_PII_INDEX_KEY"):  # development: keys in the data dir
        monkeypatch.delenv(name, raising=False)
    assert main(["keys", "new", "--id", "k9"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("VOICEBOOK_PII_KEYS=k9=")
    assert main(["privacy", "export", "not a number"]) == 2
    assert "not a phone number" in capsys.readouterr().err
    assert main(["privacy", "erase", "(646) 555-0142"]) == 2
    assert "--yes" in capsys.readouterr().err
    assert main(["privacy", "export", "(646) 555-0142"]) == 1  # nobody under that number yet
    assert orjson.loads(capsys.readouterr().out)["subject"]["phone"] == PERSON
    assert main(["keys", "rotate"]) == 0  # development: a new key k2 joins data_dir/pii-keys, active
    assert "under key k2" in capsys.readouterr().out
    assert orjson.loads((tmp_path / "pii-keys").read_bytes())["active"] == "k2"
    assert main(["keys", "status"]) == 0
    assert "active: k2" in capsys.readouterr().out


async def test_erasure_rewrites_the_persons_calendar_events_without_their_details(
    database: Database,
    service: BookingService,
    clock: FrozenClock,
    archive: LocalFolderStorage,
    business: Business,
    calendar_sim: tuple[CalendarState, str],
    private_key_pem: str,
) -> None:
    """The event Google holds carries the name, the masked number and the notes; erasure enqueues a
    ``calendar.update`` of the anonymised booking, and running it (as a worker would, against the Calendar
    simulator) leaves an event with only the service and the time."""
    booking_id = await _populate(database, service, clock, archive)
    state, url = calendar_sim
    calendar = GoogleCalendar.from_service_account(
        service_account_info(url, private_key_pem), api_endpoint=f"{url}/calendar/v3/", timeout=5.0
    )
    booking = await service.get_booking(booking_id)
    await calendar.create(booking, business)
    before = orjson.dumps(state.live_events(business.resources[0].calendar_id or "")).decode()
    assert NAME in before and "0142" in before

    await erase_person(database, PERSON, archive=archive, actor="test", clock=clock)
    async with database.reader.connect() as conn:
        rows = await conn.execute(select(t.effects).where(t.effects.c.kind == EffectKind.CALENDAR_UPDATE.value))
        [update] = [effect_from_row(row) for row in rows]
    assert update.booking_id == booking_id and update.idempotency_key.endswith(":erased")
    assert NAME not in repr(update.payload) and PERSON not in repr(update.payload) and SAID not in repr(update.payload)
    assert update.payload[REWRITE_DETAILS] is True
    await calendar.update(booking_from_payload(update.payload), business, details=True)
    after = orjson.dumps(state.live_events(business.resources[0].calendar_id or "")).decode()
    for trace in (NAME, "0142", SAID):
        assert trace not in after, trace
    assert "General check-up: Caller" in after  # the slot is still the business's record
