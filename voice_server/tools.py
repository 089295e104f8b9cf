"""The agent's booking tools: what the model (or the offline dialog) may call during a call, with
arguments validated before anything touches the booking service.

Times crossing this boundary are the business's local wall-clock times (``2026-12-01T10:00``): that is
what a caller says and what a model reasons in. The caller's phone number comes from the call, never
from the model, so a caller can only see and change their own bookings. A bad argument comes back as a
tool error the agent can read aloud or fix; it never reaches the ledger.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any, Literal, TypeVar

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from booking import writes
from booking.business import Business, Resource, Service
from booking.consent import SMS_QUESTION
from booking.domain import Booking, Interval, Slot, SmsConsent, ensure_utc
from booking.errors import BookingError, InvalidRequest, NotFound
from booking.ledger.repository import CustomerDetails, utc_now
from booking.service import Booked, BookingService, BookRequest, Held
from booking.timeutil import local_day_bounds, local_to_utc
from booking.writes import BookingWriter, WriteOp, Writers
from voice_server.ports import CallInfo, ToolCall, ToolSpec

log = structlog.get_logger("voicebook.tools")

T = TypeVar("T")

MAX_OFFERED = 3
HOLDS_PER_CALL = 8
PARTS_OF_DAY: Mapping[str, tuple[time, time]] = {
    "morning": (time(0, 0), time(12, 0)),
    "afternoon": (time(12, 0), time(17, 0)),
    "evening": (time(17, 0), time(23, 59)),
}
_LOCAL_MINUTE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}$")


# -- arguments ------------------------------------------------------------------------------------


class _Arguments(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


def _local_minute(value: str) -> str:
    if not _LOCAL_MINUTE.match(value):
        raise ValueError("use the business's local time as YYYY-MM-DDTHH:MM, e.g. 2026-12-01T10:30")
    datetime.fromisoformat(value)  # impossible dates (February 30th) fail here with a clear message
    return value


class CheckAvailability(_Arguments):
    service: str = Field(min_length=1, description="The service's id or name, e.g. checkup.")
    date: str | None = Field(default=None, description="Local date YYYY-MM-DD; omit for the next free times.")
    time: str | None = Field(default=None, description="Local time HH:MM (24 h); needs a date.")
    part_of_day: Literal["morning", "afternoon", "evening"] | None = None
    resource: str | None = Field(default=None, description="A staff member's id or name, if the caller asked.")

    @field_validator("date")
    @classmethod
    def _date(cls, value: str | None) -> str | None:
        if value is not None:
            date.fromisoformat(value)
        return value

    @field_validator("time")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is not None:
            if not re.match(r"^\d{2}:\d{2}$", value):
                raise ValueError("use HH:MM (24 h), e.g. 14:30")
            time.fromisoformat(value)
        return value


class BookAppointment(_Arguments):
    service: str = Field(min_length=1, description="The service's id or name.")
    start: str = Field(description="Local start time YYYY-MM-DDTHH:MM, as offered by check_availability.")
    customer_name: str = Field(min_length=1, max_length=120, description="The caller's name as they gave it.")
    resource: str | None = Field(default=None, description="The staff member offered, if any.")
    notes: str | None = Field(default=None, max_length=500)
    texts_ok: bool | None = Field(
        default=None,
        description="Whether the caller agreed to a text confirmation and reminder, asked as "
        f'"{SMS_QUESTION}": true if they said yes, false if they declined; leave out when it was not discussed.',
    )

    _start = field_validator("start")(_local_minute)


class RescheduleAppointment(_Arguments):
    booking_id: str = Field(min_length=1)
    new_start: str = Field(description="Local start time YYYY-MM-DDTHH:MM.")
    resource: str | None = None

    _start = field_validator("new_start")(_local_minute)


class CancelAppointment(_Arguments):
    booking_id: str = Field(min_length=1)
    reason: str | None = Field(default=None, max_length=500)


class FindMyAppointments(_Arguments):
    pass


class Reason(_Arguments):
    reason: str = Field(min_length=1, max_length=500)


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON Schema in the plain shape OpenAI's tools take (no titles, no extra keys)."""

    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items() if k != "title"}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return node

    schema: dict[str, Any] = clean(model.model_json_schema())
    schema["additionalProperties"] = False
    schema.setdefault("properties", {})
    return schema


_TOOLS: Mapping[str, tuple[type[_Arguments], str]] = {
    "check_availability": (
        CheckAvailability,
        "Find free appointment times. With a date and time, says whether that exact time is free (and holds "
        "it for the caller for a few minutes); otherwise offers the nearest free times.",
    ),
    "book_appointment": (
        BookAppointment,
        "Book an appointment for the caller once they have confirmed the service, time and their name.",
    ),
    "reschedule_appointment": (
        RescheduleAppointment,
        "Move one of the caller's bookings to a new time (the old time is kept if the new one is taken).",
    ),
    "cancel_appointment": (CancelAppointment, "Cancel one of the caller's bookings after they confirmed."),
    "find_my_appointments": (FindMyAppointments, "List the caller's upcoming appointments."),
}
TRANSFER_SPEC = ToolSpec(
    "transfer_to_human",
    "Put the caller through to a person at the business, when they ask for one or you cannot help.",
    _schema(Reason),
)
END_CALL_SPEC = ToolSpec(
    "end_call", "End the call after saying goodbye, when the caller has nothing more.", _schema(Reason)
)
BOOKING_TOOL_SPECS: tuple[ToolSpec, ...] = tuple(
    ToolSpec(name, description, _schema(model)) for name, (model, description) in _TOOLS.items()
)
ALL_TOOL_SPECS: tuple[ToolSpec, ...] = (*BOOKING_TOOL_SPECS, TRANSFER_SPEC, END_CALL_SPEC)


# -- results --------------------------------------------------------------------------------------


def _error(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return {"error": error}


def spoken_time(instant: datetime, business: Business) -> str:
    """``Tuesday, December 1 at 10 AM`` / ``at 10:30 AM`` in the business's zone: what a person says."""
    local = instant.astimezone(business.tz)
    hour = local.hour % 12 or 12
    clock = f"{hour}" if local.minute == 0 else f"{hour}:{local.minute:02d}"
    clock = "noon" if (local.hour, local.minute) == (12, 0) else f"{clock} {'AM' if local.hour < 12 else 'PM'}"
    return f"{local:%A}, {local:%B} {local.day} at {clock}"


@dataclass(frozen=True, slots=True)
class _HeldSlot:
    service_id: str
    start: datetime
    resource_id: str
    token: str
    expires_at: datetime


class BookingTools:
    """Runs the booking tools of one server for every call. Holds taken while a caller decides are kept
    per call, so ``book_appointment`` converts the caller's own hold into the booking."""

    specs: Sequence[ToolSpec] = ALL_TOOL_SPECS

    def __init__(
        self,
        service: BookingService,
        *,
        clock: Callable[[], datetime] = utc_now,
        lane: BookingWriter | None = None,
    ) -> None:
        """``lane`` (optional) runs the writes (holds, bookings, reschedules, cancellations) on a loop of
        their own: a thread's (``booking.lane``) or the booking process's (``booking.lane_process``); reads
        stay on the caller's loop with ``service``."""
        self._service = service
        self._lane = lane
        self._business = service.business
        self._clock = clock
        self._holds: dict[str, list[_HeldSlot]] = {}

    async def run(self, call: ToolCall, info: CallInfo) -> Mapping[str, Any]:
        entry = _TOOLS.get(call.name)
        if entry is None:
            return _error("unknown_tool", f"there is no tool called {call.name!r}")
        model, _ = entry
        try:
            arguments = model.model_validate(dict(call.arguments))
        except ValidationError as error:
            first = error.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or None
            return _error("invalid_argument", first["msg"], field)
        try:
            if isinstance(arguments, CheckAvailability):
                return await self._check(arguments, info)
            if isinstance(arguments, BookAppointment):
                return await self._book(arguments, call, info)
            if isinstance(arguments, RescheduleAppointment):
                with structlog.contextvars.bound_contextvars(booking_id=arguments.booking_id):
                    return await self._reschedule(arguments, info)
            if isinstance(arguments, CancelAppointment):
                with structlog.contextvars.bound_contextvars(booking_id=arguments.booking_id):
                    return await self._cancel(arguments, info)
            return await self._find(info)
        except NotFound as error:
            return _error("not_found", error.detail)
        except BookingError as error:
            # Rules the caller can act on (outside hours, too soon, an unknown service): say why.
            return _error(error.code, error.detail)

    def forget(self, call_sid: str) -> None:
        """The call ended: its holds expire on their own in Redis; drop our note of them."""
        self._holds.pop(call_sid, None)

    # -- resolving what the caller said -------------------------------------------------------------
    def _resolve_service(self, text: str) -> Service:
        wanted = _simplify(text)
        for service in self._business.services:
            names = (service.id, service.name, *service.aliases)
            if any(_simplify(name) == wanted for name in names):
                return service
        for service in self._business.services:
            if wanted and any(wanted in _simplify(name) for name in (service.name, *service.aliases)):
                return service
        known = ", ".join(f"{s.id} ({s.name})" for s in self._business.services)
        raise InvalidRequest(f"unknown service {text!r}; services: {known}", code="unknown_service")

    def _resolve_resource(self, text: str | None, service: Service | None = None) -> str | None:
        if text is None:
            return None
        wanted = _simplify(text.replace("doctor", "dr").replace("nurse", ""))
        for resource in self._business.resources:
            if wanted in (_simplify(resource.id), _simplify(resource.name)):
                return resource.id
        for resource in self._business.resources:
            surname = _simplify(resource.name.split()[-1])
            if wanted and (wanted == surname or wanted.endswith(surname) or surname in wanted.split()):
                return resource.id
        staff = ", ".join(r.name for r in self._business.resources if service is None or r.id in service.resources)
        raise InvalidRequest(f"no staff member called {text!r}; staff: {staff}", code="unknown_resource")

    def _local(self, text: str) -> datetime:
        return local_to_utc(datetime.fromisoformat(text), self._business.tz)

    def _resource_name(self, resource_id: str) -> str:
        resource: Resource | None = self._business.resource(resource_id)
        return resource.name if resource is not None else resource_id

    def _slot_view(self, slot: Slot) -> dict[str, Any]:
        return {
            "start": slot.start.astimezone(self._business.tz).strftime("%Y-%m-%dT%H:%M"),
            "spoken": spoken_time(slot.start, self._business),
            "resource": slot.resource_id,
            "resource_name": self._resource_name(slot.resource_id),
        }

    def _booking_view(self, booking: Booking) -> dict[str, Any]:
        service = self._business.service(booking.service_id)
        return {
            "booking_id": booking.id,
            "service": booking.service_id,
            "service_name": service.name if service is not None else booking.service_id,
            "start": booking.start.astimezone(self._business.tz).strftime("%Y-%m-%dT%H:%M"),
            "spoken": spoken_time(booking.start, self._business),
            "resource": booking.resource_id,
            "resource_name": self._resource_name(booking.resource_id),
            "status": booking.status.value,
        }

    async def _write(self, op: WriteOp[T]) -> T:
        """``op`` on the booking lane (a thread or process) when there is one, else here."""
        if self._lane is None:
            return await op.apply(Writers(self._service))
        return await self._lane.write(op)

    # -- the tools ------------------------------------------------------------------------------------
    async def _check(self, args: CheckAvailability, info: CallInfo) -> dict[str, Any]:
        service = self._resolve_service(args.service)
        resource_id = self._resolve_resource(args.resource, service)
        answer: dict[str, Any] = {
            "service": service.id,
            "service_name": service.name,
            "requested": None,
            "requested_available": None,
            "held": False,
            "slots": [],
        }
        if args.time is not None and args.date is None:
            return _error("invalid_argument", "a time needs a date as well", "date")
        if args.date is not None and args.time is not None:
            requested = f"{args.date}T{args.time}"
            answer["requested"] = requested
            start = self._local(requested)
            # A caller weighs one offer at a time: an earlier hold of theirs would block an overlapping
            # time they now ask for, so it goes back first.
            await self._release_holds(info.call_sid)
            try:
                outcome = await self._write(
                    writes.hold(
                        service.id, start, resource_id=resource_id, owner=f"call:{info.call_sid}", among=info.serves
                    )
                )
            except InvalidRequest as error:
                # Outside hours, too soon, closed: not bookable, but the nearest times are.
                answer["requested_available"] = False
                answer["reason"] = error.detail
                slots = await self._service.alternatives(
                    service.id, start, resource_id, limit=MAX_OFFERED, among=info.serves
                )
                answer["slots"] = [self._slot_view(slot) for slot in slots]
                return answer
            if isinstance(outcome, Held):
                self._remember(info.call_sid, outcome)
                answer.update(requested_available=True, held=True, slots=[self._slot_view(outcome.slot)])
                if outcome.warnings:  # soft policy: the time is bookable, but the calendar shows it busy
                    answer["warnings"] = list(outcome.warnings)
            else:
                answer["requested_available"] = False
                answer["slots"] = [self._slot_view(slot) for slot in outcome.alternatives[:MAX_OFFERED]]
            return answer
        window = None
        if args.date is not None:
            day = date.fromisoformat(args.date)
            start, end = local_day_bounds(day, self._business.tz)
            if args.part_of_day is not None:
                lo, hi = PARTS_OF_DAY[args.part_of_day]
                start = local_to_utc(datetime.combine(day, lo), self._business.tz)
                end = local_to_utc(datetime.combine(day, hi), self._business.tz)
            window = Interval(max(start, self._clock()), end) if end > self._clock() else None
            if window is None:
                return _error("invalid_argument", f"{args.date} is in the past", "date")
        search = await self._service.find_slots(
            service.id, window=window, resource_id=resource_id, among=info.serves, limit=MAX_OFFERED * 4
        )
        answer["slots"] = [self._slot_view(slot) for slot in _spread(search.slots, MAX_OFFERED)]
        return answer

    async def _release_holds(self, call_sid: str) -> None:
        tokens = [held.token for held in self._holds.pop(call_sid, [])]
        if tokens:
            await self._write(writes.release_holds(tokens))

    def _remember(self, call_sid: str, held: Held) -> None:
        # Expiry is Redis's business (server time): a stale token is simply not honoured at booking.
        holds = self._holds.get(call_sid, [])[-(HOLDS_PER_CALL - 1) :]
        holds.append(
            _HeldSlot(held.slot.service_id, held.slot.start, held.slot.resource_id, held.token, held.expires_at)
        )
        self._holds[call_sid] = holds

    def _hold_for(self, call_sid: str, service_id: str, start: datetime, resource_id: str | None) -> _HeldSlot | None:
        for held in reversed(self._holds.get(call_sid, [])):
            if held.service_id == service_id and held.start == start and resource_id in (None, held.resource_id):
                return held
        return None

    async def _book(self, args: BookAppointment, call: ToolCall, info: CallInfo) -> dict[str, Any]:
        service = self._resolve_service(args.service)
        resource_id = self._resolve_resource(args.resource, service)
        start = self._local(args.start)
        held = self._hold_for(info.call_sid, service.id, start, resource_id)
        request = BookRequest(
            service_id=service.id,
            start=start,
            customer=CustomerDetails(phone=info.caller, name=args.customer_name),
            resource_id=held.resource_id if held is not None else resource_id,
            idempotency_key=f"call:{info.call_sid}:{call.id}",
            hold_token=held.token if held is not None else None,
            notes=args.notes,
            source="phone",
            actor=f"call:{info.call_sid}",
            # Calling from the number and booking: texts about this booking are implied unless discussed.
            sms_consent=SmsConsent.from_answer(args.texts_ok),
            among=info.serves,
            line_number=info.called or None,  # texts about it go from the number the caller dialled
        )
        outcome = await self._write(writes.book(request))
        if isinstance(outcome, Booked):
            booking = outcome.booking
            with structlog.contextvars.bound_contextvars(booking_id=booking.id):
                log.info("tool_booked", call_sid=info.call_sid)
            return {**self._booking_view(booking), "status": "booked", **_warnings(outcome)}
        return {
            "status": "unavailable",
            "start": args.start,
            "alternatives": [self._slot_view(slot) for slot in outcome.alternatives[:MAX_OFFERED]],
        }

    async def _own_booking(self, booking_id: str, info: CallInfo) -> Booking:
        booking = await self._service.get_booking(booking_id)
        mine = {b.id for b in await self._service.find_bookings(info.caller, upcoming_only=False)}
        if booking.id not in mine:
            raise NotFound(f"no booking {booking_id} for this caller", booking_id=booking_id)
        return booking

    async def _reschedule(self, args: RescheduleAppointment, info: CallInfo) -> dict[str, Any]:
        booking = await self._own_booking(args.booking_id, info)
        resource_id = self._resolve_resource(args.resource)
        await self._release_holds(info.call_sid)  # the caller's own hold must not block the new time
        new_start = self._local(args.new_start)
        outcome = await self._write(
            writes.reschedule(
                booking.id, new_start, resource_id=resource_id, actor=f"call:{info.call_sid}", among=info.serves
            )
        )
        if isinstance(outcome, Booked):
            log.info("tool_rescheduled", call_sid=info.call_sid)
            return {**self._booking_view(outcome.booking), "status": "rescheduled", **_warnings(outcome)}
        return {
            "status": "unavailable",
            "start": args.new_start,
            "alternatives": [self._slot_view(slot) for slot in outcome.alternatives[:MAX_OFFERED]],
        }

    async def _cancel(self, args: CancelAppointment, info: CallInfo) -> dict[str, Any]:
        booking = await self._own_booking(args.booking_id, info)
        if not booking.status.is_active:
            return {
                "status": booking.status.value,
                "booking_id": booking.id,
                "spoken": spoken_time(booking.start, self._business),
            }
        cancelled = await self._write(
            writes.cancel(booking.id, reason=args.reason or "cancelled by the caller", actor=f"call:{info.call_sid}")
        )
        log.info("tool_cancelled", call_sid=info.call_sid)
        return {
            "status": "cancelled",
            "booking_id": cancelled.id,
            "spoken": spoken_time(cancelled.start, self._business),
        }

    async def _find(self, info: CallInfo) -> dict[str, Any]:
        try:
            bookings = await self._service.find_bookings(info.caller)
        except InvalidRequest:
            return {"appointments": []}  # a withheld or unparseable number has no bookings we can show
        upcoming = sorted(bookings, key=lambda b: b.start)
        return {"appointments": [self._booking_view(b) for b in upcoming[:10]]}


def _warnings(outcome: Booked) -> dict[str, Any]:
    """The booking's warnings for the agent, only when there are some (soft external conflicts)."""
    return {"warnings": list(outcome.warnings)} if outcome.warnings else {}


def _simplify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", text.lower())


def _spread(slots: Sequence[Slot], count: int) -> list[Slot]:
    """A few slots worth saying aloud: the first free one, then ones at least an hour apart, so a caller
    hears a real choice rather than 9:00, 9:15 and 9:30."""
    chosen: list[Slot] = []
    for slot in sorted(slots, key=lambda s: s.start):
        if all(abs(ensure_utc(slot.start) - c.start) >= timedelta(hours=1) for c in chosen):
            chosen.append(slot)
        if len(chosen) == count:
            break
    for slot in slots:  # fewer than ``count`` an hour apart: fill with the rest
        if len(chosen) == count:
            break
        if slot not in chosen:
            chosen.append(slot)
    return sorted(chosen, key=lambda s: s.start)


__all__ = ["ALL_TOOL_SPECS", "BOOKING_TOOL_SPECS", "END_CALL_SPEC", "TRANSFER_SPEC", "BookingTools", "spoken_time"]
