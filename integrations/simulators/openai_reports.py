"""The call-report "model" of the OpenAI simulator: it reads the transcript back out of an analysis
request (``[index] role: words`` lines, as :mod:`integrations.openai_analyser` writes them) and answers
the call-report schema by rules, so a test knows what the analysis will say.

Sentiment is VADER's, key phrases are YAKE's and intents the offline cue phrases (no tools: the model
sees only the transcript); the summary lists the intents and quotes the agent's last words.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from booking.reports.intents import CUES
from booking.reports.keyphrases import key_phrases
from booking.reports.schema import TranscriptTurn
from booking.reports.sentiment import compound, label_for
from integrations.openai_analyser import SCHEMA_NAME

CONFIDENCE = 0.8  # every answer of this "model" claims the same certainty
_TURN = re.compile(r"^\[(\d+)\] (caller|agent): (.*)$", re.MULTILINE)
_SOMETIME = datetime(2026, 1, 1, tzinfo=UTC)  # the lines carry no times; the analysers do not read them


def read_transcript(body: Mapping[str, Any]) -> list[TranscriptTurn]:
    """The turns written into the user messages of an analysis request."""
    text = "\n".join(
        message["content"]
        for message in body["messages"]
        if message.get("role") == "user" and isinstance(message.get("content"), str)
    )
    return [
        TranscriptTurn(index=int(index), role=role, text=words, at=_SOMETIME)
        for index, role, words in _TURN.findall(text)
    ]


def call_report_policy(body: dict[str, Any]) -> dict[str, Any]:
    """Satisfies :class:`integrations.simulators.openai.StructuredPolicy` for the call-report schema; any
    other schema is a test set up wrong, and raises."""
    name = (body["response_format"].get("json_schema") or {}).get("name")
    if name != SCHEMA_NAME:
        raise ValueError(f"the call-report policy answers the {SCHEMA_NAME!r} schema, not {name!r}")
    turns = read_transcript(body)
    scores = {turn.index: round(compound(turn.text), 4) for turn in turns if turn.role == "caller"}
    overall = round(sum(scores.values()) / len(scores), 4) if scores else 0.0
    said = " ".join(turn.text for turn in turns if turn.role == "caller")
    intents = [intent for intent, cue in CUES.items() if cue.search(said)]
    return {
        "summary": {"text": summary_of(turns, [intent.value for intent in intents]), "confidence": CONFIDENCE},
        "sentiment": {"label": label_for(overall).value, "compound": overall, "confidence": CONFIDENCE},
        "caller_turns": [
            {"turn": index, "label": label_for(score).value, "compound": score, "confidence": CONFIDENCE}
            for index, score in scores.items()
        ],
        "key_phrases": {"phrases": list(key_phrases(turns).value), "confidence": CONFIDENCE},
        "intents": [{"intent": intent.value, "confidence": CONFIDENCE} for intent in intents],
    }


def summary_of(turns: Sequence[TranscriptTurn], intents: Sequence[str]) -> str:
    wanted = ", ".join(intent.replace("_", " ") for intent in intents) or "nothing the rules recognise"
    agent = [turn.text for turn in turns if turn.role == "agent"]
    ending = f' The agent ended with: "{agent[-1]}"' if agent else ""
    return f"The caller wanted: {wanted}.{ending}"
