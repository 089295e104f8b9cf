"""Phone numbers in E.164, the one form the ledger stores and looks up by."""

from __future__ import annotations

from functools import lru_cache

import phonenumbers

from booking.errors import InvalidRequest


@lru_cache(maxsize=8192)  # pure; a caller's number is normalised at every step of a call
def normalise_phone(raw: str, *, default_region: str = "US") -> str:
    """``(212) 555-0100`` -> ``+12125550100``. A number without a country code is read in
    ``default_region`` (the business's country). Invalid numbers are refused with the reason."""
    text = raw.strip()
    if not text:
        raise InvalidRequest("a phone number is required", code="invalid_phone")
    try:
        parsed = phonenumbers.parse(text, default_region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidRequest(f"{raw!r} is not a phone number: {exc}", code="invalid_phone") from None
    if not phonenumbers.is_valid_number(parsed):
        raise InvalidRequest(f"{raw!r} is not a valid phone number", code="invalid_phone")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def region_of(number: str | None, fallback: str = "US") -> str:
    """The ISO country of an E.164 number (the business's own line), for reading local numbers."""
    if not number:
        return fallback
    try:
        region = phonenumbers.region_code_for_number(phonenumbers.parse(number, None))
    except phonenumbers.NumberParseException:
        return fallback
    return region or fallback
