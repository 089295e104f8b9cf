"""The end-of-call analysis by an OpenAI model: one chat completion per report, answered in a strict JSON
schema (structured output), checked again here and turned into an :class:`Analysis` whose provenance
names the model and the snapshot that answered.

Only the cleaned transcript is sent: the builder has already masked phone numbers, e-mail addresses,
card and account numbers, and tool turns (booking ids, the caller's name as typed into a tool) are not
in it. Every failure (HTTP error, timeout, refusal, output that breaks the schema or names a turn the
call does not have) raises :class:`AnalysisFailed`; :class:`FallbackAnalyser` then answers offline.
Each confidence is the model's own estimate, passed on as given: a self-report, not a calibrated one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import httpx2
import openai
import structlog
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam
from openai.types.shared_params import ResponseFormatJSONSchema
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from booking.reports.analysis import OfflineAnalyser
from booking.reports.keyphrases import MAX_PHRASES
from booking.reports.ports import Analyser, Analysis, AnalysisInput
from booking.reports.provenance import hosted_model
from booking.reports.schema import Automated, Provenance, SentimentScore, TranscriptTurn, TurnSentiment
from booking.reports.vocabulary import Intent, SentimentLabel
from integrations.metrics import provider_request

log = structlog.get_logger("voicebook.reports.openai")

PROVIDER = "openai"
DEFAULT_MODEL = "gpt-4o-mini"
SCHEMA_NAME = "call_report"
# A long call has many caller turns, each scored in about 30 tokens; past this the answer is cut off
# (finish_reason "length") and the call falls back to the offline analysis.
MAX_ANSWER_TOKENS = 4096
_TRANSIENT_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class AnalysisFailed(Exception):
    """The model gave no usable analysis. ``transient``: worth trying again later (rate limit, outage,
    timeout); otherwise the same request would fail the same way (refusal, bad output, bad key)."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


# -- the schema the model answers in, and its mirror for checking the answer ------------------------------


def _object(description: str, **properties: dict[str, Any]) -> dict[str, Any]:
    """A strict-mode object: every property required, nothing else allowed (the API insists on both)."""
    return {
        "type": "object",
        "description": description,
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


_CONFIDENCE = {"type": "number", "minimum": 0, "maximum": 1, "description": "How sure you are, 0 to 1."}
_COMPOUND = {"type": "number", "minimum": -1, "maximum": 1, "description": "-1 most negative .. +1 most positive."}
_LABEL = {"type": "string", "enum": [label.value for label in SentimentLabel]}

ANSWER_SCHEMA: dict[str, Any] = _object(
    "The analysis of one phone call.",
    summary=_object(
        "Two to four sentences for the business's staff: what the caller wanted, what happened, the next step.",
        text={"type": "string"},
        confidence=_CONFIDENCE,
    ),
    sentiment=_object(
        "The caller's sentiment over the whole call.", label=_LABEL, compound=_COMPOUND, confidence=_CONFIDENCE
    ),
    caller_turns={
        "type": "array",
        "description": "The sentiment of each caller turn, by the turn number in brackets.",
        "items": _object(
            "One caller turn.",
            turn={"type": "integer", "minimum": 0},
            label=_LABEL,
            compound=_COMPOUND,
            confidence=_CONFIDENCE,
        ),
    },
    key_phrases=_object(
        "What the caller talked about, best first.",
        phrases={"type": "array", "items": {"type": "string"}, "maxItems": MAX_PHRASES},
        confidence=_CONFIDENCE,
    ),
    intents={
        "type": "array",
        "description": "What the caller wanted, each intent at most once.",
        "items": _object(
            "One intent.",
            intent={"type": "string", "enum": [intent.value for intent in Intent]},
            confidence=_CONFIDENCE,
        ),
    },
)

RESPONSE_FORMAT: ResponseFormatJSONSchema = {
    "type": "json_schema",
    "json_schema": {"name": SCHEMA_NAME, "strict": True, "schema": ANSWER_SCHEMA},
}

_Confidence = Annotated[float, Field(ge=0.0, le=1.0)]
_Compound = Annotated[float, Field(ge=-1.0, le=1.0)]


class _Strict(BaseModel):
    # strict: no "0.5" for a number, no 1.5 for a turn; extra: an unknown key is a mismatch, as in the schema
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class _Summary(_Strict):
    text: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
    confidence: _Confidence


class _Sentiment(_Strict):
    label: SentimentLabel
    compound: _Compound
    confidence: _Confidence


class _TurnScore(_Sentiment):
    turn: int = Field(ge=0)


class _KeyPhrases(_Strict):
    phrases: tuple[Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)], ...] = Field(
        max_length=MAX_PHRASES
    )
    confidence: _Confidence


class _IntentScore(_Strict):
    intent: Intent
    confidence: _Confidence


class _Answer(_Strict):
    """The model's answer as :data:`ANSWER_SCHEMA` describes it."""

    summary: _Summary
    sentiment: _Sentiment
    caller_turns: tuple[_TurnScore, ...]
    key_phrases: _KeyPhrases
    intents: tuple[_IntentScore, ...]


# -- the request (pure) ----------------------------------------------------------------------------------

INSTRUCTIONS = f"""\
You analyse the transcript of one phone call between a caller and the voice agent that answers the \
phone for a business taking appointments. Personal data in it is masked as [phone], [email], [card] and \
[number]; never guess what was masked.

Answer in the given JSON schema:
- summary: two to four plain sentences in English for the business's staff: what the caller wanted, \
what happened (booked, moved, cancelled, transferred, nothing), and the next step for the staff.
- sentiment: the caller's mood over the call (not the agent's); how the call ends counts most.
- caller_turns: one entry for every caller turn, by its number in brackets.
- key_phrases: up to {MAX_PHRASES} short phrases the caller talked about, best first.
- intents: only what the caller asked for or clearly wanted, from the allowed values.
Each confidence is how sure you are, from 0 to 1."""


def transcript_text(turns: Sequence[TranscriptTurn]) -> str:
    """One line per turn, ``[index] role: words``, the index being the turn's place in the raw transcript."""
    return "\n".join(f"[{turn.index}] {turn.role}: {' '.join(turn.text.split())}" for turn in turns)


def analysis_messages(turns: Sequence[TranscriptTurn]) -> list[ChatCompletionMessageParam]:
    return [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "user", "content": f"Transcript:\n{transcript_text(turns) or '(nobody spoke)'}"},
    ]


# -- the answer (pure) -----------------------------------------------------------------------------------


def read_answer(completion: ChatCompletion, turns: Sequence[TranscriptTurn], model: str) -> Analysis:
    """The :class:`Analysis` in ``completion``, or :class:`AnalysisFailed` saying what is wrong with it."""
    if not completion.choices:
        raise AnalysisFailed("the model returned no choices", transient=False)
    choice = completion.choices[0]
    if choice.message.refusal:
        raise AnalysisFailed(f"the model refused: {choice.message.refusal}", transient=False)
    if choice.finish_reason != "stop":
        raise AnalysisFailed(f"the answer stopped early (finish_reason {choice.finish_reason!r})", transient=False)
    if not choice.message.content:
        raise AnalysisFailed("the answer is empty", transient=False)
    try:
        answer = _Answer.model_validate_json(choice.message.content)
    except ValidationError as invalid:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'answer'}: {e['msg']}" for e in invalid.errors())
        raise AnalysisFailed(f"the answer does not match the schema: {problems}", transient=False) from None
    caller_turns = {turn.index for turn in turns if turn.role == "caller"}
    scored = [score.turn for score in answer.caller_turns]
    unknown = sorted(set(scored) - caller_turns)
    if unknown:
        raise AnalysisFailed(f"the answer scores turns that are not caller turns: {unknown}", transient=False)
    if len(scored) != len(set(scored)):
        raise AnalysisFailed("the answer scores a turn twice", transient=False)
    # An alias (gpt-4o-mini) moves to new snapshots; the snapshot that answered is what the report records.
    return _analysis(answer, hosted_model(PROVIDER, model, completion.model or "unreported"))


def _analysis(answer: _Answer, provenance: Provenance) -> Analysis:
    intents: dict[Intent, float] = {}
    for item in answer.intents:  # a repeated intent keeps its surer confidence
        intents[item.intent] = max(item.confidence, intents.get(item.intent, 0.0))
    sentiment = answer.sentiment
    return Analysis(
        summary=Automated[str](value=answer.summary.text, confidence=answer.summary.confidence, provenance=provenance),
        sentiment=Automated[SentimentScore](
            value=SentimentScore(label=sentiment.label, compound=sentiment.compound),
            confidence=sentiment.confidence,
            provenance=provenance,
        ),
        turn_sentiments=tuple(
            Automated[TurnSentiment](
                value=TurnSentiment(turn=score.turn, label=score.label, compound=score.compound),
                confidence=score.confidence,
                provenance=provenance,
            )
            for score in sorted(answer.caller_turns, key=lambda score: score.turn)
        ),
        key_phrases=Automated[tuple[str, ...]](
            value=answer.key_phrases.phrases, confidence=answer.key_phrases.confidence, provenance=provenance
        ),
        # In the vocabulary's order, as the offline analyser gives them, so reports compare line by line.
        intents=tuple(
            Automated[Intent](value=intent, confidence=intents[intent], provenance=provenance)
            for intent in Intent
            if intent in intents
        ),
    )


# -- the analysers ---------------------------------------------------------------------------------------


class OpenAIAnalyser:
    """Satisfies :class:`booking.reports.ports.Analyser` with one structured-output chat completion a call.

    ``client`` is the app's, which closes it (its retries apply: a report is not on a live call, so the
    SDK's default two retries are welcome); :meth:`from_settings` makes one the analyser owns and
    :meth:`aclose` closes. ``timeout`` bounds each attempt in seconds. ``temperature=None`` leaves it
    out, for models that take only their default::

        analyser = OpenAIAnalyser(AsyncOpenAI(api_key=key), model="gpt-4o-mini", timeout=30.0)
    """

    def __init__(
        self,
        client: AsyncOpenAI,
        *,
        model: str = DEFAULT_MODEL,
        timeout: float = 30.0,
        temperature: float | None = 0.0,
    ) -> None:
        self._client, self.model, self._timeout, self._temperature = client, model, timeout, temperature
        self._owns_client = False

    @classmethod
    def from_settings(
        cls,
        *,
        api_key: str,
        base_url: str | None = None,
        model: str = DEFAULT_MODEL,
        timeout: float = 30.0,
        max_retries: int = 2,
        http_client: httpx2.AsyncClient | None = None,
    ) -> OpenAIAnalyser:
        """An analyser with a client of its own (``base_url`` None is OpenAI's), closed by :meth:`aclose`;
        ``http_client`` is the HTTP client it sends with (the app's egress-guarded one), None the SDK's."""
        client = AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=max_retries, http_client=http_client)
        analyser = cls(client, model=model, timeout=timeout)
        analyser._owns_client = True
        return analyser

    async def aclose(self) -> None:
        """Close the client if :meth:`from_settings` made it; the app's own client is the app's to close."""
        if self._owns_client:
            await self._client.close()

    async def analyse(self, call: AnalysisInput) -> Analysis:
        try:
            with provider_request("openai", "analysis"):
                completion = await self._client.chat.completions.create(
                    model=self.model,
                    messages=analysis_messages(call.turns),
                    response_format=RESPONSE_FORMAT,
                    temperature=openai.omit if self._temperature is None else self._temperature,
                    max_completion_tokens=MAX_ANSWER_TOKENS,
                    timeout=self._timeout,
                )
        except openai.APITimeoutError:
            raise AnalysisFailed(f"{self.model}: no answer within {self._timeout:g} s", transient=True) from None
        except openai.APIConnectionError as error:
            raise AnalysisFailed(f"{self.model}: connection failed: {error}", transient=True) from error
        except openai.APIStatusError as error:
            code = error.code if isinstance(error.code, str) else None
            transient = error.status_code in _TRANSIENT_STATUSES and code != "insufficient_quota"
            raise AnalysisFailed(
                f"{self.model}: HTTP {error.status_code} ({code or 'no code'}): {error.message}", transient=transient
            ) from error
        except openai.OpenAIError as error:  # an answer the SDK could not read, and the like
            raise AnalysisFailed(f"{self.model}: {type(error).__name__}: {error}", transient=False) from error
        return read_answer(completion, call.turns, self.model)


class FallbackAnalyser:
    """Satisfies :class:`booking.reports.ports.Analyser`: ``primary``'s analysis, or when it fails the
    offline one, so a report is always built. The fields then carry the offline provenance."""

    def __init__(self, primary: Analyser, fallback: Analyser | None = None) -> None:
        self._primary = primary
        self._fallback = fallback or OfflineAnalyser()

    async def analyse(self, call: AnalysisInput) -> Analysis:
        try:
            return await self._primary.analyse(call)
        except (AnalysisFailed, openai.OpenAIError) as failure:
            log.warning(
                "report_analysis_fallback",
                primary=type(self._primary).__name__,
                error=str(failure),
                transient=getattr(failure, "transient", None),
                turns=len(call.turns),
            )
        return await self._fallback.analyse(call)

    async def aclose(self) -> None:
        """Close the analysers that hold connections (an :class:`OpenAIAnalyser` made by ``from_settings``)."""
        for analyser in (self._primary, self._fallback):
            close = getattr(analyser, "aclose", None)
            if close is not None:
                await close()
