"""Request bodies of the booking API (validated with pydantic) and the JSON shapes it returns."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, TypeVar
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from booking.business import Business
from booking.domain import Booking, BookingEvent, Slot
from booking.errors import InvalidRequest
from booking.service import OccurrenceConflict, SlotUnavailable
from booking.timeutil import format_local, parse_instant, zone

ModelT = TypeVar("ModelT", bound=BaseModel)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True)


class CustomerBody(_Body):
    phone: str = Field(min_length=3, max_length=40)
    name: str | None = Field(default=None, max_length=200)
    email: str | None = Field(default=None, max_length=320, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
    time_zone: str | None = Field(default=None, max_length=64)


class WhenBody(_Body):
    """A start time: ISO 8601 with an offset, or a local wall-clock time in ``time_zone`` (default: the
    business's) with ``fold`` choosing the occurrence of a time repeated at a DST change."""

    start: str = Field(min_length=10, max_length=40)
    time_zone: str | None = Field(default=None, max_length=64)
    fold: Literal[0, 1] = 0

    def start_utc(self, business: Business) -> datetime:
        tz = zone(self.time_zone) if self.time_zone else business.tz
        return parse_instant(self.start, tz, fold=self.fold)


class BookingBody(WhenBody):
    service: str = Field(min_length=1, max_length=64)
    resource: str | None = Field(default=None, max_length=64)
    customer: CustomerBody
    hold_token: str | None = Field(default=None, max_length=200)
    rrule: str | None = Field(default=None, max_length=500)
    notes: str | None = Field(default=None, max_length=2000)
    sms_consent: bool | None = None
    """True: the customer agreed to texts; False: declined (no texts at all); absent: they gave their
    number for this booking, so confirmations and reminders go to it (implied)."""
    sms_consent_wording: str | None = Field(default=None, min_length=1, max_length=500)
    """The words the customer answered (the form's checkbox label), kept with the decision as proof."""


class HoldBody(WhenBody):
    service: str = Field(min_length=1, max_length=64)
    resource: str | None = Field(default=None, max_length=64)


class PatchBody(_Body):
    """Either a new time (reschedule) or a new status (completed, no_show, cancelled)."""

    start: str | None = Field(default=None, min_length=10, max_length=40)
    time_zone: str | None = Field(default=None, max_length=64)
    fold: Literal[0, 1] = 0
    resource: str | None = Field(default=None, max_length=64)
    status: Literal["completed", "no_show", "cancelled"] | None = None
    reason: str | None = Field(default=None, max_length=500)


def parse_body(model: type[ModelT], payload: Any) -> ModelT:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            problems.append(f"{where}: {error['msg']}" if where else str(error["msg"]))
        raise InvalidRequest("; ".join(problems), code="invalid_body") from None


def render_slot(slot: Slot, business: Business, caller_tz: ZoneInfo | None = None) -> dict[str, Any]:
    resource = business.resource(slot.resource_id)
    data: dict[str, Any] = {
        "resource": slot.resource_id,
        "resource_name": resource.name if resource else slot.resource_id,
        "service": slot.service_id,
        "start": slot.start.isoformat().replace("+00:00", "Z"),
        "end": slot.end.isoformat().replace("+00:00", "Z"),
        "start_local": format_local(slot.start, business.tz),
        "end_local": format_local(slot.end, business.tz),
    }
    if caller_tz is not None:
        data["start_caller"] = format_local(slot.start, caller_tz)
        data["end_caller"] = format_local(slot.end, caller_tz)
    return data


def render_booking(booking: Booking, business: Business) -> dict[str, Any]:
    tz = business.tz
    data: dict[str, Any] = {
        "id": booking.id,
        "status": booking.status.value,
        "service": booking.service_id,
        "resource": booking.resource_id,
        "start": booking.start.isoformat().replace("+00:00", "Z"),
        "end": booking.end.isoformat().replace("+00:00", "Z"),
        "start_local": format_local(booking.start, tz),
        "end_local": format_local(booking.end, tz),
        "time_zone": business.timezone,
        "customer": {"phone": booking.customer.phone, "name": booking.customer.name, "email": booking.customer.email},
        "series_id": booking.series_id,
        "source": booking.source,
        "notes": booking.notes,
        "sms_consent": booking.sms_consent.value,
        "version": booking.version,
        "created_at": booking.created_at.isoformat().replace("+00:00", "Z"),
        "updated_at": booking.updated_at.isoformat().replace("+00:00", "Z"),
    }
    if booking.customer.time_zone:
        try:
            data["start_caller"] = format_local(booking.start, zone(booking.customer.time_zone))
        except InvalidRequest:
            pass
    return data


def render_event(event: BookingEvent) -> dict[str, Any]:
    return {
        "at": event.at.isoformat().replace("+00:00", "Z"),
        "kind": event.kind,
        "from_status": event.from_status.value if event.from_status else None,
        "to_status": event.to_status.value,
        "actor": event.actor,
        "details": event.details,
    }


def render_conflict(conflict: OccurrenceConflict) -> dict[str, Any]:
    return {
        "start": conflict.start.isoformat().replace("+00:00", "Z") if conflict.start else None,
        "local": conflict.local.isoformat(timespec="minutes"),
        "reason": conflict.reason,
    }


def render_unavailable(outcome: SlotUnavailable, business: Business, caller_tz: ZoneInfo | None) -> dict[str, Any]:
    return {
        "requested": {
            "service": outcome.service_id,
            "start": outcome.start.isoformat().replace("+00:00", "Z"),
            "start_local": format_local(outcome.start, business.tz),
        },
        "alternatives": [render_slot(slot, business, caller_tz) for slot in outcome.alternatives],
        "conflicts": [render_conflict(conflict) for conflict in outcome.conflicts],
    }
