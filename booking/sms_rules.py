"""What each destination country allows of a business's texts: the sender types its carriers deliver from,
whether the customer can reply (and so how they opt out), and how long a text we let go out. Pure: no I/O,
no configuration read here; the effect handler passes in what is configured.

Usage::

    senders = Senders(from_number="+12125550100")
    choice = choose_sender("+447700900123", senders, home_region="US")
    if isinstance(choice, NoSender):
        ...  # choice.reason says why, naming the country
    footer = opt_out_footer("en", two_way=choice.two_way, contact="(212) 555-0100")
    problem = body_problem(text, choice.rules)   # None, or why the text may not go out

The table keeps to what the sources named beside each entry state. It is a policy for transactional
texts (confirmations, reminders), not a substitute for a country's marketing rules, and a country not in
it gets the cautious default: numeric senders only, replies possible.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberType

from booking.messages import STOP_FOOTER, language_of, segments
from booking.phone import region_of


class SenderKind(enum.StrEnum):
    LONG_CODE = "long_code"
    """An ordinary (geographic or mobile) number: customers can reply."""
    TOLL_FREE = "toll_free"
    """A toll-free number (US/CA): customers can reply; it texts its own numbering plan only."""
    SHORT_CODE = "short_code"
    """Five or six digits, leased in one country and reaching only that country's subscribers."""
    ALPHANUMERIC = "alphanumeric"
    """A name (``Riverside``) shown as the sender: nobody can reply to it, so STOP-by-reply cannot work."""


MAX_SEGMENTS = 5
"""Segments we let one text take: our own cost and deliverability limit, not a carrier's (each segment
is billed, and long concatenated texts are filtered more often). The templates take one or two."""

_ALPHA_SENDER = re.compile(r"[A-Za-z0-9 +\-_&]{1,11}")
"""Twilio's rule for an alphanumeric sender ID: up to 11 of these characters, not digits only."""

_NANP = frozenset({"US", "CA"})


@dataclass(frozen=True, slots=True)
class CountryRules:
    country: str
    """ISO 3166 code of the destination; ``ZZ`` for the default."""
    senders: frozenset[SenderKind]
    """Sender types that deliver a business's texts there."""
    numeric_from: frozenset[str] | None = None
    """Countries whose numbers (long codes, toll-free) may text there; None: any country's."""
    registration: str = ""
    """What must be registered before carriers deliver, for the operator (docs/phone-numbers.md)."""
    max_segments: int = MAX_SEGMENTS

    def allows(self, kind: SenderKind) -> bool:
        return kind in self.senders


_NUMERIC = frozenset({SenderKind.LONG_CODE, SenderKind.SHORT_CODE})

RULES: Mapping[str, CountryRules] = {
    # CTIA Messaging Principles and Best Practices (2023) §5 (opt-out by STOP reply); A2P 10DLC and
    # toll-free verification (The Campaign Registry, Twilio's US guidelines); no alphanumeric senders.
    "US": CountryRules(
        "US",
        _NUMERIC | {SenderKind.TOLL_FREE},
        numeric_from=_NANP,
        registration="long codes: A2P 10DLC brand and campaign; toll-free: toll-free verification",
    ),
    # CWTA Canadian Common Short Code guidelines; Twilio's Canada guidelines: no alphanumeric senders.
    "CA": CountryRules("CA", _NUMERIC | {SenderKind.TOLL_FREE}, numeric_from=_NANP),
    # Twilio's UK guidelines: alphanumeric supported without pre-registration (one-way).
    "GB": CountryRules("GB", _NUMERIC | {SenderKind.ALPHANUMERIC}),
    # Twilio's Germany guidelines: alphanumeric supported (one-way).
    "DE": CountryRules("DE", frozenset({SenderKind.LONG_CODE, SenderKind.ALPHANUMERIC})),
    # ARCEP/FFT: application-to-person traffic from mobile (06/07) numbers is not allowed; short codes
    # and alphanumeric senders carry it. Marketing texts also need the "STOP au 36xxx" short-code
    # opt-out and quiet hours; booking texts are not marketing.
    "FR": CountryRules(
        "FR",
        frozenset({SenderKind.SHORT_CODE, SenderKind.ALPHANUMERIC}),
        registration="alphanumeric sender registered with French carriers through Twilio",
    ),
    # ACMA; Spam Act 2003 s.18 (a functional unsubscribe in commercial messages); alphanumeric allowed,
    # to be held on the SMS Sender ID Register (Telecommunications Amendment (SMS Sender ID Register) Act 2024).
    "AU": CountryRules(
        "AU",
        _NUMERIC | {SenderKind.ALPHANUMERIC},
        registration="alphanumeric sender on the ACMA SMS Sender ID Register",
    ),
    # TRAI Telecom Commercial Communications Customer Preference Regulations 2018: business texts go
    # from a header (sender ID) and template registered on an operator's DLT platform.
    "IN": CountryRules(
        "IN",
        frozenset({SenderKind.ALPHANUMERIC}),
        registration="DLT: entity, header (the sender ID) and each message template",
    ),
    # Twilio's Brazil guidelines: no alphanumeric senders; numeric only.
    "BR": CountryRules("BR", _NUMERIC),
}
DEFAULT_RULES = CountryRules("ZZ", frozenset({SenderKind.LONG_CODE}))


def rules_for(destination: str) -> CountryRules:
    return RULES.get(region_of(destination, fallback="ZZ"), DEFAULT_RULES)


def is_alpha_sender(text: str) -> bool:
    return _ALPHA_SENDER.fullmatch(text) is not None and not text.isdigit()


def sender_kind(number: str) -> SenderKind:
    """What kind of number ``number`` (a From number) is: digits without a country code are a short code."""
    if number.isdigit() and len(number) <= 8:
        return SenderKind.SHORT_CODE
    try:
        parsed = phonenumbers.parse(number, None)
    except NumberParseException:
        return SenderKind.LONG_CODE
    if phonenumbers.number_type(parsed) == PhoneNumberType.TOLL_FREE:
        return SenderKind.TOLL_FREE
    return SenderKind.LONG_CODE


@dataclass(frozen=True, slots=True)
class Senders:
    """What is configured to send from: a From number, or a Messaging Service whose pool may hold an
    alphanumeric sender (``alpha_sender``), which Twilio uses where the destination allows one."""

    from_number: str | None = None
    messaging_service_sid: str | None = None
    alpha_sender: str | None = None


@dataclass(frozen=True, slots=True)
class SenderChoice:
    kind: SenderKind | None
    """The sender type the text goes from; None: a number Twilio picks from the Messaging Service's pool."""
    two_way: bool
    """Whether the customer can reply (and so opt out by replying STOP)."""
    rules: CountryRules


@dataclass(frozen=True, slots=True)
class NoSender:
    """No configured sender may text this destination: an expected outcome, said with the reason."""

    reason: str


def choose_sender(destination: str, senders: Senders, *, home_region: str) -> SenderChoice | NoSender:
    """The sender a text to ``destination`` (E.164) goes from. ``home_region`` is the business's country,
    where a short code given as the From number is leased."""
    rules = rules_for(destination)
    country = region_of(destination, fallback="an unknown country")
    if senders.messaging_service_sid is not None:
        if senders.alpha_sender and rules.allows(SenderKind.ALPHANUMERIC):
            return SenderChoice(SenderKind.ALPHANUMERIC, two_way=False, rules=rules)
        if rules.senders == {SenderKind.ALPHANUMERIC}:
            return NoSender(f"texts to {country} need a registered alphanumeric sender (VOICEBOOK_SMS_ALPHA_SENDER)")
        return SenderChoice(None, two_way=True, rules=rules)
    if senders.from_number is None:
        return NoSender("no sender is configured (TWILIO_SMS_FROM or TWILIO_MESSAGING_SERVICE_SID)")
    kind = sender_kind(senders.from_number)
    name = kind.value.replace("_", " ")
    if not rules.allows(kind):
        return NoSender(f"carriers in {country} do not deliver business texts from a {name}")
    if kind is SenderKind.SHORT_CODE:
        if country != home_region:
            return NoSender(f"a short code leased in {home_region} reaches only {home_region}, not {country}")
        return SenderChoice(kind, two_way=True, rules=rules)
    origin = region_of(senders.from_number, fallback=home_region)
    if kind is SenderKind.TOLL_FREE and country not in _NANP:
        return NoSender(f"a toll-free number texts the US and Canada only, not {country}")
    if rules.numeric_from is not None and origin not in rules.numeric_from:
        allowed = ", ".join(sorted(rules.numeric_from))
        return NoSender(f"carriers in {country} deliver business texts only from numbers of {allowed}, not {origin}")
    return SenderChoice(kind, two_way=True, rules=rules)


_NO_REPLY_FOOTER = {
    "en": " Replies are not read; to stop these texts, call {contact}.",
    "es": " No se leen respuestas; para dejar de recibir estos mensajes, llame al {contact}.",
}
"""For one-way senders: STOP by reply cannot reach anyone, so the footer names the way that does. The
Spanish stays within GSM-7 (no "más"), so the footer does not halve what fits in a segment."""


def opt_out_footer(locale: str | None, *, two_way: bool, contact: str) -> str:
    """The opt-out sentence a text ends with, in the customer's language. ``contact`` is how a one-way
    text's reader reaches the business (its number in the reader's national form)."""
    language = language_of(locale)
    if two_way:
        return STOP_FOOTER[language]
    return _NO_REPLY_FOOTER[language].format(contact=contact)


def body_problem(body: str, rules: CountryRules) -> str | None:
    """Why ``body`` may not go to a ``rules`` country, or None. A text over the segment limit is refused,
    not cut: a truncated confirmation could lose the time or the reference, which is worse than none
    reaching the customer through this channel (the effect's dead letter says why)."""
    count = segments(body)
    if count.segments > rules.max_segments:
        return (
            f"the text takes {count.segments} {count.encoding} segments ({count.characters} characters);"
            f" at most {rules.max_segments} are allowed"
        )
    return None
