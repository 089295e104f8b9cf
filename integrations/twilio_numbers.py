"""The business's phone numbers at Twilio (twilio's own client): search what is on offer, buy, read a
number's configuration back, change it, put it in a Messaging Service's sender pool, read where it stands
on carrier registration (A2P 10DLC, toll-free verification), and release it.

What voicebook needs a number to do is :class:`Webhooks` (derived from the public base URL);
:func:`changes_needed` is what an idempotent configure sends (nothing when all is in place) and
:func:`mismatches` what verify reports. :func:`toll_free_verification` and :func:`a2p_registration` read
Twilio's review statuses as the registry's. All are pure, so the rules are tested without a network.

twilio's client blocks: each request runs in a worker thread. Twilio's refusals become
:class:`NumbersError` with Twilio's code and message. Requests go only to the allowed hosts
(:mod:`integrations.egress`); the Messaging Service API lives on its own host (:data:`MESSAGING_HOSTS`),
and a configured ``api_base_url`` (a simulator) replaces both.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import phonenumbers
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from booking.ledger.numbers_repository import (
    A2PStatus,
    Mismatch,
    NumberFacts,
    NumberType,
    TollFreeVerification,
    default_compliance,
)
from integrations.egress import Allowlist, guard_session
from integrations.metrics import provider_request

T = TypeVar("T")

MESSAGING_HOSTS = ("messaging.twilio.com",)
"""Where Twilio serves the Messaging Service API (the rest is on ``egress.TWILIO_HOSTS``)."""
NOT_AVAILABLE = 21422
VOICE_PATH = "/twilio/voice"
CALL_STATUS_PATH = "/twilio/call-status"
SMS_PATH = "/twilio/sms"

TOLL_FREE_STATUSES: Mapping[str, TollFreeVerification] = {
    "PENDING_REVIEW": TollFreeVerification.PENDING,
    "IN_REVIEW": TollFreeVerification.PENDING,
    "TWILIO_APPROVED": TollFreeVerification.APPROVED,
    "TWILIO_REJECTED": TollFreeVerification.REJECTED,
}
"""Twilio's toll-free verification statuses. One it adds later reads as pending: not cleared to text,
without claiming a rejection."""
CAMPAIGN_STATUSES: Mapping[str, A2PStatus] = {
    "VERIFIED": A2PStatus.APPROVED,
    "PENDING": A2PStatus.PENDING,
    "IN_PROGRESS": A2PStatus.PENDING,
    "FAILED": A2PStatus.FAILED,
}
"""Twilio's US A2P campaign statuses; as above, one not listed reads as pending."""


class NumbersError(RuntimeError):
    """Twilio refused a request or could not be reached. ``code`` is Twilio's error code (None when
    Twilio did not answer); ``permanent`` is True when retrying cannot help."""

    def __init__(self, message: str, *, code: int | None, status: int | None, permanent: bool) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.permanent = permanent


@dataclass(frozen=True, slots=True)
class AvailableNumber:
    phone_number: str
    friendly_name: str
    country: str
    locality: str | None
    region: str | None
    voice: bool
    sms: bool
    mms: bool


@dataclass(frozen=True, slots=True)
class IncomingNumber:
    """A number the account owns, as Twilio has it configured (unset URLs are None)."""

    sid: str
    phone_number: str
    friendly_name: str | None
    voice: bool
    sms: bool
    mms: bool
    voice_url: str | None
    voice_method: str | None
    status_callback: str | None
    status_callback_method: str | None
    sms_url: str | None
    sms_method: str | None

    def facts(self) -> NumberFacts:
        """What the registry keeps of it; the country and type are read from the number itself, since
        Twilio's resource does not reliably carry them."""
        parsed = phonenumbers.parse(self.phone_number, None)
        return NumberFacts(
            number=self.phone_number,
            sid=self.sid,
            country=phonenumbers.region_code_for_number(parsed) or "ZZ",
            type=number_type(self.phone_number),
            voice=self.voice,
            sms=self.sms,
            mms=self.mms,
            friendly_name=self.friendly_name,
        )


def number_type(phone_number: str) -> NumberType:
    kind = phonenumbers.number_type(phonenumbers.parse(phone_number, None))
    if kind == phonenumbers.PhoneNumberType.TOLL_FREE:
        return NumberType.TOLL_FREE
    if kind == phonenumbers.PhoneNumberType.MOBILE:
        return NumberType.MOBILE
    return NumberType.LOCAL


@dataclass(frozen=True, slots=True)
class Webhooks:
    """Where Twilio must send a number's calls and texts for voicebook, all POST. ``sms_url`` is None when
    the number's texts go through ``messaging_service_sid`` instead (the service decides where)."""

    voice_url: str
    status_callback: str
    sms_url: str | None
    messaging_service_sid: str | None = None

    @classmethod
    def for_base(cls, public_url: str, *, messaging_service_sid: str | None = None) -> Webhooks:
        base = public_url.rstrip("/")
        return cls(
            voice_url=base + VOICE_PATH,
            status_callback=base + CALL_STATUS_PATH,
            sms_url=None if messaging_service_sid else base + SMS_PATH,
            messaging_service_sid=messaging_service_sid,
        )


def changes_needed(number: IncomingNumber, wanted: Webhooks) -> dict[str, str]:
    """The update (twilio's keyword arguments) that makes ``number`` match ``wanted``; empty when it
    already does. A number that cannot receive texts gets no SMS URL."""
    changes: dict[str, str] = {}
    pairs = [
        ("voice_url", number.voice_url, wanted.voice_url),
        ("voice_method", number.voice_method, "POST"),
        ("status_callback", number.status_callback, wanted.status_callback),
        ("status_callback_method", number.status_callback_method, "POST"),
    ]
    if wanted.sms_url is not None and number.sms:
        pairs += [("sms_url", number.sms_url, wanted.sms_url), ("sms_method", number.sms_method, "POST")]
    for name, have, want in pairs:
        same = (have or "").upper() == want if name.endswith("_method") else have == want
        if not same:
            changes[name] = want
    return changes


def mismatches(
    number: IncomingNumber | None, wanted: Webhooks, *, in_service: bool | None, require_sms: bool = True
) -> list[Mismatch]:
    """Every way ``number`` (None: not on the account) differs from ``wanted``. ``in_service``: whether
    it is in ``wanted.messaging_service_sid``'s sender pool (None when no service is wanted)."""
    if number is None:
        return [Mismatch("not_on_account", "the number is not on this Twilio account")]
    found: list[Mismatch] = []

    def url(what: str, label: str, have: str | None, want: str) -> None:
        if not have:
            found.append(Mismatch(what, f"no {label} is set", want, None))
        elif have != want:
            found.append(Mismatch(what, f"the {label} points elsewhere", want, have))

    def method(what: str, label: str, have: str | None) -> None:
        if (have or "").upper() != "POST":
            found.append(Mismatch(what, f"the {label} method is {have or 'unset'}, not POST", "POST", have))

    if not number.voice:
        found.append(Mismatch("voice_capability", "the number cannot take calls", "true", "false"))
    url("voice_url", "voice URL", number.voice_url, wanted.voice_url)
    method("voice_method", "voice URL", number.voice_method)
    url("status_callback", "call status callback", number.status_callback, wanted.status_callback)
    method("status_callback_method", "call status callback", number.status_callback_method)
    if not number.sms:
        if require_sms:
            found.append(Mismatch("sms_capability", "the number cannot receive texts", "true", "false"))
        return found
    if wanted.sms_url is not None:
        url("sms_url", "SMS URL", number.sms_url, wanted.sms_url)
        method("sms_method", "SMS URL", number.sms_method)
    if wanted.messaging_service_sid is not None and not in_service:
        found.append(
            Mismatch(
                "messaging_service",
                f"the number is not in Messaging Service {wanted.messaging_service_sid}",
                wanted.messaging_service_sid,
                None,
            )
        )
    return found


@dataclass(frozen=True, slots=True)
class Review:
    """One of Twilio's reviews of a sender (a toll-free verification, an A2P campaign): its status as
    Twilio spells it, and Twilio's reason when it refused."""

    status: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Compliance:
    """Where a number stands with carriers, read from Twilio. ``note`` says why when the statuses alone do
    not (no Messaging Service to hold a campaign, Twilio's reason for a rejection)."""

    a2p_status: A2PStatus
    toll_free_verification: TollFreeVerification
    note: str | None = None


def toll_free_verification(statuses: Iterable[str]) -> TollFreeVerification:
    """A toll-free number's verification from Twilio's verification records for it: approved when one
    is, else pending when one is in review, else rejected; unverified when it has none."""
    found = {TOLL_FREE_STATUSES.get(status.upper(), TollFreeVerification.PENDING) for status in statuses}
    for status in (TollFreeVerification.APPROVED, TollFreeVerification.PENDING, TollFreeVerification.REJECTED):
        if status in found:
            return status
    return TollFreeVerification.UNVERIFIED


def a2p_registration(campaign_statuses: Iterable[str]) -> A2PStatus:
    """A US local number's A2P 10DLC registration from the campaigns of the Messaging Service that holds
    it: approved when one is verified, else pending, else failed; unregistered when it has none."""
    found = {CAMPAIGN_STATUSES.get(status.upper(), A2PStatus.PENDING) for status in campaign_statuses}
    for status in (A2PStatus.APPROVED, A2PStatus.PENDING, A2PStatus.FAILED):
        if status in found:
            return status
    return A2PStatus.UNREGISTERED


def _capabilities(resource: Any) -> tuple[bool, bool, bool]:
    # Twilio spells them "SMS"/"MMS" when offering a number and "sms"/"mms" once it is owned.
    raw = resource.capabilities or {}
    caps = {str(key).lower(): bool(value) for key, value in dict(raw).items()}
    return caps.get("voice", False), caps.get("sms", False), caps.get("mms", False)


def _incoming(resource: Any) -> IncomingNumber:
    voice, sms, mms = _capabilities(resource)
    return IncomingNumber(
        sid=str(resource.sid),
        phone_number=str(resource.phone_number),
        friendly_name=resource.friendly_name or None,
        voice=voice,
        sms=sms,
        mms=mms,
        voice_url=resource.voice_url or None,
        voice_method=resource.voice_method or None,
        status_callback=resource.status_callback or None,
        status_callback_method=resource.status_callback_method or None,
        sms_url=resource.sms_url or None,
        sms_method=resource.sms_method or None,
    )


def _available(resource: Any) -> AvailableNumber:
    voice, sms, mms = _capabilities(resource)
    return AvailableNumber(
        phone_number=str(resource.phone_number),
        friendly_name=str(resource.friendly_name or resource.phone_number),
        country=str(resource.iso_country or ""),
        locality=resource.locality or None,
        region=resource.region or None,
        voice=voice,
        sms=sms,
        mms=mms,
    )


def _refusal(error: TwilioException, what: str) -> NumbersError:
    status: int | None
    if isinstance(error, TwilioRestException):
        status, code, message = int(error.status), error.code, error.msg
    else:
        # A list page that fails raises the base class, with the response as its second argument.
        response = error.args[1] if len(error.args) > 1 else None
        status = int(getattr(response, "status_code", 0)) or None
        try:
            body = json.loads(getattr(response, "text", "") or "{}")
        except ValueError:
            body = {}
        code, message = body.get("code"), body.get("message") or str(error.args[0] if error.args else error)
    permanent = status is not None and status < 500 and status != 429
    code_text = f", error {code}" if code is not None else ""
    return NumbersError(
        f"Twilio refused to {what} (HTTP {status}{code_text}): {message}",
        code=int(code) if code is not None else None,
        status=status,
        permanent=permanent,
    )


class TwilioNumbers:
    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        *,
        api_base_url: str | None = None,
        egress: Allowlist | None = None,
        timeout: float = 30.0,
    ) -> None:
        """``api_base_url`` replaces both Twilio hosts (the REST API and the Messaging Service API);
        ``egress``: the hosts requests may go to, None sends anywhere."""
        http_client = TwilioHttpClient(timeout=timeout)
        if egress is not None and http_client.session is not None:
            guard_session(http_client.session, egress)
        self._client = Client(account_sid, auth_token, http_client=http_client)
        if api_base_url is not None:
            self._client.api.base_url = api_base_url.rstrip("/")
            self._client.messaging.base_url = api_base_url.rstrip("/")

    async def _run(self, operation: str, what: str, work: Callable[[], T]) -> T:
        def guarded() -> T:
            with provider_request("twilio", operation):
                return work()

        try:
            return await asyncio.to_thread(guarded)
        except TwilioException as error:
            raise _refusal(error, what) from error
        except OSError as error:  # requests' connection errors and timeouts
            raise NumbersError(
                f"Twilio could not be reached to {what}: {error}", code=None, status=None, permanent=False
            ) from error

    async def search(
        self,
        country: str,
        kind: NumberType,
        *,
        area_code: str | None = None,
        contains: str | None = None,
        voice: bool | None = None,
        sms: bool | None = None,
        mms: bool | None = None,
        limit: int = 20,
    ) -> list[AvailableNumber]:
        """Numbers on offer in ``country`` of type ``kind``. A capability given True must be present,
        False absent; None does not filter."""
        filters: dict[str, Any] = {"limit": limit, "page_size": limit}
        for name, value in (
            ("area_code", area_code),
            ("contains", contains),
            ("voice_enabled", voice),
            ("sms_enabled", sms),
            ("mms_enabled", mms),
        ):
            if value is not None:
                filters[name] = value

        def work() -> list[AvailableNumber]:
            offers = self._client.api.v2010.account.available_phone_numbers(country.upper())
            listing = {NumberType.LOCAL: offers.local, NumberType.MOBILE: offers.mobile}.get(kind, offers.toll_free)
            return [_available(resource) for resource in listing.list(**filters)]

        return await self._run("numbers.search", f"search {kind.value} numbers in {country}", work)

    async def buy(self, phone_number: str) -> IncomingNumber:
        def work() -> IncomingNumber:
            return _incoming(self._client.api.v2010.account.incoming_phone_numbers.create(phone_number=phone_number))

        return await self._run("numbers.buy", f"sell {phone_number}", work)

    async def find(self, phone_number: str) -> IncomingNumber | None:
        """The account's number ``phone_number`` as configured now, or None when the account lacks it."""

        def work() -> IncomingNumber | None:
            found = self._client.api.v2010.account.incoming_phone_numbers.list(phone_number=phone_number, limit=20)
            return next((_incoming(r) for r in found if r.phone_number == phone_number), None)

        return await self._run("numbers.fetch", f"read {phone_number}", work)

    async def owned(self, limit: int = 1000) -> list[IncomingNumber]:
        def work() -> list[IncomingNumber]:
            return [_incoming(r) for r in self._client.api.v2010.account.incoming_phone_numbers.list(limit=limit)]

        return await self._run("numbers.list", "list the account's numbers", work)

    async def update(self, number: IncomingNumber, changes: Mapping[str, str]) -> IncomingNumber:
        """Apply ``changes`` (twilio's keyword arguments, as :func:`changes_needed` gives them)."""

        def work() -> IncomingNumber:
            return _incoming(self._client.api.v2010.account.incoming_phone_numbers(number.sid).update(**changes))

        return await self._run("numbers.update", f"update {number.phone_number}", work)

    async def in_service(self, service_sid: str, number: IncomingNumber) -> bool:
        def work() -> bool:
            pool = self._client.messaging.v1.services(service_sid).phone_numbers.list(limit=1000)
            return any(entry.sid == number.sid for entry in pool)

        return await self._run("numbers.service_list", f"read Messaging Service {service_sid}", work)

    async def add_to_service(self, service_sid: str, number: IncomingNumber) -> None:
        def work() -> None:
            self._client.messaging.v1.services(service_sid).phone_numbers.create(phone_number_sid=number.sid)

        await self._run("numbers.service_add", f"add {number.phone_number} to Messaging Service {service_sid}", work)

    async def release(self, number: IncomingNumber) -> None:
        """Give the number back to Twilio: it stops taking calls and texts at once and cannot be bought
        back unless Twilio offers it again."""

        def work() -> None:
            self._client.api.v2010.account.incoming_phone_numbers(number.sid).delete()

        await self._run("numbers.release", f"release {number.phone_number}", work)

    async def toll_free_reviews(self, number: IncomingNumber) -> list[Review]:
        """Twilio's toll-free verification records for ``number`` (none: never submitted)."""

        def work() -> list[Review]:
            found = self._client.messaging.v1.tollfree_verifications.list(
                tollfree_phone_number_sid=number.sid, limit=50
            )
            return [Review(str(r.status or ""), r.rejection_reason or None) for r in found]

        return await self._run("numbers.toll_free_verifications", f"read {number.phone_number}'s verification", work)

    async def campaign_reviews(self, service_sid: str) -> list[Review]:
        """The US A2P 10DLC campaigns of Messaging Service ``service_sid`` (none: not registered)."""

        def work() -> list[Review]:
            found = self._client.messaging.v1.services(service_sid).us_app_to_person.list(limit=50)
            return [Review(str(r.campaign_status or "")) for r in found]

        return await self._run("numbers.campaigns", f"read Messaging Service {service_sid}'s A2P campaigns", work)

    async def compliance(self, number: IncomingNumber, service_sid: str | None) -> Compliance:
        """Where ``number`` stands with carriers. A texting North American toll-free number needs a
        toll-free verification; a texting US local number an A2P 10DLC campaign, which attaches to the
        Messaging Service that holds it (``service_sid``, as the registry has it). Any other number needs
        neither (``not_required``)."""
        a2p_needed, verification_needed = default_compliance(number.facts())
        if verification_needed is not TollFreeVerification.NOT_REQUIRED:
            reviews = await self.toll_free_reviews(number)
            verification = toll_free_verification(review.status for review in reviews)
            reasons = [review.reason for review in reviews if review.reason]
            note = None
            if verification is TollFreeVerification.UNVERIFIED:
                note = "no toll-free verification submitted"
            elif verification is TollFreeVerification.REJECTED and reasons:
                note = "rejected: " + "; ".join(reasons)
            return Compliance(A2PStatus.NOT_REQUIRED, verification, note)
        if a2p_needed is A2PStatus.NOT_REQUIRED:
            return Compliance(A2PStatus.NOT_REQUIRED, TollFreeVerification.NOT_REQUIRED)
        if service_sid is None:
            return Compliance(
                A2PStatus.UNREGISTERED,
                TollFreeVerification.NOT_REQUIRED,
                "in no Messaging Service, and A2P 10DLC campaigns attach to one",
            )
        if not await self.in_service(service_sid, number):
            return Compliance(
                A2PStatus.UNREGISTERED,
                TollFreeVerification.NOT_REQUIRED,
                f"not in Messaging Service {service_sid}, whose campaign would cover it",
            )
        a2p = a2p_registration(review.status for review in await self.campaign_reviews(service_sid))
        note = f"Messaging Service {service_sid} has no A2P campaign" if a2p is A2PStatus.UNREGISTERED else None
        return Compliance(a2p, TollFreeVerification.NOT_REQUIRED, note)
