"""The cleaned transcript: fillers removed and personal data masked.

Filler removal is conservative: ``um``/``uh``/``erm``/``hmm`` always go (``mm-hmm``, a
yes, stays); ``like`` and ``you know`` only
where commas set them off as a filler (``it was, like, late``), never as a verb (``I'd like a check-up``).

Masking replaces, in this order: e-mail addresses with ``[email]``; runs of 13 to 19 digits (spaces or
dashes between them allowed) that pass the Luhn check with ``[card]``; phone numbers that libphonenumber
finds valid (for the business's region when written without a country code) with ``[phone]``; any
other run of seven or more digits (nine or more when spaced or dashed) with ``[number]``; the words of
the caller's name as the booking tools recorded it with ``[name]``. Times
(``9:30``) and dates (``12/01``, ``2026-12-01``) have short digit groups and are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import phonenumbers

EMAIL_MASK = "[email]"
CARD_MASK = "[card]"
PHONE_MASK = "[phone]"
NUMBER_MASK = "[number]"
NAME_MASK = "[name]"
MASKS = (EMAIL_MASK, CARD_MASK, PHONE_MASK, NUMBER_MASK, NAME_MASK)

_FILLER = re.compile(r"(?i)(?<![\w'-])(?:u+m+|u+h+|e+r+m+|h+m+)(?![\w'-]),?")
_COMMA_FILLER = re.compile(r"(?i)(?:,\s*|^\s*)(?:like|you know|i mean)\s*,")
_EMAIL = re.compile(r"(?i)\b[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}\b")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_LONG_DIGITS = re.compile(r"\d{7,}|(?<![\d-])\d+(?:[ -]\d+){1,}(?![\d-])")
_LONG_RUN_DIGITS = 9  # spaced or dashed runs at least this long (account numbers); dates have eight at most
_SPACES = re.compile(r"\s{2,}")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([,.?!])")
_REPEATED_COMMAS = re.compile(r",\s*(?=[,.?!])")


def remove_fillers(text: str) -> str:
    without = _FILLER.sub("", text)
    without = _COMMA_FILLER.sub(" ", without)
    return _tidy(without)


def mask_pii(text: str, region: str = "US") -> str:
    """``text`` with e-mails, card numbers, phone numbers and long digit runs masked; ``region`` is the
    ISO country whose national format applies to numbers written without ``+``."""
    masked = _EMAIL.sub(EMAIL_MASK, text)
    masked = _CARD.sub(lambda match: CARD_MASK if _passes_luhn(match.group(0)) else match.group(0), masked)
    masked = _mask_phones(masked, region)
    return _LONG_DIGITS.sub(_mask_long_run, masked)


def mask_names(text: str, names: Sequence[str]) -> str:
    """``text`` with every word of the known ``names`` (the caller's, as the booking tools recorded it)
    masked, whole words and any case: "Thanks, John" and "my name is john doe" alike. A name said but
    never given to a tool is not known, so not masked."""
    words = sorted({w for name in names for w in re.findall(r"[^\W\d_][\w'-]*", name) if len(w) > 1}, key=len)
    if not words:
        return text
    pattern = re.compile(r"(?i)(?<![\w'-])(?:" + "|".join(re.escape(w) for w in reversed(words)) + r")(?![\w'-])")
    masked = pattern.sub(NAME_MASK, text)
    return re.sub(r"\[name\](?:\s+\[name\])+", NAME_MASK, masked)


def clean_text(text: str, region: str = "US", names: Sequence[str] = ()) -> str:
    return mask_names(mask_pii(remove_fillers(text), region), names)


def _mask_phones(text: str, region: str) -> str:
    matches = list(phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID))
    for match in reversed(matches):  # from the end, so earlier offsets stay right
        text = text[: match.start] + PHONE_MASK + text[match.end :]
    return text


def _mask_long_run(match: re.Match[str]) -> str:
    run = match.group(0)
    digits = sum(char.isdigit() for char in run)
    contiguous = run.isdigit()
    return NUMBER_MASK if (contiguous and digits >= 7) or digits >= _LONG_RUN_DIGITS else run


def _passes_luhn(candidate: str) -> bool:
    digits = [int(char) for char in candidate if char.isdigit()]
    total = 0
    for position, digit in enumerate(reversed(digits)):
        if position % 2 == 1:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def _tidy(text: str) -> str:
    text = _REPEATED_COMMAS.sub("", text)
    text = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", text)
    text = _SPACES.sub(" ", text).strip()
    return text.lstrip(",. ").strip()
