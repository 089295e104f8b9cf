"""Twilio webhooks delivered twice are applied once: a cheap Redis front door before the ledger.

Twilio retries a webhook that timed out or failed (and anyone holding a captured, validly signed request
can send it again). Every retry carries the same ``I-Twilio-Idempotency-Token``; without one we fall back
to what identifies the event: the CallSid of an incoming call, CallSid + CallStatus + SequenceNumber of a
status callback, MessageSid + MessageStatus of a delivery receipt, the MessageSid of an inbound text.
The first delivery claims that key in Redis (``SET NX EX``, kept ``VOICEBOOK_WEBHOOK_DEDUPE_SECONDS``,
24 h by default); a later one finds it taken and is a replay.

A replay gets the answer the first delivery got where that answer matters, without its side effects:
the incoming-call webhook answers the same TwiML again (Twilio needs a document either way, and a
replayed call must not be recorded twice), an inbound text gets the same reply, status callbacks and
receipts get their 204. A first delivery whose handler fails gives its key back, so Twilio's retry is
applied rather than dropped.

This is a front door, not the guarantee: the ledger's own idempotency (``call_status_events``,
``sms_status_events``, the calls table keyed by CallSid) stays. So when Redis cannot be reached the door
fails open, logs it, and the ledger decides.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis
import structlog
from prometheus_client import Counter
from redis.exceptions import RedisError
from starlette.datastructures import FormData
from starlette.requests import Request

from voice_server.components import Components

log = structlog.get_logger("voicebook.twilio")

Kind = Literal["voice", "consent", "call-status", "message-status", "sms"]

IDEMPOTENCY_HEADER = "i-twilio-idempotency-token"
_EVENT_FIELDS: dict[Kind, tuple[tuple[str, ...], ...]] = {
    # Each field is a tuple of names Twilio has used for it (the first found wins).
    "voice": (("CallSid",),),
    "consent": (("CallSid",),),  # one answer per call
    "call-status": (("CallSid",), ("CallStatus",), ("SequenceNumber",)),
    "message-status": (("MessageSid", "SmsSid"), ("MessageStatus", "SmsStatus")),
    "sms": (("MessageSid", "SmsSid"),),
}

REPLAYS = Counter(
    "voicebook_webhook_replays_total",
    "Twilio webhooks recognised as a delivery seen before (not applied again), by endpoint kind.",
    ["kind"],
)
DEDUPE_UNAVAILABLE = Counter(
    "voicebook_webhook_dedupe_unavailable_total",
    "Twilio webhooks applied without the replay check because Redis could not be reached.",
)


def delivery_key(prefix: str, kind: Kind, token: str | None, form: FormData) -> str | None:
    """The Redis key of one delivery: by Twilio's idempotency token when it sent one, else by the event's
    SIDs; None when neither is there (nothing to recognise a replay by). Pure."""
    if token:
        identity = f"token:{token.strip()}"
    else:
        parts: list[str] = []
        for names in _EVENT_FIELDS[kind]:
            value = next((str(form.get(name)).strip() for name in names if form.get(name)), "")
            parts.append(value)
        if not parts[0]:  # no SID: not an event we can name
            return None
        identity = "event:" + "|".join(parts)
    # Hashed: a fixed-length key whatever the sender put in the header.
    digest = hashlib.sha256(identity.encode("utf-8", "replace")).hexdigest()[:32]
    return f"{prefix}:twilio-delivery:{kind}:{digest}"


@dataclass
class Delivery:
    """One webhook delivery after the replay check. ``replay`` True: seen before, do not apply again."""

    replay: bool
    key: str | None
    redis: aioredis.Redis | None

    @contextlib.asynccontextmanager
    async def applying(self) -> AsyncIterator[None]:
        """Around the side effects of a first delivery: if they fail, the claim is given back so that
        Twilio's retry of this delivery is applied."""
        try:
            yield
        except BaseException:
            await self.forget()
            raise

    async def forget(self) -> None:
        if self.key is None or self.redis is None:
            return
        try:
            await self.redis.delete(self.key)
        except (RedisError, OSError) as error:
            log.warning("webhook_dedupe_forget_failed", error=type(error).__name__)


async def claim(components: Components, request: Request, form: FormData, kind: Kind) -> Delivery:
    """Claim this (signature-checked) delivery; see the module's docstring."""
    settings = components.settings
    key = delivery_key(settings.redis_prefix, kind, request.headers.get(IDEMPOTENCY_HEADER), form)
    if key is None or settings.webhook_dedupe_seconds <= 0:
        return Delivery(replay=False, key=None, redis=None)
    try:
        first = await components.redis.set(key, b"1", nx=True, ex=settings.webhook_dedupe_seconds)
    except (RedisError, OSError) as error:
        DEDUPE_UNAVAILABLE.inc()
        log.warning(
            "webhook_dedupe_unavailable",
            kind=kind,
            error=type(error).__name__,
            hint="applied without the replay check; the ledger's idempotency still holds",
        )
        return Delivery(replay=False, key=None, redis=None)
    if not first:
        REPLAYS.labels(kind).inc()
        log.info("twilio_webhook_replay", kind=kind, path=request.url.path)
        return Delivery(replay=True, key=key, redis=components.redis)
    return Delivery(replay=False, key=key, redis=components.redis)
