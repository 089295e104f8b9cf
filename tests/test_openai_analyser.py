"""The OpenAI call-report analyser through the real openai SDK against the chat completions simulator on
loopback: one strict structured-output request carrying only the masked transcript, the answer checked
and mapped with the model's provenance, and every failure either raised as AnalysisFailed or, through
FallbackAnalyser, answered by the offline analyser with offline provenance."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import openai
import orjson
import pytest
from openai import AsyncOpenAI
from structlog.testing import capture_logs

from booking.business import EXAMPLE_BUSINESS_FILE, Business, load_business
from booking.calls import CallRecord, CallStatus, CallTurn
from booking.reports.analysis import OfflineAnalyser
from booking.reports.builder import build_report
from booking.reports.cleaning import clean_text
from booking.reports.facts import read_facts
from booking.reports.ports import AnalysisInput
from booking.reports.schema import Automated, Provenance, TranscriptTurn
from booking.reports.vocabulary import Intent, Outcome, SentimentLabel, Tag
from integrations.openai_analyser import (
    ANSWER_SCHEMA,
    SCHEMA_NAME,
    AnalysisFailed,
    FallbackAnalyser,
    OpenAIAnalyser,
)
from integrations.simulators.openai import (
    Fault,
    FaultKind,
    OpenAISimConfig,
    PolicyReply,
    Refusal,
    StructuredAnswer,
    create_openai_simulator,
)
from integrations.simulators.openai_reports import CONFIDENCE, call_report_policy
from tests.conftest import serving

KEY = "sk-test-90b3e1"
MODEL = "gpt-4o-mini"
SNAPSHOT = "gpt-4o-mini-2024-07-18"
OPENAI = Provenance(component=f"openai:{MODEL}", version=SNAPSHOT)
START = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)
CALLER = "+16465550199"
CLINIC = "+12125550100"
BOOKING_ID = "0190a1b2c3d4e5f60718293a4b5c6d7e"
LAST_AGENT_LINE = "You're booked for Tuesday, December 1 at 10 AM with Dr. Amelia Lee."


def turns(*lines: tuple[str, str] | tuple[str, str, str]) -> list[CallTurn]:
    """(role, text) or ("tool", name, text) lines, five seconds apart."""
    return [
        CallTurn(role=line[0], tool=line[1], text=line[2], at=START + timedelta(seconds=5 * index))
        if len(line) == 3
        else CallTurn(role=line[0], text=line[1], at=START + timedelta(seconds=5 * index))
        for index, line in enumerate(lines)
    ]


def tool(name: str, arguments: dict[str, Any], result: dict[str, Any]) -> tuple[str, str, str]:
    return ("tool", name, orjson.dumps({"id": f"call_{name}", "arguments": arguments, "result": result}).decode())


BOOKING_CALL = turns(
    ("agent", "Thanks for calling Riverside Family Clinic, how can I help?"),
    ("caller", "Hi, um, I'd like to book a check-up with Dr Lee. Any openings on Tuesday?"),
    tool(
        "check_availability",
        {"service": "checkup", "date": "2026-12-01"},
        {"service": "checkup", "requested_available": True, "held": True, "slots": []},
    ),
    ("agent", "Dr. Amelia Lee is free on Tuesday at 10 AM. Shall I book it?"),
    ("caller", "Yes please, that's perfect. My number is 646 555 0199 if you need it."),
    tool(
        "book_appointment",
        {"service": "checkup", "start": "2026-12-01T10:00", "customer_name": "Jane Doe"},
        {"booking_id": BOOKING_ID, "status": "booked", "spoken": "Tuesday, December 1 at 10 AM"},
    ),
    ("agent", LAST_AGENT_LINE),
    ("caller", "Great, thank you so much, that's really helpful!"),
)
CALLER_TURNS = [1, 4, 7]


@pytest.fixture(scope="module")
def clinic() -> Business:
    return load_business(EXAMPLE_BUSINESS_FILE)


def analysis_input(business: Business, lines: list[CallTurn]) -> AnalysisInput:
    """What ``build_report`` hands its analyser: the spoken turns, fillers removed and personal data masked."""
    cleaned = tuple(
        TranscriptTurn(index=index, role=turn.role, text=clean_text(turn.text), at=turn.at)
        for index, turn in enumerate(lines)
        if turn.role in ("caller", "agent") and clean_text(turn.text)
    )
    return AnalysisInput(
        turns=cleaned,
        facts=read_facts(lines),
        outcome=Outcome.BOOKED,
        bookings_touched=(),
        known_customer=False,
        business=business,
    )


def no_chat(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> PolicyReply:
    raise AssertionError("an analysis request went down the conversation path")


@dataclass
class Sim:
    config: OpenAISimConfig
    client: AsyncOpenAI
    answer: Callable[[dict[str, Any]], StructuredAnswer] = call_report_policy

    def analyser(self, **options: Any) -> OpenAIAnalyser:
        return OpenAIAnalyser(self.client, model=MODEL, **options)

    def sent(self) -> list[dict[str, Any]]:
        return [body for body in self.config.requests if body is not None]


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    config = OpenAISimConfig(api_key=KEY, model_versions={MODEL: SNAPSHOT})
    holder: list[Sim] = []
    app = create_openai_simulator(config, no_chat, lambda body: holder[0].answer(body))
    async with serving(app, lifespan="off") as url:
        # No SDK retries: each test decides what every request meets.
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        holder.append(Sim(config, client))
        try:
            yield holder[0]
        finally:
            await client.close()


# -- the analysis --------------------------------------------------------------------------------------


async def test_a_fixed_transcript_is_analysed_by_the_model(sim: Sim, clinic: Business) -> None:
    analysis = await sim.analyser().analyse(analysis_input(clinic, BOOKING_CALL))

    assert (
        analysis.summary.value
        == f'The caller wanted: book, check availability. The agent ended with: "{LAST_AGENT_LINE}"'
    )
    assert [item.value for item in analysis.intents] == [Intent.BOOK, Intent.CHECK_AVAILABILITY]
    assert analysis.sentiment.value.label is SentimentLabel.POSITIVE
    assert 0.3 < analysis.sentiment.value.compound <= 1.0
    assert [item.value.turn for item in analysis.turn_sentiments] == CALLER_TURNS
    assert analysis.turn_sentiments[-1].value.label is SentimentLabel.POSITIVE
    phrases = " ".join(analysis.key_phrases.value).lower()
    assert "check-up" in phrases or "openings" in phrases
    assert "phone" not in phrases and "555" not in phrases
    fields: list[Automated[Any]] = [
        analysis.summary,
        analysis.sentiment,
        analysis.key_phrases,
        *analysis.turn_sentiments,
        *analysis.intents,
    ]
    assert {field.provenance for field in fields} == {OPENAI}
    assert {field.confidence for field in fields} == {CONFIDENCE}
    assert len(sim.sent()) == 1


async def test_the_request_is_strict_structured_output_of_the_masked_transcript(sim: Sim, clinic: Business) -> None:
    await build_report(
        record(), BOOKING_CALL, business=clinic, bookings_touched=(), known_customer=False, analyser=sim.analyser()
    )

    [body] = sim.sent()
    assert body["model"] == MODEL
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": SCHEMA_NAME, "strict": True, "schema": ANSWER_SCHEMA},
    }
    assert "tools" not in body and not body.get("stream")
    sent = orjson.dumps(body["messages"]).decode()
    assert "[4] caller: Yes please, that's perfect. My number is [phone] if you need it." in sent
    assert "646" not in sent and "0199" not in sent  # the raw number never left
    assert BOOKING_ID not in sent and "Jane Doe" not in sent  # tool turns are not part of the transcript
    assert " um" not in sent


def valid_answer(body: dict[str, Any]) -> dict[str, Any]:
    return call_report_policy(body)


def with_change(change: Callable[[dict[str, Any]], None], *, verbatim: bool) -> Callable[[dict[str, Any]], Any]:
    """The rule policy's answer changed by ``change``; ``verbatim`` sends it unchecked, as a model might
    when strict mode does not hold it to the schema."""

    def answer(body: dict[str, Any]) -> StructuredAnswer:
        result = valid_answer(body)
        change(result)
        return orjson.dumps(result).decode() if verbatim else result

    return answer


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (
            with_change(lambda a: a["intents"].append({"intent": "buy_a_car", "confidence": 0.9}), verbatim=True),
            "intents.2.intent: Input should be 'book'",
        ),
        (
            with_change(lambda a: a["sentiment"].update(compound=1.5), verbatim=True),
            "sentiment.compound: Input should be less than or equal to 1",
        ),
        (
            with_change(lambda a: a["key_phrases"].update(confidence="0.9"), verbatim=True),
            "key_phrases.confidence: Input should be a valid number",
        ),
        (with_change(lambda a: a.update(mood="great"), verbatim=True), "mood: Extra inputs are not permitted"),
        (with_change(lambda a: a.pop("summary"), verbatim=True), "summary: Field required"),
        (
            with_change(lambda a: a["caller_turns"][0].update(turn=99), verbatim=False),
            "scores turns that are not caller turns: [99]",
        ),
        (
            with_change(lambda a: a["caller_turns"][0].update(turn=3), verbatim=False),  # an agent turn
            "scores turns that are not caller turns: [3]",
        ),
        (
            with_change(lambda a: a["caller_turns"].append(a["caller_turns"][0]), verbatim=False),
            "scores a turn twice",
        ),
        (lambda body: '{"summary": {"text": "The caller', "answer does not match the schema"),
        (lambda body: Refusal("I'm sorry, I can't help with that."), "refused: I'm sorry, I can't help with that."),
    ],
)
async def test_an_answer_that_breaks_the_contract_fails(
    sim: Sim, clinic: Business, answer: Callable[[dict[str, Any]], StructuredAnswer], problem: str
) -> None:
    sim.answer = answer
    with pytest.raises(AnalysisFailed) as failed:
        await sim.analyser().analyse(analysis_input(clinic, BOOKING_CALL))
    assert problem in str(failed.value)
    assert failed.value.transient is False


async def test_a_strict_answer_the_schema_forbids_never_reaches_the_client(sim: Sim, clinic: Business) -> None:
    # Strict mode guarantees the schema, so the simulator treats a policy breaking it as its own error.
    sim.answer = with_change(lambda a: a["intents"].append({"intent": "buy_a_car", "confidence": 0.9}), verbatim=False)
    with pytest.raises(AnalysisFailed, match="HTTP 500") as failed:
        await sim.analyser().analyse(analysis_input(clinic, BOOKING_CALL))
    assert "answer.intents[2].intent: 'buy_a_car' is not one of" in str(failed.value)


# -- failures fall back to the offline analysis ---------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "message"),
    [("server_error", "HTTP 500"), ("overloaded", "HTTP 503"), ("rate_limit", "HTTP 429"), ("timeout", "no answer")],
)
async def test_a_provider_failure_falls_back_to_the_offline_analysis(
    sim: Sim, clinic: Business, kind: FaultKind, message: str
) -> None:
    sim.config.faults = [Fault(kind, count=None)]
    call = analysis_input(clinic, BOOKING_CALL)
    analyser = sim.analyser(timeout=0.5)

    with pytest.raises(AnalysisFailed, match=message) as failed:
        await analyser.analyse(call)
    assert failed.value.transient is True

    with capture_logs() as logs:
        analysis = await FallbackAnalyser(analyser).analyse(call)
    assert analysis == OfflineAnalyser().analyse_now(call)
    offline: list[Automated[Any]] = [analysis.summary, analysis.sentiment, *analysis.intents]
    components = {item.provenance.component for item in offline}
    assert components == {"voicebook.summary", "vaderSentiment", "voicebook.intents"}
    [warning] = [entry for entry in logs if entry["event"] == "report_analysis_fallback"]
    assert warning["log_level"] == "warning"
    assert message in warning["error"] and warning["transient"] is True


async def test_a_refusal_falls_back_too(sim: Sim, clinic: Business) -> None:
    sim.answer = lambda body: Refusal("I can't analyse this.")
    call = analysis_input(clinic, BOOKING_CALL)
    with capture_logs() as logs:
        analysis = await FallbackAnalyser(sim.analyser()).analyse(call)
    assert analysis == OfflineAnalyser().analyse_now(call)
    assert [entry["transient"] for entry in logs if entry["event"] == "report_analysis_fallback"] == [False]


async def test_the_fallback_keeps_a_working_model_as_the_settings_build_it(sim: Sim, clinic: Business) -> None:
    primary = OpenAIAnalyser.from_settings(api_key=KEY, base_url=str(sim.client.base_url), model=MODEL, timeout=5.0)
    analyser = FallbackAnalyser(primary)
    analysis = await analyser.analyse(analysis_input(clinic, BOOKING_CALL))
    assert analysis.summary.provenance == OPENAI
    await analyser.aclose()
    with pytest.raises(RuntimeError, match="client has been closed"):  # its own client is closed with it
        await primary.analyse(analysis_input(clinic, BOOKING_CALL))


# -- the whole report -----------------------------------------------------------------------------------


def record() -> CallRecord:
    return CallRecord(
        call_sid="CA" + "1" * 32,
        account_sid="AC" + "0" * 32,
        from_number=CALLER,
        to_number=CLINIC,
        direction="inbound",
        status=CallStatus.COMPLETED,
        created_at=START,
        updated_at=START + timedelta(minutes=3),
        ended_at=START + timedelta(minutes=3),
        duration_seconds=180,
        stream_sid="MZ" + "2" * 32,
        end_reason="stop",
    )


async def test_a_report_built_with_the_model(sim: Sim, clinic: Business) -> None:
    report = await build_report(
        record(),
        BOOKING_CALL,
        business=clinic,
        bookings_touched=(),
        known_customer=False,
        analyser=FallbackAnalyser(sim.analyser()),
    )

    analysed: list[Automated[Any]] = [
        report.summary,
        report.sentiment,
        report.key_phrases,
        *report.turn_sentiments,
        *report.intents,
    ]
    assert {field.provenance for field in analysed} == {OPENAI}
    assert report.summary.value.startswith("The caller wanted: book, check availability.")
    ruled: list[Automated[Any]] = [report.outcome, report.lead_score, report.lifecycle, *report.tags]
    assert all(field.provenance.component.startswith("voicebook.") for field in ruled)
    assert report.outcome.value is Outcome.BOOKED
    assert {tag.value for tag in report.tags} == {Tag.NEW_CUSTOMER}
    # The rules score what the model found: its intents and sentiment feed the lead score.
    assert {"intent:check_availability", "sentiment:positive"} <= {
        reason.rule for reason in report.lead_score.value.reasons
    }
    assert report.transcript[4].text.endswith("646 555 0199 if you need it.")  # the ledger's copy is raw
    assert set(report.automated_fields()) >= {"summary", "sentiment", "intents[0]", "lead_score"}


# -- the simulator holds requests to strict mode's rules ------------------------------------------------


def loose(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "loose", "strict": True, "schema": schema}}


@pytest.mark.parametrize(
    ("response_format", "problem"),
    [
        (
            loose({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}),
            "'additionalProperties' is required to be supplied and to be false",
        ),
        (
            loose({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": False}),
            "including every key in properties. Missing 'a'",
        ),
        (loose({"type": "array", "items": {"type": "string"}}), "schema must be a JSON Schema of 'type: \"object\"'"),
        ({"type": "json_object"}, "must contain the word 'json'"),
        ({"type": "json_schema", "json_schema": {"name": "has spaces", "schema": {}}}, "json_schema.name"),
    ],
)
async def test_the_simulator_refuses_what_the_api_refuses(
    sim: Sim, response_format: dict[str, Any], problem: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await sim.client.chat.completions.create(  # type: ignore[call-overload]  # malformed formats too
            model=MODEL,
            messages=[{"role": "user", "content": "Analyse this."}],
            response_format=response_format,
        )
    assert problem in refused.value.message
    assert problem in sim.config.rejections[-1]


async def test_structured_output_streams(sim: Sim, clinic: Business) -> None:
    sim.answer = lambda body: {"a": "streamed words, in pieces"}
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    stream = await sim.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Answer."}],
        response_format={"type": "json_schema", "json_schema": {"name": "tiny", "strict": True, "schema": schema}},
        stream=True,
    )
    chunks = [chunk async for chunk in stream]
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert orjson.loads(content) == {"a": "streamed words, in pieces"}
    assert len(chunks) > 3
    assert {chunk.model for chunk in chunks} == {SNAPSHOT}
    assert chunks[-1].choices[0].finish_reason == "stop"

    sim.answer = lambda body: Refusal("No, thank you.")
    stream = await sim.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Answer."}],
        response_format={"type": "json_schema", "json_schema": {"name": "tiny", "strict": True, "schema": schema}},
        stream=True,
    )
    refusal = "".join([chunk.choices[0].delta.refusal or "" async for chunk in stream if chunk.choices])
    assert refusal == "No, thank you."
