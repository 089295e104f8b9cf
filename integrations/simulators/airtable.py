"""Airtable's REST API on loopback, strict where Airtable is: a bearer token; records that may be listed
(``filterByFormula`` limited to ``{Field}=value`` and ``IS_AFTER({Field}, DATETIME_PARSE('...'))`` terms
joined by ``AND``; ``fields[]`` limits the fields returned), read, created, updated,
upserted (``performUpsert.fieldsToMergeOn``; several matches refuse the request) and deleted, at most 10
a request; values checked against the field's type unless ``typecast`` is set; linked-record fields that
must be arrays of ids of existing records of the linked table; the Meta API for a base's schema (list
tables, create a table, create a field); 5 requests a second per base, past which every request gets
429 for a penalty window. Every refusal is ``{"error": {"type": ..., "message": ...}}`` and refuses the
whole request: nothing of a refused batch is written. A ``lastModifiedTime`` field shows when a record's
values last changed, through the API or through :meth:`AirtableState.edit_as_person` (someone in
Airtable's own interface).

Simplifications: link fields have no inverse field in the linked table, and ``typecast`` adds missing
select options but does not turn names into links. Rate, window and penalty are configurable, the clock
injectable (tests advance it past a penalty), and so is the wall clock that stamps created and modified
times; faults (5xx, 429) can be queued for the next N requests.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from integrations.simulators.airtable_model import (
    MAX_RECORDS_PER_REQUEST,
    PAGE_SIZE,
    AirtableError,
    SimBase,
    SimRecord,
    SimTable,
    apply_fields,
    checked_fields,
    create_table,
    field_from,
    iso_time,
    new_id,
    record_filter,
)


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    status: int
    records: int
    """Records in the request body (0 for reads and the Meta API)."""
    query: str = ""
    """The query string as received (a list's ``filterByFormula`` and ``fields[]``)."""


@dataclass
class AirtableState:
    token: str
    bases: dict[str, SimBase] = field(default_factory=dict)
    rate: int = 5
    """Requests allowed per base in any ``window`` seconds; the next one starts a penalty."""
    window: float = 1.0
    penalty: float = 30.0
    latency: float = 0.0
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    """What time Airtable thinks it is: stamps records' created and last modified times."""
    log: list[LoggedRequest] = field(default_factory=list)
    _faults: list[int] = field(default_factory=list)
    _outage: tuple[float, int] | None = None
    _recent: dict[str, deque[float]] = field(default_factory=dict)
    _penalty_until: dict[str, float] = field(default_factory=dict)

    def add_base(self, base_id: str | None = None) -> SimBase:
        base = SimBase(base_id or new_id("app"))
        self.bases[base.id] = base
        return base

    def add_table(self, base_id: str, name: str, fields: list[dict[str, Any]]) -> SimTable:
        """Create a table as the Meta API would (the first field is the primary one)."""
        return create_table(self._base(base_id), {"name": name, "fields": fields})

    def records(self, base_id: str, table: str) -> list[SimRecord]:
        return list(self._base(base_id).table(table).records.values())

    def edit_as_person(
        self, base_id: str, table: str, record_id: str, fields: dict[str, Any], *, at: datetime
    ) -> SimRecord:
        """Change a record as someone in Airtable's interface would, at ``at``: no request, no rate limit;
        new select options are allowed (``typecast``), computed fields are not writable; the record's
        last modified time becomes ``at`` when a value changed."""
        base = self._base(base_id)
        sim_table = base.table(table)
        record = sim_table.records.get(record_id)
        if record is None:
            raise AirtableError(404, "NOT_FOUND", f"Could not find record {record_id}")
        apply_fields(record, checked_fields(base, sim_table, fields, typecast=True), replace=False, at=iso_time(at))
        return record

    def now(self) -> str:
        return iso_time(self.wall_clock())

    def fail_next(self, status: int, count: int = 1) -> None:
        """Answer the next ``count`` requests with ``status`` (429 or a 5xx) before looking at them."""
        self._faults.extend([status] * count)

    def refuse_until(self, until: float, status: int = 503) -> None:
        """Answer every request with ``status`` until ``clock()`` reaches ``until`` (an outage)."""
        self._outage = (until, status)

    def requests_to(self, table: str, method: str | None = None) -> list[LoggedRequest]:
        return [r for r in self.log if r.path.split("/")[-1] == table and (method is None or r.method == method)]

    def _base(self, base_id: str) -> SimBase:
        base = self.bases.get(base_id)
        if base is None:
            raise AirtableError(404, "NOT_FOUND", f"Could not find base {base_id}")
        return base

    def admit(self, base_id: str) -> None:
        """Count one request against the base's rate, raising 429 past it or within a penalty."""
        now = self.clock()
        if now < self._penalty_until.get(base_id, float("-inf")):
            raise AirtableError(429, "RATE_LIMIT_REACHED", "Rate limit exceeded. Please try again later")
        recent = self._recent.setdefault(base_id, deque())
        while recent and recent[0] <= now - self.window:
            recent.popleft()
        if len(recent) >= self.rate:
            self._penalty_until[base_id] = now + self.penalty
            raise AirtableError(429, "RATE_LIMIT_REACHED", "Rate limit exceeded. Please try again later")
        recent.append(now)


# -- the app ---------------------------------------------------------------------------------------


def create_airtable_simulator(state: AirtableState) -> Starlette:
    async def guarded(request: Request) -> Response:
        status, records = 500, 0
        try:
            body: Any = None
            if request.method in ("POST", "PATCH", "PUT"):
                try:
                    body = await request.json()
                except ValueError:
                    raise AirtableError(
                        422, "INVALID_REQUEST_UNKNOWN", "Invalid request: the body is not JSON"
                    ) from None
            if isinstance(body, dict) and isinstance(body.get("records"), list):
                records = len(body["records"])
            response = await _handle(state, request, body)
            status = response.status_code
            return response
        except AirtableError as error:
            status = error.status
            return error.response()
        finally:
            state.log.append(LoggedRequest(request.method, request.url.path, status, records, request.url.query))

    routes = [
        Route("/v0/meta/bases/{base}/tables", guarded, methods=["GET", "POST"]),
        Route("/v0/meta/bases/{base}/tables/{table}/fields", guarded, methods=["POST"]),
        Route("/v0/{base}/{table}", guarded, methods=["GET", "POST", "PATCH", "PUT", "DELETE"]),
        Route("/v0/{base}/{table}/{record}", guarded, methods=["GET", "PATCH", "PUT", "DELETE"]),
    ]
    return Starlette(routes=routes)


async def _handle(state: AirtableState, request: Request, body: Any) -> Response:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AirtableError(401, "AUTHENTICATION_REQUIRED", "Authentication required")
    if not secrets.compare_digest(token, state.token):
        raise AirtableError(401, "AUTHENTICATION_REQUIRED", "Invalid authentication token")
    if state.latency:
        await asyncio.sleep(state.latency)
    outage = state._outage
    if outage is not None and state.clock() < outage[0]:
        raise AirtableError(outage[1], "SERVER_ERROR", f"Airtable is unavailable: HTTP {outage[1]}")
    if state._faults:
        status = state._faults.pop(0)
        kind = "RATE_LIMIT_REACHED" if status == 429 else "SERVER_ERROR"
        raise AirtableError(status, kind, f"Injected fault: HTTP {status}")
    params = request.path_params
    base = state._base(params["base"])
    state.admit(base.id)
    path = request.url.path
    if path.startswith("/v0/meta/"):
        if path.endswith("/fields"):
            table = base.table(params["table"])
            created = field_from(base, body, table.fields)
            table.fields.append(created)
            return JSONResponse(created.schema())
        if request.method == "POST":
            return JSONResponse(create_table(base, body).schema())
        return JSONResponse({"tables": [table.schema() for table in base.tables]})
    table = base.table(params["table"])
    record_id = params.get("record")
    if record_id is not None:
        return _one_record(base, table, request.method, record_id, body, state.now())
    if request.method == "GET":
        return _list(table, request)
    if request.method == "DELETE":
        ids = request.query_params.getlist("records[]")
        _check_count(ids)
        missing = [i for i in ids if i not in table.records]
        if missing:
            raise AirtableError(404, "NOT_FOUND", f"Could not find records {', '.join(missing)}")
        return JSONResponse({"records": [{"id": i, "deleted": table.records.pop(i) is not None} for i in ids]})
    if not isinstance(body, dict):
        raise AirtableError(422, "INVALID_REQUEST_UNKNOWN", "Invalid request: the body must be an object")
    typecast = bool(body.get("typecast", False))
    if request.method == "POST":
        return _create(base, table, body, typecast, state.now())
    return _update(base, table, body, typecast, state.now(), replace=request.method == "PUT")


def _check_count(items: list[Any]) -> None:
    if not items:
        raise AirtableError(422, "INVALID_RECORDS", "The request must name at least one record")
    if len(items) > MAX_RECORDS_PER_REQUEST:
        raise AirtableError(
            422, "INVALID_RECORDS", f"Too many records: at most {MAX_RECORDS_PER_REQUEST} a request, not {len(items)}"
        )


def _one_record(base: SimBase, table: SimTable, method: str, record_id: str, body: Any, now: str) -> Response:
    record = table.records.get(record_id)
    if record is None:
        raise AirtableError(404, "NOT_FOUND", f"Could not find record {record_id}")
    if method == "GET":
        return JSONResponse(table.record_body(record))
    if method == "DELETE":
        del table.records[record_id]
        return JSONResponse({"id": record_id, "deleted": True})
    if not isinstance(body, dict):
        raise AirtableError(422, "INVALID_REQUEST_UNKNOWN", "Invalid request: the body must be an object")
    fields = checked_fields(base, table, body.get("fields"), bool(body.get("typecast", False)))
    apply_fields(record, fields, replace=method == "PUT", at=now)
    return JSONResponse(table.record_body(record))


def _list(table: SimTable, request: Request) -> Response:
    query = request.query_params
    records = list(table.records.values())
    formula = query.get("filterByFormula")
    if formula:
        matches = record_filter(formula, table)
        records = [r for r in records if matches(r)]
    only: list[str] | None = None
    if "fields[]" in query:
        only = query.getlist("fields[]")
        unknown = [name for name in only if table.field_named(name) is None]
        if unknown:
            raise AirtableError(422, "UNKNOWN_FIELD_NAME", f'Unknown field name: "{unknown[0]}"')
        only = [spec.name for name in only if (spec := table.field_named(name)) is not None]
    if "maxRecords" in query:
        records = records[: int(query["maxRecords"])]
    size = min(int(query.get("pageSize", PAGE_SIZE)), PAGE_SIZE)
    start = int(query.get("offset", "0") or 0)
    page = records[start : start + size]
    body: dict[str, Any] = {"records": [table.record_body(r, only) for r in page]}
    if start + size < len(records):
        body["offset"] = str(start + size)
    return JSONResponse(body)


def _create(base: SimBase, table: SimTable, body: dict[str, Any], typecast: bool, now: str) -> Response:
    single = "records" not in body
    items = [body] if single else body["records"]
    if not isinstance(items, list):
        raise AirtableError(422, "INVALID_RECORDS", '"records" must be an array')
    _check_count(items)
    checked = [
        checked_fields(base, table, item.get("fields") if isinstance(item, dict) else None, typecast) for item in items
    ]
    created = []
    for fields in checked:
        record = SimRecord(new_id("rec"), now, {})
        apply_fields(record, fields, replace=False, at=now)
        table.records[record.id] = record
        created.append(table.record_body(record))
    return JSONResponse(created[0] if single else {"records": created})


def _update(
    base: SimBase, table: SimTable, body: dict[str, Any], typecast: bool, now: str, *, replace: bool
) -> Response:
    items = body.get("records")
    if not isinstance(items, list):
        raise AirtableError(422, "INVALID_RECORDS", '"records" must be an array')
    _check_count(items)
    upsert = body.get("performUpsert")
    keys: list[str] = []
    if upsert is not None:
        merge_on = upsert.get("fieldsToMergeOn") if isinstance(upsert, dict) else None
        if not isinstance(merge_on, list) or not 1 <= len(merge_on) <= 3:
            raise AirtableError(422, "INVALID_MERGE_FIELD", "fieldsToMergeOn must name 1 to 3 fields of the table")
        specs = [table.field_named(str(k)) for k in merge_on]
        keys = [spec.name for spec in specs if spec is not None]
        if len(keys) != len(specs):
            raise AirtableError(422, "INVALID_MERGE_FIELD", f"fieldsToMergeOn names unknown fields: {merge_on}")
    # Everything is checked before anything is written: a refused request leaves the table as it was.
    plan: list[tuple[SimRecord | None, dict[str, Any]]] = []
    seen_keys: set[tuple[Any, ...]] = set()
    for item in items:
        if not isinstance(item, dict):
            raise AirtableError(422, "INVALID_RECORDS", "Each record must be an object")
        fields = checked_fields(base, table, item.get("fields"), typecast)
        if "id" in item:
            record = table.records.get(item["id"])
            if record is None:
                raise AirtableError(404, "NOT_FOUND", f"Could not find record {item['id']}")
            plan.append((record, fields))
            continue
        if not keys:
            raise AirtableError(422, "INVALID_RECORDS", "A record to update needs an id (or use performUpsert)")
        names = keys
        if any(fields.get(n) in (None, "") for n in names):
            raise AirtableError(422, "INVALID_RECORDS", f"Each record must have a value for {', '.join(names)}")
        key = tuple(repr(fields[n]) for n in names)
        if key in seen_keys:
            raise AirtableError(422, "INVALID_RECORDS", f"Two records in the request share the merge key {key}")
        seen_keys.add(key)
        found = [r for r in table.records.values() if all(repr(r.fields.get(n)) == repr(fields[n]) for n in names)]
        if len(found) > 1:
            raise AirtableError(
                422,
                "INVALID_VALUE_FOR_COLUMN",
                f"{len(found)} records match {dict(zip(names, (fields[n] for n in names), strict=True))}; "
                "an upsert needs at most one",
            )
        plan.append((found[0] if found else None, fields))
    written, created_ids, updated_ids = [], [], []
    for existing, fields in plan:
        if existing is None:
            record = SimRecord(new_id("rec"), now, {})
            table.records[record.id] = record
            created_ids.append(record.id)
        else:
            record = existing
            updated_ids.append(record.id)
        apply_fields(record, fields, replace=replace and existing is not None, at=now)
        written.append(table.record_body(record))
    answer: dict[str, Any] = {"records": written}
    if upsert is not None:
        answer.update(createdRecords=created_ids, updatedRecords=updated_ids)
    return JSONResponse(answer)
