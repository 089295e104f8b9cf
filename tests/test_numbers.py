"""`voicebook numbers ...` through twilio's own client against the Twilio simulator on loopback (search,
buy, configure, verify, Messaging Service pools, compliance, release, assign), and the ledger's number
registry behind them."""

from __future__ import annotations

import dataclasses
import io
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from booking.business import Business
from booking.ledger.database import Database, downgrade, migrate
from booking.ledger.numbers_repository import (
    A2PStatus,
    Mismatch,
    NumberFacts,
    NumberRegistry,
    NumberType,
    TollFreeVerification,
    cleared_to_text,
)
from booking.ledger.repository import CustomerDetails
from booking.service import Booked, BookingService, BookRequest
from integrations.simulators.twilio import TwilioState, create_twilio_simulator
from integrations.simulators.twilio_numbers import Capabilities, NumbersState, OwnedNumber
from integrations.twilio_numbers import NumbersError, TwilioNumbers, a2p_registration, toll_free_verification
from tests.conftest import FrozenClock, serving
from voice_server import numbers_cli
from voice_server.cli import build_parser, main
from voice_server.settings import Settings
from voice_server.simulators_cli import SimulatorOptions, simulator_apps

ACCOUNT = "AC" + "7" * 32
TOKEN = "8" * 32
PUBLIC = "https://voice.example.com"

Sim = tuple[NumbersState, str]


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    """One Twilio simulator (calls and numbers) served by a real uvicorn: the SDK speaks HTTP to it."""
    numbers = NumbersState(ACCOUNT, TOKEN, seed=7)
    async with serving(create_twilio_simulator(TwilioState(ACCOUNT, TOKEN), numbers), lifespan="off") as url:
        yield numbers, url


@pytest.fixture
def settings(app_settings: Settings, sim: Sim) -> Settings:
    return dataclasses.replace(
        app_settings,
        twilio_account_sid=ACCOUNT,
        twilio_auth_token=TOKEN,
        twilio_api_base_url=sim[1],
        public_url=PUBLIC,
    )


@dataclasses.dataclass
class Ran:
    status: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


async def numbers(settings: Settings, *argv: str) -> Ran:
    """``voicebook numbers ARGV`` on the test's event loop (the simulator shares it)."""
    args = build_parser().parse_args(["numbers", *argv])
    out, err = io.StringIO(), io.StringIO()
    status = await numbers_cli.run(settings, args, out, err)
    return Ran(status, out.getvalue(), err.getvalue())


def client(url: str, token: str = TOKEN) -> TwilioNumbers:
    return TwilioNumbers(ACCOUNT, token, api_base_url=url)


# -- search --------------------------------------------------------------------------------------------


async def test_search_filters_by_area_code_type_and_capabilities(sim: Sim) -> None:
    state, url = sim
    twilio = client(url)
    in_212 = await twilio.search("US", NumberType.LOCAL, area_code="212", limit=50)
    assert in_212 and all(n.phone_number.startswith("+1212") for n in in_212)
    assert all(n.voice and n.sms and n.mms and n.country == "US" for n in in_212)
    assert len(in_212) < len(state.offered("US", "local")), "the area code filtered something out"

    toll_free = await twilio.search("US", NumberType.TOLL_FREE, limit=50)
    assert toll_free and all(n.sms and not n.mms for n in toll_free)
    assert await twilio.search("US", NumberType.TOLL_FREE, mms=True) == []

    gb_mobile = await twilio.search("GB", NumberType.MOBILE, sms=True, voice=True, limit=5)
    assert len(gb_mobile) == 5 and all(n.phone_number.startswith("+447") for n in gb_mobile)
    de_local = await twilio.search("DE", NumberType.LOCAL, limit=50)
    assert de_local and not any(n.sms for n in de_local)
    assert await twilio.search("DE", NumberType.LOCAL, sms=True) == []


async def test_search_matches_twilios_contains_pattern(sim: Sim) -> None:
    state, url = sim
    target = state.offered("AU", "mobile")[3].phone_number
    tail = target[-4:]
    found = await client(url).search("AU", NumberType.MOBILE, contains=tail, limit=50)
    assert target in [n.phone_number for n in found] and all(tail in n.phone_number for n in found)
    wildcard = f"{tail[0]}*{tail[2:]}$"  # one digit free, anchored at the end
    found = await client(url).search("AU", NumberType.MOBILE, contains=wildcard, limit=50)
    assert target in [n.phone_number for n in found]
    assert all(re.search(tail[0] + r"\d" + tail[2:] + "$", n.phone_number) for n in found)
    with pytest.raises(NumbersError) as bad:
        await client(url).search("AU", NumberType.MOBILE, contains="5")  # Twilio wants 2 to 16 characters
    assert bad.value.status == 400 and bad.value.permanent


async def test_search_from_the_command_line(settings: Settings) -> None:
    ran = await numbers(settings, "search", "--country", "gb", "--type", "mobile", "--sms", "--limit", "3")
    assert ran.status == 0 and len(ran.lines) == 3
    assert all(line.startswith("+447") and " GB " in line and "voice,sms" in line for line in ran.lines)
    # Twilio sells no US mobile numbers: its 404 is reported, with its code.
    refused = await numbers(settings, "search", "--type", "mobile")
    assert refused.status == 1 and "20404" in refused.err


async def test_a_wrong_auth_token_is_a_permanent_refusal(sim: Sim) -> None:
    with pytest.raises(NumbersError) as refused:
        await client(sim[1], token="0" * 32).search("US", NumberType.LOCAL)
    assert refused.value.status == 401 and refused.value.code == 20003 and refused.value.permanent


# -- buy -----------------------------------------------------------------------------------------------


async def test_buy_records_the_number_in_the_registry(settings: Settings, sim: Sim, database: Database) -> None:
    state, _ = sim
    number = state.offered("US", "local")[0].phone_number
    ran = await numbers(settings, "buy", number, "--serves", "dr-lee")
    assert ran.status == 0 and f"bought {number}" in ran.out
    owned = state.owned(number)
    assert owned is not None and number not in [n.phone_number for n in state.offered("US", "local")]
    registered = await NumberRegistry(database).get(number)
    assert registered is not None
    assert (registered.sid, registered.country, registered.type) == (owned.sid, "US", NumberType.LOCAL)
    assert (registered.voice, registered.sms, registered.mms) == (True, True, True)
    assert registered.a2p_status is A2PStatus.UNREGISTERED  # a texting US local number needs 10DLC
    assert registered.toll_free_verification is TollFreeVerification.NOT_REQUIRED
    assert await NumberRegistry(database).serves(number) == ("dr-lee",)


async def test_buying_a_number_not_on_offer_is_refused(settings: Settings, sim: Sim, database: Database) -> None:
    state, _ = sim
    offered = {n.phone_number for n in state.offered("US", "local")}
    assert "+12125550143" not in offered
    ran = await numbers(settings, "buy", "(212) 555-0143")
    assert ran.status == 1 and "21422" in ran.err
    assert state.numbers == {} and await NumberRegistry(database).list() == []
    number = sorted(offered)[0]
    assert (await numbers(settings, "buy", number)).status == 0
    again = await numbers(settings, "buy", number)  # sold: no longer on offer
    assert again.status == 1 and "21422" in again.err and len(state.numbers) == 1


# -- configure -----------------------------------------------------------------------------------------


async def test_configure_points_the_webhooks_and_a_second_run_changes_nothing(
    settings: Settings, sim: Sim, database: Database
) -> None:
    state, _ = sim
    number = state.offered("US", "local")[1].phone_number
    assert (await numbers(settings, "buy", number)).status == 0
    owned = state.owned(number)
    assert owned is not None and owned.voice_url == ""
    first = await numbers(settings, "configure", number)
    assert first.status == 0 and "nothing to change" not in first.out
    assert (owned.voice_url, owned.voice_method) == (f"{PUBLIC}/twilio/voice", "POST")
    assert (owned.status_callback, owned.status_callback_method) == (f"{PUBLIC}/twilio/call-status", "POST")
    assert (owned.sms_url, owned.sms_method) == (f"{PUBLIC}/twilio/sms", "POST")
    assert len(state.updates_of(owned.sid)) == 1, "every change in one update"

    second = await numbers(settings, "configure", number)
    assert second.status == 0 and second.lines == [f"{number}: nothing to change"]
    assert len(state.updates_of(owned.sid)) == 1, "the second run sent no update"

    owned.sms_url = "https://old-host.example/sms"  # someone edited it in the console
    third = await numbers(settings, "configure", number)
    assert third.lines == [f"{number}: sms_url -> {PUBLIC}/twilio/sms"]
    assert state.updates_of(owned.sid)[-1].form == {"SmsUrl": f"{PUBLIC}/twilio/sms"}, "only what differed"


async def test_configure_registers_a_number_already_on_the_account(
    settings: Settings, sim: Sim, database: Database
) -> None:
    state, _ = sim
    number = state.offered("CA", "toll-free")[0].phone_number
    assert state.buy(number) is not None  # bought in Twilio's console, unknown to voicebook
    assert (await numbers(settings, "configure", number)).status == 0
    registered = await NumberRegistry(database).get(number)
    assert registered is not None and registered.type is NumberType.TOLL_FREE
    assert registered.toll_free_verification is TollFreeVerification.UNVERIFIED
    missing = await numbers(settings, "configure", state.offered("CA", "local")[0].phone_number)
    assert missing.status == 1 and "not on this Twilio account" in missing.out


async def test_configure_needs_a_public_url(settings: Settings, sim: Sim) -> None:
    number = sim[0].offered("US", "local")[0].phone_number
    ran = await numbers(dataclasses.replace(settings, public_url=None), "configure", number)
    assert ran.status == 2 and "VOICEBOOK_PUBLIC_URL" in ran.err


# -- Messaging Service ---------------------------------------------------------------------------------


async def test_configure_attaches_the_number_to_a_messaging_service(
    settings: Settings, sim: Sim, database: Database
) -> None:
    state, _ = sim
    service = state.add_messaging_service()
    number = state.offered("US", "local")[2].phone_number
    assert (await numbers(settings, "buy", number)).status == 0
    owned = state.owned(number)
    assert owned is not None
    ran = await numbers(settings, "configure", number, "--messaging-service", service)
    assert ran.status == 0 and f"{number}: added to Messaging Service {service}" in ran.lines
    assert owned.sid in state.services[service]
    assert owned.sms_url == "" and owned.voice_url == f"{PUBLIC}/twilio/voice", "texts go to the service"
    registered = await NumberRegistry(database).get(number)
    assert registered is not None and registered.messaging_service_sid == service

    # The registry remembers the service: configure without the flag finds nothing to change.
    again = await numbers(settings, "configure", number)
    assert again.lines == [f"{number}: nothing to change"]
    assert (await numbers(settings, "verify", number)).status == 0

    del state.services[service][owned.sid]  # removed from the pool in the console
    ran = await numbers(settings, "verify", number)
    assert ran.status == 1 and f"{number}: the number is not in Messaging Service {service}" in ran.out

    unknown = await numbers(settings, "configure", number, "--messaging-service", "MG" + "0" * 32)
    assert unknown.status == 1 and "20404" in unknown.err
    malformed = await numbers(settings, "configure", number, "--messaging-service", "MG123")
    assert malformed.status == 2 and "Messaging Service SID" in malformed.err


# -- verify --------------------------------------------------------------------------------------------


async def test_verify_is_clean_then_catches_a_mispointed_webhook(
    settings: Settings, sim: Sim, database: Database
) -> None:
    state, _ = sim
    number = state.offered("US", "local")[3].phone_number
    assert (await numbers(settings, "buy", number)).status == 0
    assert (await numbers(settings, "configure", number)).status == 0
    clean = await numbers(settings, "verify")  # every registered number
    assert clean.status == 0 and clean.lines == [f"{number}: ok"]
    registry = NumberRegistry(database)
    checked = await registry.get(number)
    assert checked is not None and checked.last_verification == () and checked.last_verified_at is not None

    owned = state.owned(number)
    assert owned is not None
    owned.voice_url = "https://attacker.example/voice"
    owned.status_callback = ""
    owned.sms_method = "GET"
    ran = await numbers(settings, "verify", number)
    assert ran.status == 1
    assert (
        f"{number}: the voice URL points elsewhere (expected {PUBLIC}/twilio/voice, "
        "found https://attacker.example/voice)" in ran.lines
    )
    assert f"{number}: no call status callback is set" in ran.lines
    assert f"{number}: the SMS URL method is GET, not POST (expected POST, found GET)" in ran.lines
    stored = await registry.get(number)
    assert stored is not None and stored.last_verification is not None
    assert [m.what for m in stored.last_verification] == ["voice_url", "status_callback", "sms_method"]
    assert len(state.updates_of(owned.sid)) == 1, "verify only reads"


async def test_verify_reports_missing_capabilities_and_numbers_gone_from_the_account(
    settings: Settings, sim: Sim
) -> None:
    state, _ = sim
    number = state.offered("DE", "local")[0].phone_number  # German landlines take no texts
    assert (await numbers(settings, "buy", number)).status == 0
    configured = await numbers(settings, "configure", number)
    assert f"{number}: cannot receive texts, so no SMS URL or Messaging Service was set" in configured.lines
    ran = await numbers(settings, "verify", number)
    assert ran.status == 1 and ran.lines == [f"{number}: the number cannot receive texts (expected true, found false)"]
    assert (await numbers(settings, "verify", number, "--voice-only")).status == 0

    owned = state.owned(number)
    assert owned is not None
    del state.numbers[owned.sid]  # released in the console
    gone = await numbers(settings, "verify", number)
    assert gone.status == 1 and gone.lines == [f"{number}: the number is not on this Twilio account"]
    stranger = await numbers(settings, "verify", state.offered("US", "local")[0].phone_number)
    assert stranger.status == 1 and "not in voicebook's registry" in stranger.out


# -- list ----------------------------------------------------------------------------------------------


async def test_list_shows_the_registry_with_when_each_number_was_verified(settings: Settings, sim: Sim) -> None:
    state, _ = sim
    assert (await numbers(settings, "list")).lines == ["no numbers registered"]
    first, second = (n.phone_number for n in state.offered("GB", "mobile")[:2])
    for number in (first, second):
        assert (await numbers(settings, "buy", number)).status == 0
        assert (await numbers(settings, "configure", number, "--serves", "dr-patel")).status == 0
    assert (await numbers(settings, "verify", first)).status == 0
    ran = await numbers(settings, "list")
    assert ran.status == 0 and len(ran.lines) == 2
    rows = dict(zip(sorted((first, second)), ran.lines, strict=True))
    assert rows[first].split()[:4] == [first, "GB", "mobile", "voice,sms"]
    assert "serves=dr-patel" in rows[first] and "a2p=not_required" in rows[first]
    assert re.search(r"verified \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00 ok$", rows[first])
    assert rows[second].endswith("never verified")


# -- input and configuration ---------------------------------------------------------------------------


def test_invalid_numbers_and_missing_credentials_are_refused(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VOICEBOOK_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DATABASE_URL", database_url)
    for name in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_API_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    assert main(["numbers", "buy", "not a number"]) == 2
    assert "not a phone number" in capsys.readouterr().err
    assert main(["numbers", "verify"]) == 2
    assert "set TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN" in capsys.readouterr().err
    # What only reads or writes the registry needs no Twilio account.
    assert main(["numbers", "list"]) == 0
    assert "no numbers registered" in capsys.readouterr().out
    assert main(["numbers", "compliance"]) == 1
    assert "no numbers registered" in capsys.readouterr().out
    assert main(["numbers", "assign", "+12125550111", "dr-lee"]) == 1
    assert "not in voicebook's registry" in capsys.readouterr().out
    assert main(["numbers", "compliance", "--refresh"]) == 2
    assert "set TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", ACCOUNT)
    assert main(["numbers", "search"]) == 2
    assert "set TWILIO_AUTH_TOKEN " in capsys.readouterr().err


# -- the registry --------------------------------------------------------------------------------------


async def test_the_registry_keeps_what_twilio_does_not_know(database: Database, clock: FrozenClock) -> None:
    registry = NumberRegistry(database, clock=clock)
    facts = NumberFacts("+18885550100", "PN" + "1" * 32, "US", NumberType.TOLL_FREE, voice=True, sms=True, mms=False)
    created = await registry.upsert(facts)
    assert created.created_at == clock.now and created.resources == () and created.last_verification is None
    assert created.toll_free_verification is TollFreeVerification.UNVERIFIED
    assert created.a2p_status is A2PStatus.NOT_REQUIRED
    assert await registry.assign(facts.number, ["dr-lee", "dr-patel", "dr-lee"])
    assert await registry.set_compliance(facts.number, toll_free_verification=TollFreeVerification.APPROVED)
    assert await registry.set_messaging_service(facts.number, "MG" + "2" * 32)
    problem = Mismatch("voice_url", "the voice URL points elsewhere", "https://a.example", "https://b.example")
    assert await registry.mark_verified(facts.number, [problem])

    # Twilio's facts change (a new friendly name, MMS enabled); what voicebook decided stays.
    refreshed = await registry.upsert(dataclasses.replace(facts, mms=True, friendly_name="Front desk"))
    assert (refreshed.mms, refreshed.friendly_name) == (True, "Front desk")
    assert refreshed.resources == ("dr-lee", "dr-patel")
    assert refreshed.toll_free_verification is TollFreeVerification.APPROVED
    assert refreshed.messaging_service_sid == "MG" + "2" * 32
    assert refreshed.last_verification == (problem,) and refreshed.last_verified_at == clock.now
    assert refreshed.created_at == created.created_at

    assert await registry.serves(facts.number) == ("dr-lee", "dr-patel")
    assert await registry.serves("+12125550100") is None, "not our number"
    assert not await registry.assign("+12125550100", ["dr-lee"])
    assert not await registry.mark_verified("+12125550100", [])
    assert [n.number for n in await registry.list()] == [facts.number]
    assert await registry.remove(facts.number) and await registry.get(facts.number) is None
    assert not await registry.remove(facts.number), "already gone"


async def test_the_registry_migration_downgrades_and_upgrades_again(tmp_path: Path) -> None:
    database = Database.connect(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        await migrate(database)

        def tables(conn: Connection) -> set[str]:
            return set(inspect(conn).get_table_names())

        assert "phone_numbers" in await database.write(tables)
        await downgrade(database, "0015")
        assert "phone_numbers" not in await database.write(tables)
        await migrate(database)
        registry = NumberRegistry(database)
        facts = NumberFacts("+12125550123", "PN" + "3" * 32, "US", NumberType.LOCAL, voice=True, sms=False, mms=False)
        assert (await registry.upsert(facts)).a2p_status is A2PStatus.NOT_REQUIRED, "a number that cannot text"
    finally:
        await database.dispose()


# -- `voicebook simulators` ----------------------------------------------------------------------------


async def test_voicebook_simulators_serve_the_number_apis(business: Business) -> None:
    options = SimulatorOptions()
    twilio_app = simulator_apps(options, business, TOKEN)[options.twilio_port]
    transport = httpx.ASGITransport(app=twilio_app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://twilio.test", auth=(options.twilio_account_sid, TOKEN)
    ) as http:
        offers = await http.get(
            f"/2010-04-01/Accounts/{options.twilio_account_sid}/AvailablePhoneNumbers/US/Local.json"
        )
        pool = await http.get(f"/v1/Services/{options.twilio_messaging_service_sid}/PhoneNumbers")
    assert offers.status_code == 200 and offers.json()["available_phone_numbers"]
    assert pool.status_code == 200 and pool.json()["phone_numbers"] == []


# -- compliance ----------------------------------------------------------------------------------------


def test_twilios_review_statuses_read_as_the_registrys() -> None:
    assert toll_free_verification([]) is TollFreeVerification.UNVERIFIED
    assert toll_free_verification(["PENDING_REVIEW"]) is TollFreeVerification.PENDING
    assert toll_free_verification(["IN_REVIEW"]) is TollFreeVerification.PENDING
    assert toll_free_verification(["TWILIO_APPROVED"]) is TollFreeVerification.APPROVED
    assert toll_free_verification(["TWILIO_REJECTED"]) is TollFreeVerification.REJECTED
    assert toll_free_verification(["TWILIO_REJECTED", "IN_REVIEW"]) is TollFreeVerification.PENDING, "resubmitted"
    assert toll_free_verification(["TWILIO_REJECTED", "twilio_approved"]) is TollFreeVerification.APPROVED
    assert toll_free_verification(["ON_HOLD"]) is TollFreeVerification.PENDING, "a status Twilio adds later"
    assert a2p_registration([]) is A2PStatus.UNREGISTERED
    assert a2p_registration(["PENDING"]) is a2p_registration(["IN_PROGRESS"]) is A2PStatus.PENDING
    assert a2p_registration(["VERIFIED"]) is A2PStatus.APPROVED
    assert a2p_registration(["FAILED"]) is A2PStatus.FAILED
    assert a2p_registration(["FAILED", "VERIFIED"]) is A2PStatus.APPROVED
    assert a2p_registration(["SUSPENDED"]) is A2PStatus.PENDING
    assert cleared_to_text(A2PStatus.APPROVED, TollFreeVerification.NOT_REQUIRED)
    assert cleared_to_text(A2PStatus.NOT_REQUIRED, TollFreeVerification.APPROVED)
    assert cleared_to_text(A2PStatus.NOT_REQUIRED, TollFreeVerification.NOT_REQUIRED)
    for a2p in (A2PStatus.UNREGISTERED, A2PStatus.PENDING, A2PStatus.FAILED):
        assert not cleared_to_text(a2p, TollFreeVerification.NOT_REQUIRED)
    for verification in (TollFreeVerification.UNVERIFIED, TollFreeVerification.PENDING, TollFreeVerification.REJECTED):
        assert not cleared_to_text(A2PStatus.NOT_REQUIRED, verification)


async def test_compliance_refresh_reads_a_toll_free_verification(
    settings: Settings, sim: Sim, database: Database
) -> None:
    state, _ = sim
    number = state.offered("US", "toll-free")[0].phone_number
    assert (await numbers(settings, "buy", number)).status == 0
    registry = NumberRegistry(database)

    async def refresh() -> tuple[Ran, TollFreeVerification]:
        ran = await numbers(settings, "compliance", "--refresh", number)
        known = await registry.get(number)
        assert known is not None and known.a2p_status is A2PStatus.NOT_REQUIRED
        return ran, known.toll_free_verification

    ran, recorded = await refresh()
    assert ran.status == 1 and recorded is TollFreeVerification.UNVERIFIED
    assert ran.lines == [
        f"{number}: a2p=not_required toll_free=unverified  not cleared to text (no toll-free verification submitted)"
    ]
    state.set_toll_free_verification(number, "PENDING_REVIEW")
    ran, recorded = await refresh()
    assert ran.status == 1 and recorded is TollFreeVerification.PENDING
    state.set_toll_free_verification(number, "TWILIO_REJECTED", "Opt-in flow unclear")
    ran, recorded = await refresh()
    assert ran.status == 1 and recorded is TollFreeVerification.REJECTED
    assert ran.lines == [
        f"{number}: a2p=not_required toll_free=rejected  not cleared to text (rejected: Opt-in flow unclear)"
    ]
    state.set_toll_free_verification(number, "TWILIO_APPROVED")
    ran, recorded = await refresh()
    assert ran.status == 0 and recorded is TollFreeVerification.APPROVED
    assert ran.lines == [f"{number}: a2p=not_required toll_free=approved  cleared to text"]
    assert any(r.path == "/v1/Tollfree/Verifications" for r in state.requests), "read from Twilio"


async def test_compliance_refresh_reads_the_a2p_campaign_of_the_numbers_messaging_service(
    settings: Settings, sim: Sim, database: Database
) -> None:
    state, _ = sim
    number = state.offered("US", "local")[4].phone_number
    assert (await numbers(settings, "buy", number)).status == 0
    registry = NumberRegistry(database)

    async def refresh() -> tuple[Ran, A2PStatus]:
        ran = await numbers(settings, "compliance", "--refresh")  # every registered number: this one
        known = await registry.get(number)
        assert known is not None and known.toll_free_verification is TollFreeVerification.NOT_REQUIRED
        assert len(ran.lines) == 1 and ran.lines[0].startswith(f"{number}: a2p={known.a2p_status.value} ")
        return ran, known.a2p_status

    ran, recorded = await refresh()
    assert ran.status == 1 and recorded is A2PStatus.UNREGISTERED
    assert "(in no Messaging Service, and A2P 10DLC campaigns attach to one)" in ran.out

    service = state.add_messaging_service()
    assert (await numbers(settings, "configure", number, "--messaging-service", service)).status == 0
    ran, recorded = await refresh()
    assert ran.status == 1 and recorded is A2PStatus.UNREGISTERED
    assert f"(Messaging Service {service} has no A2P campaign)" in ran.out

    campaign = state.add_campaign(service, "IN_PROGRESS")
    ran, recorded = await refresh()
    assert ran.status == 1 and recorded is A2PStatus.PENDING and ran.out.rstrip().endswith("not cleared to text")
    state.campaigns[campaign].status = "FAILED"
    ran, recorded = await refresh()
    assert ran.status == 1 and recorded is A2PStatus.FAILED
    state.campaigns[campaign].status = "VERIFIED"
    ran, recorded = await refresh()
    assert ran.status == 0 and recorded is A2PStatus.APPROVED and ran.out.rstrip().endswith("cleared to text")

    owned = state.owned(number)
    assert owned is not None
    del state.services[service][owned.sid]  # taken out of the pool in the console: the campaign no longer covers it
    ran, recorded = await refresh()
    assert ran.status == 1 and recorded is A2PStatus.UNREGISTERED
    assert f"(not in Messaging Service {service}, whose campaign would cover it)" in ran.out
    del state.numbers[owned.sid]
    gone = await numbers(settings, "compliance", "--refresh", number)
    assert gone.status == 1 and gone.lines == [f"{number}: the number is not on this Twilio account"]


async def test_compliance_records_and_shows_the_statuses(settings: Settings, sim: Sim, database: Database) -> None:
    state, _ = sim
    texting = state.offered("US", "local")[5].phone_number
    landline = state.offered("DE", "local")[1].phone_number  # takes no texts: needs neither registration
    for number in (texting, landline):
        assert (await numbers(settings, "buy", number)).status == 0
    registry = NumberRegistry(database)

    shown = await numbers(settings, "compliance")  # nothing recorded yet: the starting statuses
    assert shown.status == 1
    assert set(shown.lines) == {
        f"{texting}: a2p=unregistered toll_free=not_required  not cleared to text",
        f"{landline}: a2p=not_required toll_free=not_required  does not text",
    }
    recorded = await numbers(settings, "compliance", texting, "--a2p", "approved")
    assert recorded.status == 0 and recorded.lines == [
        f"{texting}: a2p=approved toll_free=not_required  cleared to text"
    ]
    known = await registry.get(texting)
    assert known is not None and known.a2p_status is A2PStatus.APPROVED
    assert (await numbers(settings, "compliance")).status == 0, "every texting number cleared"
    listed = {line.split()[0]: line for line in (await numbers(settings, "list")).lines}
    assert "a2p=approved  toll_free=not_required" in listed[texting]

    pending = await numbers(settings, "compliance", texting, "--a2p", "pending")
    assert pending.status == 0, "recording succeeded"
    assert (await numbers(settings, "compliance", texting)).status == 1

    # A number that needs neither stays not_required when read from Twilio, whatever was recorded.
    assert (await numbers(settings, "compliance", landline, "--a2p", "failed")).status == 0
    refreshed = await numbers(settings, "compliance", "--refresh", landline)
    assert refreshed.status == 0
    assert refreshed.lines == [f"{landline}: a2p=not_required toll_free=not_required  does not text"]
    known = await registry.get(landline)
    assert known is not None and known.a2p_status is A2PStatus.NOT_REQUIRED

    both = await numbers(settings, "compliance", texting, "--refresh", "--a2p", "approved")
    assert both.status == 2 and "not both" in both.err
    nameless = await numbers(settings, "compliance", "--toll-free", "approved")
    assert nameless.status == 2 and "name the number" in nameless.err
    stranger = state.offered("US", "local")[6].phone_number
    unknown = await numbers(settings, "compliance", stranger, "--a2p", "approved")
    assert unknown.status == 1 and "not in voicebook's registry" in unknown.out


# -- release -------------------------------------------------------------------------------------------


async def test_release_says_what_it_would_do_then_does_it_with_yes(
    settings: Settings, sim: Sim, database: Database
) -> None:
    state, _ = sim
    number = state.offered("US", "local")[7].phone_number
    assert (await numbers(settings, "buy", number)).status == 0
    owned = state.owned(number)
    assert owned is not None
    registry = NumberRegistry(database)

    dry = await numbers(settings, "release", number)
    assert dry.status == 2
    assert dry.lines[0].startswith(f"would release {number} ({owned.sid}) at Twilio")
    assert dry.lines[1:] == [
        f"would remove {number} from voicebook's registry",
        "nothing done: run again with --yes to do it",
    ]
    assert state.owned(number) is not None and await registry.get(number) is not None
    assert not [r for r in state.requests if r.method == "DELETE"]

    done = await numbers(settings, "release", number, "--yes")
    assert done.status == 0
    assert done.lines == [f"released {number} ({owned.sid}) at Twilio", f"removed {number} from voicebook's registry"]
    assert state.owned(number) is None and await registry.get(number) is None
    assert [r.path for r in state.requests if r.method == "DELETE"] == [
        f"/2010-04-01/Accounts/{ACCOUNT}/IncomingPhoneNumbers/{owned.sid}.json"
    ]
    again = await numbers(settings, "release", number, "--yes")
    assert again.status == 1 and "not on this Twilio account and not in voicebook's registry" in again.out


async def test_release_says_how_many_upcoming_bookings_were_made_on_the_number(
    settings: Settings, sim: Sim, service: BookingService, business: Business, clock: FrozenClock
) -> None:
    """Bookings made on a line text from it; once it is released their texts fall back to the configured
    sender, and release says so before and when it does it."""
    state, _ = sim
    number = state.offered("US", "local")[8].phone_number
    assert (await numbers(settings, "buy", number)).status == 0
    for hour, line in ((9, number), (10, number), (11, None)):
        start = datetime(2026, 12, 1, hour, tzinfo=business.tz)
        made = await service.book(
            BookRequest("checkup", start, CustomerDetails(phone=f"+1646555010{hour % 10}", name="A"), line_number=line)
        )
        assert isinstance(made, Booked)
    later = datetime(2026, 12, 1, 9, 30, tzinfo=business.tz)  # the 9:00 check-up (30 minutes) is over
    args = build_parser().parse_args(["numbers", "release", number])
    out = io.StringIO()
    assert await numbers_cli.run(settings, args, out, io.StringIO(), clock=clock) == 2
    assert out.getvalue().splitlines()[0] == (
        f"2 upcoming bookings were made on {number}: their texts will come from the configured sender "
        "(TWILIO_SMS_FROM or TWILIO_MESSAGING_SERVICE_SID) once it is released"
    )
    out = io.StringIO()
    assert await numbers_cli.run(settings, args, out, io.StringIO(), clock=lambda: later.astimezone(UTC)) == 2
    assert out.getvalue().startswith(f"1 upcoming booking was made on {number}: its texts")


async def test_release_of_a_number_gone_from_the_account_forgets_it(
    settings: Settings, sim: Sim, database: Database
) -> None:
    state, _ = sim
    number = state.offered("GB", "mobile")[2].phone_number
    assert (await numbers(settings, "buy", number)).status == 0
    owned = state.owned(number)
    assert owned is not None
    del state.numbers[owned.sid]  # released in the console
    ran = await numbers(settings, "release", number, "--yes")
    assert ran.status == 0
    assert ran.lines == [f"{number} is not on this Twilio account", f"removed {number} from voicebook's registry"]
    assert await NumberRegistry(database).list() == []
    assert not [r for r in state.requests if r.method == "DELETE"]


async def test_release_refuses_the_business_phone_without_force(settings: Settings, sim: Sim) -> None:
    state, _ = sim
    phone = "+12125550100"  # the example business's own phone
    owned = OwnedNumber("PN" + "4" * 32, phone, "US", "local", Capabilities(voice=True, sms=True, mms=True), "front")
    state.numbers[owned.sid] = owned
    refused = await numbers(settings, "release", "(212) 555-0100", "--yes")
    assert refused.status == 2 and "+12125550100 is the business's own phone" in refused.err
    assert "--force" in refused.err and state.owned(phone) is not None
    forced = await numbers(settings, "release", phone, "--yes", "--force")
    assert forced.status == 0 and forced.lines == [f"released {phone} ({owned.sid}) at Twilio"]
    assert state.owned(phone) is None


# -- assign --------------------------------------------------------------------------------------------


async def test_assign_sets_what_a_number_books_and_refuses_unknown_resources(
    settings: Settings, sim: Sim, database: Database
) -> None:
    state, _ = sim
    number = state.offered("US", "local")[8].phone_number
    assert (await numbers(settings, "buy", number)).status == 0
    registry = NumberRegistry(database)

    ran = await numbers(settings, "assign", number, "nurse-kim", "dr-lee")
    assert ran.status == 0 and ran.lines == [f"{number} serves dr-lee, nurse-kim"]
    assert await registry.serves(number) == ("dr-lee", "nurse-kim")

    unknown = await numbers(settings, "assign", number, "dr-lee", "dr-nobody", "room-9")
    assert unknown.status == 2
    assert (
        "unknown resources dr-nobody, room-9; the business's resources are dr-lee, dr-patel, nurse-kim" in unknown.err
    )
    assert await registry.serves(number) == ("dr-lee", "nurse-kim"), "nothing changed"

    whole = await numbers(settings, "assign", number)
    assert whole.status == 0 and whole.lines == [f"{number} serves the whole business"]
    assert await registry.serves(number) == ()
    stranger = await numbers(settings, "assign", state.offered("US", "local")[9].phone_number, "dr-lee")
    assert stranger.status == 1 and "not in voicebook's registry" in stranger.out


async def test_buy_and_configure_refuse_unknown_resources_before_asking_twilio(settings: Settings, sim: Sim) -> None:
    state, _ = sim
    number = state.offered("US", "local")[10].phone_number
    bought = await numbers(settings, "buy", number, "--serves", "dr-lee", "--serves", "dr-leee")
    assert bought.status == 2 and "unknown resource dr-leee;" in bought.err
    assert state.numbers == {} and state.requests == [], "nothing bought, nothing sent"
    assert (await numbers(settings, "buy", number)).status == 0
    sent = len(state.requests)
    configured = await numbers(settings, "configure", number, "--serves", "front-desk")
    assert configured.status == 2 and "unknown resource front-desk;" in configured.err
    assert len(state.requests) == sent


async def test_voicebook_simulators_serve_the_compliance_apis(business: Business) -> None:
    options = SimulatorOptions()
    twilio_app = simulator_apps(options, business, TOKEN)[options.twilio_port]
    transport = httpx.ASGITransport(app=twilio_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://twilio.test") as http:
        auth = (options.twilio_account_sid, TOKEN)
        verifications = await http.get("/v1/Tollfree/Verifications", auth=auth)
        campaigns = await http.get(f"/v1/Services/{options.twilio_messaging_service_sid}/Compliance/Usa2p", auth=auth)
        unknown = await http.get(f"/v1/Services/MG{'0' * 32}/Compliance/Usa2p", auth=auth)
        stranger = await http.get("/v1/Tollfree/Verifications", auth=(options.twilio_account_sid, "0" * 32))
    assert verifications.status_code == 200 and verifications.json()["verifications"] == []
    assert campaigns.status_code == 200 and campaigns.json()["compliance"] == []
    assert unknown.status_code == 404 and stranger.status_code == 401
