"""Phone numbers in E.164, the one form the ledger stores and looks up by, and the national forms a
person reads and hears.

Numbers arrive typed by people (the booking API, the CLI) and from carriers (Twilio's webhooks); both are
read in the business's country (``region_of(business.phone)``), so ``(646) 555-0199`` means a US number
for a New York clinic and ``020 7946 0958`` a London one for a London clinic.
"""

from __future__ import annotations

import re
from functools import lru_cache

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberFormat, ValidationResult

from booking.errors import InvalidRequest

_EXTENSION = re.compile(r"\s*[,;]?\s*(?:x|ext\.?|extension|#|,)\s*\d{1,7}\s*$", re.IGNORECASE)
"""An extension typed after the number ("ext 2", "x12", "#3"): dropped, since neither a text message
nor a transfer can dial one, and E.164 has no place for it."""
_LETTER = re.compile(r"[^\W\d_]")
_WHY_NOT_POSSIBLE = {
    ValidationResult.INVALID_COUNTRY_CODE: "its country code is unknown",
    ValidationResult.TOO_SHORT: "it has too few digits",
    ValidationResult.TOO_LONG: "it has too many digits",
    ValidationResult.INVALID_LENGTH: "it has the wrong number of digits for its country",
    ValidationResult.IS_POSSIBLE_LOCAL_ONLY: "it lacks an area code",
}
_WHY_NOT_PARSED = {
    NumberParseException.INVALID_COUNTRY_CODE: "its country code is unknown",
    NumberParseException.NOT_A_NUMBER: "it has no digits to dial",
    NumberParseException.TOO_SHORT_AFTER_IDD: "it has too few digits after the international prefix",
    NumberParseException.TOO_SHORT_NSN: "it has too few digits",
    NumberParseException.TOO_LONG: "it has too many digits",
}
_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@lru_cache(maxsize=8192)  # pure; a caller's number is normalised at every step of a call
def normalise_phone(raw: str, *, default_region: str = "US") -> str:
    """``(212) 555-0100`` -> ``+12125550100``. A number without a country code is read in
    ``default_region`` (the business's country); ``00`` before a country code is read as ``+`` even where
    the national dialling prefix differs (``0044 20 7946 0958`` typed into a US form). Invalid numbers are
    refused with the input and the reason.

    Letters are refused rather than read as a keypad would (``1-800-FLOWERS``): a letter O typed for a
    zero would otherwise become a six and a wrong number that looks right."""
    text = raw.strip()
    if not text:
        raise InvalidRequest("a phone number is required", code="invalid_phone")
    number = _EXTENSION.sub("", text)
    if _LETTER.search(number):
        raise InvalidRequest(f"{raw!r} is not a phone number: it contains letters", code="invalid_phone")
    parsed = _parse(raw, number, default_region)
    if not phonenumbers.is_valid_number(parsed) and number.lstrip().startswith("00"):
        parsed = _parse(raw, "+" + number.lstrip()[2:], default_region)
    if not phonenumbers.is_valid_number(parsed):
        reason = _WHY_NOT_POSSIBLE.get(phonenumbers.is_possible_number_with_reason(parsed))
        detail = reason or f"no such number is assigned in {_region_name(parsed)}"
        raise InvalidRequest(f"{raw!r} is not a valid phone number: {detail}", code="invalid_phone")
    return phonenumbers.format_number(parsed, PhoneNumberFormat.E164)


def _parse(raw: str, text: str, region: str) -> phonenumbers.PhoneNumber:
    try:
        return phonenumbers.parse(text, region)
    except NumberParseException as exc:
        reason = _WHY_NOT_PARSED.get(exc.error_type, "it cannot be read as one")
        raise InvalidRequest(f"{raw!r} is not a phone number: {reason}", code="invalid_phone") from None


def _region_name(parsed: phonenumbers.PhoneNumber) -> str:
    region = phonenumbers.region_code_for_number(parsed)
    return region if region and region != "ZZ" else f"country code +{parsed.country_code}"


def region_of(number: str | None, fallback: str = "US") -> str:
    """The ISO country of an E.164 number (the business's own line), for reading local numbers."""
    if not number:
        return fallback
    try:
        region = phonenumbers.region_code_for_number(phonenumbers.parse(number, None))
    except NumberParseException:
        return fallback
    # "ZZ": no country (a withheld or unknown number); "001": a non-geographic one (+800, +882).
    return region if region and region not in ("ZZ", "001") else fallback


def _displayable(number: str) -> phonenumbers.PhoneNumber | None:
    try:
        parsed = phonenumbers.parse(number, None)
    except NumberParseException:
        return None
    return parsed if phonenumbers.is_valid_number(parsed) else None


def format_national(number: str, *, home_region: str | None = None) -> str:
    """How a person in ``home_region`` writes ``number``: ``+16465550199`` -> ``(646) 555-0199``,
    ``+442079460958`` -> ``020 7946 0958``. A number of another country than ``home_region`` keeps its
    country code (``+44 20 7946 0958``), since dialling it nationally would reach someone else; None means
    the number's own country. Anything that is not a valid E.164 number is returned as given."""
    parsed = _displayable(number)
    if parsed is None:
        return number
    own = phonenumbers.region_code_for_number(parsed)
    if home_region is not None and own != home_region:
        return phonenumbers.format_number(parsed, PhoneNumberFormat.INTERNATIONAL)
    return phonenumbers.format_number(parsed, PhoneNumberFormat.NATIONAL)


def spoken_number(number: str, *, home_region: str | None = None) -> str:
    """``number`` as a person reads it aloud, for text-to-speech: each digit a word, the groups of its
    national form separated by commas so the voice pauses where a listener expects to, e.g.
    ``+16465550199`` -> "six four six, five five five, zero one nine nine". A foreign number starts with
    "plus" and its country code. A speech engine left to itself says "6465550199" as a six-billion figure."""
    written = format_national(number, home_region=home_region)
    groups = re.findall(r"\+?\d+", written)
    words = []
    for group in groups:
        spoken = " ".join(_DIGIT_WORDS[int(digit)] for digit in group.lstrip("+"))
        words.append(f"plus {spoken}" if group.startswith("+") else spoken)
    return ", ".join(words) if words else number
