"""The business's Airtable base as a CRM: contacts, appointments, calls and activities (messages), linked,
written with keyed upserts (pyairtable's ``Table.batch_upsert``) so that repeating a sync never makes a
duplicate. Airtable's answers are translated into :class:`~booking.errors.EffectFailed`.

Decisions:

* Keys: contacts by ``Phone``, appointments by ``Booking ID``, calls by ``Call SID``, activities by
  ``Activity ID``. Rows with the same key in one sync are merged first (Airtable refuses a request whose
  records share a key). Fields left ``None`` are not sent, so an upsert never clears what someone typed.
* At most 10 records a request (pyairtable chunks). Chunks are not atomic together: a sync that fails
  halfway has written some chunks, and the retry upserts them again harmlessly.
* pyairtable's own retries are off. A 429 starts a 30-second penalty in which every request is refused,
  so retrying within the request (pyairtable retries after 0.1 to 1.6 s) only adds refused requests; the
  effect fails transiently with ``retry_after`` and the outbox, which already retries with backoff and
  dead-letters, waits it out.
* Every HTTP request, whichever pyairtable method makes it, first takes a slot from the shared
  :class:`~integrations.redis_rate_limit.RedisRateLimiter` (an adapter on pyairtable's session), so all
  workers together stay under the base's limit.
* ``typecast`` is on: a status or outcome the base has no select option for yet gets one instead of
  failing the sync for good. Links are always record ids, found by upserting the linked rows first.
* Changes people make in the base come back through :meth:`AirtableCRM.changed_appointments`: the
  Appointments table's ``Last Modified`` field (computed by Airtable, on Airtable's clock) filtered with
  ``IS_AFTER({Last Modified}, DATETIME_PARSE(...))``. Our own upserts move it too; telling those apart
  is the caller's business (``booking.crm_pull``).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import redis.asyncio as aioredis
import requests
from pyairtable import Api
from pyairtable.formulas import IS_AFTER, Field, match
from pyairtable.utils import datetime_from_iso_str
from requests.adapters import HTTPAdapter

from booking.errors import EffectFailed
from integrations.egress import Allowlist, guard_session
from integrations.http_headers import retry_after
from integrations.metrics import provider_request
from integrations.redis_rate_limit import RedisRateLimiter

T = TypeVar("T")

CONTACTS, APPOINTMENTS, CALLS, ACTIVITIES = "Contacts", "Appointments", "Calls", "Activities"
LAST_MODIFIED = "Last Modified"
"""The Appointments table's lastModifiedTime field: when any of a row's values last changed."""
RATE_LIMIT = 5
RATE_WINDOW = 1.2
"""Airtable allows 5 requests a second per base. The extra 0.2 s absorbs the network's jitter between the
limiter granting a slot and Airtable counting the request: without it, a first request delayed more than
the sixth one lands six in one of Airtable's seconds."""
DEFAULT_THREADS = 4
"""Requests in flight per adapter: more would only wait for the base's 5 a second."""
RATE_LIMIT_PENALTY = 30.0
"""Seconds Airtable refuses a base's requests after a 429; its 429 carries no Retry-After."""
PERMANENT_STATUSES = frozenset({400, 401, 403, 404, 413, 422})
_CALLER_LOOP: contextvars.ContextVar[asyncio.AbstractEventLoop] = contextvars.ContextVar("airtable_caller_loop")
"""The event loop of the coroutine that made a request; ``asyncio.to_thread`` carries it to the thread."""


# -- rows and their mapping --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContactRow:
    phone: str
    name: str | None = None
    email: str | None = None
    lifecycle: str | None = None
    lead_score: float | None = None
    notes: str | None = None
    last_contacted: datetime | None = None


@dataclass(frozen=True, slots=True)
class AppointmentRow:
    booking_id: str
    contact_phone: str
    service: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    status: str | None = None
    notes: str | None = None


@dataclass(frozen=True, slots=True)
class CallRow:
    call_sid: str
    contact_phone: str | None = None
    booking_ids: tuple[str, ...] = ()
    started: datetime | None = None
    duration_seconds: float | None = None
    outcome: str | None = None
    summary: str | None = None
    sentiment: float | None = None
    lead_score: float | None = None
    report_version: int | None = None


@dataclass(frozen=True, slots=True)
class ActivityRow:
    activity_id: str
    """A stable id of the event, e.g. the message SID."""
    contact_phone: str
    kind: str
    at: datetime
    body: str | None = None


def _fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the unknowns (``None``) and write datetimes as ISO 8601, as Airtable's dateTime wants."""
    return {
        name: (value.isoformat() if isinstance(value, datetime) else value)
        for name, value in values.items()
        if value is not None
    }


def contact_fields(row: ContactRow) -> dict[str, Any]:
    return _fields(
        {
            "Phone": row.phone,
            "Name": row.name,
            "Email": row.email,
            "Lifecycle": row.lifecycle,
            "Lead score": row.lead_score,
            "Notes": row.notes,
            "Last contacted": row.last_contacted,
        }
    )


def appointment_fields(row: AppointmentRow, contact_id: str) -> dict[str, Any]:
    return _fields(
        {
            "Booking ID": row.booking_id,
            "Contact": [contact_id],
            "Service": row.service,
            "Start": row.start,
            "End": row.end,
            "Status": row.status,
            "Notes": row.notes,
        }
    )


def call_fields(row: CallRow, contact_id: str | None, appointment_ids: Sequence[str]) -> dict[str, Any]:
    return _fields(
        {
            "Call SID": row.call_sid,
            "Contact": [contact_id] if contact_id is not None else None,
            "Appointments": list(appointment_ids) or None,
            "Started": row.started,
            "Duration (s)": row.duration_seconds,
            "Outcome": row.outcome,
            "Summary": row.summary,
            "Sentiment": row.sentiment,
            "Lead score": row.lead_score,
            "Report version": row.report_version,
        }
    )


def activity_fields(row: ActivityRow, contact_id: str) -> dict[str, Any]:
    return _fields(
        {"Activity ID": row.activity_id, "Contact": [contact_id], "Kind": row.kind, "At": row.at, "Body": row.body}
    )


# -- the schema ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    type: str
    options: Mapping[str, Any] = field(default_factory=dict)
    links_to: str | None = None
    """For a link field: the name of the linked table (its id goes into the options when created)."""


_DATETIME = {"timeZone": "utc", "dateFormat": {"name": "iso"}, "timeFormat": {"name": "24hour"}}
_LIFECYCLE = {"choices": [{"name": n} for n in ("new", "contacted", "qualified", "booked", "nurture", "lost")]}

SCHEMA: dict[str, tuple[FieldSpec, ...]] = {
    CONTACTS: (
        FieldSpec("Phone", "phoneNumber"),
        FieldSpec("Name", "singleLineText"),
        FieldSpec("Email", "email"),
        FieldSpec("Lifecycle", "singleSelect", _LIFECYCLE),
        FieldSpec("Lead score", "number", {"precision": 0}),
        FieldSpec("Notes", "multilineText"),
        FieldSpec("Last contacted", "dateTime", _DATETIME),
    ),
    APPOINTMENTS: (
        FieldSpec("Booking ID", "singleLineText"),
        FieldSpec("Contact", "multipleRecordLinks", links_to=CONTACTS),
        FieldSpec("Service", "singleLineText"),
        FieldSpec("Start", "dateTime", _DATETIME),
        FieldSpec("End", "dateTime", _DATETIME),
        FieldSpec("Status", "singleSelect", {"choices": []}),
        FieldSpec("Notes", "multilineText"),
        FieldSpec(LAST_MODIFIED, "lastModifiedTime"),
    ),
    CALLS: (
        FieldSpec("Call SID", "singleLineText"),
        FieldSpec("Contact", "multipleRecordLinks", links_to=CONTACTS),
        FieldSpec("Appointments", "multipleRecordLinks", links_to=APPOINTMENTS),
        FieldSpec("Started", "dateTime", _DATETIME),
        FieldSpec("Duration (s)", "number", {"precision": 0}),
        FieldSpec("Outcome", "singleSelect", {"choices": []}),
        FieldSpec("Summary", "multilineText"),
        FieldSpec("Sentiment", "number", {"precision": 2}),
        FieldSpec("Lead score", "number", {"precision": 0}),
        FieldSpec("Report version", "number", {"precision": 0}),
    ),
    ACTIVITIES: (
        FieldSpec("Activity ID", "singleLineText"),
        FieldSpec("Contact", "multipleRecordLinks", links_to=CONTACTS),
        FieldSpec("Kind", "singleSelect", {"choices": []}),
        FieldSpec("At", "dateTime", _DATETIME),
        FieldSpec("Body", "multilineText"),
    ),
}
"""The tables in creation order (a link's table comes first); each table's first field is its key."""


@dataclass(frozen=True, slots=True)
class SchemaReport:
    missing_tables: tuple[str, ...] = ()
    missing_fields: tuple[tuple[str, str], ...] = ()
    """(table, field) pairs, for tables that exist."""
    wrong_types: tuple[tuple[str, str, str, str], ...] = ()
    """(table, field, expected type, actual type): reported, never changed."""
    created_tables: tuple[str, ...] = ()
    created_fields: tuple[tuple[str, str], ...] = ()

    @property
    def ok(self) -> bool:
        """True when the base can take a sync: nothing missing after this run, no wrong type."""
        created = set(self.created_tables)
        return (
            not self.wrong_types
            and created >= set(self.missing_tables)
            and set(self.created_fields) >= set(self.missing_fields)
        )


def _field_body(spec: FieldSpec, table_ids: Mapping[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {"name": spec.name, "type": spec.type}
    options = dict(spec.options)
    if spec.links_to is not None:
        options["linkedTableId"] = table_ids[spec.links_to]
    if options:
        body["options"] = options
    return body


def airtable_rate_limiter(redis: aioredis.Redis) -> RedisRateLimiter:
    """The limiter every worker's :class:`AirtableCRM` should share (keyed by base id)."""
    return RedisRateLimiter(redis, "airtable", limit=RATE_LIMIT, window=RATE_WINDOW)


# -- the adapter -----------------------------------------------------------------------------------


class _RateLimitedAdapter(HTTPAdapter):
    """Takes a rate-limit slot before every request the session sends."""

    def __init__(self, before_request: Callable[[], None]) -> None:
        super().__init__()
        self._before_request = before_request

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        self._before_request()
        return super().send(request, *args, **kwargs)


@dataclass(frozen=True, slots=True)
class AppointmentChange:
    """An Appointments row as it stands after a change: what someone edited, or what we last pushed."""

    record_id: str
    booking_id: str | None
    """None for a row someone added by hand (no ``Booking ID``)."""
    status: str | None
    notes: str | None
    modified_at: datetime
    """Airtable's ``Last Modified``, on Airtable's clock (milliseconds)."""


_CHANGE_FIELDS = ["Booking ID", "Status", "Notes", LAST_MODIFIED]


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value != "" else None


@dataclass(frozen=True, slots=True)
class SyncResult:
    contacts: dict[str, str]
    """Phone -> record id."""
    appointments: dict[str, str]
    """Booking id -> record id."""
    calls: dict[str, str]
    """Call SID -> record id."""
    activities: dict[str, str]


class AirtableCRM:
    """Push contacts, appointments, calls and activities into one base. pyairtable blocks, so each call
    runs on a thread of the default executor; the rate limiter is awaited on the event loop the calling
    coroutine runs on. ``endpoint_url`` points at the simulator in tests."""

    def __init__(
        self,
        api_key: str,
        base_id: str,
        limiter: RedisRateLimiter,
        *,
        endpoint_url: str = "https://api.airtable.com",
        timeout: tuple[int, int] = (5, 30),
        rate_limit_penalty: float = RATE_LIMIT_PENALTY,
        threads: int = DEFAULT_THREADS,
        egress: Allowlist | None = None,
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        # Threads of its own: a request waits on them for the shared limiter's slot (up to a second),
        # which on the default pool would hold up every other blocking call of the process.
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="airtable")
        self.base_id = base_id
        self._limiter = limiter
        self._penalty = rate_limit_penalty
        self._api = Api(api_key, endpoint_url=endpoint_url, timeout=timeout, retry_strategy=None)
        adapter = _RateLimitedAdapter(self._take_slot)
        for scheme in ("https://", "http://"):
            self._api.session.mount(scheme, adapter)
        if egress is not None:  # after mounting: the gate wraps the adapters in place
            guard_session(self._api.session, egress)

    def close(self) -> None:
        self._api.session.close()
        self._executor.shutdown(wait=False)

    def _take_slot(self) -> None:
        # On a worker thread: wait for the shared limiter on the loop that started the call.
        loop = _CALLER_LOOP.get(None)
        if loop is None:
            raise RuntimeError("AirtableCRM requests must be made through its coroutines")
        asyncio.run_coroutine_threadsafe(self._limiter.acquire(self.base_id), loop).result()

    async def _call(self, work: Callable[[], T], what: str) -> T:
        loop = asyncio.get_running_loop()
        _CALLER_LOOP.set(loop)
        try:
            # As asyncio.to_thread does, but on this adapter's threads: the request sees the caller's context.
            # The operation is the first word of ``what`` ("the upsert into Contacts" -> "upsert"): a small set.
            with provider_request("airtable", what.removeprefix("the ").split(" ", 1)[0]):
                return await loop.run_in_executor(
                    self._executor, functools.partial(contextvars.copy_context().run, work)
                )
        except requests.HTTPError as error:
            raise self._translate(error, what) from error
        except requests.Timeout as error:
            raise EffectFailed(
                f"Airtable did not answer in time ({what}): {error}", permanent=False, code="outcome_unknown"
            ) from error
        except OSError as error:  # requests' ConnectionError and the rest of RequestException
            raise EffectFailed(
                f"Airtable could not be reached ({what}): {error}", permanent=False, code="unreachable"
            ) from error

    def _translate(self, error: requests.HTTPError, what: str) -> EffectFailed:
        response = error.response
        status = response.status_code if response is not None else 0
        kind, message = "UNKNOWN", str(error)
        try:
            body = response.json() if response is not None else {}
            kind = str(body["error"]["type"])
            message = str(body["error"].get("message", ""))
        except (ValueError, KeyError, TypeError):
            pass
        detail = f"Airtable refused {what} (HTTP {status}, {kind}): {message}"
        headers = dict(response.headers) if response is not None else {}
        context: dict[str, Any] = {"base_id": self.base_id, "airtable_error": kind}
        if status == 429:
            wait = retry_after(headers)
            # Jittered: every sync refused in the same second would otherwise all retry in the same one.
            return EffectFailed(
                detail,
                permanent=False,
                retry_after=self._penalty * (1 + random.random() / 2) if wait is None else wait,
                code="rate_limited",
                **context,
            )
        if status >= 500 or status == 0:
            return EffectFailed(
                detail, permanent=False, retry_after=retry_after(headers), code="provider_error", **context
            )
        if status in (401, 403):
            return EffectFailed(detail, permanent=True, code="unauthorized", **context)
        if status in PERMANENT_STATUSES or 400 <= status < 500:
            return EffectFailed(detail, permanent=True, code="rejected", **context)
        return EffectFailed(detail, permanent=False, code="provider_error", **context)

    async def upsert(self, table: str, key: str, rows: Iterable[dict[str, Any]]) -> dict[str, str]:
        """Upsert field dicts into ``table`` by its ``key`` field (rows sharing a key are merged, later
        values winning); returns key value -> record id. :meth:`sync` is built on this."""
        merged: dict[Any, dict[str, Any]] = {}
        for fields in rows:
            merged.setdefault(fields[key], {}).update(fields)
        if not merged:
            return {}
        records = [{"fields": fields} for fields in merged.values()]
        target = self._api.table(self.base_id, table)
        result = await self._call(
            lambda: target.batch_upsert(records, key_fields=[key], typecast=True), f"the upsert into {table}"
        )
        return {str(record["fields"][key]): record["id"] for record in result["records"]}

    async def sync(
        self,
        *,
        contacts: Sequence[ContactRow] = (),
        appointments: Sequence[AppointmentRow] = (),
        calls: Sequence[CallRow] = (),
        activities: Sequence[ActivityRow] = (),
    ) -> SyncResult:
        """Upsert the rows, linked: contacts first (with a bare row for every phone only referenced),
        then appointments, calls and activities pointing at their ids. Safe to repeat."""
        referenced = [a.contact_phone for a in appointments] + [a.contact_phone for a in activities]
        referenced += [c.contact_phone for c in calls if c.contact_phone is not None]
        contact_rows = [ContactRow(phone) for phone in referenced] + list(contacts)
        contact_ids = await self.upsert(CONTACTS, "Phone", (contact_fields(row) for row in contact_rows))
        appointment_ids = await self.upsert(
            APPOINTMENTS,
            "Booking ID",
            (appointment_fields(row, contact_ids[row.contact_phone]) for row in appointments),
        )
        linked = dict(appointment_ids)
        wanted = {b for call in calls for b in call.booking_ids if b not in linked}
        if wanted:
            linked.update(await self._find(APPOINTMENTS, "Booking ID", wanted))
        missing = wanted - linked.keys()
        if missing:
            raise EffectFailed(
                f"calls refer to bookings not in Airtable: {', '.join(sorted(missing))}",
                permanent=False,  # the booking's own sync may not have run yet
                code="missing_link",
                base_id=self.base_id,
            )
        call_ids = await self.upsert(
            CALLS,
            "Call SID",
            (
                call_fields(
                    row,
                    contact_ids[row.contact_phone] if row.contact_phone is not None else None,
                    [linked[b] for b in row.booking_ids],
                )
                for row in calls
            ),
        )
        activity_ids = await self.upsert(
            ACTIVITIES, "Activity ID", (activity_fields(row, contact_ids[row.contact_phone]) for row in activities)
        )
        return SyncResult(contact_ids, appointment_ids, call_ids, activity_ids)

    async def changed_appointments(self, since: datetime) -> list[AppointmentChange]:
        """The Appointments rows whose values changed after ``since`` (an aware instant), oldest first."""
        if since.tzinfo is None:
            raise ValueError(f"naive datetime {since.isoformat()} given as an Airtable modification time")
        formula = IS_AFTER(Field(LAST_MODIFIED), since.astimezone(UTC))
        target = self._api.table(self.base_id, APPOINTMENTS)
        records = await self._call(
            functools.partial(target.all, formula=formula, fields=_CHANGE_FIELDS), "the read of changed appointments"
        )
        changes = []
        for record in records:
            fields = record["fields"]
            modified = fields.get(LAST_MODIFIED)
            if not isinstance(modified, str):
                raise EffectFailed(
                    f"Airtable returned appointment {record['id']} without its {LAST_MODIFIED!r}",
                    permanent=True,
                    code="rejected",
                    base_id=self.base_id,
                )
            changes.append(
                AppointmentChange(
                    record_id=record["id"],
                    booking_id=_text(fields.get("Booking ID")),
                    status=_text(fields.get("Status")),
                    notes=_text(fields.get("Notes")),
                    modified_at=datetime_from_iso_str(modified).astimezone(UTC),
                )
            )
        return sorted(changes, key=lambda change: change.modified_at)

    async def erase(
        self, *, phone: str, booking_ids: Sequence[str], call_sids: Sequence[str], activity_ids: Sequence[str]
    ) -> int:
        """Delete a person's rows (a privacy erasure): their calls, activities, appointments and contact,
        links first so no row is left pointing at a deleted one. Returns how many rows went; safe to repeat
        (what is gone is not found again)."""
        deleted = 0
        for table, key, values in (
            (CALLS, "Call SID", call_sids),
            (ACTIVITIES, "Activity ID", activity_ids),
            (APPOINTMENTS, "Booking ID", booking_ids),
            (CONTACTS, "Phone", [phone]),
        ):
            found = await self._find_all(table, key, set(values))
            if found:
                target = self._api.table(self.base_id, table)
                await self._call(functools.partial(target.batch_delete, found), f"the erasure from {table}")
                deleted += len(found)
        return deleted

    async def _find_all(self, table: str, key: str, values: set[str]) -> list[str]:
        """Record ids of every row whose ``key`` is one of ``values``."""
        target = self._api.table(self.base_id, table)
        found: list[str] = []
        for value in sorted(values):
            search = functools.partial(target.all, formula=match({key: value}))
            records = await self._call(search, f"the search of {table}")
            found.extend(record["id"] for record in records)
        return found

    async def _find(self, table: str, key: str, values: set[str]) -> dict[str, str]:
        """Record ids of the rows whose ``key`` is one of ``values`` (one query per value)."""
        target = self._api.table(self.base_id, table)
        found: dict[str, str] = {}
        for value in sorted(values):
            records = await self._call(
                functools.partial(target.all, formula=match({key: value}), max_records=2), f"the search of {table}"
            )
            if records:
                found[value] = records[0]["id"]
        return found

    async def ensure_schema(self, create: bool) -> SchemaReport:
        """Compare the base with :data:`SCHEMA`; with ``create``, add the missing tables and fields
        (wrong field types are only reported: changing them could lose data)."""
        base = self._api.base(self.base_id)
        schema = await self._call(lambda: base.schema(force=True), "the schema read")
        existing = {table.name: table for table in schema.tables}
        table_ids = {name: table.id for name, table in existing.items()}
        missing_tables: list[str] = []
        missing_fields: list[tuple[str, str]] = []
        wrong_types: list[tuple[str, str, str, str]] = []
        created_tables: list[str] = []
        created_fields: list[tuple[str, str]] = []
        for name, specs in SCHEMA.items():
            table_schema = existing.get(name)
            if table_schema is None:
                missing_tables.append(name)
                if create:
                    bodies = [_field_body(spec, table_ids) for spec in specs]
                    answer = await self._call(
                        functools.partial(self._api.post, base.urls.tables, json={"name": name, "fields": bodies}),
                        f"the creation of table {name}",
                    )
                    table_ids[name] = str(answer["id"])
                    created_tables.append(name)
                continue
            have = {f.name: f.type for f in table_schema.fields}
            for spec in specs:
                if spec.name not in have:
                    missing_fields.append((name, spec.name))
                    if create:
                        table = self._api.table(self.base_id, table_schema.id)
                        options = _field_body(spec, table_ids).get("options")
                        await self._call(
                            functools.partial(table.create_field, spec.name, spec.type, options=options),
                            f"the creation of field {name}.{spec.name}",
                        )
                        created_fields.append((name, spec.name))
                elif have[spec.name] != spec.type:
                    wrong_types.append((name, spec.name, spec.type, have[spec.name]))
        return SchemaReport(
            tuple(missing_tables),
            tuple(missing_fields),
            tuple(wrong_types),
            tuple(created_tables),
            tuple(created_fields),
        )
