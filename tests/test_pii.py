"""Personal data at rest (booking/ledger/pii.py): sealed per field, bound to its row and column, looked
up by blind index, readable under every configured key, and absent in plaintext from a dump of the
ledger after a real booking, call, text and report."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from booking.calls import CallStatus, CallTurn
from booking.ledger import pii
from booking.ledger import schema as t
from booking.ledger.calls_repository import CallLedger
from booking.ledger.database import Database
from booking.ledger.pii import FieldCipher, PiiDecryptError, PiiKeyError, new_key
from booking.ledger.reports_repository import ReportLedger
from booking.ledger.repository import CustomerDetails
from booking.ledger.sms_repository import SmsLedger, SuppressionSource
from booking.outbox import Outbox
from booking.service import Booked, BookingService, BookRequest
from tests.conftest import TEST_PII_INDEX_KEY, FrozenClock
from voice_server.privacy_keys import KEY_FILE, pii_cipher
from voice_server.settings import Settings, SettingsError

PHONE = "+16465550142"
NAME = "Margaret Oyelaran-Fitzgerald"
EMAIL = "margaret.of@example.org"
SAID = "my date of birth is the fourth of july and I have asthma"


def _ring(*ids: str) -> FieldCipher:
    return FieldCipher.parse(",".join(f"{key_id}={new_key()}" for key_id in ids), new_key())


def test_values_are_sealed_to_their_table_column_and_row() -> None:
    cipher = _ring("a")
    sealed = cipher.encrypt(PHONE, table="customers", column="phone", row="r1")
    assert sealed is not None and sealed.startswith("v1:a:") and PHONE not in sealed
    assert cipher.decrypt(sealed, table="customers", column="phone", row="r1") == PHONE
    assert cipher.encrypt(PHONE, table="customers", column="phone", row="r1") != sealed  # a fresh nonce each time
    for table, column, row in (("customers", "phone", "r2"), ("customers", "name", "r1"), ("calls", "phone", "r1")):
        with pytest.raises(PiiDecryptError, match="failed authentication"):
            cipher.decrypt(sealed, table=table, column=column, row=row)
    middle = len(sealed) // 2  # a character of the ciphertext itself (the last ones may be padding bits)
    tampered = sealed[:middle] + ("A" if sealed[middle] != "A" else "B") + sealed[middle + 1 :]
    with pytest.raises(PiiDecryptError):
        cipher.decrypt(tampered, table="customers", column="phone", row="r1")
    with pytest.raises(PiiDecryptError, match="not sealed"):
        cipher.decrypt(PHONE, table="customers", column="phone", row="r1")
    assert cipher.encrypt(None, table="x", column="y", row="z") is None


def test_every_configured_key_decrypts_and_only_the_active_one_encrypts() -> None:
    old = FieldCipher.parse(f"old={new_key()}", TEST_PII_INDEX_KEY)
    sealed_old = old.encrypt(NAME, table="customers", column="name", row="r")
    both = FieldCipher({"new": _ring("x").keys["x"], "old": old.keys["old"]}, "new", old.index_key)
    assert both.decrypt(sealed_old, table="customers", column="name", row="r") == NAME
    assert both.needs_rotation(sealed_old) and not old.needs_rotation(sealed_old)
    sealed_new = both.encrypt(NAME, table="customers", column="name", row="r")
    assert sealed_new is not None and sealed_new.startswith("v1:new:") and not both.needs_rotation(sealed_new)
    with pytest.raises(PiiKeyError, match="'new', which is not configured"):
        old.decrypt(sealed_new, table="customers", column="name", row="r")
    assert both.blind_index(PHONE) == old.blind_index(PHONE)  # the index key is not part of the rotation


def test_blind_index_is_keyed() -> None:
    one, other = _ring("a"), _ring("a")
    assert one.blind_index(PHONE) == one.blind_index(PHONE) != one.blind_index("+16465550143")
    assert one.blind_index(PHONE) != other.blind_index(PHONE)  # a guess of the number is not enough
    assert PHONE.strip("+") not in one.blind_index(PHONE)


def test_json_documents_are_sealed_whole() -> None:
    cipher = _ring("a")
    document = {"transcript": [{"role": "caller", "text": SAID}], "lead_score": 7}
    sealed = cipher.encrypt_json(document, table="call_reports", column="body", row="CA1:1")
    assert list(sealed) == ["$pii"] and SAID not in str(sealed)
    assert cipher.decrypt_json(sealed, table="call_reports", column="body", row="CA1:1") == document
    assert cipher.decrypt_json({"legacy": 1}, table="call_reports", column="body", row="CA1:1") == {"legacy": 1}
    assert cipher.needs_rotation({"legacy": 1}) and not cipher.needs_rotation(sealed)


@pytest.mark.parametrize(
    ("keys", "index_key", "message"),
    [
        ("a=" + new_key(), "short", "blind index key is not a 256-bit key"),
        ("nokeyid", new_key(), "has no id"),
        ("a=abc", new_key(), "key 'a' is not a 256-bit key"),
        (f"a={new_key()},a={new_key()}", new_key(), "appears twice"),
        (f"bad id!={new_key()}", new_key(), "use 1 to 16 letters"),
    ],
    ids=["short index key", "no id", "short key", "id twice", "bad id"],  # random keys: the same ids on every worker
)
def test_malformed_keys_are_refused_with_a_clear_message(keys: str, index_key: str, message: str) -> None:
    with pytest.raises(PiiKeyError, match=message):
        FieldCipher.parse(keys, index_key)


def test_settings_require_keys_in_production_and_validate_them(tmp_path: Path) -> None:
    base = {"VOICEBOOK_DATA_DIR": str(tmp_path)}
    with pytest.raises(SettingsError, match="VOICEBOOK_PII_KEYS: required when VOICEBOOK_ENV=production"):
        Settings.from_env({**base, "VOICEBOOK_ENV": "production"})
    with pytest.raises(SettingsError, match="VOICEBOOK_PII_INDEX_KEY: set it together"):
        Settings.from_env({**base, "VOICEBOOK_PII_KEYS": f"a={new_key()}"})
    with pytest.raises(SettingsError, match="VOICEBOOK_PII_KEYS: key 'a' is not a 256-bit key") as error:
        Settings.from_env({**base, "VOICEBOOK_PII_KEYS": "a=c2VjcmV0", "VOICEBOOK_PII_INDEX_KEY": new_key()})
    assert "c2VjcmV0" not in str(error.value)
    key_file = tmp_path / "keys"
    key_file.write_text(f"k7={new_key()}\n")
    settings = Settings.from_env(
        {**base, "VOICEBOOK_PII_KEYS_FILE": str(key_file), "VOICEBOOK_PII_INDEX_KEY": new_key()}
    )
    assert pii_cipher(settings).active == "k7"
    assert "k7=" not in repr(settings)


def test_development_keys_are_made_once_and_kept(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    first = pii_cipher(settings)
    assert (tmp_path / KEY_FILE).stat().st_mode & 0o777 == 0o600
    again = pii_cipher(settings)
    sealed = first.encrypt(PHONE, table="customers", column="phone", row="r")
    assert again.decrypt(sealed, table="customers", column="phone", row="r") == PHONE
    with pytest.raises(PiiKeyError, match="required outside development"):
        pii_cipher(dataclasses.replace(settings, environment="production"))


# -- through the ledger ---------------------------------------------------------------------------


async def _dump(database: Database) -> str:
    """Every row of every table, as text: what a copy of the database would show."""
    lines: list[str] = []
    async with database.reader.connect() as conn:
        for table in t.metadata.sorted_tables:
            for row in await conn.execute(text(f"SELECT * FROM {table.name}")):
                lines.append(f"{table.name}: {tuple(row)!r}")
    return "\n".join(lines)


async def test_a_dump_of_the_ledger_holds_no_plaintext_phone_name_or_transcript(
    database: Database, service: BookingService, clock: FrozenClock
) -> None:
    start = datetime(2026, 12, 1, 14, 0, tzinfo=UTC)
    outcome = await service.book(
        BookRequest("checkup", start, CustomerDetails(PHONE, NAME, EMAIL), notes="allergic to " + SAID)
    )
    assert isinstance(outcome, Booked)
    calls = CallLedger(database, clock=clock)
    await calls.record_call(
        call_sid="CA" + "1" * 32,
        account_sid="AC" + "2" * 32,
        from_number=PHONE,
        to_number="+12125550100",
        direction="inbound",
        status=CallStatus.RINGING,
    )
    turns = [CallTurn("caller", SAID, clock()), CallTurn("agent", f"Thanks {NAME}", clock())]
    await calls.finish_call("CA" + "1" * 32, stream_sid="MZ1", end_reason="hangup", turns=turns)
    await ReportLedger(database, clock=clock).add_version(
        "CA" + "1" * 32,
        {"transcript": [{"text": SAID}], "caller": {"phone": PHONE, "name": NAME}},
        schema_version=1,
        produced_by="test",
        reason="test",
        actor="test",
    )
    sms = SmsLedger(database, clock=clock)
    await sms.record_sent(
        message_sid="SM" + "3" * 32, to_number=PHONE, status="queued", segments=1, effect_key="k", booking_id=None
    )
    await sms.begin_send("k2", PHONE)
    await sms.set_opted_out(PHONE, True, keyword="STOP", source=SuppressionSource.INBOUND)

    dump = await _dump(database)
    assert "customers:" in dump and "effects:" in dump and "call_turns:" in dump  # the dump did see the rows
    for plaintext in (PHONE, PHONE.lstrip("+"), PHONE[2:], NAME, EMAIL, SAID, "asthma"):
        assert plaintext not in dump, plaintext

    # ... and everything reads back through the ledger.
    [booking] = await service.find_bookings(PHONE, upcoming_only=False)
    assert (booking.customer.phone, booking.customer.name, booking.customer.email) == (PHONE, NAME, EMAIL)
    assert booking.notes == "allergic to " + SAID
    call = await calls.require_call("CA" + "1" * 32)
    assert call.from_number == PHONE
    assert [turn.text for turn in await calls.transcript(call.call_sid)] == [SAID, f"Thanks {NAME}"]
    assert [m.to_number for m in await sms.messages_to(PHONE)] == [PHONE]
    assert await sms.is_suppressed(PHONE) and not await sms.is_suppressed("+16465550143")
    payloads = [effect.payload for effect in await Outbox(database).for_booking(booking.id)]
    assert payloads and all(p["customer"]["phone"] == PHONE for p in payloads if "customer" in p)


async def test_a_value_moved_to_another_row_does_not_read_as_that_row(
    database: Database, service: BookingService
) -> None:
    for phone, name in ((PHONE, NAME), ("+16465550143", "Someone Else")):
        outcome = await service.book(
            BookRequest(
                "checkup", datetime(2026, 12, 1, 14 if phone == PHONE else 15, tzinfo=UTC), CustomerDetails(phone, name)
            )
        )
        assert isinstance(outcome, Booked)
    c = t.customers.c
    async with database.reader.connect() as conn:
        rows = {row.phone_index: row.name for row in await conn.execute(select(c.phone_index, c.name))}
    mine, theirs = pii.cipher().blind_index(PHONE), pii.cipher().blind_index("+16465550143")
    # Someone with write access to the database copies another customer's sealed name onto this row.
    await database.write(
        lambda conn: conn.execute(t.customers.update().where(c.phone_index == mine).values(name=rows[theirs]))
    )
    with pytest.raises(PiiDecryptError, match=r"customers\.name"):
        await service.find_bookings(PHONE, upcoming_only=False)


async def test_the_migration_seals_rows_written_before_it_and_its_downgrade_opens_them(tmp_path: Path) -> None:
    """Rows written under revision 0013 (plaintext) are sealed by 0014 and read through the ledger; the
    downgrade opens them again, and a second upgrade seals them again."""
    from booking.ledger.database import downgrade, migrate

    database = Database.connect(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        await migrate(database, "0013")
        now = datetime(2026, 11, 30, 12, tzinfo=UTC)

        def old_rows(conn: Any) -> None:
            conn.execute(
                text(
                    "INSERT INTO customers (id, phone, name, email, created_at, updated_at) "
                    "VALUES ('c1', :phone, :name, :email, :now, :now)"
                ),
                {"phone": PHONE, "name": NAME, "email": EMAIL, "now": now.replace(tzinfo=None)},
            )
            conn.execute(
                text(
                    "INSERT INTO calls (call_sid, account_sid, from_number, to_number, direction, status, "
                    "created_at, updated_at) VALUES ('CA1', 'AC1', :phone, '+12125550100', 'inbound', 'completed', "
                    ":now, :now)"
                ),
                {"phone": PHONE, "now": now.replace(tzinfo=None)},
            )
            conn.execute(
                text(
                    "INSERT INTO call_turns (call_sid, position, role, text, truncated, at) "
                    "VALUES ('CA1', 0, 'caller', :said, 0, :now)"
                ),
                {"said": SAID, "now": now.replace(tzinfo=None)},
            )
            conn.execute(
                text(
                    "INSERT INTO sms_suppressions (phone, opted_out, keyword, changed_at, source) "
                    "VALUES (:phone, 1, 'STOP', :now, 'inbound_sms')"
                ),
                {"phone": PHONE, "now": now.replace(tzinfo=None)},
            )

        await database.write(old_rows)
        await migrate(database)
        dump = await _dump(database)
        assert PHONE not in dump and NAME not in dump and SAID not in dump
        calls = CallLedger(database)
        assert (await calls.require_call("CA1")).from_number == PHONE
        assert [turn.text for turn in await calls.transcript("CA1")] == [SAID]
        assert await SmsLedger(database).is_suppressed(PHONE)

        await downgrade(database, "0013")
        async with database.reader.connect() as conn:
            customer = (await conn.execute(text("SELECT phone, name, email FROM customers"))).one()
            turn = (await conn.execute(text("SELECT text FROM call_turns"))).scalar_one()
            suppressed = (await conn.execute(text("SELECT phone FROM sms_suppressions"))).scalar_one()
        assert tuple(customer) == (PHONE, NAME, EMAIL) and turn == SAID and suppressed == PHONE

        await migrate(database)
        assert (await calls.require_call("CA1")).from_number == PHONE
        assert PHONE not in await _dump(database)
    finally:
        await database.dispose()
