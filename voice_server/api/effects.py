"""The dead-letter API: effects (calendar events, texts) that failed for good wait here for an operator,
who retries them (back to the queue with a fresh set of attempts) or discards them (with a note).

Lists leave the payload out: it is the booking's snapshot, customer details included. The one-effect
view shows it with the phone number masked.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from booking.errors import InvalidRequest
from booking.ledger.api_token_repository import Role
from booking.outbox import Effect, Outbox, RedisNotifier
from voice_server.api.bookings import _query_int, endpoint, json_body
from voice_server.api.responses import JSONResponse, problem
from voice_server.api.schemas import parse_body
from voice_server.components import Components
from voice_server.effects import masked_phone

MAX_LIST = 500


class DiscardBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: str = Field(min_length=1, max_length=500)


def _iso(value: Any) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def render_effect(effect: Effect, *, payload: bool = False) -> dict[str, Any]:
    """An effect as JSON; ``payload`` adds the booking snapshot with the customer's phone masked."""
    body: dict[str, Any] = {
        "id": effect.id,
        "booking_id": effect.booking_id,
        "call_sid": effect.call_sid,
        "kind": effect.kind,
        "status": effect.status.value,
        "attempts": effect.attempts,
        "max_attempts": effect.max_attempts,
        "due_at": _iso(effect.due_at),
        "last_error": effect.last_error,
        "idempotency_key": effect.idempotency_key,
        "created_at": _iso(effect.created_at),
        "updated_at": _iso(effect.updated_at),
    }
    if payload:
        body["payload"] = masked_payload(effect.payload)
    return body


def masked_payload(payload: dict[str, Any]) -> dict[str, Any]:
    customer = payload.get("customer")
    if not isinstance(customer, dict) or not isinstance(customer.get("phone"), str):
        return dict(payload)
    return payload | {"customer": customer | {"phone": masked_phone(customer["phone"])}}


def _outbox(components: Components) -> Outbox:
    # The same channel the server's ledger notifies on, so a retried effect wakes idle workers at once.
    notify = RedisNotifier(components.redis, components.settings.effects_channel)
    return Outbox(components.database, clock=components.clock, notify=notify)


def _effect_id(request: Request) -> int:
    raw: str = request.path_params["effect_id"]
    if not raw.isdigit():
        raise InvalidRequest("an effect id is a whole number", code="invalid_effect_id")
    return int(raw)


def _not_found(effect_id: int) -> Response:
    return problem(404, "effect_not_found", "Effect not found", f"no effect {effect_id}")


def _not_dead(effect: Effect) -> Response:
    return problem(
        409,
        "effect_not_dead",
        "Effect is not a dead letter",
        f"effect {effect.id} is {effect.status.value}: only dead effects can be retried or discarded",
        effect_status=effect.status.value,
    )


async def list_dead(request: Request, components: Components) -> Response:
    limit = _query_int(request, "limit", 100, 1, MAX_LIST)
    effects = await _outbox(components).dead_letters(limit=limit, newest_first=True)
    return JSONResponse({"effects": [render_effect(effect) for effect in effects]})


async def depth(request: Request, components: Components) -> Response:
    return JSONResponse({"pending_due": await _outbox(components).queue_depth()})


async def get_effect(request: Request, components: Components) -> Response:
    effect_id = _effect_id(request)
    effect = await _outbox(components).get(effect_id)
    if effect is None:
        return _not_found(effect_id)
    return JSONResponse(render_effect(effect, payload=True))


async def _settled(outbox: Outbox, effect_id: int, settled: Effect | None) -> Response:
    if settled is not None:
        return JSONResponse(render_effect(settled))
    # Not dead (or gone): say which, for an operator who raced another one.
    current = await outbox.get(effect_id)
    return _not_found(effect_id) if current is None else _not_dead(current)


async def retry_effect(request: Request, components: Components) -> Response:
    effect_id = _effect_id(request)
    outbox = _outbox(components)
    return await _settled(outbox, effect_id, await outbox.retry(effect_id))


async def discard_effect(request: Request, components: Components) -> Response:
    effect_id = _effect_id(request)
    body = parse_body(DiscardBody, await json_body(request))
    outbox = _outbox(components)
    return await _settled(outbox, effect_id, await outbox.discard(effect_id, body.note))


routes = [
    Route("/api/admin/effects/dead", endpoint(list_dead, Role.OPERATOR), methods=["GET"]),
    Route("/api/admin/effects/depth", endpoint(depth, Role.OPERATOR), methods=["GET"]),
    Route("/api/admin/effects/{effect_id}", endpoint(get_effect, Role.OPERATOR), methods=["GET"]),
    Route("/api/admin/effects/{effect_id}/retry", endpoint(retry_effect, Role.OPERATOR), methods=["POST"]),
    Route("/api/admin/effects/{effect_id}/discard", endpoint(discard_effect, Role.OPERATOR), methods=["POST"]),
]
