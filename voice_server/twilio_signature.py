"""Checking ``X-Twilio-Signature`` with the auth token, or either token during a rotation.

Rotating a Twilio auth token has a window: Twilio signs with the new (primary) token once it is promoted,
but requests already queued or retried may still carry the old one's signature, and the order in which
our configuration and Twilio's console change is up to a person. So while
``TWILIO_AUTH_TOKEN_SECONDARY`` is set, a request signed with either token is accepted. Each accepted
request says which token matched, in the log (``twilio_signature_matched=secondary``) and in
``voicebook_twilio_signature_matched_total{token}``: when the secondary's count stops growing, the old
token is no longer in use and the variable can go.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import structlog
from prometheus_client import Counter
from twilio.request_validator import RequestValidator

from voice_server.settings import Settings

log = structlog.get_logger("voicebook.twilio")

Matched = Literal["primary", "secondary"]

SIGNATURE_MATCHED = Counter(
    "voicebook_twilio_signature_matched_total",
    "Twilio requests whose signature was valid, by the auth token that matched (primary or secondary).",
    ["token"],
)


def matching_token(settings: Settings, url: str, params: Mapping[str, str], signature: str) -> Matched | None:
    """Which configured auth token signed this request (``url`` as Twilio requested it, ``params`` the form
    fields, none for a WebSocket upgrade); None when neither did or the signature is missing. The primary
    is tried first: outside a rotation it is the only one."""
    if not signature:
        return None
    candidates: tuple[tuple[Matched, str | None], ...] = (
        ("primary", settings.twilio_auth_token),
        ("secondary", settings.twilio_auth_token_secondary),
    )
    for which, token in candidates:
        if token is not None and RequestValidator(token).validate(url, dict(params), signature):
            SIGNATURE_MATCHED.labels(which).inc()
            if which == "secondary":
                # Worth a line each time: the operator waits for these to stop before dropping the old token.
                log.info("twilio_signature_secondary", twilio_signature_matched=which)
            return which
    return None
