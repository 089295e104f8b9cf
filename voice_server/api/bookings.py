"""The booking API: availability, holds, bookings. JSON in and out; errors as RFC 9457 problems."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import date, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from booking.domain import BookingStatus, Interval, SmsConsent
from booking.errors import BookingError, InvalidRequest
from booking.ledger.api_token_repository import Role
from booking.ledger.repository import CustomerDetails
from booking.service import Booked, BookRequest, SlotUnavailable
from booking.timeutil import local_day_bounds, parse_instant, zone
from voice_server.api.auth import authorize, principal_of
from voice_server.api.masking import mask_customer
from voice_server.api.responses import JSONResponse, problem, problem_for
from voice_server.api.schemas import (
    BookingBody,
    HoldBody,
    PatchBody,
    parse_body,
    render_booking,
    render_event,
    render_slot,
    render_unavailable,
)
from voice_server.components import Components

log = structlog.get_logger("voicebook.api.bookings")

MAX_BODY_BYTES = 64 * 1024
MAX_IDEMPOTENCY_KEY = 255
MAX_SEARCH_DAYS = 31

Handler = Callable[[Request, Components], Awaitable[Response]]


def _components(request: Request) -> Components:
    components: Components = request.app.state.components
    return components


def endpoint(handler: Handler, needs: Role) -> Callable[[Request], Awaitable[Response]]:
    """Authorization (a token whose role allows ``needs``) and error mapping around a handler."""

    async def wrapped(request: Request) -> Response:
        components = _components(request)
        principal = await authorize(request, components, needs)
        if isinstance(principal, Response):
            return principal
        booking_id = request.path_params.get("booking_id")
        try:
            # Whatever the handler's layers log about a booking (ledger, effects) names it.
            with structlog.contextvars.bound_contextvars(**({"booking_id": booking_id} if booking_id else {})):
                return await handler(request, components)
        except BookingError as error:
            return problem_for(error)
        except BadRequest as error:
            return problem(error.status, error.code, error.title, str(error))

    wrapped.__name__ = handler.__name__
    return wrapped


class BadRequest(Exception):
    def __init__(self, status: int, code: str, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.title = status, code, title


async def json_body(request: Request) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BadRequest(
            413, "body_too_large", "Body too large", f"request bodies are limited to {MAX_BODY_BYTES} bytes"
        )
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise BadRequest(
                413, "body_too_large", "Body too large", f"request bodies are limited to {MAX_BODY_BYTES} bytes"
            )
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type and content_type != "application/json" and not content_type.endswith("+json"):
        raise BadRequest(415, "unsupported_media_type", "Unsupported media type", "send application/json")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(400, "malformed_json", "Malformed JSON", f"the body is not valid JSON: {exc}") from None


def _query_zone(request: Request, components: Components) -> tuple[ZoneInfo, ZoneInfo | None]:
    name = request.query_params.get("tz")
    if not name:
        return components.business.tz, None
    caller = zone(name)
    return caller, caller


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise InvalidRequest(f"{name} must be a whole number from {low} to {high}", code="invalid_query")
    return int(raw)


async def availability(request: Request, components: Components) -> Response:
    """``GET /api/availability?service=&date=&days=&near=&from=&to=&resource=&tz=&limit=``"""
    params = request.query_params
    service_id = params.get("service")
    if not service_id:
        raise InvalidRequest("the service query parameter is required", code="invalid_query")
    tz, caller_tz = _query_zone(request, components)
    fold = _query_int(request, "fold", 0, 0, 1)
    limit = _query_int(request, "limit", 20, 1, 500)
    near = parse_instant(params["near"], tz, fold=fold) if params.get("near") else None
    window: Interval | None = None
    if params.get("from") or params.get("to"):
        if not (params.get("from") and params.get("to")):
            raise InvalidRequest("give both from and to", code="invalid_query")
        start, end = parse_instant(params["from"], tz), parse_instant(params["to"], tz)
        if end <= start or end - start > timedelta(days=MAX_SEARCH_DAYS):
            raise InvalidRequest(f"to must follow from by at most {MAX_SEARCH_DAYS} days", code="invalid_query")
        window = Interval(start, end)
    elif params.get("date"):
        try:
            day = date.fromisoformat(params["date"])
        except ValueError:
            raise InvalidRequest(f"date {params['date']!r} is not YYYY-MM-DD", code="invalid_query") from None
        days = _query_int(request, "days", 1, 1, MAX_SEARCH_DAYS)
        window = Interval(local_day_bounds(day, tz)[0], local_day_bounds(day + timedelta(days=days - 1), tz)[1])
    search = await components.bookings.find_slots(
        service_id, window=window, near=near, resource_id=params.get("resource"), limit=limit
    )
    body: dict[str, Any] = {
        "service": service_id,
        "time_zone": components.business.timezone,
        "slots": [render_slot(slot, components.business, caller_tz) for slot in search.slots],
    }
    if near is not None:
        body["requested_available"] = search.requested_available
    return JSONResponse(body)


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    key = key.strip().strip('"')
    if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise InvalidRequest(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters", code="invalid_idempotency_key"
        )
    return key


def _unavailable(outcome: SlotUnavailable, components: Components, caller_tz: ZoneInfo | None) -> Response:
    if outcome.conflicts:
        detail = f"{len(outcome.conflicts)} occurrence(s) of the series cannot be booked; nothing was booked"
    else:
        detail = "that time is no longer available"
    return problem(
        409,
        "slot_unavailable",
        "Slot unavailable",
        detail,
        **render_unavailable(outcome, components.business, caller_tz),
    )


def _booked(outcome: Booked, components: Components, status: int) -> Response:
    business = components.business
    if outcome.series_id is not None:
        body: dict[str, Any] = {
            "series_id": outcome.series_id,
            "bookings": [render_booking(b, business) for b in outcome.bookings],
        }
    else:
        body = render_booking(outcome.booking, business)
    body["warnings"] = list(outcome.warnings)  # external calendar busy time overlapped (soft policy)
    response = JSONResponse(body, status_code=200 if outcome.replayed else status)
    response.headers["Location"] = f"/api/bookings/{outcome.booking.id}"
    if outcome.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


async def create_booking(request: Request, components: Components) -> Response:
    key = _idempotency_key(request)
    body = parse_body(BookingBody, await json_body(request))
    caller_tz = zone(body.time_zone) if body.time_zone else None
    customer_tz = body.customer.time_zone or body.time_zone
    if customer_tz:
        zone(customer_tz)
    outcome = await components.bookings.book(
        BookRequest(
            service_id=body.service,
            start=body.start_utc(components.business),
            resource_id=body.resource,
            customer=CustomerDetails(
                phone=body.customer.phone, name=body.customer.name, email=body.customer.email, time_zone=customer_tz
            ),
            idempotency_key=key,
            hold_token=body.hold_token,
            rrule=body.rrule,
            notes=body.notes,
            source="api",
            actor=_actor(request),
            sms_consent=SmsConsent.from_answer(body.sms_consent),
            sms_consent_wording=body.sms_consent_wording,
        )
    )
    if isinstance(outcome, SlotUnavailable):
        return _unavailable(outcome, components, caller_tz)
    with structlog.contextvars.bound_contextvars(booking_id=outcome.booking.id):
        log.info("api_booking_created", replayed=outcome.replayed, series_id=outcome.series_id)
    return _booked(outcome, components, 201)


async def list_bookings(request: Request, components: Components) -> Response:
    phone = request.query_params.get("phone")
    if not phone:
        raise InvalidRequest("the phone query parameter is required", code="invalid_query")
    include_past = request.query_params.get("include_past", "false").lower() in ("1", "true", "yes")
    found = await components.bookings.find_bookings(phone, upcoming_only=not include_past)
    return JSONResponse({"bookings": [_shown(request, render_booking(b, components.business)) for b in found]})


async def get_booking(request: Request, components: Components) -> Response:
    booking = await components.bookings.get_booking(request.path_params["booking_id"])
    body = _shown(request, render_booking(booking, components.business))
    body["history"] = [render_event(e) for e in await components.bookings.ledger.history(booking.id)]
    response = JSONResponse(body)
    response.headers["ETag"] = f'"{booking.version}"'
    return response


def _actor(request: Request) -> str:
    """Who a booking change is recorded as made by: ``api`` for the bootstrap token (as before roles),
    ``token:<id>`` for a token made with ``voicebook tokens create``."""
    principal = principal_of(request)
    return "api" if principal.token_id is None else principal.actor


def _shown(request: Request, booking: dict[str, Any]) -> dict[str, Any]:
    """A rendered booking as the caller may see it: a viewer gets the customer's details masked."""
    if principal_of(request).sees_pii:
        return booking
    return booking | {"customer": mask_customer(booking["customer"])}


def _expected_version(request: Request) -> int | None:
    header = request.headers.get("if-match")
    if header is None:
        return None
    value = header.strip().removeprefix("W/").strip('"')
    if not value.isdigit():
        raise InvalidRequest('If-Match must carry the booking\'s ETag, e.g. "3"', code="invalid_if_match")
    return int(value)


async def patch_booking(request: Request, components: Components) -> Response:
    booking_id = request.path_params["booking_id"]
    body = parse_body(PatchBody, await json_body(request))
    service = components.bookings
    if (body.start is None) == (body.status is None):
        raise InvalidRequest("give either start (to reschedule) or status", code="invalid_body")
    if body.status is not None:
        booking = await service.change_status(
            booking_id, BookingStatus(body.status), reason=body.reason, actor=_actor(request)
        )
        return JSONResponse(render_booking(booking, components.business))
    assert body.start is not None
    tz = zone(body.time_zone) if body.time_zone else components.business.tz
    outcome = await service.reschedule(
        booking_id,
        parse_instant(body.start, tz, fold=body.fold),
        resource_id=body.resource,
        expected_version=_expected_version(request),
        actor=_actor(request),
    )
    if isinstance(outcome, SlotUnavailable):
        return _unavailable(outcome, components, zone(body.time_zone) if body.time_zone else None)
    return _booked(outcome, components, 200)


async def delete_booking(request: Request, components: Components) -> Response:
    booking = await components.bookings.cancel(
        request.path_params["booking_id"], reason=request.query_params.get("reason"), actor=_actor(request)
    )
    return JSONResponse(render_booking(booking, components.business))


async def create_hold(request: Request, components: Components) -> Response:
    body = parse_body(HoldBody, await json_body(request))
    caller_tz = zone(body.time_zone) if body.time_zone else None
    outcome = await components.bookings.hold(
        body.service, body.start_utc(components.business), resource_id=body.resource
    )
    if isinstance(outcome, SlotUnavailable):
        return _unavailable(outcome, components, caller_tz)
    return JSONResponse(
        {
            "token": outcome.token,
            "expires_at": outcome.expires_at.isoformat().replace("+00:00", "Z"),
            "slot": render_slot(outcome.slot, components.business, caller_tz),
            "warnings": list(outcome.warnings),
        },
        status_code=201,
    )


async def delete_hold(request: Request, components: Components) -> Response:
    released = await components.bookings.release_hold(request.path_params["token"])
    if not released:
        return problem(404, "hold_not_found", "Hold not found", "no live hold with that token (it may have expired)")
    return Response(status_code=204)


async def reindex(request: Request, components: Components) -> Response:
    counts = await components.bookings.rebuild_index()
    return JSONResponse({"rebuilt": counts})


routes = [
    Route("/api/availability", endpoint(availability, Role.VIEWER), methods=["GET"]),
    Route("/api/bookings", endpoint(create_booking, Role.OPERATOR), methods=["POST"]),
    Route("/api/bookings", endpoint(list_bookings, Role.VIEWER), methods=["GET"]),
    Route("/api/bookings/{booking_id}", endpoint(get_booking, Role.VIEWER), methods=["GET"]),
    Route("/api/bookings/{booking_id}", endpoint(patch_booking, Role.OPERATOR), methods=["PATCH"]),
    Route("/api/bookings/{booking_id}", endpoint(delete_booking, Role.OPERATOR), methods=["DELETE"]),
    Route("/api/holds", endpoint(create_hold, Role.OPERATOR), methods=["POST"]),
    Route("/api/holds/{token}", endpoint(delete_hold, Role.OPERATOR), methods=["DELETE"]),
    Route("/api/admin/reindex", endpoint(reindex, Role.OPERATOR), methods=["POST"]),
]
