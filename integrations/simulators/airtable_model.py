"""The Airtable simulator's data model: bases, tables, fields and records, how a value is checked
against its field's type (or cast, with ``typecast``), the ``{Field}=value`` formulas it understands, and
the Meta API's table and field creation. Pure: the app in :mod:`integrations.simulators.airtable` does the
HTTP, the rate limit and the faults.

A ``lastModifiedTime`` field is computed, never written: it shows when any other field of the record last
changed value (a write that changes nothing leaves it alone; unverified against Airtable). Formulas are
``{Field}=value`` terms and ``IS_AFTER({Field}, DATETIME_PARSE('<ISO 8601>'))`` terms (what pyairtable's
``IS_AFTER(Field(name), datetime)`` writes), joined by ``AND``; anything else is refused."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from starlette.responses import JSONResponse, Response

MAX_RECORDS_PER_REQUEST = 10
PAGE_SIZE = 100
TEXT_TYPES = frozenset({"singleLineText", "multilineText", "richText", "email", "phoneNumber", "url"})
NUMBER_TYPES = frozenset({"number", "currency", "percent", "duration", "rating"})
LINK = "multipleRecordLinks"
SELECT_TYPES = frozenset({"singleSelect", "multipleSelects"})
LAST_MODIFIED_TIME = "lastModifiedTime"
COMPUTED_TYPES = frozenset({LAST_MODIFIED_TIME})
DATE_TYPES = frozenset({"date", "dateTime", LAST_MODIFIED_TIME})
FIELD_TYPES = TEXT_TYPES | NUMBER_TYPES | SELECT_TYPES | COMPUTED_TYPES | {LINK, "checkbox", "date", "dateTime"}
_TERM = re.compile(r"""^\{([^{}]+)\}\s*=\s*(?:'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)"|(-?\d+(?:\.\d+)?))$""")
_IS_AFTER = re.compile(r"""^IS_AFTER\(\s*\{([^{}]+)\}\s*,\s*DATETIME_PARSE\(\s*'([^'\\]*)'\s*\)\s*\)$""")


class AirtableError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message

    def response(self) -> Response:
        return JSONResponse({"error": {"type": self.kind, "message": self.message}}, status_code=self.status)


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(7)[:14]


def iso_time(value: datetime) -> str:
    """An instant as Airtable writes one: UTC, milliseconds, ``Z``."""
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


@dataclass
class SimField:
    id: str
    name: str
    type: str
    options: dict[str, Any] = field(default_factory=dict)

    def schema(self) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "name": self.name, "type": self.type}
        if self.options:
            body["options"] = self.options
        return body


@dataclass
class SimRecord:
    id: str
    created_time: str
    fields: dict[str, Any]
    """What was written (computed fields are not stored here)."""
    modified_time: str = ""
    """When a written field last changed value (``created_time`` until then)."""

    def __post_init__(self) -> None:
        self.modified_time = self.modified_time or self.created_time

    def body(self) -> dict[str, Any]:
        return {"id": self.id, "createdTime": self.created_time, "fields": dict(self.fields)}


@dataclass
class SimTable:
    id: str
    name: str
    fields: list[SimField]
    records: dict[str, SimRecord] = field(default_factory=dict)

    def field_named(self, name: str) -> SimField | None:
        return next((f for f in self.fields if f.name == name or f.id == name), None)

    def values(self, record: SimRecord) -> dict[str, Any]:
        """The record's fields as Airtable shows them: what was written, and the computed ones."""
        values = dict(record.fields)
        for spec in self.fields:
            if spec.type == LAST_MODIFIED_TIME:
                values[spec.name] = record.modified_time
        return values

    def record_body(self, record: SimRecord, only: list[str] | None = None) -> dict[str, Any]:
        """The record as the API returns it; ``only`` names the fields asked for (``fields[]``)."""
        values = self.values(record)
        if only is not None:
            values = {name: value for name, value in values.items() if name in only}
        return {"id": record.id, "createdTime": record.created_time, "fields": values}

    def schema(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "primaryFieldId": self.fields[0].id,
            "fields": [f.schema() for f in self.fields],
            "views": [{"id": "viw" + self.id[3:], "name": "Grid view", "type": "grid"}],
        }


@dataclass
class SimBase:
    id: str
    tables: list[SimTable] = field(default_factory=list)

    def table(self, id_or_name: str) -> SimTable:
        for table in self.tables:
            if id_or_name in (table.id, table.name):
                return table
        raise AirtableError(404, "TABLE_NOT_FOUND", f"Could not find table {id_or_name} in base {self.id}")


# -- values ---------------------------------------------------------------------------------------


def coerce(state_base: SimBase, table: SimTable, spec: SimField, value: Any, typecast: bool) -> Any:
    """The value as stored, or AirtableError 422 when it does not fit the field's type."""

    def refuse(expected: str) -> AirtableError:
        return AirtableError(
            422,
            "INVALID_VALUE_FOR_COLUMN",
            f'Field "{spec.name}" cannot accept the provided value: expected {expected}',
        )

    kind = spec.type
    if kind in COMPUTED_TYPES:
        raise AirtableError(
            422,
            "INVALID_VALUE_FOR_COLUMN",
            f'Field "{spec.name}" cannot accept a value because the field is computed',
        )
    if value is None:
        return None
    if kind in TEXT_TYPES:
        if isinstance(value, str):
            return value
        if typecast and isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise refuse("a string")
    if kind in NUMBER_TYPES:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
        if typecast and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise refuse("a number") from None
        raise refuse("a number")
    if kind == "checkbox":
        if isinstance(value, bool):
            return value
        raise refuse("a boolean")
    if kind in ("date", "dateTime"):
        if not isinstance(value, str):
            raise refuse("an ISO 8601 string")
        try:
            if kind == "date":
                return date.fromisoformat(value).isoformat()
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise refuse("an ISO 8601 string") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    if kind in SELECT_TYPES:
        names = [value] if kind == "singleSelect" else value
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise refuse("a string" if kind == "singleSelect" else "an array of strings")
        choices = spec.options.setdefault("choices", [])
        for name in names:
            if not any(choice["name"] == name for choice in choices):
                if not typecast:
                    raise AirtableError(
                        422,
                        "INVALID_MULTIPLE_CHOICE_OPTIONS",
                        f'Insufficient permissions to create new select option ""{name}""',
                    )
                choices.append({"id": new_id("sel"), "name": name, "color": "blueLight2"})
        return value
    if kind == LINK:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise refuse("an array of record IDs")
        linked = state_base.table(spec.options["linkedTableId"])
        for record_id in value:
            if record_id not in linked.records:
                raise AirtableError(
                    422,
                    "ROW_DOES_NOT_EXIST",
                    f'Record ID {record_id} in field "{spec.name}" does not exist in table {linked.name}',
                )
        return list(dict.fromkeys(value))
    raise refuse(f"a value of type {kind}")  # computed fields cannot be written


def checked_fields(base: SimBase, table: SimTable, fields: Any, typecast: bool) -> dict[str, Any]:
    if not isinstance(fields, dict):
        raise AirtableError(422, "INVALID_REQUEST_MISSING_FIELDS", 'Could not find field "fields" in the request')
    checked: dict[str, Any] = {}
    for name, value in fields.items():
        spec = table.field_named(name)
        if spec is None:
            raise AirtableError(422, "UNKNOWN_FIELD_NAME", f'Unknown field name: "{name}"')
        checked[spec.name] = coerce(base, table, spec, value, typecast)
    return checked


def apply_fields(record: SimRecord, fields: dict[str, Any], *, replace: bool, at: str) -> bool:
    """Write ``fields``; when a value changed, the record's modification time becomes ``at``. Returns
    whether anything changed."""
    before = dict(record.fields)
    if replace:
        record.fields = {}
    for name, value in fields.items():
        if value is None or value == [] or value == "":
            record.fields.pop(name, None)  # Airtable omits empty values
        else:
            record.fields[name] = value
    changed = record.fields != before
    if changed:
        record.modified_time = at
    return changed


def _invalid_formula(term: str) -> AirtableError:
    return AirtableError(422, "INVALID_FILTER_BY_FORMULA", f"The formula for filtering records is invalid: {term}")


def _is_after(table: SimTable, term: str, name: str, literal: str) -> Callable[[dict[str, Any]], bool]:
    spec = table.field_named(name)
    if spec is None:
        raise AirtableError(422, "INVALID_FILTER_BY_FORMULA", f"Unknown field names: {name.lower()}")
    if spec.type not in DATE_TYPES:
        raise _invalid_formula(term)
    try:
        threshold = parse_time(literal)
    except ValueError:
        raise _invalid_formula(term) from None

    def test(values: dict[str, Any]) -> bool:
        actual = values.get(spec.name)
        return isinstance(actual, str) and parse_time(actual) > threshold

    return test


def _equals(term: str) -> Callable[[dict[str, Any]], bool]:
    match = _TERM.match(term)
    if match is None:
        raise _invalid_formula(term)
    name, single, double, number = match.groups()
    text = single if single is not None else double
    if text is None:
        wanted = float(number)
        return lambda values: isinstance(values.get(name), int | float) and float(values[name]) == wanted
    literal = re.sub(r"\\(.)", r"\1", text)
    return lambda values: ("" if values.get(name) is None else str(values[name])) == literal


def record_filter(formula: str, table: SimTable) -> Callable[[SimRecord], bool]:
    """The test a ``filterByFormula`` makes of each record; the whole formula is checked first, so an
    invalid one is refused whether or not the table has records."""
    tests = []
    for term in _split_formula(formula.strip()):
        after = _IS_AFTER.match(term)
        tests.append(_is_after(table, term, *after.groups()) if after is not None else _equals(term))

    def matches(record: SimRecord) -> bool:
        values = table.values(record)
        return all(test(values) for test in tests)

    return matches


def _split_formula(formula: str) -> list[str]:
    if not (formula.upper().startswith("AND(") and formula.endswith(")")):
        return [formula]
    inner, terms, depth, quote, start = formula[4:-1], [], 0, "", 0
    for i, char in enumerate(inner):
        if quote:
            quote = "" if char == quote and inner[i - 1] != "\\" else quote
        elif char in "'\"":
            quote = char
        elif char in "({":
            depth += 1
        elif char in ")}":
            depth -= 1
        elif char == "," and depth == 0:
            terms.append(inner[start:i].strip())
            start = i + 1
    terms.append(inner[start:].strip())
    return [t for term in terms for t in _split_formula(term)]


# -- the Meta API ----------------------------------------------------------------------------------


def field_from(base: SimBase, spec: Any, existing: list[SimField]) -> SimField:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"].strip():
        raise AirtableError(422, "INVALID_FIELD_NAME", "A field needs a non-empty name")
    name, kind, options = spec["name"], spec.get("type"), dict(spec.get("options") or {})
    if any(f.name.lower() == name.lower() for f in existing):
        raise AirtableError(422, "DUPLICATE_OR_EMPTY_FIELD_NAME", f'Field name "{name}" is already used')
    if kind not in FIELD_TYPES:
        raise AirtableError(422, "INVALID_FIELD_TYPE", f'Unsupported field type "{kind}" for field "{name}"')
    if kind == LINK:
        linked = base.table(str(options.get("linkedTableId", "")))
        options = {
            "isReversed": False,
            "linkedTableId": linked.id,
            "prefersSingleRecordLink": bool(options.get("prefersSingleRecordLink", False)),
            "inverseLinkFieldId": None,
        }
    elif kind in SELECT_TYPES:
        options = {"choices": [{"id": new_id("sel"), "name": c["name"]} for c in options.get("choices", [])]}
    elif kind == "number":
        options = {"precision": int(options.get("precision", 0))}
    elif kind == "dateTime":
        options = {
            "timeZone": str(options.get("timeZone", "utc")),
            "dateFormat": {"format": "YYYY-MM-DD", "name": "iso"},
            "timeFormat": {"format": "HH:mm", "name": "24hour"},
        }
    elif kind == "checkbox":
        options = {"color": "greenBright", "icon": "check"}
    elif kind == LAST_MODIFIED_TIME:
        # Every other field counts (Airtable can limit it to some fields; the simulator does not).
        options = {
            "isValid": True,
            "referencedFieldIds": [],
            "result": {
                "type": "dateTime",
                "options": {
                    "timeZone": "utc",
                    "dateFormat": {"format": "YYYY-MM-DD", "name": "iso"},
                    "timeFormat": {"format": "HH:mm", "name": "24hour"},
                },
            },
        }
    else:
        options = {}
    return SimField(new_id("fld"), name, kind, options)


def create_table(base: SimBase, body: Any) -> SimTable:
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"].strip():
        raise AirtableError(422, "INVALID_TABLE_NAME", "A table needs a non-empty name")
    if any(t.name.lower() == body["name"].lower() for t in base.tables):
        raise AirtableError(422, "DUPLICATE_TABLE_NAME", f'Table name "{body["name"]}" is already used')
    specs = body.get("fields")
    if not isinstance(specs, list) or not specs:
        raise AirtableError(422, "INVALID_REQUEST_UNKNOWN", "A table needs at least one field")
    fields: list[SimField] = []
    for spec in specs:
        fields.append(field_from(base, spec, fields))
    if fields[0].type in (LINK, "checkbox", *COMPUTED_TYPES):
        raise AirtableError(422, "INVALID_PRIMARY_FIELD", f'Field type "{fields[0].type}" cannot be primary')
    table = SimTable(new_id("tbl"), body["name"], fields)
    base.tables.append(table)
    return table
