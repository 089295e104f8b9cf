"""Bookings as Google Calendar events (google-api-python-client), one calendar per resource.

Every effect is idempotent, because the outbox may run it again after a crash or a timeout:

- the event ``id`` is derived from the booking id (base32hex), so a retried insert that already landed
  answers 409 ``duplicate``, which means "done";
- a reschedule patches ``start``/``end`` (patching twice to the same time is harmless);
- a cancel deletes, and 404/410 on delete mean "already gone".

A resource without ``calendar_id`` gets no event: every method then returns ``None`` ("skipped").
Failures leave this module only as :class:`~booking.errors.EffectFailed` (transient or permanent);
HTTP status codes stay here. Google's own retries are off (``num_retries=0``): the outbox retries.

The client is synchronous and httplib2 is not thread-safe, so each request runs in one of the adapter's
own threads (``threads`` of them, not the event loop's default pool, which other blocking work shares)
with its own ``httplib2.Http`` wrapped in ``AuthorizedHttp``; the discovery-built service is made once and
only used to build requests. ``AuthorizedHttp(max_refresh_attempts=1)`` turns a 401 into one token
refresh and one retry; a second 401 is permanent.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import functools
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

import google.auth.exceptions
import google.oauth2.credentials
import httplib2  # type: ignore[import-untyped]  # ships no type information
import phonenumbers
from google.auth.credentials import Credentials
from google.oauth2 import service_account
from google_auth_httplib2 import AuthorizedHttp  # type: ignore[import-untyped]  # ships no type information
from googleapiclient.discovery import build  # type: ignore[import-untyped]  # ships no type information
from googleapiclient.errors import HttpError  # type: ignore[import-untyped]  # ships no type information

from booking.business import Business, Resource
from booking.domain import Booking, Interval
from booking.errors import EffectFailed
from integrations.egress import Allowlist, GuardedHttp
from integrations.http_headers import retry_after
from integrations.metrics import GOOGLE_RATE_LIMIT_REASONS, google_error_reasons, provider_request

SCOPES = ("https://www.googleapis.com/auth/calendar",)  # events and freeBusy
BOOKING_ID_PROPERTY = "voicebook_booking_id"
SERIES_ID_PROPERTY = "voicebook_series_id"
_BASE32HEX = str.maketrans("", "", "=")

SendUpdates = Literal["all", "externalOnly", "none"]

DEFAULT_THREADS = 32
"""Requests in flight at once: at least the effect worker's concurrency, so no effect waits for a thread
where the worker cannot see it (measured in ``load_tests/bench_effects.py``). Threads start on demand."""


# -- the pure mapping ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventTemplates:
    """``str.format`` templates; fields: ``service``, ``customer``, ``phone`` (masked), ``booking_id``,
    ``source``, ``resource``, ``notes`` (empty when none)."""

    summary: str = "{service}: {customer}"
    description: str = "Customer: {customer}\nPhone: {phone}\nBooking: {booking_id}\nBooked via: {source}\n{notes}"


def event_id_for(booking_id: str) -> str:
    """The event id of a booking: its UTF-8 bytes in lowercase base32hex without padding (``0-9``,
    ``a-v``). Injective, so two bookings never share an event; ``ValueError`` if the result would fall
    outside Google's 5..1024 characters."""
    event_id = base64.b32hexencode(booking_id.encode()).decode().translate(_BASE32HEX).lower()
    if not 5 <= len(event_id) <= 1024:
        raise ValueError(f"booking id {booking_id!r} gives an event id of {len(event_id)} characters (5..1024)")
    return event_id


@dataclass(frozen=True, slots=True)
class Occurrence:
    """One occurrence of a recurring booking: its series and the start it was created with (which names
    its instance of the series' event however often it has moved since)."""

    series_id: str
    original_start: datetime


def instance_id_for(occurrence: Occurrence) -> str:
    """Google's id of one instance of a recurring event: ``<event id>_<original start, UTC, basic format>``."""
    start = occurrence.original_start.astimezone(UTC)
    return f"{event_id_for(occurrence.series_id)}_{start:%Y%m%dT%H%M%SZ}"


def mask_phone(phone: str) -> str:
    """``+12125550142`` -> ``+1 ••• ••• 0142``: enough to recognise a caller, not to call them from a
    shared calendar."""
    digits = "".join(character for character in phone if character.isdigit())
    try:
        country = f"+{phonenumbers.parse(phone, None).country_code} "
    except phonenumbers.NumberParseException:
        country = ""
    return f"{country}••• ••• {digits[-4:]}" if len(digits) >= 4 else "•••"


def event_times(booking: Booking, business: Business) -> dict[str, Any]:
    """``start``/``end`` in the business's wall-clock time with its IANA zone (recurring events need
    the zone to keep 09:00 at 09:00 across DST)."""
    return {
        key: {"dateTime": instant.astimezone(business.tz).isoformat(), "timeZone": business.timezone}
        for key, instant in (("start", booking.start), ("end", booking.end))
    }


def event_body(
    booking: Booking,
    business: Business,
    *,
    templates: EventTemplates = EventTemplates(),  # frozen, so one shared default is safe
    recurrence: str | None = None,
    invite_customer: bool = False,
) -> dict[str, Any]:
    """The Calendar v3 event for ``booking``. ``recurrence`` is the series' RRULE (with or without the
    ``RRULE:`` prefix), used only for a booking of a series. The customer becomes an attendee only with
    ``invite_customer``: a service account without domain-wide delegation may not invite anyone."""
    service = business.service(booking.service_id)
    resource = business.resource(booking.resource_id)
    fields = {
        "service": service.name if service is not None else booking.service_id,
        "customer": booking.customer.name or "Caller",
        "phone": mask_phone(booking.customer.phone),
        "booking_id": booking.id,
        "source": booking.source,
        "resource": resource.name if resource is not None else booking.resource_id,
        "notes": booking.notes or "",
    }
    recurring = booking.series_id is not None and recurrence is not None
    body: dict[str, Any] = {
        # A series is one event named after the series, so any occurrence can find its instance.
        "id": event_id_for(booking.series_id if recurring and booking.series_id else booking.id),
        "summary": templates.summary.format(**fields),
        "description": templates.description.format(**fields).strip(),
        **event_times(booking, business),
        "extendedProperties": {"private": {BOOKING_ID_PROPERTY: booking.id, "source": booking.source}},
    }
    if recurring and recurrence is not None and booking.series_id is not None:
        rule = recurrence.strip()
        body["recurrence"] = [rule if rule.upper().startswith("RRULE:") else f"RRULE:{rule}"]
        body["extendedProperties"]["private"][SERIES_ID_PROPERTY] = booking.series_id
    if invite_customer and booking.customer.email:
        attendee = {"email": booking.customer.email}
        if booking.customer.name:
            attendee["displayName"] = booking.customer.name
        body["attendees"] = [attendee]
    return body


# -- error classification (pure) -----------------------------------------------------------------


def error_reasons(error: HttpError) -> list[str]:
    """The reasons in Google's error body (``duplicate``, ``rateLimitExceeded``...), in order."""
    return google_error_reasons(error)


def classify(error: HttpError, action: str, **context: Any) -> EffectFailed:
    """Google's answer as transient or permanent. Rate limits (429, 403 with a per-minute rate-limit
    reason), 5xx and 408 are worth retrying; 401 (after the one refresh), other 403s and other 4xx are
    not. The daily quota and Calendar's usage limits (403 ``dailyLimitExceeded``, ``quotaExceeded``)
    outlast the outbox's retries, so they are permanent here, though the metrics count them as
    ``rate_limited`` like the per-minute limits (``GOOGLE_USAGE_LIMIT_REASONS``)."""
    status = int(error.resp.status)
    reasons = error_reasons(error)
    transient = (
        status in (408, 429)
        or status >= 500
        or (status == 403 and bool(GOOGLE_RATE_LIMIT_REASONS.intersection(reasons)))
        or (status == 409 and "duplicate" not in reasons)  # a concurrent modification
    )
    detail = f"Google Calendar {action} answered {status} {','.join(reasons) or error.reason}"
    return EffectFailed(
        detail,
        permanent=not transient,
        retry_after=retry_after(error.resp) if transient else None,
        code="calendar_failed",
        **context,
    )


# -- the adapter ---------------------------------------------------------------------------------


class GoogleCalendar:
    """Calendar effects for bookings. Build it once per process (in the lifespan), share it, and
    :meth:`close` it there. ``threads`` bounds the requests in flight (each blocks one thread)."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        api_endpoint: str | None = None,
        timeout: float = 10.0,
        templates: EventTemplates = EventTemplates(),  # frozen, so one shared default is safe
        invite_customers: bool = False,
        threads: int = DEFAULT_THREADS,
        egress: Allowlist | None = None,
    ) -> None:
        """``egress``: the hosts requests (token refreshes included) may go to; None sends anywhere."""
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="google-calendar")
        self._credentials = credentials
        self._timeout = timeout
        self._egress = egress
        self._templates = templates
        self._invite = invite_customers
        options = {"api_endpoint": api_endpoint} if api_endpoint is not None else None
        # Only used to build requests: each execution passes its own Http (see _execute).
        self._service = build(
            "calendar",
            "v3",
            static_discovery=True,
            cache_discovery=False,
            credentials=credentials,
            client_options=options,
        )
        # Each ``events()`` call builds its resource anew from the discovery document (every method,
        # docstrings included): 2.6 ms of the event loop per request, measured for load_tests/bench_effects.py.
        self._events = self._service.events()
        self._freebusy = self._service.freebusy()

    @classmethod
    def from_service_account(
        cls, info: Mapping[str, Any], *, subject: str | None = None, api_endpoint: str | None = None, **options: Any
    ) -> GoogleCalendar:
        """A service-account key (the JSON as a dict); ``subject`` impersonates a Workspace user through
        domain-wide delegation. The token endpoint is ``info["token_uri"]``."""
        credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]  # untyped in google-auth
            dict(info), scopes=list(SCOPES)
        )
        if subject is not None:
            credentials = credentials.with_subject(subject)
        return cls(credentials, api_endpoint=api_endpoint, **options)

    @classmethod
    def from_user_oauth(
        cls,
        token: str | None,
        refresh_token: str,
        token_uri: str,
        client_id: str,
        client_secret: str,
        *,
        api_endpoint: str | None = None,
        **options: Any,
    ) -> GoogleCalendar:
        """A user's OAuth grant; ``token`` may be None (the first call refreshes it)."""
        credentials = google.oauth2.credentials.Credentials(  # type: ignore[no-untyped-call]  # untyped in google-auth
            token,
            refresh_token=refresh_token,
            token_uri=token_uri,
            client_id=client_id,
            client_secret=client_secret,
            scopes=list(SCOPES),
        )
        return cls(credentials, api_endpoint=api_endpoint, **options)

    async def create(self, booking: Booking, business: Business, *, recurrence: str | None = None) -> str | None:
        """Insert the booking's event and return its id; None when the resource has no calendar. A 409
        ``duplicate`` means an earlier attempt landed: the same id is returned."""
        calendar_id = _calendar_of(booking, business)
        if calendar_id is None:
            return None
        body = event_body(
            booking, business, templates=self._templates, recurrence=recurrence, invite_customer=self._invite
        )
        request = self._events.insert(
            calendarId=calendar_id, body=body, sendUpdates=self._send_updates(booking)
        )
        context = {"booking_id": booking.id, "calendar_id": calendar_id}

        def done_if_duplicate(error: HttpError) -> bool:
            return int(error.resp.status) == 409 and "duplicate" in error_reasons(error)

        await self._execute(request, "insert", context, done_if=done_if_duplicate)
        return str(body["id"])

    async def update(
        self,
        booking: Booking,
        business: Business,
        *,
        occurrence: Occurrence | None = None,
        previous_resource_id: str | None = None,
        details: bool = False,
    ) -> str | None:
        """Move the event to the booking's current time (for an ``occurrence`` of a series, only its
        instance); returns the event id, None when skipped. A booking moved to another resource
        (``previous_resource_id``) also changes calendar: see :meth:`_change_calendar`. With ``details``
        the title, description and attendees are rewritten from the booking too (after an erasure)."""
        calendar_id = _calendar_of(booking, business)
        if previous_resource_id is not None and previous_resource_id != booking.resource_id:
            before = replace(booking, resource_id=previous_resource_id)
            if _calendar_of(before, business) != calendar_id:
                return await self._change_calendar(before, booking, business, occurrence)
        if calendar_id is None:
            return None
        event_id = instance_id_for(occurrence) if occurrence is not None else event_id_for(booking.id)
        body = event_times(booking, business)
        if details:
            full = event_body(booking, business, templates=self._templates, invite_customer=self._invite)
            body |= {k: full[k] for k in ("summary", "description")} | {"attendees": full.get("attendees", [])}
        request = self._events.patch(
            calendarId=calendar_id,
            eventId=event_id,
            body=body,
            sendUpdates=self._send_updates(booking),
        )
        await self._execute(request, "patch", {"booking_id": booking.id, "calendar_id": calendar_id})
        return event_id

    async def delete(self, booking: Booking, business: Business, *, occurrence: Occurrence | None = None) -> str | None:
        """Delete the event (for an ``occurrence`` of a series, only its instance, which Google then lists
        as cancelled); 404 and 410 mean it is already gone. Returns the id, None when skipped."""
        calendar_id = _calendar_of(booking, business)
        if calendar_id is None:
            return None
        event_id = instance_id_for(occurrence) if occurrence is not None else event_id_for(booking.id)
        request = self._events.delete(
            calendarId=calendar_id,
            eventId=event_id,
            sendUpdates=self._send_updates(booking),
        )

        def done_if_gone(error: HttpError) -> bool:
            return int(error.resp.status) in (404, 410)

        await self._execute(
            request, "delete", {"booking_id": booking.id, "calendar_id": calendar_id}, done_if=done_if_gone
        )
        return event_id

    async def _change_calendar(
        self, before: Booking, after: Booking, business: Business, occurrence: Occurrence | None
    ) -> str | None:
        """The booking moved to a resource with another calendar (or none). A plain event is moved with
        ``events.move`` (keeping its id) and then retimed; an occurrence of a series cannot leave its
        series, so its instance is deleted and the booking gets an event of its own on the new calendar.
        Each step is idempotent, so a retry after any of them lands in the same place."""
        source, target = _calendar_of(before, business), _calendar_of(after, business)
        if source is not None and (target is None or occurrence is not None):
            await self.delete(before, business, occurrence=occurrence)
        if target is None:
            return None
        if source is None or occurrence is not None:
            return await self.create(after, business)
        event_id = event_id_for(after.id)
        request = self._service.events().move(calendarId=source, eventId=event_id, destination=target)

        def already_moved(error: HttpError) -> bool:
            # Gone from the source (an earlier attempt moved it) or already at the target.
            status = int(error.resp.status)
            return status == 404 or (status == 409 and "duplicate" in error_reasons(error))

        await self._execute(request, "move", {"booking_id": after.id, "calendar_id": source}, done_if=already_moved)
        return await self.update(after, business)

    async def busy(self, calendar_id: str, time_min: datetime, time_max: datetime) -> list[Interval]:
        """Busy time of one calendar in ``[time_min, time_max)`` (freeBusy), in UTC. An error Google
        reports for the calendar inside its 200 answer is raised as EffectFailed (``notFound`` is
        permanent)."""
        body = {
            "timeMin": _utc_text(time_min),
            "timeMax": _utc_text(time_max),
            "timeZone": "UTC",
            "items": [{"id": calendar_id}],
        }
        context: dict[str, Any] = {"calendar_id": calendar_id}
        answer = await self._execute(self._freebusy.query(body=body), "freeBusy", context)
        calendar = (answer or {}).get("calendars", {}).get(calendar_id)
        if calendar is None:
            raise EffectFailed("Google Calendar freeBusy left the calendar out", permanent=False, **context)
        reasons = [str(item.get("reason")) for item in calendar.get("errors") or []]
        if reasons:
            raise EffectFailed(
                f"Google Calendar freeBusy answered {','.join(reasons)} for the calendar",
                permanent=any(reason in ("notFound", "forbidden") for reason in reasons),
                code="calendar_failed",
                **context,
            )
        intervals = []
        for span in calendar.get("busy") or []:
            start = datetime.fromisoformat(span["start"])
            end = datetime.fromisoformat(span["end"])
            if end > start:
                intervals.append(Interval(start, end))
        return intervals

    def close(self) -> None:
        """Let the requests in flight finish on their threads, which then exit; later requests fail
        (transient). Does not block the event loop."""
        self._executor.shutdown(wait=False)

    def _send_updates(self, booking: Booking) -> SendUpdates:
        """Google emails attendees only when the customer was invited (``event_body``'s attendee rule)."""
        return "all" if self._invite and booking.customer.email else "none"

    async def _execute(
        self,
        request: Any,
        action: str,
        context: dict[str, Any],
        *,
        done_if: Callable[[HttpError], bool] | None = None,
    ) -> Any:
        def run() -> Any:
            # A fresh Http per request: httplib2 is not thread-safe, and effects are rare enough that
            # connection reuse does not matter. One refresh on 401, then the 401 stands.
            plain = (
                httplib2.Http(timeout=self._timeout)
                if self._egress is None
                else GuardedHttp(self._egress, timeout=self._timeout)
            )
            http = AuthorizedHttp(self._credentials, http=plain, max_refresh_attempts=1)
            try:
                # An error ``done_if`` accepts (a 404 deleting what is gone) is an answer, not a failure.
                with provider_request(
                    "google_calendar",
                    action,
                    ok_if=lambda error: isinstance(error, HttpError) and done_if is not None and done_if(error),
                ):
                    return request.execute(http=http, num_retries=0)
            finally:
                http.close()

        try:
            # As asyncio.to_thread does, but on this adapter's threads: the request sees the caller's context.
            call = functools.partial(contextvars.copy_context().run, run)
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except HttpError as error:
            if done_if is not None and done_if(error):
                return None
            raise classify(error, action, **context) from error
        except google.auth.exceptions.RefreshError as error:
            raise EffectFailed(
                f"Google Calendar {action}: the token could not be refreshed: {error}",
                permanent=not error.retryable,
                code="calendar_auth_failed",
                **context,
            ) from error
        except (google.auth.exceptions.TransportError, httplib2.HttpLib2Error, OSError) as error:
            # Timeouts (TimeoutError), refused or reset connections, unreachable token endpoint.
            raise EffectFailed(
                f"Google Calendar {action} could not be reached: {error!r}",
                permanent=False,
                code="calendar_unreachable",
                **context,
            ) from error


def _calendar_of(booking: Booking, business: Business) -> str | None:
    resource: Resource | None = business.resource(booking.resource_id)
    if resource is None:
        raise EffectFailed(
            f"resource {booking.resource_id!r} is not in the business configuration",
            permanent=True,
            code="calendar_failed",
            booking_id=booking.id,
        )
    return resource.calendar_id


def _utc_text(value: datetime) -> str:
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value.isoformat()} where an aware instant was expected")
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
