"""Sentiment with VADER (a lexicon and rule model tuned for short conversational text; the lexicon ships
in the wheel, so it runs offline and gives the same answer every time)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # type: ignore[import-untyped]  # no stubs

from booking.reports.provenance import library
from booking.reports.schema import Automated, SentimentScore, TranscriptTurn, TurnSentiment
from booking.reports.vocabulary import SentimentLabel

# VADER's own thresholds on the compound score (Hutto and Gilbert, 2014).
_POSITIVE_FROM = 0.05
_NEGATIVE_TO = -0.05
# A caller's overall mood is judged from what they said; this many words make the judgement fully
# supported (a two-word call says little about mood).
_WORDS_FOR_FULL_CONFIDENCE = 40


@cache
def _analyser() -> SentimentIntensityAnalyzer:
    return SentimentIntensityAnalyzer()  # reads the lexicon file once


def compound(text: str) -> float:
    return float(_analyser().polarity_scores(text)["compound"])


def label_for(score: float) -> SentimentLabel:
    if score >= _POSITIVE_FROM:
        return SentimentLabel.POSITIVE
    if score <= _NEGATIVE_TO:
        return SentimentLabel.NEGATIVE
    return SentimentLabel.NEUTRAL


def turn_sentiments(turns: Sequence[TranscriptTurn]) -> tuple[Automated[TurnSentiment], ...]:
    """A score per spoken turn (caller and agent)."""
    provenance = library("vaderSentiment")
    scored = []
    for turn in turns:
        if turn.role not in ("caller", "agent") or not turn.text.strip():
            continue
        score = compound(turn.text)
        scored.append(
            Automated[TurnSentiment](
                value=TurnSentiment(turn=turn.index, label=label_for(score), compound=score),
                confidence=_confidence(len(turn.text.split()), score),
                provenance=provenance,
            )
        )
    return tuple(scored)


def overall_sentiment(turns: Sequence[TranscriptTurn]) -> Automated[SentimentScore]:
    """The caller's sentiment over the call: the mean of their turns' scores, later turns weighing more
    (how a call ends says more than how it began). Neutral with no confidence when the caller said nothing."""
    caller = [turn for turn in turns if turn.role == "caller" and turn.text.strip()]
    provenance = library("vaderSentiment")
    if not caller:
        return Automated[SentimentScore](
            value=SentimentScore(label=SentimentLabel.NEUTRAL, compound=0.0), confidence=0.0, provenance=provenance
        )
    weights = range(1, len(caller) + 1)
    score = sum(weight * compound(turn.text) for weight, turn in zip(weights, caller, strict=True)) / sum(weights)
    score = round(score, 4)
    words = sum(len(turn.text.split()) for turn in caller)
    return Automated[SentimentScore](
        value=SentimentScore(label=label_for(score), compound=score),
        confidence=_confidence(words, score),
        provenance=provenance,
    )


def _confidence(words: int, score: float) -> float:
    """More words and a clearer polarity make a label surer; never certain, a lexicon misses sarcasm."""
    support = min(1.0, words / _WORDS_FOR_FULL_CONFIDENCE)
    clarity = min(1.0, abs(score) / 0.5) if abs(score) > _POSITIVE_FROM else 0.6
    return round(0.2 + 0.7 * support * clarity, 3)
