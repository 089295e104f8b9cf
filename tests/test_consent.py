"""Consent to recording, transcription and texts: asked and answered through Twilio's webhooks, kept as a
history with time, channel and wording, enforced where a call's transcript and recording are stored, and
withdrawn (mid-call by voice, by text, by an operator) from then on.

The server, ledger (SQLite or PostgreSQL), Redis and the Media Streams WebSocket are real; the call's
speech and agent are scripted (tests/voice_fakes.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import httpx
import pytest
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.datastructures import FormData
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import connect

from booking.consent import (
    CALL_KINDS,
    SMS_QUESTION,
    Channel,
    ConsentKind,
    ConsentMode,
    ConsentRecord,
    Decision,
    permission,
    withdraws_consent,
    wording_version,
)
from booking.domain import SmsConsent
from booking.ledger import schema as t
from booking.ledger.audit import AuditAction, verify_audit
from booking.ledger.consent_repository import ConsentLedger, NewConsent
from booking.ledger.database import Database
from booking.ledger.repository import CustomerDetails
from booking.ledger.sms_repository import SmsLedger, SuppressionSource
from booking.privacy import erase_person, export_person
from booking.service import Booked, BookingService, BookRequest
from integrations.simulators.loopback import loopback_socket
from tests.conftest import FrozenClock, serving
from tests.twilio_caller import TwilioCaller, inbound_call
from tests.voice_fakes import SlowTools, scripted_ports
from voice_server import twiml
from voice_server.app import create_app
from voice_server.cli import main
from voice_server.recording import load_recording
from voice_server.settings import Settings
from voice_server.twilio_webhooks import CONSENT_PATH, consent_answer

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
CALLER = "+16465550199"
NOTICE = "This call is recorded and transcribed so we can book your appointment."
T0 = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)


# -- the rules, pure ---------------------------------------------------------------------------------


def record(
    decision: Decision,
    channel: Channel,
    minutes: int,
    *,
    call: str | None = "CA1",
    kind: ConsentKind = ConsentKind.RECORDING,
) -> ConsentRecord:
    return ConsentRecord(kind, decision, channel, "v1", T0 + timedelta(minutes=minutes), call_sid=call, id=minutes)


def test_off_needs_nothing_and_the_other_modes_need_the_calls_own_grant() -> None:
    kind = ConsentKind.RECORDING
    assert permission(ConsentMode.OFF, kind, "CA1", [], []).allowed
    for mode in (ConsentMode.NOTICE, ConsentMode.EXPLICIT):
        assert not permission(mode, kind, "CA1", [], []).allowed
        other_call = [record(Decision.GRANTED, Channel.VOICE_KEYPAD, 1, call="CA0")]
        assert not permission(mode, kind, "CA1", other_call, other_call).allowed
        refused = [record(Decision.DECLINED, Channel.VOICE_KEYPAD, 1)]
        assert not permission(mode, kind, "CA1", refused, refused).allowed
        granted = [record(Decision.GRANTED, Channel.VOICE_KEYPAD, 1)]
        assert permission(mode, kind, "CA1", granted, granted) == permission(mode, kind, "CA1", granted, granted)
        assert permission(mode, kind, "CA1", granted, granted).allowed
        transcription_only = [record(Decision.GRANTED, Channel.VOICE_KEYPAD, 1, kind=ConsentKind.TRANSCRIPTION)]
        assert not permission(mode, kind, "CA1", transcription_only, transcription_only).allowed


def test_a_withdrawal_keeps_what_came_before_it_only() -> None:
    history = [record(Decision.GRANTED, Channel.VOICE_NOTICE, 1), record(Decision.REVOKED, Channel.VOICE_SPEECH, 5)]
    allowed = permission(ConsentMode.NOTICE, ConsentKind.RECORDING, "CA1", history, history)
    assert allowed.allowed and allowed.until == T0 + timedelta(minutes=5)
    assert allowed.keeps(T0 + timedelta(minutes=4)) and not allowed.keeps(T0 + timedelta(minutes=5))


def test_a_notice_never_overrides_an_earlier_withdrawal_but_an_explicit_yes_does() -> None:
    earlier = [
        record(Decision.GRANTED, Channel.VOICE_NOTICE, 1, call="CA0"),
        record(Decision.REVOKED, Channel.VOICE_SPEECH, 2, call="CA0"),
    ]
    notice = record(Decision.GRANTED, Channel.VOICE_NOTICE, 10)
    refused = permission(ConsentMode.NOTICE, ConsentKind.RECORDING, "CA1", [notice], [*earlier, notice])
    assert not refused.allowed and "revoked" in refused.reason
    asked = record(Decision.GRANTED, Channel.VOICE_KEYPAD, 10)
    assert permission(ConsentMode.EXPLICIT, ConsentKind.RECORDING, "CA1", [asked], [*earlier, asked]).allowed
    # The revocation came after this call's notice grant was given (say, by an operator during the call):
    # the call's own grant stands; the next call is refused.
    later = [notice, record(Decision.REVOKED, Channel.OPERATOR, 12, call=None)]
    assert permission(ConsentMode.NOTICE, ConsentKind.RECORDING, "CA1", [notice], later).allowed


@pytest.mark.parametrize(
    "said",
    [
        "stop recording please",
        "Please don't record this.",
        "I do not want to be recorded",
        "I withdraw my consent",
        "don\u2019t transcribe this",
        "no recording",
    ],
)
def test_withdrawals_are_heard(said: str) -> None:
    assert withdraws_consent(said)


@pytest.mark.parametrize("said", ["I'd like to book a checkup", "can you record my name as Ann", "stop", "no"])
def test_ordinary_turns_are_not_withdrawals(said: str) -> None:
    assert not withdraws_consent(said)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"Digits": "1"}, (Decision.GRANTED, Channel.VOICE_KEYPAD)),
        ({"Digits": "2"}, (Decision.DECLINED, Channel.VOICE_KEYPAD)),
        ({"Digits": "7"}, (Decision.DECLINED, Channel.VOICE_KEYPAD)),
        ({"SpeechResult": "Yes, that's fine."}, (Decision.GRANTED, Channel.VOICE_SPEECH)),
        ({"SpeechResult": "I agree"}, (Decision.GRANTED, Channel.VOICE_SPEECH)),
        ({"SpeechResult": "No thank you"}, (Decision.DECLINED, Channel.VOICE_SPEECH)),
        ({"SpeechResult": "yes but don't record it"}, (Decision.DECLINED, Channel.VOICE_SPEECH)),
        ({"SpeechResult": "what?"}, (Decision.DECLINED, Channel.VOICE_SPEECH)),
        ({}, (Decision.DECLINED, Channel.VOICE_SILENCE)),
    ],
)
def test_the_answer_to_the_question(fields: dict[str, str], expected: tuple[Decision, Channel]) -> None:
    assert consent_answer(FormData(fields)) == expected


def test_a_wording_version_changes_with_the_words_not_the_spacing() -> None:
    assert wording_version("This call is recorded.") == wording_version("This  call is\nrecorded.")
    assert wording_version("This call is recorded.") != wording_version("This call is recorded and kept.")


# -- through the server -----------------------------------------------------------------------------


@dataclass
class Server:
    app: Starlette
    base: str
    settings: Settings

    @property
    def database(self) -> Database:
        database: Database = self.app.state.components.database
        return database

    @property
    def consents(self) -> ConsentLedger:
        return ConsentLedger(self.database)

    def signed(self, path: str, form: dict[str, str]) -> dict[str, str]:
        return {"X-Twilio-Signature": RequestValidator(AUTH_TOKEN).compute_signature(self.base + path, form)}

    async def post(self, client: httpx.AsyncClient, path: str, form: dict[str, str]) -> httpx.Response:
        return await client.post(self.base + path, data=form, headers=self.signed(path, form))


@contextlib.asynccontextmanager
async def consent_server(
    app_settings: Settings, clock: FrozenClock, script: list[str], **overrides: Any
) -> AsyncIterator[Server]:
    sock = loopback_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = dataclasses.replace(
        app_settings, public_url=base, twilio_auth_token=AUTH_TOKEN, consent_notice=NOTICE, **overrides
    )
    app = create_app(settings, clock=clock, voice=scripted_ports(script, SlowTools()))
    async with serving(app, sock, lifespan="on", ws="websockets-sansio"):
        yield Server(app, base, settings)


async def until(check: Callable[[], Any], within: float = 10.0) -> None:
    """Poll ``check`` (a coroutine function) until it is true: the ledger and the recording are written
    after the socket closes, on the server's own time."""
    for _ in range(int(within / 0.02)):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not true within {within} s")


async def talk(server: Server, call_sid: str, lines: int) -> None:
    """A call over the real Media Streams socket: hear the greeting, say ``lines`` lines, hang up, and wait
    until the ledger has filed the call."""
    media = server.base.replace("http://", "ws://") + "/twilio/media"
    signature = RequestValidator(AUTH_TOKEN).compute_signature(media, {})
    async with connect(media, additional_headers={"X-Twilio-Signature": signature}) as ws:
        async with TwilioCaller(ws, call_sid=call_sid) as caller:
            await caller.connect()
            await caller.wait_for(lambda: len(caller.marks_echoed) >= 2)  # the greeting's two sentences
            for _ in range(lines):
                heard = len(caller.marks_echoed)
                await caller.say()
                await caller.wait_for(lambda heard=heard: len(caller.marks_echoed) > heard)
            await caller.stop()
    calls = server.app.state.components.calls

    async def filed() -> bool:
        found = await calls.get_call(call_sid)
        return found is not None and found.end_reason is not None

    await until(filed)


async def report_enqueued(server: Server, call_sid: str) -> bool:
    async with server.database.reader.connect() as conn:
        rows = (await conn.execute(select(t.effects.c.kind).where(t.effects.c.call_sid == call_sid))).all()
    return "report.build" in {row.kind for row in rows}


async def test_explicit_mode_asks_before_connecting_and_keeps_the_answer_with_its_words(
    app_settings: Settings, clock: FrozenClock
) -> None:
    call = inbound_call("CA" + "1" * 32)
    async with consent_server(app_settings, clock, [], consent_mode=ConsentMode.EXPLICIT) as server:
        async with httpx.AsyncClient() as client:
            asked = ElementTree.fromstring((await server.post(client, "/twilio/voice", call)).text)
            gather = asked.find("./Gather")
            assert gather is not None and asked.find("./Connect") is None, "nothing connects before the answer"
            assert gather.get("action") == server.base + CONSENT_PATH and gather.get("actionOnEmptyResult") == "true"
            prompt = gather.findtext("Say")
            assert prompt == twiml.consent_prompt(NOTICE)
            answered = await server.post(client, CONSENT_PATH, {**call, "Digits": "1"})
            replayed = await server.post(client, CONSENT_PATH, {**call, "Digits": "1"})
        connected = ElementTree.fromstring(answered.text)
        assert [child.tag for child in connected] == ["Say", "Connect"]
        assert replayed.status_code == 200
        decisions = await server.consents.for_call(call["CallSid"])
        assert sorted((d.kind, d.decision, d.channel) for d in decisions) == [
            (ConsentKind.RECORDING, Decision.GRANTED, Channel.VOICE_KEYPAD),
            (ConsentKind.TRANSCRIPTION, Decision.GRANTED, Channel.VOICE_KEYPAD),
        ], "one answer, recorded once for each kind (the replay added nothing)"
        version = decisions[0].wording_version
        assert version == wording_version(prompt) and decisions[0].at == clock.now
        assert await server.consents.wordings([version]) == {version: prompt}
        assert [d.kind for d in await server.consents.for_person(CALLER)] == [d.kind for d in decisions]


async def test_an_unanswered_question_is_a_refusal_and_the_call_still_connects(
    app_settings: Settings, clock: FrozenClock
) -> None:
    call = inbound_call("CA" + "2" * 32)
    async with consent_server(app_settings, clock, [], consent_mode=ConsentMode.EXPLICIT) as server:
        async with httpx.AsyncClient() as client:
            answered = ElementTree.fromstring((await server.post(client, CONSENT_PATH, call)).text)
        assert answered.find("./Connect/Stream") is not None
        assert answered.findtext("Say") == "Understood. This call will not be recorded or transcribed."
        decisions = await server.consents.for_call(call["CallSid"])
        assert {(d.decision, d.channel) for d in decisions} == {(Decision.DECLINED, Channel.VOICE_SILENCE)}


async def test_an_unsigned_consent_answer_is_refused_and_not_recorded(
    app_settings: Settings, clock: FrozenClock
) -> None:
    call = inbound_call("CA" + "3" * 32)
    async with consent_server(app_settings, clock, [], consent_mode=ConsentMode.EXPLICIT) as server:
        async with httpx.AsyncClient() as client:
            forged = await client.post(server.base + CONSENT_PATH, data={**call, "Digits": "1"})
        assert forged.status_code == 403
        assert await server.consents.for_call(call["CallSid"]) == []


@pytest.mark.parametrize(("key", "kept"), [("2", False), ("1", True)])
async def test_storage_follows_the_callers_answer(
    app_settings: Settings, clock: FrozenClock, key: str, kept: bool
) -> None:
    call_sid = "CA" + "4" * 32
    script = ["I would like a checkup", "tell me a story"]
    async with consent_server(
        app_settings, clock, script, consent_mode=ConsentMode.EXPLICIT, record_calls=True
    ) as server:
        async with httpx.AsyncClient() as client:
            await server.post(client, "/twilio/voice", inbound_call(call_sid))
            await server.post(client, CONSENT_PATH, {**inbound_call(call_sid), "Digits": key})
        await talk(server, call_sid, lines=2)
        turns = await server.app.state.components.calls.transcript(call_sid)
        recording = server.settings.data_dir / "recordings" / f"{call_sid}.jsonl"
        await until(lambda: report_enqueued(server, call_sid))  # the call is filed and reported either way
        if kept:
            assert [turn.text for turn in turns if turn.role == "caller"] == script
            await until(lambda: asyncio.sleep(0, recording.exists()))
        else:
            assert turns == []
            await asyncio.sleep(0.2)  # the recording would have been written at hang-up
            assert not recording.exists()


async def test_a_caller_who_says_stop_recording_is_not_recorded_from_then_on_nor_on_the_next_call(
    app_settings: Settings, clock: FrozenClock
) -> None:
    first, second = "CA" + "5" * 32, "CA" + "6" * 32
    script = ["I would like a checkup", "please stop recording", "tell me a story", "I would like a checkup"]
    async with consent_server(
        app_settings, clock, script, consent_mode=ConsentMode.NOTICE, record_calls=True
    ) as server:
        async with httpx.AsyncClient() as client:
            notice = ElementTree.fromstring((await server.post(client, "/twilio/voice", inbound_call(first))).text)
        assert notice.findtext("Say") == NOTICE
        await talk(server, first, lines=3)
        calls = server.app.state.components.calls
        assert [(turn.role, turn.text) for turn in await calls.transcript(first) if turn.role == "caller"] == [
            ("caller", "I would like a checkup")
        ], "what came before the withdrawal is kept; the withdrawal and everything after it are not"
        path = server.settings.data_dir / "recordings" / f"{first}.jsonl"
        await until(lambda: asyncio.sleep(0, path.exists()))
        entries = load_recording(path)
        said = [entry.get("text") for entry in entries if entry.get("event") == "turn"]
        assert "I would like a checkup" in said and "tell me a story" not in said
        assert entries[-1]["event"] == "consent_withdrawn"
        history = await server.consents.for_call(first)
        assert {(d.kind, d.decision, d.channel) for d in history if d.decision is Decision.REVOKED} == {
            (ConsentKind.RECORDING, Decision.REVOKED, Channel.VOICE_SPEECH),
            (ConsentKind.TRANSCRIPTION, Decision.REVOKED, Channel.VOICE_SPEECH),
        }

        # The next call from the same number hears the notice again; the withdrawal still stands.
        async with httpx.AsyncClient() as client:
            await server.post(client, "/twilio/voice", inbound_call(second))
        await talk(server, second, lines=1)
        assert await calls.transcript(second) == []
        assert not (server.settings.data_dir / "recordings" / f"{second}.jsonl").exists()


async def test_texted_stop_and_start_are_kept_in_the_consent_history(database: Database, clock: FrozenClock) -> None:
    sms = SmsLedger(database, clock=clock)
    await sms.set_opted_out(CALLER, True, keyword="STOP", source=SuppressionSource.INBOUND)
    clock.advance(timedelta(minutes=5))
    await sms.set_opted_out(CALLER, False, keyword="START", source=SuppressionSource.INBOUND)
    history = await ConsentLedger(database, clock=clock).for_person(CALLER)
    assert [(d.kind, d.decision, d.channel, d.wording_version) for d in history] == [
        (ConsentKind.SMS, Decision.REVOKED, Channel.SMS_KEYWORD, "keyword:STOP"),
        (ConsentKind.SMS, Decision.GRANTED, Channel.SMS_KEYWORD, "keyword:START"),
    ]
    assert history[1].at - history[0].at == timedelta(minutes=5)


async def test_the_history_holds_no_phone_number(database: Database, clock: FrozenClock) -> None:
    await SmsLedger(database, clock=clock).set_opted_out(CALLER, True, keyword="STOP", source=SuppressionSource.INBOUND)
    async with database.reader.connect() as conn:
        rows = (await conn.execute(select(t.consents))).all()
    assert rows and all(CALLER not in str(tuple(row)) and "6465550199" not in str(tuple(row)) for row in rows)


# -- operators, export and erasure --------------------------------------------------------------------


def test_an_operator_records_a_withdrawal_and_a_grant_from_the_command_line(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOICEBOOK_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DATABASE_URL", database_url)
    assert main(["consent", "show", "(646) 555-0199"]) == 1  # nothing recorded yet
    assert main(["consent", "revoke", "not a number"]) == 2
    assert main(["consent", "grant", CALLER, "--kind", "sms", "--wording", "  "]) == 2
    capsys.readouterr()
    assert main(["consent", "revoke", "(646) 555-0199"]) == 0
    assert capsys.readouterr().out.strip() == "revoked: recording, transcription, sms"
    wording = "I agree to receive appointment reminders by text."
    assert main(["consent", "grant", CALLER, "--kind", "sms", "--wording", wording]) == 0
    capsys.readouterr()
    assert main(["consent", "show", CALLER]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1:4] for line in lines] == [
        ["recording", "revoked", "operator"],
        ["transcription", "revoked", "operator"],
        ["sms", "revoked", "operator"],
        ["sms", "granted", "operator"],
    ]
    assert lines[-1].endswith(f"wording={wording_version(wording)}")

    async def check() -> None:
        database = Database.connect(database_url)
        try:
            assert await SmsLedger(database).is_suppressed(CALLER) is False  # the grant lifted the opt-out
            query = select(t.audit_events.c.details).where(t.audit_events.c.action == AuditAction.CONSENT_CHANGED)
            async with database.reader.connect() as conn:
                changes = [row.details for row in await conn.execute(query)]
            assert len(changes) == 3 and all(CALLER not in str(entry) for entry in changes)
            assert (await verify_audit(database)).ok
        finally:
            await database.dispose()

    asyncio.run(check())


async def test_export_shows_the_history_with_its_words_and_erasure_keeps_only_the_refusals(
    database: Database, clock: FrozenClock
) -> None:
    ledger = ConsentLedger(database, clock=clock)
    await ledger.record(
        CALLER,
        [
            NewConsent(kind, Decision.GRANTED, Channel.VOICE_NOTICE, "notice-v1", wording=NOTICE, call_sid="CA1")
            for kind in CALL_KINDS
        ],
    )
    clock.advance(timedelta(minutes=3))
    await SmsLedger(database, clock=clock).set_opted_out(CALLER, True, keyword="STOP", source=SuppressionSource.INBOUND)
    exported = (await export_person(database, CALLER, actor="test", clock=clock))["consents"]
    assert [(c["kind"], c["decision"], c["channel"], c["wording"]) for c in exported] == [
        ("recording", "granted", "voice-notice", NOTICE),
        ("transcription", "granted", "voice-notice", NOTICE),
        ("sms", "revoked", "sms-keyword", None),
    ]
    await erase_person(database, CALLER, actor="test", clock=clock)
    remaining = await ledger.for_person(CALLER)
    assert [(d.kind, d.decision) for d in remaining] == [(ConsentKind.SMS, Decision.REVOKED)]


async def test_an_answer_about_texts_given_when_booking_is_kept_with_its_words(
    service: BookingService, database: Database
) -> None:
    start = datetime(2026, 12, 1, 14, tzinfo=UTC)
    form = "Text me about this appointment"
    requests = [
        # (asked on the phone and agreed, declined on a web form with its label, not discussed)
        BookRequest(
            "checkup",
            start,
            CustomerDetails(CALLER, "Ann"),
            source="phone",
            actor="call:CA9",
            sms_consent=SmsConsent.GIVEN,
        ),
        BookRequest(
            "checkup",
            start + timedelta(hours=1),
            CustomerDetails(CALLER, "Ann"),
            sms_consent=SmsConsent.DECLINED,
            sms_consent_wording=form,
        ),
        BookRequest("checkup", start + timedelta(hours=2), CustomerDetails(CALLER, "Ann")),
    ]
    booked = [await service.book(request) for request in requests]
    assert all(isinstance(outcome, Booked) for outcome in booked)
    ids = [outcome.booking.id for outcome in booked if isinstance(outcome, Booked)]
    ledger = ConsentLedger(database)
    history = await ledger.for_person(CALLER)
    assert [(d.kind, d.decision, d.channel, d.call_sid, d.booking_id) for d in history] == [
        (ConsentKind.SMS, Decision.GRANTED, Channel.VOICE_SPEECH, "CA9", ids[0]),
        (ConsentKind.SMS, Decision.DECLINED, Channel.BOOKING, None, ids[1]),
    ], "an implied answer (not discussed) is the booking row's alone"
    words = await ledger.wordings([d.wording_version for d in history])
    assert [words[d.wording_version] for d in history] == [SMS_QUESTION, form]
