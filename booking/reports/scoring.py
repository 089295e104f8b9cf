"""Lead score and lifecycle stage from the business's ``[crm]`` rules, each with its reasons.

The rules look at *evidence*: the report's conditions (``outcome:booked``, ``tag:complaint``, ...), each
with the confidence of the field it came from. A score or stage is as sure as the least sure evidence it
used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from booking.business import CrmRules
from booking.reports.provenance import rules
from booking.reports.schema import Automated, CallReport, LeadScore, Lifecycle, ScoreReason, SentimentScore
from booking.reports.vocabulary import Intent, Outcome, Tag, condition

Evidence = Mapping[str, float]
"""Condition (``kind:value``) -> confidence of the field that shows it."""

MAX_SCORE = 100


def gather_evidence(
    *,
    outcome: Automated[Outcome],
    intents: Sequence[Automated[Intent]],
    tags: Sequence[Automated[Tag]],
    sentiment: Automated[SentimentScore],
) -> dict[str, float]:
    evidence = {condition("outcome", outcome.value.value): outcome.confidence}
    evidence |= {condition("intent", item.value.value): item.confidence for item in intents}
    evidence |= {condition("tag", item.value.value): item.confidence for item in tags}
    if sentiment.confidence > 0:  # a caller who said nothing has no mood to score
        evidence[condition("sentiment", sentiment.value.label.value)] = sentiment.confidence
    return evidence


def report_evidence(report: CallReport) -> dict[str, float]:
    """The evidence a finished report shows: the same conditions the report's own score was built from."""
    return gather_evidence(outcome=report.outcome, intents=report.intents, tags=report.tags, sentiment=report.sentiment)


def score_lead(evidence: Evidence, crm: CrmRules, *, outcome_confidence: float) -> Automated[LeadScore]:
    """The sum of the matching rules' points within 0..100; the reasons list every matching rule in
    the configuration's order."""
    reasons = tuple(
        ScoreReason(rule=rule.when, label=rule.label or rule.when, points=rule.points)
        for rule in crm.score_rules
        if rule.when in evidence
    )
    points = max(0, min(MAX_SCORE, sum(reason.points for reason in reasons)))
    used = [evidence[rule.when] for rule in crm.score_rules if rule.when in evidence]
    return Automated[LeadScore](
        value=LeadScore(points=points, reasons=reasons, high_value=points >= crm.high_score),
        confidence=round(min([outcome_confidence, *used]), 3),
        provenance=rules("lead-score"),
    )


def assign_lifecycle(evidence: Evidence, score: Automated[LeadScore], crm: CrmRules) -> Automated[Lifecycle]:
    """The stage of the first lifecycle rule whose conditions (any of them) and minimum score both hold."""
    provenance = rules("lifecycle")
    for index, rule in enumerate(crm.lifecycle_rules):
        matched = [item for item in rule.when if item in evidence]
        if rule.when and not matched:
            continue
        if rule.min_score is not None and score.value.points < rule.min_score:
            continue
        because = [*matched]
        confidences = [evidence[item] for item in matched]
        if rule.min_score is not None:
            because.append(f"score {score.value.points} >= {rule.min_score}")
            confidences.append(score.confidence)
        return Automated[Lifecycle](
            value=Lifecycle(stage=rule.stage, reason=f"lifecycle_rules[{index}]: {', '.join(because)}"),
            confidence=round(min(confidences), 3),
            provenance=provenance,
        )
    return Automated[Lifecycle](
        value=Lifecycle(stage=crm.default_stage, reason="no lifecycle rule matched: default_stage"),
        confidence=score.confidence,
        provenance=provenance,
    )
