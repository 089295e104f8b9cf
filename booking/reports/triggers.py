"""Triggers: what the business's ``[crm] triggers`` ask for once a call's report is built.

:func:`fire` is pure and deterministic: the same report, rules and report version give the same fired
triggers, in the configuration's order, each with a stable idempotency key. Running the actions (a
follow-up record, a webhook, a text to staff) is the outbox's job; a trigger that ``needs_review`` waits
for a person first.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from booking.business import CrmRules, TriggerAction, TriggerRule, score_threshold
from booking.reports.schema import Automated, CallReport, LeadScore, ParticipantRole
from booking.reports.scoring import Evidence, report_evidence

WEBHOOK_EVENT = "call.trigger_fired"
"""The ``X-Voicebook-Event`` of a trigger's webhook."""
PAYLOAD_VERSION = 1
"""Version of :func:`webhook_payload`'s shape, for receivers; bumped when a field changes meaning."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TriggerReason(_Model):
    condition: str
    """The rule's condition as configured (``tag:complaint``, ``high_score``)."""
    shown: str
    """What the report shows: the condition itself for a report fact, ``score 72 >= 60`` for a score."""
    confidence: float = Field(ge=0.0, le=1.0)
    """How sure the report is of it (the confidence of the field it came from)."""


class FiredTrigger(_Model):
    """A trigger whose conditions held for one version of a call's report. Survives a JSON round trip
    (``model_dump(mode="json")`` / ``model_validate``), so the outbox can store it as it is."""

    rule: str
    call_sid: str
    report_version: int = Field(ge=1)
    actions: tuple[TriggerAction, ...]
    reasons: tuple[TriggerReason, ...] = Field(min_length=1)
    needs_review: bool
    review_reasons: tuple[str, ...]
    """Why it is held: the rule asks for review, or the lead is high-value; empty when not held."""
    webhook_url: str | None
    notify_number: str | None
    idempotency_key: str
    """``{call_sid}:trigger:{rule}:v{report_version}``: a regenerated report (a new version) fires anew."""

    def action_key(self, action: TriggerAction) -> str:
        """The idempotency key of one of this trigger's actions (``...:v1:webhook``)."""
        return f"{self.idempotency_key}:{action.value}"


def trigger_key(call_sid: str, rule: str, report_version: int) -> str:
    return f"{call_sid}:trigger:{rule}:v{report_version}"


def fire(report: CallReport, rules: CrmRules, *, report_version: int) -> list[FiredTrigger]:
    """Every trigger of ``rules`` with at least one condition the report shows, in configuration order.
    ``report_version`` is the ledger's version of this report (1 for the first)."""
    if report_version < 1:
        raise ValueError(f"report versions start at 1, not {report_version}")
    evidence = report_evidence(report)
    points = report.lead_score.value.points
    high_value = points >= rules.high_score
    fired = []
    for rule in rules.triggers:
        reasons = _reasons(rule, evidence, report.lead_score, rules.high_score)
        if not reasons:
            continue
        held = []
        if rule.review:
            held.append("the rule asks for review")
        if rules.review_high_value and high_value:
            held.append(f"high-value lead: score {points} >= {rules.high_score}")
        fired.append(
            FiredTrigger(
                rule=rule.name,
                call_sid=report.call_sid,
                report_version=report_version,
                actions=rule.actions,
                reasons=reasons,
                needs_review=bool(held),
                review_reasons=tuple(held),
                webhook_url=rule.webhook_url,
                notify_number=rule.notify_number,
                idempotency_key=trigger_key(report.call_sid, rule.name, report_version),
            )
        )
    return fired


def _reasons(
    rule: TriggerRule, evidence: Evidence, score: Automated[LeadScore], high_score: int
) -> tuple[TriggerReason, ...]:
    """The rule's conditions that hold, in the rule's order."""
    reasons = []
    for condition in rule.when:
        threshold = score_threshold(condition, high_score=high_score)
        if threshold is None:
            if condition in evidence:
                reasons.append(TriggerReason(condition=condition, shown=condition, confidence=evidence[condition]))
        elif score.value.points >= threshold:
            shown = f"score {score.value.points} >= {threshold}"
            reasons.append(TriggerReason(condition=condition, shown=shown, confidence=score.confidence))
    return tuple(reasons)


def webhook_payload(report: CallReport, fired: FiredTrigger) -> dict[str, Any]:
    """What a trigger's webhook posts: the call, its outcome, summary, sentiment, lead score with its
    reasons, intents, tags, bookings and the trigger that fired, as plain JSON values. Never the
    transcript (raw or cleaned) nor the key phrases: a receiver gets the summary only."""
    if fired.call_sid != report.call_sid:
        raise ValueError(f"trigger {fired.idempotency_key} is not for call {report.call_sid}")
    caller = next((p for p in report.participants if p.role is ParticipantRole.CALLER), None)
    score = report.lead_score
    return {
        "event": WEBHOOK_EVENT,
        "payload_version": PAYLOAD_VERSION,
        "idempotency_key": fired.action_key(TriggerAction.WEBHOOK),
        "trigger": {
            "rule": fired.rule,
            "reasons": [reason.model_dump(mode="json") for reason in fired.reasons],
            "held_for_review": fired.needs_review,
        },
        "call": {
            "call_sid": report.call_sid,
            "report_version": fired.report_version,
            "direction": report.direction,
            "caller_number": report.caller_number,
            "caller_name": caller.name if caller is not None else None,
            "business_number": report.business_number,
            "started_at": report.started_at.isoformat(),
            "ended_at": report.ended_at.isoformat() if report.ended_at is not None else None,
            "duration_seconds": report.duration_seconds,
            "end_reason": report.end_reason,
        },
        "outcome": {"value": report.outcome.value.value, "confidence": report.outcome.confidence},
        "summary": report.summary.value,
        "sentiment": {
            "label": report.sentiment.value.label.value,
            "compound": report.sentiment.value.compound,
            "confidence": report.sentiment.confidence,
        },
        "lead_score": {
            "points": score.value.points,
            "high_value": score.value.high_value,
            "confidence": score.confidence,
            "reasons": [reason.model_dump(mode="json") for reason in score.value.reasons],
        },
        "lifecycle": report.lifecycle.value.stage.value,
        "intents": [{"value": item.value.value, "confidence": item.confidence} for item in report.intents],
        "tags": [{"value": item.value.value, "confidence": item.confidence} for item in report.tags],
        "bookings": [booking.model_dump(mode="json") for booking in report.bookings_touched],
    }
