"""Text messages about bookings: templates in English and Spanish, SMS segment counting, and the
carrier keywords (STOP, START, HELP) a customer may text back. Pure: no I/O, no clock, no configuration.

Usage::

    view = BookingView.of(booking, business, link="https://clinic.example/b")
    body = render(MessageKind.CONFIRMATION, "es", view)
    count = segments(body)        # SegmentCount(encoding='GSM-7', segments=1, characters=118, units=118)
    classify_inbound(" stop ")    # Keyword.OPT_OUT
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from booking.business import Business
from booking.domain import Booking, ensure_utc
from booking.timeutil import zone

MAX_BODY_CHARS = 1600
"""Twilio refuses a longer body (error 21617)."""

REFERENCE_LENGTH = 6


class MessageKind(enum.StrEnum):
    CONFIRMATION = "confirmation"
    RESCHEDULE = "reschedule"
    CANCELLATION = "cancellation"
    REMINDER = "reminder"


class Keyword(enum.StrEnum):
    OPT_OUT = "opt_out"
    OPT_IN = "opt_in"
    HELP = "help"


def booking_reference(booking_id: str) -> str:
    """The short reference a customer reads out on the phone: the last six characters of the id,
    uppercased. Ids end in random hex, so the suffix (not the time-ordered prefix) is what differs."""
    return booking_id[-REFERENCE_LENGTH:].upper()


@dataclass(frozen=True, slots=True)
class BookingView:
    """What a message may say about a booking, already resolved (service name, zones, reference)."""

    reference: str
    service_name: str
    start: datetime
    business_name: str
    business_zone: str
    customer_name: str | None = None
    customer_zone: str | None = None
    link: str | None = None
    previous_start: datetime | None = None
    """For a reschedule: when the booking was before it moved."""
    occurrences: int = 1
    """For the confirmation of a recurring booking: how many appointments the series holds."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", ensure_utc(self.start))
        if self.previous_start is not None:
            object.__setattr__(self, "previous_start", ensure_utc(self.previous_start))

    @property
    def zone_name(self) -> str:
        """The customer's own zone when known: a customer who travels or lives across a zone line reads
        times as their phone shows them; otherwise the business's zone, where the appointment is."""
        return self.customer_zone or self.business_zone

    @classmethod
    def of(
        cls,
        booking: Booking,
        business: Business,
        *,
        link: str | None = None,
        previous_start: datetime | None = None,
        occurrences: int = 1,
    ) -> BookingView:
        service = business.service(booking.service_id)
        return cls(
            reference=booking_reference(booking.id),
            service_name=service.name if service is not None else booking.service_id,
            start=booking.start,
            business_name=business.name,
            business_zone=business.timezone,
            customer_name=booking.customer.name,
            customer_zone=booking.customer.time_zone,
            link=link,
            previous_start=previous_start,
            occurrences=occurrences,
        )


# -- templates ------------------------------------------------------------------------------------

_EN_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_EN_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_ES_DAYS = ("lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo")
_ES_MONTHS = (
    "enero", "febrero", "marzo", "abril", "mayo", "junio",
    "julio", "agosto", "septiembre", "octubre", "noviembre", "diciembre",
)  # fmt: skip

# Wording is chosen to stay within GSM-7 where Spanish allows it ("queda confirmada" rather than
# "está confirmada"): one accented vowel outside GSM-7 switches the whole message to UCS-2 and halves
# what fits in a segment. Day names keep their accents (sábado): correctness beats a segment.
_TEMPLATES: dict[str, dict[MessageKind, str]] = {
    "en": {
        MessageKind.CONFIRMATION: "{greeting}your {service} at {business} is confirmed for {when}. Ref {ref}.",
        MessageKind.RESCHEDULE: "{greeting}your {service} at {business} has moved{previous} to {when}. Ref {ref}.",
        MessageKind.CANCELLATION: "{greeting}your {service} at {business} on {when} is cancelled. Ref {ref}.",
        MessageKind.REMINDER: "{greeting}reminder: your {service} at {business} is {when}. Ref {ref}.",
    },
    "es": {
        MessageKind.CONFIRMATION: "{greeting}su cita de {service} en {business} queda confirmada para el {when}. "
        "Ref {ref}.",
        MessageKind.RESCHEDULE: "{greeting}su cita de {service} en {business}{previous} pasa al {when}. Ref {ref}.",
        MessageKind.CANCELLATION: "{greeting}su cita de {service} en {business} del {when} queda cancelada. Ref {ref}.",
        MessageKind.REMINDER: "{greeting}le recordamos su cita de {service} en {business} el {when}. Ref {ref}.",
    },
}
_GREETING = {"en": ("Hi {name}, ", "Hi, "), "es": ("Hola {name}: ", "Hola: ")}
_PREVIOUS = {"en": " from {when}", "es": " del {when}"}
_SERIES = {"en": " (first of {count})", "es": " (primera de {count})"}
_LINK = {"en": " Manage: {link}", "es": " Gestionar: {link}"}
STOP_FOOTER = {"en": " Reply STOP to opt out.", "es": " Responda STOP para darse de baja."}
"""The opt-out sentence of a text the customer can reply to (booking/sms_rules.py picks it or another)."""

SUPPORTED_LOCALES: tuple[str, ...] = tuple(_TEMPLATES)
DEFAULT_LOCALE = "en"
_MAX_NAME = 40  # a name is free text from a caller; keep one odd entry from filling a segment


def language_of(locale: str | None) -> str:
    """``es-MX``, ``es_419`` and ``ES`` all mean Spanish; an unsupported or missing locale falls back to
    English rather than failing a confirmation the customer is waiting for."""
    if not locale:
        return DEFAULT_LOCALE
    language = locale.replace("_", "-").split("-", 1)[0].strip().lower()
    return language if language in _TEMPLATES else DEFAULT_LOCALE


def format_when(instant: datetime, zone_name: str, language: str) -> str:
    """A local date and time with the zone's abbreviation, e.g. ``Mon Dec 7, 9:30 AM EST`` or
    ``lunes 7 de diciembre, 09:30 EST``."""
    local = ensure_utc(instant).astimezone(zone(zone_name))
    abbreviation = local.tzname() or zone_name
    if language == "es":
        return f"{_ES_DAYS[local.weekday()]} {local.day} de {_ES_MONTHS[local.month - 1]}, {local:%H:%M} {abbreviation}"
    hour = local.hour % 12 or 12
    meridiem = "AM" if local.hour < 12 else "PM"
    return (
        f"{_EN_DAYS[local.weekday()]} {_EN_MONTHS[local.month - 1]} {local.day}, "
        f"{hour}:{local.minute:02d} {meridiem} {abbreviation}"
    )


def render(
    kind: MessageKind, locale: str | None, view: BookingView, *, stop_footer: bool = False, footer: str = ""
) -> str:
    """The message text for ``kind`` in the customer's language. ``stop_footer`` appends the reply-STOP
    opt-out instruction that carriers expect in the first message to a number; ``footer`` appends another
    (``booking.sms_rules.opt_out_footer`` chooses it for the sender and country)."""
    language = language_of(locale)
    name = " ".join((view.customer_name or "").split())[:_MAX_NAME].strip()
    with_name, without_name = _GREETING[language]
    greeting = with_name.format(name=name) if name else without_name
    previous = ""
    if kind is MessageKind.RESCHEDULE and view.previous_start is not None:
        previous = _PREVIOUS[language].format(when=format_when(view.previous_start, view.zone_name, language))
    when = format_when(view.start, view.zone_name, language)
    if kind is MessageKind.CONFIRMATION and view.occurrences > 1:
        when += _SERIES[language].format(count=view.occurrences)
    text = _TEMPLATES[language][kind].format(
        greeting=greeting,
        service=view.service_name,
        business=view.business_name,
        when=when,
        previous=previous,
        ref=view.reference,
    )
    if view.link:
        text += _LINK[language].format(link=view.link)
    if stop_footer:
        text += STOP_FOOTER[language]
    return text + footer


# -- segments -------------------------------------------------------------------------------------

# GSM 03.38 default alphabet (one septet each) and its extension table (escape + septet: two each).
# ESC (0x1B) itself is not a character a sender may use.
_GSM_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM_EXTENSION = frozenset("\f^{}\\[~]|€")

GSM7 = "GSM-7"
UCS2 = "UCS-2"
_LIMITS = {GSM7: (160, 153), UCS2: (70, 67)}
"""Units in a single-part message, and per part once split (the rest is the concatenation header)."""


@dataclass(frozen=True, slots=True)
class SegmentCount:
    encoding: str
    """``GSM-7`` or ``UCS-2``."""
    segments: int
    characters: int
    """Unicode code points in the text."""
    units: int
    """What the segment limits count: septets for GSM-7 (an extension character is two), UTF-16 code
    units for UCS-2 (a character outside the BMP, such as most emoji, is two)."""


def is_gsm7(text: str) -> bool:
    return all(char in _GSM_BASIC or char in _GSM_EXTENSION for char in text)


def segments(text: str) -> SegmentCount:
    """How many SMS segments ``text`` takes. A split never separates an escape from its extension
    character nor the two halves of a surrogate pair, so parts are filled greedily by whole characters,
    as handsets and Twilio do. An empty text takes no segment."""
    encoding = GSM7 if is_gsm7(text) else UCS2
    widths = [_width(char, encoding) for char in text]
    units = sum(widths)
    single, per_part = _LIMITS[encoding]
    if units == 0:
        count = 0
    elif units <= single:
        count = 1
    else:
        count, filled = 1, 0
        for width in widths:
            if filled + width > per_part:
                count, filled = count + 1, 0
            filled += width
    return SegmentCount(encoding=encoding, segments=count, characters=len(text), units=units)


def _width(char: str, encoding: str) -> int:
    if encoding == GSM7:
        return 2 if char in _GSM_EXTENSION else 1
    return 2 if ord(char) > 0xFFFF else 1


# -- inbound keywords -----------------------------------------------------------------------------

_KEYWORDS: dict[str, Keyword] = {
    **dict.fromkeys(("STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"), Keyword.OPT_OUT),
    **dict.fromkeys(("START", "YES", "UNSTOP"), Keyword.OPT_IN),
    **dict.fromkeys(("HELP", "INFO"), Keyword.HELP),
}


def classify_inbound(body: str) -> Keyword | None:
    """The carrier keyword a reply is, or None for ordinary text. Only the whole message counts
    (trimmed, any case): "please stop calling" is a conversation, not an opt-out."""
    return _KEYWORDS.get(body.strip().upper())
