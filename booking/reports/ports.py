"""The seam for analysers: the offline one here, a model-backed one (OpenAI structured output) later.

An analyser reads the *cleaned* transcript (personal data already masked, so nothing private leaves
the server when the analyser is remote) and the call's facts, and answers with the summary, sentiment,
key phrases and intents, each with its confidence and provenance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from booking.business import Business
from booking.reports.facts import CallFacts
from booking.reports.schema import Automated, BookingTouched, SentimentScore, TranscriptTurn, TurnSentiment
from booking.reports.vocabulary import Intent, Outcome


@dataclass(frozen=True, slots=True)
class AnalysisInput:
    turns: Sequence[TranscriptTurn]
    """The cleaned transcript: spoken turns only, fillers removed, personal data masked."""
    facts: CallFacts
    outcome: Outcome
    bookings_touched: Sequence[BookingTouched]
    known_customer: bool
    business: Business


@dataclass(frozen=True, slots=True)
class Analysis:
    summary: Automated[str]
    sentiment: Automated[SentimentScore]
    turn_sentiments: tuple[Automated[TurnSentiment], ...]
    key_phrases: Automated[tuple[str, ...]]
    intents: tuple[Automated[Intent], ...]


class Analyser(Protocol):
    async def analyse(self, call: AnalysisInput) -> Analysis:
        """Analyse one call. A remote analyser raises on failure; the caller decides whether to fall
        back to the offline one."""
        ...
