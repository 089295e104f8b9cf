"""Which number a member of staff sees when the agent transfers a caller to them. Pure rules, no I/O.

A transfer is a second call leg, from Twilio to the staff member's phone (``<Dial>``). The customer stays
on the leg they dialled, so they keep seeing the business's number; what the policy decides is the
caller ID on the new leg:

* ``business`` (the default): the staff member sees the business's number calling. The customer's number
  is not shown to staff, and a staff member who calls back reaches the business line, not the customer.
* ``caller``: the staff member sees the customer's own number (Twilio allows the inbound caller's number
  as the ``callerId`` of a ``<Dial>``). Refused while masking is on.

Masking (``VOICEBOOK_MASK_CALLER_NUMBER``, on by default) keeps the customer's number out of everything
sent to staff; today that is the transfer's caller ID, the only thing voicebook sends them.

Whatever the policy, the caller ID is never the staff member's own number (the number being dialled),
and when no policy can give a number a business may use as caller ID, there is none: Twilio would then
pass the customer's number through, so :mod:`integrations.twilio_rest` refuses such a transfer.
"""

from __future__ import annotations

import enum

from booking.errors import InvalidRequest
from booking.phone import normalise_phone


class TransferCallerId(enum.StrEnum):
    BUSINESS = "business"
    CALLER = "caller"


CALLER_ID_VARIABLE = "VOICEBOOK_TRANSFER_CALLER_ID"
MASK_VARIABLE = "VOICEBOOK_MASK_CALLER_NUMBER"


def policy_problem(shown: TransferCallerId, *, mask_caller_number: bool) -> str | None:
    """Why this combination of settings cannot be run, or None. Showing staff the customer's number is
    exactly what masking forbids, so asking for both is a configuration mistake, not a choice to guess."""
    if shown is TransferCallerId.CALLER and mask_caller_number:
        return (
            f"{CALLER_ID_VARIABLE}=caller shows staff the customer's number, which {MASK_VARIABLE}=true forbids;"
            f" set {MASK_VARIABLE}=false to allow it, or use {CALLER_ID_VARIABLE}=business"
        )
    return None


def _e164(number: str | None) -> str | None:
    """The number in E.164 when it is a real one; None for a withheld caller ("anonymous") or nothing."""
    if not number:
        return None
    try:
        return normalise_phone(number, default_region="ZZ")  # E.164 already: no region to read it in
    except InvalidRequest:
        return None


def transfer_caller_id(
    shown: TransferCallerId,
    *,
    mask_caller_number: bool,
    business_number: str | None,
    called_number: str | None,
    caller_number: str | None,
    transfer_number: str | None,
) -> str | None:
    """The ``callerId`` of the transfer's ``<Dial>``, or None when no number may be shown.

    The business's number is its configured phone, else the number the customer dialled (a number of
    this Twilio account, so one Twilio accepts as caller ID). Under ``caller`` without masking, the
    customer's own number when they did not withhold it; a withheld or unreadable number falls back to
    the business's. Never ``transfer_number``: staff calling themselves would see their own number, and
    a misconfigured transfer to the business line would show it as if the business were calling."""
    staff = _e164(transfer_number)
    candidates: list[str | None] = []
    if shown is TransferCallerId.CALLER and not mask_caller_number:
        candidates.append(_e164(caller_number))
    candidates += [_e164(business_number), _e164(called_number)]
    for candidate in candidates:
        if candidate is not None and candidate != staff:
            return candidate
    return None
