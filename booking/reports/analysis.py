"""The offline analyser: deterministic, no network, no model download. Sentiment by VADER, key phrases
by YAKE, intents by rules over tools and cue phrases, and an extractive summary."""

from __future__ import annotations

import asyncio

from booking.reports.intents import detect_intents
from booking.reports.keyphrases import key_phrases
from booking.reports.ports import Analysis, AnalysisInput
from booking.reports.sentiment import overall_sentiment, turn_sentiments
from booking.reports.summary import summarise


class OfflineAnalyser:
    """Satisfies :class:`booking.reports.ports.Analyser`; the same call always gives the same analysis."""

    async def analyse(self, call: AnalysisInput) -> Analysis:
        # On a thread: the server's event loop also carries live calls, which must not wait on VADER
        # and YAKE (milliseconds per call, but fifty calls ending together add up).
        return await asyncio.to_thread(self.analyse_now, call)

    def analyse_now(self, call: AnalysisInput) -> Analysis:
        """The same, without an event loop (a few milliseconds of CPU for a typical call)."""
        intents = detect_intents(call.facts)
        return Analysis(
            summary=summarise(
                turns=call.turns,
                facts=call.facts,
                outcome=call.outcome,
                intents=[item.value for item in intents],
                touched=call.bookings_touched,
                known_customer=call.known_customer,
                business=call.business,
            ),
            sentiment=overall_sentiment(call.turns),
            turn_sentiments=turn_sentiments(call.turns),
            key_phrases=key_phrases(call.turns),
            intents=intents,
        )
