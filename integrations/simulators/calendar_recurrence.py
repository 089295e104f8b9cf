"""Recurring events in the Calendar simulator, as Google models them: one event with an RRULE, whose
instances are addressed as ``<event id>_<original start, UTC, basic format>``. Touching an instance
(patch or delete) turns it into an exception: an event of its own with ``recurringEventId`` and
``originalStartTime``, which then stands in for that occurrence of the series (a deleted one is an
exception with status ``cancelled``)."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from dateutil.rrule import rrulestr

INSTANCE_ID = re.compile(r"^(?P<master>[a-v0-9]{5,1024})_(?P<start>\d{8}T\d{6}Z)$")


def parse_instant(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise ValueError(f"{text!r} has no offset")
    return value


def _stamp(instant: datetime) -> str:
    return instant.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def occurrences(event: dict[str, Any], window_end: datetime) -> Iterator[tuple[datetime, datetime]]:
    """Start and end of every occurrence of ``event`` starting before ``window_end`` (one for a plain event)."""
    start = parse_instant(event["start"]["dateTime"])
    end = parse_instant(event["end"]["dateTime"])
    rules = [line for line in event.get("recurrence") or [] if line.startswith("RRULE:")]
    if not rules:
        yield start, end
        return
    zone = ZoneInfo(event["start"]["timeZone"])
    local_start = start.astimezone(zone).replace(tzinfo=None)
    for local in rrulestr(rules[0][len("RRULE:") :], dtstart=local_start):
        occurrence = local.replace(tzinfo=zone)
        if occurrence >= window_end:
            return
        yield occurrence, occurrence + (end - start)


def busy_spans(events: dict[str, dict[str, Any]], window_end: datetime) -> Iterable[tuple[datetime, datetime]]:
    """The times a calendar is busy: plain events and exceptions as they are, series without the
    occurrences an exception replaces. Cancelled events and transparent ones do not count."""
    for event in events.values():
        if event["status"] == "cancelled" or event.get("transparency") == "transparent":
            continue
        for start, end in occurrences(event, window_end):
            if event.get("recurrence") and f"{event['id']}_{_stamp(start)}" in events:
                continue  # this occurrence was moved or deleted: its exception speaks for it
            yield start, end


def materialise_instance(events: dict[str, dict[str, Any]], instance_id: str) -> dict[str, Any] | None:
    """The exception for ``instance_id``, made from its series on first touch; None when the id names
    no occurrence of a live recurring event."""
    match = INSTANCE_ID.match(instance_id)
    if match is None:
        return None
    master = events.get(match["master"])
    if master is None or master["status"] == "cancelled" or not master.get("recurrence"):
        return None
    wanted = datetime.strptime(match["start"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    for start, end in occurrences(master, wanted.replace(year=wanted.year + 1)):
        if start == wanted:
            zone = master["start"]["timeZone"]
            instance = copy.deepcopy(master)
            instance.pop("recurrence")
            instance |= {
                "id": instance_id,
                "recurringEventId": master["id"],
                "originalStartTime": {"dateTime": start.isoformat(), "timeZone": zone},
                "start": {"dateTime": start.isoformat(), "timeZone": zone},
                "end": {"dateTime": end.isoformat(), "timeZone": zone},
                "iCalUID": master["iCalUID"],
            }
            events[instance_id] = instance
            return instance
        if start > wanted:
            break
    return None
