"""The business's phone lines: which numbers are its own, and what a call to each may book.

A number in the registry (``voicebook numbers``) may serve part of the business: ``serves`` names the
resources its calls book (a dental line and a physiotherapy line of one practice). A call to it is
offered, held and booked only with those; its caller's existing bookings stay theirs to hear about,
cancel and move (a move may also stay with the booking's own resource).

Texts follow the same lines: a text about a booking made on a registered number goes from that number
when it may (:func:`why_not_text_from`), and a text that comes in is answered only on a number of ours
(:func:`is_our_texting_number`).
"""

from __future__ import annotations

import structlog

from booking.errors import InvalidRequest
from booking.ledger.numbers_repository import A2P_CLEARED, TOLL_FREE_CLEARED, NumberRegistry, RegisteredNumber
from booking.phone import normalise_phone
from voice_server.components import Components

log = structlog.get_logger("voicebook.lines")


def normalised_number(number: str, region: str) -> str:
    """E.164 when it parses; otherwise as given (Twilio sends "anonymous" or "+266696687" for withheld)."""
    try:
        return normalise_phone(number, default_region=region)
    except InvalidRequest:
        return number


async def is_our_number(components: Components, called: str, region: str) -> bool:
    """Whether a call to ``called`` is this business's: its configured phone, or a number in the registry
    (``voicebook numbers``). With neither a phone configured nor a number registered, every number is
    (a development server answers whatever it is dialled on)."""
    business_phone = normalised_number(components.business.phone, region) if components.business.phone else None
    if not called or called == business_phone:
        return True
    registry = NumberRegistry(components.database)
    if await registry.serves(called) is not None:
        return True
    return business_phone is None and not await registry.list()


async def line_scope(components: Components, called: str) -> frozenset[str] | None:
    """The resources a call to ``called`` may book; None: the whole business (the business's own phone,
    an unregistered number, or a registered one that serves everything). Resource ids the business no
    longer has are dropped; a line left with none of its own serves the whole business and says so in
    the log, rather than turning every caller away."""
    if not called:
        return None
    serves = await NumberRegistry(components.database).serves(called)
    if not serves:
        return None
    known = {resource.id for resource in components.business.resources}
    kept = frozenset(serves) & known
    if kept != frozenset(serves):
        log.warning("line_serves_unknown_resources", number=called, unknown=sorted(set(serves) - known))
    return kept or None


def why_not_text_from(line: RegisteredNumber | None) -> str | None:
    """Why texts may not go from a booking's line, or None when they may. ``not_registered``: not in the
    registry (released, or never ours); ``cannot_text``: no SMS capability; ``a2p_<status>`` and
    ``toll_free_<status>``: carriers would filter its texts until the registration is approved. Pure."""
    if line is None:
        return "not_registered"
    if not line.sms:
        return "cannot_text"
    if line.a2p_status not in A2P_CLEARED:
        return f"a2p_{line.a2p_status.value}"
    if line.toll_free_verification not in TOLL_FREE_CLEARED:
        return f"toll_free_{line.toll_free_verification.value}"
    return None


async def is_our_texting_number(
    components: Components, to: str, region: str, *, messaging_service_sid: str | None = None
) -> bool:
    """Whether a text to ``to`` came to this business: its configured phone, its configured sender
    (``TWILIO_SMS_FROM``; or ``TWILIO_MESSAGING_SERVICE_SID``, which Twilio names as the webhook's
    ``messaging_service_sid`` when ``to`` is in that service's pool), or a number in the registry. With
    none of these configured and nothing registered, every number is, as for calls."""
    settings = components.settings
    configured = {normalised_number(n, region) for n in (components.business.phone, settings.twilio_sms_from) if n}
    service = settings.twilio_messaging_service_sid
    if not to or to in configured or (service is not None and messaging_service_sid == service):
        return True
    registry = NumberRegistry(components.database)
    if await registry.get(to) is not None:
        return True
    return not configured and service is None and not await registry.list()


__all__ = ["is_our_number", "is_our_texting_number", "line_scope", "normalised_number", "why_not_text_from"]
