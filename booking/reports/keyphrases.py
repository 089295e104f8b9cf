"""Key phrases with YAKE (unsupervised statistical keyword extraction; stop-word lists ship in the
wheel, no model or network needed)."""

from __future__ import annotations

from collections.abc import Sequence

import yake  # type: ignore[import-untyped]  # no stubs

from booking.reports.cleaning import MASKS
from booking.reports.provenance import library
from booking.reports.schema import Automated, TranscriptTurn

MAX_PHRASES = 8
_MAX_WORDS = 3
_DEDUPLICATION = 0.7  # YAKE drops a phrase this similar to a better one ("check up" vs "check-up")
_WORDS_FOR_FULL_CONFIDENCE = 60


def key_phrases(turns: Sequence[TranscriptTurn]) -> Automated[tuple[str, ...]]:
    """The caller's key phrases, best first. The agent's words are left out: it repeats the business's
    vocabulary on every call, which would crowd out what this caller talked about."""
    text = " ".join(turn.text for turn in turns if turn.role == "caller")
    for mask in MASKS:
        text = text.replace(mask, " ")  # "[phone]" is ours, not the caller's
    words = len(text.split())
    provenance = library("yake")
    if words == 0:
        return Automated[tuple[str, ...]](value=(), confidence=0.0, provenance=provenance)
    extractor = yake.KeywordExtractor(lan="en", n=_MAX_WORDS, dedupLim=_DEDUPLICATION, top=MAX_PHRASES)
    phrases: list[str] = []
    for phrase, _score in extractor.extract_keywords(text):
        # "Kim" after "Nurse Kim" adds nothing: keep a phrase only if it is not inside a better one.
        if not any(f" {phrase.lower()} " in f" {kept.lower()} " for kept in phrases):
            phrases.append(str(phrase))
    confidence = round(0.3 + 0.5 * min(1.0, words / _WORDS_FOR_FULL_CONFIDENCE), 3)
    return Automated[tuple[str, ...]](value=tuple(phrases), confidence=confidence, provenance=provenance)
