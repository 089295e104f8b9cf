"""The business a voicebook server answers for: zone, resources, services, hours, closures and booking
rules, loaded from a TOML file and validated completely before the server starts.

An invalid file raises :class:`~booking.errors.ConfigurationError` listing every problem with its
location (``resources[1].hours.mon[0]: ...``), so an operator fixes them in one pass.
"""

from __future__ import annotations

import datetime as dt
import enum
import itertools
import re
import tomllib
from collections.abc import Collection, Mapping
from datetime import time, timedelta
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from booking.errors import ConfigurationError, InvalidRequest
from booking.phone import normalise_phone
from booking.reports.vocabulary import LifecycleStage, check_condition

WEEKDAYS: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
EXAMPLE_BUSINESS_FILE = Path(__file__).with_name("examples") / "riverside_clinic.toml"

Identifier = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
ExternalConflicts = Literal["hard", "soft"]
"""What busy time in a resource's external calendar means: ``hard`` refuses a hold overlapping it,
``soft`` grants the hold with a warning (and slot search does not hide the time)."""
_SPAN = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


class OpeningSpan(_Frozen):
    """One span of a working day in local wall-clock time; ``end`` may be ``24:00``."""

    start: time
    end_minutes: int = Field(description="minutes after local midnight at which the span ends")

    @property
    def start_minutes(self) -> int:
        return self.start.hour * 60 + self.start.minute

    @classmethod
    def parse(cls, text: str) -> OpeningSpan:
        match = _SPAN.match(text)
        if match is None:
            raise ValueError(f"{text!r} is not a span like '09:00-17:30'")
        start_h, start_m, end_h, end_m = (int(group) for group in match.groups())
        if start_h > 23 or start_m > 59:
            raise ValueError(f"{text!r}: {start_h:02d}:{start_m:02d} is not a time of day")
        if end_m > 59 or end_h > 24 or (end_h == 24 and end_m != 0):
            raise ValueError(f"{text!r}: {end_h:02d}:{end_m:02d} is not a time of day (use 24:00 for midnight)")
        span = cls(start=time(start_h, start_m), end_minutes=end_h * 60 + end_m)
        if span.end_minutes <= span.start_minutes:
            raise ValueError(f"{text!r} ends before it starts")
        return span

    def __str__(self) -> str:
        hours, minutes = divmod(self.end_minutes, 60)
        return f"{self.start:%H:%M}-{hours:02d}:{minutes:02d}"


class WeeklyHours(_Frozen):
    """Opening spans per weekday; a missing day is closed."""

    mon: tuple[OpeningSpan, ...] = ()
    tue: tuple[OpeningSpan, ...] = ()
    wed: tuple[OpeningSpan, ...] = ()
    thu: tuple[OpeningSpan, ...] = ()
    fri: tuple[OpeningSpan, ...] = ()
    sat: tuple[OpeningSpan, ...] = ()
    sun: tuple[OpeningSpan, ...] = ()

    @field_validator(*WEEKDAYS, mode="before")
    @classmethod
    def _parse_spans(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple):
            return tuple(OpeningSpan.parse(item) if isinstance(item, str) else item for item in value)
        return value

    @field_validator(*WEEKDAYS)
    @classmethod
    def _no_overlap(cls, spans: tuple[OpeningSpan, ...]) -> tuple[OpeningSpan, ...]:
        ordered = sorted(spans, key=lambda span: span.start_minutes)
        for earlier, later in itertools.pairwise(ordered):
            if later.start_minutes < earlier.end_minutes:
                raise ValueError(f"spans {earlier} and {later} overlap")
        return tuple(ordered)

    def for_weekday(self, weekday: int) -> tuple[OpeningSpan, ...]:
        """Spans for ``date.weekday()`` (0 = Monday)."""
        spans: tuple[OpeningSpan, ...] = getattr(self, WEEKDAYS[weekday])
        return spans

    @property
    def is_empty(self) -> bool:
        return not any(self.for_weekday(day) for day in range(7))


class Resource(_Frozen):
    """Someone or something an appointment needs: a practitioner, a room, a chair."""

    id: Identifier
    name: str = Field(min_length=1)
    kind: Literal["staff", "room", "equipment"] = "staff"
    calendar_id: str | None = None
    external_conflicts: ExternalConflicts | None = None
    """Overrides ``[booking] external_conflicts`` for this resource; None follows the business."""
    hours: WeeklyHours


class Service(_Frozen):
    id: Identifier
    name: str = Field(min_length=1)
    duration_minutes: int = Field(gt=0, le=24 * 60)
    buffer_before_minutes: int = Field(default=0, ge=0, le=24 * 60)
    buffer_after_minutes: int = Field(default=0, ge=0, le=24 * 60)
    resources: tuple[Identifier, ...] = Field(min_length=1)
    aliases: tuple[str, ...] = ()
    description: str | None = None

    @property
    def duration(self) -> timedelta:
        return timedelta(minutes=self.duration_minutes)

    @property
    def buffer_before(self) -> timedelta:
        return timedelta(minutes=self.buffer_before_minutes)

    @property
    def buffer_after(self) -> timedelta:
        return timedelta(minutes=self.buffer_after_minutes)


class Closure(_Frozen):
    """A holiday (whole local days ``date`` or ``start_date``..``end_date``) or a partial closure
    (local ``start``..``end``), for the whole business or for the listed resources only."""

    reason: str = ""
    date: dt.date | None = None
    start_date: dt.date | None = None
    end_date: dt.date | None = None
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    resources: tuple[Identifier, ...] = ()

    @model_validator(mode="after")
    def _one_form(self) -> Closure:
        forms = [
            self.date is not None,
            self.start_date is not None or self.end_date is not None,
            self.start is not None or self.end is not None,
        ]
        if sum(forms) != 1:
            raise ValueError("give exactly one of: date; start_date and end_date; start and end")
        if forms[1] and (self.start_date is None or self.end_date is None or self.end_date < self.start_date):
            raise ValueError("start_date and end_date are both needed, and end_date must not precede start_date")
        if forms[2]:
            if self.start is None or self.end is None or self.end <= self.start:
                raise ValueError("start and end are both needed, and end must come after start")
            if self.start.tzinfo is not None or self.end.tzinfo is not None:
                raise ValueError("closure times are local wall-clock times in the business's zone: drop the offset")
        return self

    def applies_to(self, resource_id: str) -> bool:
        return not self.resources or resource_id in self.resources

    def covers_day(self, day: dt.date) -> bool:
        if self.date is not None:
            return day == self.date
        if self.start_date is not None and self.end_date is not None:
            return self.start_date <= day <= self.end_date
        return False


class BookingRules(_Frozen):
    min_notice_minutes: int = Field(default=120, ge=0)
    horizon_days: int = Field(default=60, ge=1, le=730)
    slot_step_minutes: int = Field(default=15, ge=5, le=240)
    hold_ttl_seconds: int = Field(default=120, ge=5, le=3600)
    max_occurrences: int = Field(default=52, ge=1, le=366)
    external_conflicts: ExternalConflicts = "hard"

    @property
    def min_notice(self) -> timedelta:
        return timedelta(minutes=self.min_notice_minutes)

    @property
    def horizon(self) -> timedelta:
        return timedelta(days=self.horizon_days)

    @property
    def slot_step(self) -> timedelta:
        return timedelta(minutes=self.slot_step_minutes)


Condition = Annotated[str, StringConstraints(strip_whitespace=True)]
"""A report fact such as ``outcome:booked``, ``tag:complaint``, ``intent:ask_price`` or ``sentiment:negative``."""


class ScoreRule(_Frozen):
    """Points added to (or taken from) a caller's lead score when the report shows ``when``."""

    when: Condition
    points: int = Field(ge=-100, le=100)
    label: str | None = None
    """How the reason reads in the report; the condition itself when absent."""

    _condition = field_validator("when")(check_condition)


class LifecycleRule(_Frozen):
    """The lifecycle stage for a call that shows any of ``when`` (if given) and scores at least
    ``min_score`` (if given); rules are tried in order and the first that matches wins."""

    stage: LifecycleStage
    when: tuple[Condition, ...] = ()
    min_score: int | None = Field(default=None, ge=0, le=100)

    @field_validator("when")
    @classmethod
    def _conditions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_condition(item) for item in value)

    @model_validator(mode="after")
    def _has_a_criterion(self) -> LifecycleRule:
        if not self.when and self.min_score is None:
            raise ValueError(f"the rule for stage {self.stage.value!r} needs 'when' or 'min_score'")
        return self


DEFAULT_SCORE_RULES: tuple[ScoreRule, ...] = (
    ScoreRule(when="outcome:booked", points=40, label="booked an appointment"),
    ScoreRule(when="outcome:rescheduled", points=25, label="kept an appointment by moving it"),
    ScoreRule(when="intent:check_availability", points=10, label="asked about free times"),
    ScoreRule(when="intent:ask_price", points=10, label="asked about prices"),
    ScoreRule(when="tag:new_customer", points=10, label="new customer"),
    ScoreRule(when="sentiment:positive", points=5, label="positive tone"),
    ScoreRule(when="outcome:cancelled", points=-20, label="cancelled an appointment"),
    ScoreRule(when="sentiment:negative", points=-20, label="negative tone"),
    ScoreRule(when="tag:complaint", points=-30, label="complained"),
)
DEFAULT_LIFECYCLE_RULES: tuple[LifecycleRule, ...] = (
    LifecycleRule(stage=LifecycleStage.BOOKED, when=("outcome:booked", "outcome:rescheduled")),
    LifecycleRule(stage=LifecycleStage.LOST, when=("outcome:cancelled", "tag:complaint")),
    LifecycleRule(stage=LifecycleStage.NEW, when=("outcome:abandoned", "outcome:voicemail")),
    LifecycleRule(stage=LifecycleStage.QUALIFIED, min_score=30),
    LifecycleRule(stage=LifecycleStage.NURTURE, when=("outcome:enquiry_only",)),
)


HIGH_SCORE_CONDITION = "high_score"
"""A trigger condition: the lead score is at least ``[crm] high_score``."""
_SCORE_AT_LEAST = re.compile(r"^score\s*>=\s*(\d{1,3})$")
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")


def score_threshold(text: str, *, high_score: int) -> int | None:
    """The lowest lead score a score condition (``score>=N``, ``high_score``) asks for; None for a report
    fact such as ``tag:complaint``. ``text`` is a checked condition (:func:`check_trigger_condition`)."""
    if text == HIGH_SCORE_CONDITION:
        return high_score
    match = _SCORE_AT_LEAST.match(text)
    return int(match.group(1)) if match else None


def check_trigger_condition(text: str) -> str:
    """A report fact (:func:`~booking.reports.vocabulary.check_condition`) or a lead-score condition:
    ``score>=N`` (N in 0..100, written back without spaces) or ``high_score``. Score conditions are for
    triggers only: a score rule that looked at the score would depend on itself."""
    if text == HIGH_SCORE_CONDITION:
        return text
    match = _SCORE_AT_LEAST.match(text)
    if match is not None:
        points = int(match.group(1))
        if points > 100:
            raise ValueError(f"{text!r}: a lead score is at most 100")
        return f"score>={points}"
    if text.startswith("score"):
        raise ValueError(f"{text!r} is not a score condition like 'score>=60' or {HIGH_SCORE_CONDITION!r}")
    try:
        return check_condition(text)
    except ValueError as exc:
        raise ValueError(f"{exc}; or a lead score: 'score>=60', {HIGH_SCORE_CONDITION!r}") from None


class TriggerAction(enum.StrEnum):
    """What a fired trigger does."""

    FOLLOW_UP = "follow_up"
    """Create a follow-up record in the CRM for someone at the business to act on."""
    WEBHOOK = "webhook"
    """POST the report's summary (never the transcript), signed, to the rule's ``webhook_url``."""
    SMS = "sms"
    """Text the rule's ``notify_number`` (a member of staff)."""


class TriggerRule(_Frozen):
    """Actions to take for a call whose report shows any of ``when``: report facts as in score rules,
    or the lead score (``score>=N``, ``high_score``). With ``review`` the actions wait for a person to
    approve them."""

    name: Identifier
    """Unique among the triggers; part of each action's idempotency key, so renaming one re-fires it."""
    when: tuple[Condition, ...] = Field(min_length=1)
    actions: tuple[TriggerAction, ...] = Field(min_length=1)
    webhook_url: str | None = None
    """Where the ``webhook`` action posts: http or https, needed by and only by that action."""
    notify_number: str | None = None
    """Who the ``sms`` action texts, in E.164 (``+12125550123``), needed by and only by that action."""
    review: bool = False

    @field_validator("when")
    @classmethod
    def _conditions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        checked = tuple(check_trigger_condition(item) for item in value)
        duplicates = sorted({item for item in checked if checked.count(item) > 1})
        if duplicates:
            raise ValueError(f"condition(s) listed twice: {', '.join(duplicates)}")
        return checked

    @field_validator("actions")
    @classmethod
    def _distinct_actions(cls, value: tuple[TriggerAction, ...]) -> tuple[TriggerAction, ...]:
        duplicates = sorted({item.value for item in value if value.count(item) > 1})
        if duplicates:
            raise ValueError(f"action(s) listed twice: {', '.join(duplicates)}")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parts = urlsplit(value)
            usable = (
                parts.scheme in ("http", "https")
                and bool(parts.hostname)
                and parts.port != 0
                and not any(char.isspace() for char in value)
            )
        except ValueError as exc:  # an unreadable port or host
            raise ValueError(f"{value!r} is not a URL: {exc}") from None
        if not usable:
            raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
        return value

    @field_validator("notify_number")
    @classmethod
    def _e164(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _E164.match(value):
            raise ValueError(f"{value!r} is not an E.164 number like '+12125550123'")
        try:
            normalise_phone(value)
        except InvalidRequest as exc:
            raise ValueError(exc.detail) from None
        return value

    @model_validator(mode="after")
    def _action_settings(self) -> TriggerRule:
        problems = []
        for action, setting, value in (
            (TriggerAction.WEBHOOK, "webhook_url", self.webhook_url),
            (TriggerAction.SMS, "notify_number", self.notify_number),
        ):
            if action in self.actions and value is None:
                problems.append(f"the {action.value} action needs '{setting}'")
            elif action not in self.actions and value is not None:
                problems.append(f"'{setting}' is only used by the {action.value} action, which is not listed")
        if problems:
            raise ValueError(f"trigger {self.name!r}: " + "; ".join(problems))
        return self


class CrmRules(_Frozen):
    """Lead scoring and lifecycle rules (``[crm]``). Each list replaces its default when given. A score
    is the sum of the matching rules' points, kept within 0..100."""

    score_rules: tuple[ScoreRule, ...] = DEFAULT_SCORE_RULES
    lifecycle_rules: tuple[LifecycleRule, ...] = DEFAULT_LIFECYCLE_RULES
    default_stage: LifecycleStage = LifecycleStage.CONTACTED
    """The stage when no lifecycle rule matches."""
    high_score: int = Field(default=60, ge=0, le=100)
    """A score at or above this is a high-value lead (for triggers and manual review)."""
    triggers: tuple[TriggerRule, ...] = ()
    """What to do after a call, tried in order; every trigger whose conditions hold fires. None by default."""
    review_high_value: bool = False
    """Hold every trigger fired for a high-value lead (score >= ``high_score``) for manual review."""

    @field_validator("triggers")
    @classmethod
    def _unique_trigger_names(cls, value: tuple[TriggerRule, ...]) -> tuple[TriggerRule, ...]:
        names = [rule.name for rule in value]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate trigger name(s): {', '.join(duplicates)}")
        return value


class Business(_Frozen):
    name: str = Field(min_length=1)
    timezone: str
    phone: str | None = None
    booking: BookingRules = BookingRules()
    resources: tuple[Resource, ...] = Field(min_length=1)
    services: tuple[Service, ...] = Field(min_length=1)
    closures: tuple[Closure, ...] = ()
    crm: CrmRules = CrmRules()

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True, ignored_types=(cached_property,))

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone such as 'America/New_York'") from None
        return value

    @model_validator(mode="after")
    def _references(self) -> Business:
        problems: list[str] = []
        resource_ids = [resource.id for resource in self.resources]
        service_ids = [service.id for service in self.services]
        for label, ids in (("resource", resource_ids), ("service", service_ids)):
            duplicates = sorted({item for item in ids if ids.count(item) > 1})
            if duplicates:
                problems.append(f"duplicate {label} id(s): {', '.join(duplicates)}")
        known = set(resource_ids)
        for index, service in enumerate(self.services):
            unknown = [rid for rid in service.resources if rid not in known]
            if unknown:
                problems.append(f"services[{index}] ({service.id}) names unknown resource(s): {', '.join(unknown)}")
        for index, closure in enumerate(self.closures):
            unknown = [rid for rid in closure.resources if rid not in known]
            if unknown:
                problems.append(f"closures[{index}] names unknown resource(s): {', '.join(unknown)}")
        for index, resource in enumerate(self.resources):
            if resource.hours.is_empty:
                problems.append(f"resources[{index}] ({resource.id}) has no opening hours on any day")
        notice = self.booking.min_notice
        if notice >= self.booking.horizon:
            problems.append("booking.min_notice_minutes must be shorter than booking.horizon_days")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @cached_property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @cached_property
    def _resources_by_id(self) -> Mapping[str, Resource]:
        return {resource.id: resource for resource in self.resources}

    @cached_property
    def _services_by_id(self) -> Mapping[str, Service]:
        return {service.id: service for service in self.services}

    def resource(self, resource_id: str) -> Resource | None:
        return self._resources_by_id.get(resource_id)

    def service(self, service_id: str) -> Service | None:
        return self._services_by_id.get(service_id)

    def external_conflicts(self, resource_id: str) -> ExternalConflicts:
        """The conflict policy for busy time in ``resource_id``'s external calendar."""
        resource = self.resource(resource_id)
        if resource is not None and resource.external_conflicts is not None:
            return resource.external_conflicts
        return self.booking.external_conflicts

    def closures_for(self, resource_id: str) -> tuple[Closure, ...]:
        return tuple(closure for closure in self.closures if closure.applies_to(resource_id))

    @cached_property
    def _lines(self) -> dict[frozenset[str], Business]:
        return {}

    def serving(self, resource_ids: Collection[str]) -> Business:
        """The business as a phone line that books only ``resource_ids`` presents it: those resources,
        the services they provide (each limited to them) and the closures that touch them. Ids it does
        not have are ignored; with none of its own left, the whole business (a line is never empty).
        Built once per line: the agent's prompt asks for it on every turn."""
        key = frozenset(resource_ids)
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = self._narrowed(key)
        return line

    def _narrowed(self, resource_ids: frozenset[str]) -> Business:
        kept = tuple(resource for resource in self.resources if resource.id in resource_ids)
        if not kept or len(kept) == len(self.resources):
            return self
        ids = {resource.id for resource in kept}
        services = tuple(
            service.model_copy(update={"resources": tuple(rid for rid in service.resources if rid in ids)})
            for service in self.services
            if ids.intersection(service.resources)
        )
        closures = tuple(
            closure.model_copy(update={"resources": tuple(rid for rid in closure.resources if rid in ids)})
            for closure in self.closures
            if not closure.resources or ids.intersection(closure.resources)
        )
        # Built anew (not model_copy): the lookups are cached per instance and must see the narrowed lists.
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self)(**{**fields, "resources": kept, "services": services, "closures": closures})


def parse_business(data: Mapping[str, Any], *, source: str = "<business>") -> Business:
    """Validate a mapping (as read from TOML) into a :class:`Business`, or raise ConfigurationError
    naming every problem with its location."""
    payload = dict(data)
    if "business" in payload:
        # The file keeps name/timezone/phone under a [business] table for readability.
        payload = {**payload.pop("business"), **payload}
    try:
        return Business.model_validate(payload)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            location = _format_location(error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            lines.append(f"{location}: {message}" if location else message)
        raise ConfigurationError(
            f"invalid business configuration in {source}:\n  " + "\n  ".join(lines), source=source
        ) from None


def load_business(path: str | Path) -> Business:
    """Read and validate a business TOML file."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot read business configuration {file}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"invalid TOML in {file}: {exc}") from exc
    return parse_business(data, source=str(file))


def _format_location(location: tuple[int | str, ...]) -> str:
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text
