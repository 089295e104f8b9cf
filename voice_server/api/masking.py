"""What a viewer sees of personal data: phone numbers with their middle hidden, names as initials, email
addresses without the mailbox, and no transcript text at all.

Operators and admins see the data as stored; the API's renderers ask the request's principal
(voice_server/api/auth.py) and pass the result through these functions for a viewer.
"""

from __future__ import annotations

from typing import Any

MASKED_TEXT = "[masked]"


def mask_phone(phone: str | None) -> str | None:
    """``+12125550123`` becomes ``+1******0123``: the first digit and the last four stay, so a viewer can
    tell numbers apart on a list without being able to dial one."""
    if not phone:
        return phone
    digits = sum(ch.isdigit() for ch in phone)
    seen, out = 0, []
    for ch in phone:
        if ch.isdigit():
            seen += 1
            out.append(ch if seen == 1 or seen > digits - 4 else "*")
        else:
            out.append(ch)
    return "".join(out)


def mask_name(name: str | None) -> str | None:
    """``Alice Smith`` becomes ``A. S.``."""
    if not name:
        return name
    return " ".join(f"{part[0]}." for part in name.split())


def mask_email(email: str | None) -> str | None:
    """``alice@example.com`` becomes ``a***@example.com``."""
    if not email:
        return email
    mailbox, at, domain = email.partition("@")
    return f"{mailbox[:1]}***{at}{domain}"


def mask_customer(customer: dict[str, Any]) -> dict[str, Any]:
    return customer | {
        "phone": mask_phone(customer.get("phone")),
        "name": mask_name(customer.get("name")),
        "email": mask_email(customer.get("email")),
    }


def mask_turns(turns: Any) -> Any:
    """Transcript turns (dicts with ``text``) with their text replaced; anything else as it is."""
    if not isinstance(turns, list | tuple):
        return turns
    return [turn | {"text": MASKED_TEXT} if isinstance(turn, dict) and "text" in turn else turn for turn in turns]


def _masked_automated(block: Any, mask: Any) -> Any:
    if isinstance(block, dict) and "value" in block:
        return block | {"value": mask(block["value"])}
    return block


def mask_report(body: dict[str, Any]) -> dict[str, Any]:
    """An end-of-call report (booking/reports/schema.py) as a viewer sees it. Free text drawn from the
    conversation (the summary, the key phrases) counts as transcript: it can name the caller."""
    masked = dict(body)
    if isinstance(masked.get("caller_number"), str):
        masked["caller_number"] = mask_phone(masked["caller_number"])
    if isinstance(masked.get("participants"), list):
        masked["participants"] = [
            p | {"number": mask_phone(p.get("number")), "name": mask_name(p.get("name"))} if isinstance(p, dict) else p
            for p in masked["participants"]
        ]
    masked["transcript"] = mask_turns(masked.get("transcript"))
    masked["cleaned_transcript"] = _masked_automated(masked.get("cleaned_transcript"), mask_turns)
    masked["summary"] = _masked_automated(masked.get("summary"), lambda _: MASKED_TEXT)
    masked["key_phrases"] = _masked_automated(masked.get("key_phrases"), lambda v: [MASKED_TEXT for _ in v or ()])
    return {key: value for key, value in masked.items() if key in body}
