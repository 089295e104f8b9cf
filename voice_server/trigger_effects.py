"""What a report's triggers do, as outbox effects (retried, dead-lettered like every other).

When a report version is stored, :func:`trigger_rows` turns each trigger its rules fire
(``booking.reports.triggers.fire``) into effects in the same transaction: one per action
(``trigger.follow_up``, ``trigger.webhook``, ``trigger.sms``), or, for a trigger held for manual review
(the rule asks for it, or the lead is high-value and ``review_high_value`` is set), one
``trigger.review`` that files the review request; :func:`approved_rows` makes the actions once an
operator approves (``POST /api/calls/{sid}/triggers/{rule}/approve``).

* follow-up: an Activities row of kind ``follow_up`` (``review`` for a held trigger) on the caller's
  contact in Airtable; without Airtable, the effect row itself, done, is the record (and a log line).
* webhook: the report's summary (never its transcript) POSTed, signed with HMAC
  (``X-Voicebook-Signature``, ``VOICEBOOK_WEBHOOK_SECRET``); no secret, no unsigned send: it dead-letters.
* sms: a short text to the rule's ``notify_number`` through the Twilio sender.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from booking.business import Business, TriggerAction
from booking.errors import EffectFailed
from booking.ledger.database import Database
from booking.ledger.reports_repository import ReportLedger
from booking.outbox import Effect, EffectKind, standalone_effect_row
from booking.reports.schema import CallReport
from booking.reports.triggers import FiredTrigger, fire
from booking.worker import Handler

if TYPE_CHECKING:
    from integrations.airtable import AirtableCRM
    from integrations.twilio_sms import TwilioSMS
    from integrations.webhooks import WebhookSender

log = structlog.get_logger("voicebook.triggers")


ACTION_KINDS = {
    TriggerAction.FOLLOW_UP: EffectKind.TRIGGER_FOLLOW_UP,
    TriggerAction.WEBHOOK: EffectKind.TRIGGER_WEBHOOK,
    TriggerAction.SMS: EffectKind.TRIGGER_SMS,
}
SMS_SUMMARY_CHARS = 200


def _row(kind: EffectKind, fired: FiredTrigger, key: str, now: datetime) -> dict[str, Any]:
    return standalone_effect_row(
        kind, now, {"trigger": fired.model_dump(mode="json")}, key=key, call_sid=fired.call_sid
    )


def action_rows(fired: FiredTrigger, now: datetime) -> list[dict[str, Any]]:
    return [_row(ACTION_KINDS[action], fired, fired.action_key(action), now) for action in fired.actions]


def trigger_rows(report: CallReport, version: int, now: datetime, business: Business) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for fired in fire(report, business.crm, report_version=version):
        if fired.needs_review:
            rows.append(_row(EffectKind.TRIGGER_REVIEW, fired, f"{fired.idempotency_key}:review", now))
        else:
            rows.extend(action_rows(fired, now))
    return rows


def approved_rows(
    report: CallReport, version: int, rule: str, now: datetime, business: Business
) -> list[dict[str, Any]]:
    """The actions of ``rule`` for this report version, once approved (empty if it did not fire)."""
    fired = [item for item in fire(report, business.crm, report_version=version) if item.rule == rule]
    return [row for item in fired for row in action_rows(item, now)]


def fired_of(effect: Effect) -> FiredTrigger:
    try:
        return FiredTrigger.model_validate(effect.payload["trigger"])
    except (KeyError, ValueError) as error:
        raise EffectFailed(
            f"effect {effect.id} carries no trigger: {error}", permanent=True, code="malformed"
        ) from error


@dataclass(frozen=True, slots=True)
class TriggerHandlers:
    database: Database
    business: Business
    crm: AirtableCRM | None = None
    sms: TwilioSMS | None = None
    webhooks: WebhookSender | None = None

    async def _report(self, fired: FiredTrigger) -> CallReport:
        for stored in await ReportLedger(self.database).versions(fired.call_sid):
            if stored.version == fired.report_version:
                return CallReport.model_validate(stored.body)
        raise EffectFailed(
            f"call {fired.call_sid} has no report version {fired.report_version}", permanent=True, code="missing"
        )

    async def _file(self, fired: FiredTrigger, kind: str, key: str, body: str) -> None:
        report = await self._report(fired)
        if self.crm is None or not report.caller_number:
            log.info("trigger_follow_up", call_sid=fired.call_sid, rule=fired.rule, kind=kind, note=body)
            return
        from integrations.airtable import ActivityRow

        activity = ActivityRow(
            activity_id=key,
            contact_phone=report.caller_number,
            kind=kind,
            at=report.ended_at or report.started_at,
            body=body,
        )
        await self.crm.sync(activities=[activity])

    async def follow_up(self, effect: Effect) -> None:
        fired = fired_of(effect)
        reasons = "; ".join(reason.shown for reason in fired.reasons)
        await self._file(fired, "follow_up", fired.action_key(TriggerAction.FOLLOW_UP), f"{fired.rule}: {reasons}")

    async def review(self, effect: Effect) -> None:
        fired = fired_of(effect)
        why = "; ".join(fired.review_reasons)
        actions = ", ".join(action.value for action in fired.actions)
        note = f"{fired.rule} is held for review ({why}); approve to run: {actions}"
        await self._file(fired, "review", f"{fired.idempotency_key}:review", note)
        log.info(
            "trigger_held_for_review", call_sid=fired.call_sid, rule=fired.rule, reasons=list(fired.review_reasons)
        )

    async def webhook(self, effect: Effect) -> None:
        from booking.reports.triggers import WEBHOOK_EVENT, webhook_payload

        fired = fired_of(effect)
        if self.webhooks is None:
            raise EffectFailed(
                "VOICEBOOK_WEBHOOK_SECRET is not set: trigger webhooks are only sent signed",
                permanent=True,
                code="configuration",
            )
        if fired.webhook_url is None:
            raise EffectFailed(f"trigger {fired.rule} names no webhook_url", permanent=True, code="configuration")
        report = await self._report(fired)
        await self.webhooks.send(
            fired.webhook_url,
            webhook_payload(report, fired),
            event=WEBHOOK_EVENT,
            idempotency_key=fired.action_key(TriggerAction.WEBHOOK),
        )

    async def text(self, effect: Effect) -> None:
        fired = fired_of(effect)
        if fired.notify_number is None:
            raise EffectFailed(f"trigger {fired.rule} names no notify_number", permanent=True, code="configuration")
        report = await self._report(fired)
        body = staff_text(report, fired, self.business)
        if self.sms is None:
            log.info("sms_not_sent", reason="no Twilio sender configured", kind=effect.kind, body=body)
            return
        await self.sms.send(fired.notify_number, body, idempotency_key=fired.action_key(TriggerAction.SMS))

    def handlers(self) -> dict[str, Handler]:
        return {
            EffectKind.TRIGGER_FOLLOW_UP: self.follow_up,
            EffectKind.TRIGGER_REVIEW: self.review,
            EffectKind.TRIGGER_WEBHOOK: self.webhook,
            EffectKind.TRIGGER_SMS: self.text,
        }


def staff_text(report: CallReport, fired: FiredTrigger, business: Business) -> str:
    summary = report.summary.value
    if len(summary) > SMS_SUMMARY_CHARS:
        summary = summary[: SMS_SUMMARY_CHARS - 1].rstrip() + "…"
    caller = report.caller_number or "an unknown number"
    return f"{business.name}: the call from {caller} needs attention ({fired.rule}). {summary}"
