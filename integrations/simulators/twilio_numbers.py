"""Twilio's phone-number APIs on loopback: searching the numbers on offer (AvailablePhoneNumbers), buying,
reading, configuring and releasing them (IncomingPhoneNumbers), a Messaging Service's sender pool
(``/v1/Services/{MG...}/PhoneNumbers``) and its US A2P campaigns (``/v1/Services/{MG...}/Compliance/Usa2p``),
and toll-free verifications (``/v1/Tollfree/Verifications``). Twilio serves the ``/v1`` APIs on
messaging.twilio.com; here they are on the same host, so one base URL points twilio's client at all.
Strict where Twilio is: Basic auth, the account in the path, only numbers on offer can be bought (21422),
unknown numbers and services are 404 (20404), webhook URLs must be absolute http(s) URLs (11100), methods
GET or POST.

The inventory is generated per country and type from ``seed``, so a test searches the same numbers every
run; each number is one ``phonenumbers`` deems valid and of that type. Capabilities follow what Twilio
sells (US local: voice, SMS, MMS; US toll-free: no MMS; GB and DE landlines: voice only; GB and DE
mobiles: voice and SMS). As Twilio does, the search answer spells its capabilities ``SMS``/``MMS`` and
the owned number's ``sms``/``mms``.

``state.requests`` records every request (method, path, form), so a test can prove an idempotent
command sent no update. Reviews happen in Twilio's back office, so a test seeds them:
``state.set_toll_free_verification(number, "TWILIO_APPROVED")``, ``state.add_campaign(service, "VERIFIED")``.
Mount it with :func:`add_number_routes` on the Calls simulator.
"""

from __future__ import annotations

import random
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlsplit

import phonenumbers
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from integrations.simulators.twilio import API, TwilioState, _authorised, _error

NUMBERS_PATH = API + "/Accounts/{account}/IncomingPhoneNumbers.json"
NUMBER_PATH = API + "/Accounts/{account}/IncomingPhoneNumbers/{sid}.json"
AVAILABLE_PATH = API + "/Accounts/{account}/AvailablePhoneNumbers/{country}/{kind}.json"
SERVICE_NUMBERS_PATH = "/v1/Services/{service}/PhoneNumbers"
SERVICE_NUMBER_PATH = "/v1/Services/{service}/PhoneNumbers/{sid}"
CAMPAIGNS_PATH = "/v1/Services/{service}/Compliance/Usa2p"
TOLL_FREE_VERIFICATIONS_PATH = "/v1/Tollfree/Verifications"

NOT_AVAILABLE = 21422  # "PhoneNumber requested is not available"
INVALID_NUMBER = 21421  # "PhoneNumber is invalid"
INVALID_URL = 11100  # "Invalid URL format"
# Twilio's refusals as the simulator gives them. 21712 is documented (twilio.com/docs/api/errors/21712:
# "associated with another Messaging Service"). For a number already in the same service and for a
# malformed parameter the code is the simulator's own choice: Twilio's dictionary names no error code for
# the first (only warning 80104, "Phone Number Already In Service"), and answers the second with codes
# that vary by resource. Nothing in voicebook branches on either code: configure checks membership
# before it adds a number, and every refusal is reported with Twilio's code and message as they came.
ALREADY_IN_SERVICE = 21710
IN_ANOTHER_SERVICE = 21712
INVALID_PARAMETER = 20001

KINDS = {"Local": "local", "Mobile": "mobile", "TollFree": "toll-free"}
"""The path segment of each number type this simulator offers, and its name in voicebook."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    voice: bool
    sms: bool
    mms: bool


@dataclass(frozen=True, slots=True)
class _Offer:
    """What a country sells of one type: number prefixes (E.164 without national digits), their
    locality and region, the digits after the country code, and the capabilities."""

    prefixes: tuple[tuple[str, str, str], ...]
    national_digits: tuple[int, ...]
    capabilities: Capabilities


_ALL = Capabilities(voice=True, sms=True, mms=True)
_VOICE_SMS = Capabilities(voice=True, sms=True, mms=False)
_VOICE = Capabilities(voice=True, sms=False, mms=False)

_CATALOGUE: dict[str, dict[str, _Offer]] = {
    "US": {
        "local": _Offer(
            (
                ("+1212", "New York", "NY"),
                ("+1646", "New York", "NY"),
                ("+1415", "San Francisco", "CA"),
                ("+1312", "Chicago", "IL"),
                ("+1617", "Boston", "MA"),
            ),
            (10,),
            _ALL,
        ),
        "toll-free": _Offer(
            (("+1833", "", ""), ("+1844", "", ""), ("+1855", "", ""), ("+1888", "", "")), (10,), _VOICE_SMS
        ),
    },
    "CA": {
        "local": _Offer(
            (("+1416", "Toronto", "ON"), ("+1604", "Vancouver", "BC"), ("+1514", "Montreal", "QC")), (10,), _ALL
        ),
        "toll-free": _Offer((("+1866", "", ""), ("+1877", "", "")), (10,), _VOICE_SMS),
    },
    "GB": {
        "local": _Offer(
            (("+4420", "London", ""), ("+44161", "Manchester", ""), ("+44131", "Edinburgh", "")), (10,), _VOICE
        ),
        "mobile": _Offer((("+4474", "", ""), ("+4477", "", ""), ("+4478", "", "")), (10,), _VOICE_SMS),
        "toll-free": _Offer((("+44800", "", ""), ("+44808", "", "")), (10,), _VOICE),
    },
    "DE": {
        "local": _Offer((("+4930", "Berlin", ""), ("+4989", "Munich", ""), ("+4940", "Hamburg", "")), (10, 11), _VOICE),
        "mobile": _Offer((("+49151", "", ""), ("+49157", "", ""), ("+49176", "", "")), (11,), _VOICE_SMS),
        "toll-free": _Offer((("+49800", "", ""),), (10, 11), _VOICE),
    },
    "AU": {
        "local": _Offer(
            (("+612", "Sydney", "NSW"), ("+613", "Melbourne", "VIC"), ("+617", "Brisbane", "QLD")), (9,), _VOICE
        ),
        "mobile": _Offer((("+614", "", ""),), (9,), _ALL),
        "toll-free": _Offer((("+611800", "", ""),), (10,), _VOICE),
    },
}

_TYPES_FOR_KIND = {
    "local": {phonenumbers.PhoneNumberType.FIXED_LINE, phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE},
    "mobile": {phonenumbers.PhoneNumberType.MOBILE},
    "toll-free": {phonenumbers.PhoneNumberType.TOLL_FREE},
}
_KEYPAD = {
    letter: digit
    for digit, letters in {
        "2": "abc",
        "3": "def",
        "4": "ghi",
        "5": "jkl",
        "6": "mno",
        "7": "pqrs",
        "8": "tuv",
        "9": "wxyz",
    }.items()
    for letter in letters
}


@dataclass(frozen=True, slots=True)
class AvailableNumber:
    phone_number: str
    iso_country: str
    kind: str
    locality: str
    region: str
    capabilities: Capabilities


@dataclass
class OwnedNumber:
    """A number on the account, with its webhooks as Twilio keeps them ("" when unset)."""

    sid: str
    phone_number: str
    iso_country: str
    kind: str
    capabilities: Capabilities
    friendly_name: str
    voice_url: str = ""
    voice_method: str = "POST"
    status_callback: str = ""
    status_callback_method: str = "POST"
    sms_url: str = ""
    sms_method: str = "POST"
    date_created: datetime = field(default_factory=lambda: datetime.now(UTC))
    date_updated: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass
class TollFreeVerification:
    """A toll-free verification as Twilio keeps it: ``status`` as Twilio spells it (``PENDING_REVIEW``,
    ``IN_REVIEW``, ``TWILIO_APPROVED``, ``TWILIO_REJECTED``)."""

    sid: str
    number_sid: str
    phone_number: str
    status: str
    rejection_reason: str | None = None
    date_created: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass
class Campaign:
    """A US A2P 10DLC campaign of a Messaging Service; ``status`` as Twilio spells it (``PENDING``,
    ``IN_PROGRESS``, ``VERIFIED``, ``FAILED``)."""

    sid: str
    service_sid: str
    status: str
    date_created: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True, slots=True)
class SeenRequest:
    method: str
    path: str
    form: dict[str, str]


def _generate(country: str, kind: str, offer: _Offer, count: int, seed: int, taken: set[str]) -> list[AvailableNumber]:
    rng = random.Random(f"{seed}:{country}:{kind}")
    wanted = _TYPES_FOR_KIND[kind]
    code = str(phonenumbers.country_code_for_region(country))
    found: list[AvailableNumber] = []
    for attempt in range(count * 200):
        if len(found) == count:
            break
        prefix, locality, region = offer.prefixes[attempt % len(offer.prefixes)]
        length = offer.national_digits[rng.randrange(len(offer.national_digits))]
        missing = length - (len(prefix) - 1 - len(code))
        # A subscriber number starts 2-9 (as exchanges do in North America, and as real ranges do elsewhere).
        candidate = prefix + str(rng.randrange(2, 10)) + "".join(str(rng.randrange(10)) for _ in range(missing - 1))
        if candidate in taken:
            continue
        parsed = phonenumbers.parse(candidate, None)
        if not phonenumbers.is_valid_number(parsed) or phonenumbers.number_type(parsed) not in wanted:
            continue
        if phonenumbers.region_code_for_number(parsed) not in (country, "US" if country == "CA" else country):
            continue
        taken.add(candidate)
        found.append(AvailableNumber(candidate, country, kind, locality, region, offer.capabilities))
    return found


@dataclass
class NumbersState:
    account_sid: str
    auth_token: str
    seed: int = 0
    per_type: int = 25
    """Numbers offered per country and type."""
    inventory: dict[tuple[str, str], list[AvailableNumber]] = field(default_factory=dict)
    numbers: dict[str, OwnedNumber] = field(default_factory=dict)
    """By SID (``PN...``)."""
    services: dict[str, dict[str, datetime]] = field(default_factory=dict)
    """Messaging Service SID -> the SIDs of the numbers in its sender pool, with when each joined."""
    campaigns: dict[str, Campaign] = field(default_factory=dict)
    """By SID (``QE...``)."""
    toll_free_verifications: dict[str, TollFreeVerification] = field(default_factory=dict)
    """By SID (``HH...``)."""
    requests: list[SeenRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.inventory:
            taken: set[str] = set()
            for country, offers in _CATALOGUE.items():
                for kind, offer in offers.items():
                    self.inventory[(country, kind)] = _generate(country, kind, offer, self.per_type, self.seed, taken)

    def offered(self, country: str, kind: str) -> list[AvailableNumber]:
        return self.inventory.get((country, kind), [])

    def owned(self, phone_number: str) -> OwnedNumber | None:
        return next((n for n in self.numbers.values() if n.phone_number == phone_number), None)

    def add_messaging_service(self, sid: str | None = None) -> str:
        service = sid or "MG" + secrets.token_hex(16)
        self.services.setdefault(service, {})
        return service

    def set_toll_free_verification(self, phone_number: str, status: str, rejection_reason: str | None = None) -> str:
        """Record Twilio's review of the owned number ``phone_number``'s toll-free verification (one per
        number: a later call changes it); its SID. KeyError when the account lacks the number."""
        owned = self.owned(phone_number)
        if owned is None:
            raise KeyError(f"{phone_number} is not on the account")
        for verification in self.toll_free_verifications.values():
            if verification.number_sid == owned.sid:
                verification.status, verification.rejection_reason = status, rejection_reason
                return verification.sid
        verification = TollFreeVerification(
            "HH" + secrets.token_hex(16), owned.sid, phone_number, status, rejection_reason
        )
        self.toll_free_verifications[verification.sid] = verification
        return verification.sid

    def add_campaign(self, service_sid: str, status: str = "VERIFIED") -> str:
        """Register a US A2P campaign for Messaging Service ``service_sid``; its SID. KeyError when the
        service is unknown."""
        if service_sid not in self.services:
            raise KeyError(f"no Messaging Service {service_sid}")
        campaign = Campaign("QE" + secrets.token_hex(16), service_sid, status)
        self.campaigns[campaign.sid] = campaign
        return campaign.sid

    def updates_of(self, sid: str) -> list[SeenRequest]:
        """The POSTs that changed the number ``sid``'s configuration."""
        path = NUMBER_PATH.format(account=self.account_sid, sid=sid)
        return [r for r in self.requests if r.method == "POST" and r.path == path]

    def buy(self, phone_number: str) -> OwnedNumber | None:
        for (country, kind), offers in self.inventory.items():
            for offer in offers:
                if offer.phone_number == phone_number:
                    offers.remove(offer)
                    friendly = phonenumbers.format_number(
                        phonenumbers.parse(phone_number, None), phonenumbers.PhoneNumberFormat.NATIONAL
                    )
                    owned = OwnedNumber(
                        "PN" + secrets.token_hex(16), phone_number, country, kind, offer.capabilities, friendly
                    )
                    self.numbers[owned.sid] = owned
                    return owned
        return None


def _contains_pattern(pattern: str) -> re.Pattern[str] | None:
    """Twilio's ``Contains``: digits and letters (read on a phone keypad), ``*`` one character, ``%`` any
    run, a leading ``+`` anchors at the start of the E.164 number, a trailing ``$`` at its end. None when
    the pattern is not one Twilio accepts."""
    if not 2 <= len(pattern) <= 16 or not re.fullmatch(r"\+?[0-9A-Za-z*%]+\$?", pattern):
        return None
    anchored, ended = pattern.startswith("+"), pattern.endswith("$")
    body = pattern.strip("+$")
    regex = "".join(r"\d" if c == "*" else r"\d*" if c == "%" else _KEYPAD.get(c.lower(), c) for c in body)
    return re.compile(("^" if anchored else "") + regex + ("$" if ended else ""))


def _flag(value: str | None) -> bool | str | None:
    """A boolean query parameter: None when absent, the text itself when it is not true/false."""
    if value is None:
        return None
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _available_resource(number: AvailableNumber) -> dict[str, Any]:
    parsed = phonenumbers.parse(number.phone_number, None)
    return {
        "friendly_name": phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.NATIONAL),
        "phone_number": number.phone_number,
        "lata": None,
        "locality": number.locality or None,
        "rate_center": None,
        "latitude": None,
        "longitude": None,
        "region": number.region or None,
        "postal_code": None,
        "iso_country": number.iso_country,
        "address_requirements": "none",
        "beta": False,
        "capabilities": {
            "voice": number.capabilities.voice,
            "SMS": number.capabilities.sms,
            "MMS": number.capabilities.mms,
            "fax": False,
        },
    }


def _owned_resource(state: NumbersState, number: OwnedNumber) -> dict[str, Any]:
    return {
        "sid": number.sid,
        "account_sid": state.account_sid,
        "phone_number": number.phone_number,
        "friendly_name": number.friendly_name,
        "api_version": "2010-04-01",
        "address_requirements": "none",
        "beta": False,
        "origin": "twilio",
        "status": "in-use",
        "capabilities": {
            "voice": number.capabilities.voice,
            "sms": number.capabilities.sms,
            "mms": number.capabilities.mms,
            "fax": False,
        },
        "voice_url": number.voice_url,
        "voice_method": number.voice_method,
        "voice_fallback_url": "",
        "voice_fallback_method": "POST",
        "voice_caller_id_lookup": False,
        "voice_application_sid": "",
        "status_callback": number.status_callback,
        "status_callback_method": number.status_callback_method,
        "sms_url": number.sms_url,
        "sms_method": number.sms_method,
        "sms_fallback_url": "",
        "sms_fallback_method": "POST",
        "sms_application_sid": "",
        "trunk_sid": None,
        "date_created": format_datetime(number.date_created),
        "date_updated": format_datetime(number.date_updated),
        "uri": f"{API}/Accounts/{state.account_sid}/IncomingPhoneNumbers/{number.sid}.json",
    }


def _stamp(moment: datetime) -> str:
    """The /v1 APIs' ISO 8601 time, in UTC with a Z."""
    return moment.isoformat().replace("+00:00", "Z")


def _verification_resource(state: NumbersState, verification: TollFreeVerification) -> dict[str, Any]:
    rejected = verification.status == "TWILIO_REJECTED"
    return {
        "sid": verification.sid,
        "account_sid": state.account_sid,
        "tollfree_phone_number_sid": verification.number_sid,
        "tollfree_phone_number": verification.phone_number,
        "status": verification.status,
        "rejection_reason": verification.rejection_reason if rejected else None,
        "edit_allowed": rejected,
        "date_created": _stamp(verification.date_created),
        "date_updated": _stamp(verification.date_created),
        "url": f"https://messaging.twilio.com/v1/Tollfree/Verifications/{verification.sid}",
    }


def _campaign_resource(state: NumbersState, campaign: Campaign) -> dict[str, Any]:
    return {
        "sid": campaign.sid,
        "account_sid": state.account_sid,
        "brand_registration_sid": "BN" + "0" * 32,
        "messaging_service_sid": campaign.service_sid,
        "us_app_to_person_usecase": "CUSTOMER_CARE",
        "campaign_status": campaign.status,
        "campaign_id": "C" + campaign.sid[-6:].upper(),
        "is_externally_registered": False,
        "mock": True,
        "errors": [],
        "date_created": _stamp(campaign.date_created),
        "date_updated": _stamp(campaign.date_created),
        "url": f"https://messaging.twilio.com/v1/Services/{campaign.service_sid}/Compliance/Usa2p/{campaign.sid}",
    }


def _service_number_resource(
    state: NumbersState, service: str, number: OwnedNumber, joined: datetime
) -> dict[str, Any]:
    capabilities = [
        name
        for name, on in (
            ("Voice", number.capabilities.voice),
            ("SMS", number.capabilities.sms),
            ("MMS", number.capabilities.mms),
        )
        if on
    ]
    return {
        "sid": number.sid,
        "account_sid": state.account_sid,
        "service_sid": service,
        "date_created": _stamp(joined),
        "date_updated": _stamp(joined),
        "phone_number": number.phone_number,
        "country_code": number.iso_country,
        "capabilities": capabilities,
        "url": f"https://messaging.twilio.com/v1/Services/{service}/PhoneNumbers/{number.sid}",
    }


_URL_FIELDS = {"VoiceUrl": "voice_url", "StatusCallback": "status_callback", "SmsUrl": "sms_url"}
_METHOD_FIELDS = {
    "VoiceMethod": "voice_method",
    "StatusCallbackMethod": "status_callback_method",
    "SmsMethod": "sms_method",
}


def _apply(number: OwnedNumber, form: dict[str, str]) -> Response | None:
    """Apply an update's fields to ``number``; the error answer (and nothing applied) when one is bad."""
    for name in _URL_FIELDS:
        value = form.get(name)
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                return _error(400, INVALID_URL, f"{name} is not a valid URL: {value}")
    for name in _METHOD_FIELDS:
        value = form.get(name)
        if value is not None and value.upper() not in ("GET", "POST"):
            return _error(400, INVALID_PARAMETER, f"{name} must be GET or POST, not {value!r}")
    for name, attribute in _URL_FIELDS.items():
        if name in form:
            setattr(number, attribute, form[name])
    for name, attribute in _METHOD_FIELDS.items():
        if name in form:
            setattr(number, attribute, form[name].upper())
    if "FriendlyName" in form:
        number.friendly_name = form["FriendlyName"][:64]
    number.date_updated = datetime.now(UTC)
    return None


def _page(key: str, items: list[dict[str, Any]], request: Request, page_size: int) -> Response:
    uri = str(request.url.path)
    return JSONResponse(
        {
            key: items,
            "page": 0,
            "page_size": page_size,
            "start": 0,
            "end": max(len(items) - 1, 0),
            "uri": uri,
            "first_page_uri": uri,
            "next_page_uri": None,
            "previous_page_uri": None,
        }
    )


def _meta_page(key: str, items: list[dict[str, Any]], request: Request, page_size: int) -> Response:
    """A page of the /v1 APIs, which describe it under ``meta`` rather than beside the items."""
    uri = str(request.url)
    meta = {
        "page": 0,
        "page_size": page_size,
        "first_page_url": uri,
        "previous_page_url": None,
        "url": uri,
        "next_page_url": None,
        "key": key,
    }
    return JSONResponse({key: items[:page_size], "meta": meta})


def _page_size(request: Request) -> int | Response:
    try:
        return min(max(int(request.query_params.get("PageSize", "50")), 1), 1000)
    except ValueError:
        return _error(400, INVALID_PARAMETER, "PageSize must be a number")


def number_routes(state: NumbersState) -> list[Route]:
    credentials = TwilioState(state.account_sid, state.auth_token)

    async def gate(request: Request) -> tuple[dict[str, str], Response | None]:
        """Record the request and check who sent it; the refusal to answer with, if any."""
        form = (
            {k: v for k, v in (await request.form()).items() if isinstance(v, str)} if request.method == "POST" else {}
        )
        state.requests.append(SeenRequest(request.method, request.url.path, form))
        if not _authorised(request, credentials):
            return form, _error(401, 20003, "Authentication Error - invalid username")
        account = request.path_params.get("account")
        if account is not None and account != state.account_sid:
            return form, _error(404, 20404, "The requested resource was not found")
        return form, None

    def not_found(request: Request) -> Response:
        return _error(404, 20404, f"The requested resource {request.url.path} was not found")

    async def search(request: Request) -> Response:
        _, refused = await gate(request)
        if refused is not None:
            return refused
        kind = KINDS.get(request.path_params["kind"])
        country = request.path_params["country"].upper()
        if kind is None or (country, kind) not in state.inventory:
            return not_found(request)
        query = request.query_params
        page_size = _page_size(request)
        if isinstance(page_size, Response):
            return page_size
        flags = {name: _flag(query.get(name)) for name in ("VoiceEnabled", "SmsEnabled", "MmsEnabled")}
        for name, value in flags.items():
            if isinstance(value, str):
                return _error(400, INVALID_PARAMETER, f"{name} must be true or false, not {value!r}")
        pattern = None
        if query.get("Contains"):
            pattern = _contains_pattern(query["Contains"])
            if pattern is None:
                return _error(400, INVALID_PARAMETER, f"Contains is not a valid pattern: {query['Contains']!r}")
        area_code = query.get("AreaCode")
        found = []
        for number in state.offered(country, kind):
            national = str(phonenumbers.parse(number.phone_number, None).national_number)
            caps = number.capabilities
            if area_code and not national.startswith(area_code):
                continue
            if pattern is not None and not pattern.search(number.phone_number[1:]):
                continue
            wanted = (
                (flags["VoiceEnabled"], caps.voice),
                (flags["SmsEnabled"], caps.sms),
                (flags["MmsEnabled"], caps.mms),
            )
            if any(flag is not None and flag != has for flag, has in wanted):
                continue
            found.append(_available_resource(number))
        return _page("available_phone_numbers", found[:page_size], request, page_size)

    async def incoming(request: Request) -> Response:
        form, refused = await gate(request)
        if refused is not None:
            return refused
        if request.method == "GET":
            page_size = _page_size(request)
            if isinstance(page_size, Response):
                return page_size
            wanted = request.query_params.get("PhoneNumber")
            pattern = re.compile(re.escape(wanted).replace(r"\*", r"\d")) if wanted else None
            name = request.query_params.get("FriendlyName")
            found = [
                _owned_resource(state, n)
                for n in sorted(state.numbers.values(), key=lambda n: n.date_created)
                if (pattern is None or pattern.search(n.phone_number)) and (name is None or n.friendly_name == name)
            ]
            return _page("incoming_phone_numbers", found[:page_size], request, page_size)
        wanted_number, area_code = form.get("PhoneNumber"), form.get("AreaCode")
        if not wanted_number and area_code:
            wanted_number = next(
                (
                    n.phone_number
                    for country in ("US", "CA")
                    for n in state.offered(country, "local")
                    if str(phonenumbers.parse(n.phone_number, None).national_number).startswith(area_code)
                ),
                None,
            )
            if wanted_number is None:
                return _error(400, NOT_AVAILABLE, f"No phone numbers are available in area code {area_code}.")
        if not wanted_number:
            return _error(400, INVALID_NUMBER, "A 'PhoneNumber' or 'AreaCode' is required.")
        owned = state.buy(wanted_number)
        if owned is None:
            return _error(400, NOT_AVAILABLE, f"PhoneNumber {wanted_number} requested is not available")
        problem = _apply(owned, form)
        if problem is not None:  # Twilio checks before buying; undo so the number stays on offer
            del state.numbers[owned.sid]
            state.inventory[(owned.iso_country, owned.kind)].append(
                AvailableNumber(owned.phone_number, owned.iso_country, owned.kind, "", "", owned.capabilities)
            )
            return problem
        return JSONResponse(_owned_resource(state, owned), status_code=201)

    async def one_number(request: Request) -> Response:
        form, refused = await gate(request)
        if refused is not None:
            return refused
        number = state.numbers.get(request.path_params["sid"])
        if number is None:
            return not_found(request)
        if request.method == "DELETE":
            del state.numbers[number.sid]
            for pool in state.services.values():
                pool.pop(number.sid, None)
            return Response(status_code=204)
        if request.method == "POST":
            problem = _apply(number, form)
            if problem is not None:
                return problem
        return JSONResponse(_owned_resource(state, number))

    async def service_numbers(request: Request) -> Response:
        form, refused = await gate(request)
        if refused is not None:
            return refused
        service = request.path_params["service"]
        pool = state.services.get(service)
        if pool is None:
            return not_found(request)
        if request.method == "GET":
            page_size = _page_size(request)
            if isinstance(page_size, Response):
                return page_size
            items = [_service_number_resource(state, service, state.numbers[sid], at) for sid, at in pool.items()]
            return _meta_page("phone_numbers", items, request, page_size)
        sid = form.get("PhoneNumberSid", "")
        number = state.numbers.get(sid)
        if number is None:
            return _error(400, INVALID_NUMBER, f"PhoneNumberSid {sid!r} is not a number on this account")
        if sid in pool:
            return _error(409, ALREADY_IN_SERVICE, "Phone Number is already in the Messaging Service")
        if any(sid in other for name, other in state.services.items() if name != service):
            return _error(409, IN_ANOTHER_SERVICE, "Phone Number is already associated with another Messaging Service")
        pool[sid] = datetime.now(UTC)
        return JSONResponse(_service_number_resource(state, service, number, pool[sid]), status_code=201)

    async def service_number(request: Request) -> Response:
        _, refused = await gate(request)
        if refused is not None:
            return refused
        pool = state.services.get(request.path_params["service"])
        sid = request.path_params["sid"]
        if pool is None or sid not in pool or sid not in state.numbers:
            return not_found(request)
        if request.method == "DELETE":
            del pool[sid]
            return Response(status_code=204)
        return JSONResponse(
            _service_number_resource(state, request.path_params["service"], state.numbers[sid], pool[sid])
        )

    async def campaigns(request: Request) -> Response:
        _, refused = await gate(request)
        if refused is not None:
            return refused
        service = request.path_params["service"]
        if service not in state.services:
            return not_found(request)
        page_size = _page_size(request)
        if isinstance(page_size, Response):
            return page_size
        items = [_campaign_resource(state, c) for c in state.campaigns.values() if c.service_sid == service]
        return _meta_page("compliance", items, request, page_size)

    async def toll_free_verifications(request: Request) -> Response:
        _, refused = await gate(request)
        if refused is not None:
            return refused
        page_size = _page_size(request)
        if isinstance(page_size, Response):
            return page_size
        number_sid, status = request.query_params.get("TollfreePhoneNumberSid"), request.query_params.get("Status")
        items = [
            _verification_resource(state, v)
            for v in sorted(state.toll_free_verifications.values(), key=lambda v: v.date_created)
            if (number_sid is None or v.number_sid == number_sid) and (status is None or v.status == status)
        ]
        return _meta_page("verifications", items, request, page_size)

    return [
        Route(AVAILABLE_PATH, search, methods=["GET"]),
        Route(NUMBERS_PATH, incoming, methods=["GET", "POST"]),
        Route(NUMBER_PATH, one_number, methods=["GET", "POST", "DELETE"]),
        Route(SERVICE_NUMBERS_PATH, service_numbers, methods=["GET", "POST"]),
        Route(SERVICE_NUMBER_PATH, service_number, methods=["GET", "DELETE"]),
        Route(CAMPAIGNS_PATH, campaigns, methods=["GET"]),
        Route(TOLL_FREE_VERIFICATIONS_PATH, toll_free_verifications, methods=["GET"]),
    ]


def add_number_routes(app: Starlette, state: NumbersState) -> None:
    """Add the phone-number APIs to an existing simulator app (such as the Calls simulator)."""
    app.router.routes.extend(number_routes(state))
