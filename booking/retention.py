"""Retention: transcripts and recordings older than the configured age are deleted, and the deletion is
recorded.

The ``retention.sweep`` effect (enqueued once a day by the workers) runs :func:`sweep`:

* archived objects under ``transcripts/`` and ``recordings/`` stored before the cutoff are deleted;
* for each call that ended before the cutoff and still has a transcript: its turns leave the ledger,
  the transcripts inside its report versions are emptied (the rest of each report, outcome, summary,
  scores, stays), ``calls.transcript_deleted_at`` is set and an audit event says so, one transaction per
  call, so a sweep cut short resumes where it stopped.

Reports are otherwise immutable: emptying their transcripts is the one change made to a stored version,
and the audit trail records it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import structlog
from sqlalchemy import delete, or_, select, update
from sqlalchemy.engine import Connection

from booking.ledger import schema as t
from booking.ledger.audit import AuditAction, append_audit
from booking.ledger.database import Database
from booking.ledger.reports_repository import open_report, seal_report

log = structlog.get_logger("voicebook.retention")

ARCHIVED_PREFIXES = ("transcripts/", "recordings/")
BATCH = 200
"""Calls purged per query round (each in its own transaction)."""


class StoredItem(Protocol):
    @property
    def key(self) -> str: ...


class Purgeable(Protocol):
    """What the sweep needs from object storage (integrations.storage satisfies it)."""

    async def older_than(self, prefix: str, cutoff: datetime) -> Sequence[Any]: ...

    async def delete(self, key: str) -> bool: ...


@dataclass
class SweepResult:
    cutoff: datetime
    objects_deleted: list[str] = field(default_factory=list)
    calls_purged: list[str] = field(default_factory=list)


def _without_transcripts(body: dict[str, Any]) -> dict[str, Any]:
    cleaned = dict(body)
    cleaned["transcript"] = []
    if isinstance(cleaned.get("cleaned_transcript"), dict):
        cleaned["cleaned_transcript"] = dict(cleaned["cleaned_transcript"]) | {"value": []}
    return cleaned


async def sweep(
    database: Database, storage: Purgeable | None, cutoff: datetime, *, now: datetime, actor: str = "retention"
) -> SweepResult:
    """Delete what is older than ``cutoff``; safe to run again (what is gone stays gone, nothing twice)."""
    result = SweepResult(cutoff=cutoff)
    if storage is not None:
        for prefix in ARCHIVED_PREFIXES:
            for item in await storage.older_than(prefix, cutoff):
                if await storage.delete(item.key):
                    result.objects_deleted.append(item.key)
    by_call: dict[str, list[str]] = {}  # archived keys end in "<CallSid>.<ext>"
    for key in result.objects_deleted:
        by_call.setdefault(key.rsplit("/", 1)[-1].split(".", 1)[0], []).append(key)
    c = t.calls.c
    ended = c.ended_at.is_not(None) & (c.ended_at < cutoff)
    unended = c.ended_at.is_(None) & (c.created_at < cutoff)
    due = select(c.call_sid).where(c.transcript_deleted_at.is_(None), or_(ended, unended)).limit(BATCH)
    while True:
        async with database.reader.connect() as conn:
            call_sids = list((await conn.execute(due)).scalars())
        if not call_sids:
            break
        for call_sid in call_sids:
            objects = by_call.get(call_sid, [])
            await database.write(
                functools.partial(_purge_call, call_sid=call_sid, objects=objects, now=now, actor=actor)
            )
            result.calls_purged.append(call_sid)
    log.info(
        "retention_swept",
        cutoff=cutoff.isoformat(),
        objects_deleted=len(result.objects_deleted),
        calls_purged=len(result.calls_purged),
    )
    return result


def _purge_call(conn: Connection, call_sid: str, objects: list[str], now: datetime, actor: str) -> None:
    turns = conn.execute(delete(t.call_turns).where(t.call_turns.c.call_sid == call_sid)).rowcount
    r = t.call_reports.c
    versions = conn.execute(select(r.version, r.body).where(r.call_sid == call_sid)).all()
    for version, body in versions:
        kept = _without_transcripts(open_report(call_sid, version, body))
        conn.execute(
            update(t.call_reports)
            .where(r.call_sid == call_sid, r.version == version)
            .values(body=seal_report(call_sid, version, kept))
        )
    conn.execute(update(t.calls).where(t.calls.c.call_sid == call_sid).values(transcript_deleted_at=now))
    append_audit(
        conn,
        at=now,
        actor=actor,
        action=AuditAction.DELETED,
        subject_kind="call",
        subject_id=call_sid,
        details={"turns": turns, "report_versions": len(versions), "objects": objects},
    )
