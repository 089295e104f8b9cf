"""`voicebook numbers ...` through twilio's own client against the Twilio simulator on loopback (search,
buy, configure, verify, Messaging Service pools), and the ledger's number registry behind them."""

from __future__ import annotations

import dataclasses
import io
import re
from collections.abc import AsyncIterator
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
)
from integrations.simulators.twilio import TwilioState, create_twilio_simulator
from integrations.simulators.twilio_numbers import NumbersState
from integrations.twilio_numbers import NumbersError, TwilioNumbers
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
    assert main(["numbers", "list"]) == 2
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
