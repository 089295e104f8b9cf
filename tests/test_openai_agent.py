"""The OpenAI agent through the real openai SDK against our chat completions simulator on loopback: text
streamed as it is generated, tool calls assembled, the conversation sent in a shape the strict simulator
accepts, and every provider failure turned into words for the caller instead of silence or a crash."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import openai
import orjson
import pytest
from openai import AsyncOpenAI

from booking.business import Business
from integrations.openai_agent import (
    CONTINUE_NOTE,
    FALLBACK_LINE,
    HOLDING_LINE,
    INTERRUPTED_MARKER,
    OpenAIAgent,
    conversation_to_messages,
    tool_definitions,
)
from integrations.simulators.openai import (
    Fault,
    InvalidRequest,
    OpenAISimConfig,
    PolicyReply,
    create_openai_simulator,
    validate_request,
)
from tests.conftest import serving
from voice_server.agent_prompt import INTERRUPTION_NOTE, BookingView, CallerContext, build_system_prompt
from voice_server.ports import AgentEvent, CallInfo, EndCall, TextDelta, ToolCall, TransferCall, Turn
from voice_server.tools import ALL_TOOL_SPECS, BOOKING_TOOL_SPECS

KEY = "sk-test-4f1c9e"
MODEL = "gpt-4o-mini"
CALL = CallInfo("CA" + "1" * 32, "MZ" + "2" * 32, "+16465550199", "+12125550100")
AT = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
GREETING = "Hello, thanks for calling Riverside Family Clinic. How can I help you today?"
CHECK_ARGS = {"service": "checkup", "date": "2026-12-01", "time": "10:00"}
BOOK_ARGS = {"service": "checkup", "start": "2026-12-01T10:00", "customer_name": "Maria Lopez"}


class ClinicPolicy:
    """A few rules standing in for the model: enough to drive each path of the adapter."""

    def __init__(self) -> None:
        self.seen: list[list[dict[str, Any]]] = []

    def __call__(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> PolicyReply:
        self.seen.append(messages)
        if messages[-1]["role"] == "tool":
            result = orjson.loads(messages[-1]["content"])
            if "slots" in result:
                return PolicyReply(f"I have {result['slots'][0]['spoken']}. Shall I book it?")
            return PolicyReply(f"You're booked for {result['spoken']}. Anything else?")
        said = next(m["content"] for m in reversed(messages) if m["role"] == "user").lower()
        if "book" in said:
            return PolicyReply("Let me check that for you.", [("check_availability", CHECK_ARGS)])
        if "both" in said:
            return PolicyReply(
                "",
                [
                    ("check_availability", CHECK_ARGS),
                    ("check_availability", {"service": "vaccination", "date": "2026-12-02", "part_of_day": "morning"}),
                ],
            )
        if "yes" in said:
            return PolicyReply("", [("book_appointment", BOOK_ARGS)])
        if "bye" in said:
            return PolicyReply("Goodbye!", [("end_call", {"reason": "caller said goodbye"})])
        if "person" in said:
            return PolicyReply("Let me put you through.", [("transfer_to_human", {"reason": "asked for a person"})])
        if "garbled" in said:
            return PolicyReply("", [("check_availability", '{"service": "checkup", "date": ')])
        return PolicyReply(GREETING)


@dataclass
class Sim:
    config: OpenAISimConfig
    policy: ClinicPolicy
    client: AsyncOpenAI


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    config = OpenAISimConfig(api_key=KEY)
    policy = ClinicPolicy()
    async with serving(create_openai_simulator(config, policy), lifespan="off") as url:
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY)
        try:
            yield Sim(config, policy, client)
        finally:
            await client.close()


def make_agent(sim: Sim, **options: Any) -> OpenAIAgent:
    settings: dict[str, Any] = {
        "model": MODEL,
        "tools": ALL_TOOL_SPECS,
        "system_prompt": "You are the receptionist of a test clinic.",
        "backoff": 0.01,
        **options,
    }
    return OpenAIAgent(sim.client, **settings)


def caller(text: str) -> Turn:
    return Turn("caller", text, AT)


def tool_turn(name: str, call_id: str, arguments: dict[str, Any], result: dict[str, Any]) -> Turn:
    record = {"id": call_id, "arguments": arguments, "result": result}
    return Turn("tool", orjson.dumps(record).decode(), AT, tool=name)


async def collect(agent: OpenAIAgent, conversation: Sequence[Turn]) -> list[AgentEvent]:
    return [event async for event in agent.respond(conversation, CALL)]


def spoken(events: Sequence[AgentEvent]) -> str:
    return "".join(event.text for event in events if isinstance(event, TextDelta))


# -- streaming and tool calls ---------------------------------------------------------------------


async def test_text_is_passed_on_while_the_model_is_still_generating(sim: Sim) -> None:
    order: list[str] = []
    first_delta = asyncio.Event()

    async def gate(index: int, total: int) -> None:
        if index == total - 1:
            # Hold the last token back until the client has shown it streams (or give up and let the
            # assertion below fail for an adapter that buffers the whole reply).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(first_delta.wait(), 5)
            order.append("last token generated")

    sim.config.token_gate = gate
    events: list[AgentEvent] = []
    async for event in make_agent(sim).respond([caller("Hi there")], CALL):
        events.append(event)
        order.append("delta received")
        first_delta.set()
    assert order.index("delta received") < order.index("last token generated")
    assert spoken(events) == GREETING
    assert len([e for e in events if isinstance(e, TextDelta)]) > 5  # word by word, not one block
    assert sim.config.rejections == []


async def test_a_barge_in_closes_the_request_in_flight(sim: Sim) -> None:
    abandoned = asyncio.Event()

    async def gate(index: int, total: int) -> None:
        if index == 3:
            try:
                await asyncio.Event().wait()  # the model "thinks" until the client goes away
            finally:
                abandoned.set()

    sim.config.token_gate = gate
    heard: list[str] = []
    speaking = asyncio.Event()

    async def listen() -> None:
        async for event in make_agent(sim).respond([caller("Hi there")], CALL):
            assert isinstance(event, TextDelta)
            heard.append(event.text)
            if len(heard) == 3:
                speaking.set()

    reply = asyncio.create_task(listen())
    await speaking.wait()
    reply.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reply
    await asyncio.wait_for(abandoned.wait(), 10)  # the simulator saw the connection close
    assert "".join(heard) == "Hello, thanks for"


async def test_parallel_tool_calls_are_assembled_from_their_fragments(sim: Sim) -> None:
    events = await collect(make_agent(sim), [caller("Can you check both for me?")])
    calls = [event for event in events if isinstance(event, ToolCall)]
    assert [(call.name, dict(call.arguments)) for call in calls] == [
        ("check_availability", CHECK_ARGS),
        ("check_availability", {"service": "vaccination", "date": "2026-12-02", "part_of_day": "morning"}),
    ]
    assert all(call.id.startswith("call_") for call in calls) and len({call.id for call in calls}) == 2
    assert spoken(events) == ""


async def test_end_call_and_transfer_become_call_control_events(sim: Sim) -> None:
    goodbye = await collect(make_agent(sim), [caller("That's all, bye")])
    assert spoken(goodbye) == "Goodbye!"
    assert [e for e in goodbye if not isinstance(e, TextDelta)] == [EndCall("caller said goodbye")]
    transfer = await collect(make_agent(sim), [caller("Can I talk to a person?")])
    assert [e for e in transfer if not isinstance(e, TextDelta)] == [TransferCall("asked for a person")]


async def test_call_control_tools_are_offered_once_even_when_not_given(sim: Sim) -> None:
    await collect(make_agent(sim, tools=BOOKING_TOOL_SPECS), [caller("Hi")])
    await collect(make_agent(sim, tools=ALL_TOOL_SPECS), [caller("Hi")])
    for request in sim.config.requests:
        assert request is not None
        names = [tool["function"]["name"] for tool in request["tools"]]
        assert sorted(names) == sorted(spec.name for spec in ALL_TOOL_SPECS)
    assert sim.config.rejections == []


async def test_malformed_arguments_go_to_the_runner_raw(sim: Sim) -> None:
    events = await collect(make_agent(sim), [caller("garbled")])
    [call] = [event for event in events if isinstance(event, ToolCall)]
    assert call.name == "check_availability"
    assert call.arguments == {"_raw": '{"service": "checkup", "date": '}


# -- the conversation as the API wants it ---------------------------------------------------------------


async def test_a_booking_round_trip_is_accepted_by_the_strict_simulator(sim: Sim) -> None:
    agent = make_agent(sim)
    conversation = [Turn("agent", GREETING, AT), caller("I'd like to book a checkup tomorrow at 10.")]
    first = await collect(agent, conversation)
    [check] = [event for event in first if isinstance(event, ToolCall)]
    assert spoken(first) == "Let me check that for you."
    # What the session does: file the words heard, run the tool, add its result, ask again.
    slot = {"start": "2026-12-01T10:00", "spoken": "Tuesday, December 1 at 10 AM", "resource": "dr-lee"}
    availability = {"service": "checkup", "requested_available": True, "held": True, "slots": [slot]}
    conversation += [Turn("agent", spoken(first), AT), tool_turn(check.name, check.id, CHECK_ARGS, availability)]
    second = await collect(agent, conversation)
    assert spoken(second) == "I have Tuesday, December 1 at 10 AM. Shall I book it?"

    request = sim.config.requests[-1]
    assert request is not None and request["stream"] is True
    assert request["messages"][-2] == {
        "role": "assistant",
        "content": "Let me check that for you.",
        "tool_calls": [
            {
                "id": check.id,
                "type": "function",
                "function": {"name": "check_availability", "arguments": orjson.dumps(CHECK_ARGS).decode()},
            }
        ],
    }
    assert request["messages"][-1] == {
        "role": "tool",
        "tool_call_id": check.id,
        "content": orjson.dumps(availability).decode(),
    }

    conversation += [Turn("agent", spoken(second), AT), caller("Yes please, I'm Maria Lopez.")]
    third = await collect(agent, conversation)
    [book] = [event for event in third if isinstance(event, ToolCall)]
    assert (book.name, dict(book.arguments)) == ("book_appointment", BOOK_ARGS)
    booked = {"status": "booked", "booking_id": "bk_1", "spoken": "Tuesday, December 1 at 10 AM"}
    conversation.append(tool_turn(book.name, book.id, BOOK_ARGS, booked))
    fourth = await collect(agent, conversation)
    assert spoken(fourth) == "You're booked for Tuesday, December 1 at 10 AM. Anything else?"
    assert sim.config.rejections == []
    assert len(sim.config.requests) == 4


def test_every_kind_of_turn_converts_to_messages_the_api_accepts() -> None:
    conversation = [
        Turn("agent", GREETING, AT),
        caller("Book me in, and check both"),
        Turn("agent", "Let me look that", AT, truncated=True),  # the caller spoke over it
        caller("Sorry, go on"),
        tool_turn("check_availability", "call_a", CHECK_ARGS, {"slots": []}),  # finished after the barge-in
        tool_turn("check_availability", "call_b", {}, {"error": {"code": "invalid_argument"}}),
        tool_turn("check_availability", "call_a", CHECK_ARGS, {"slots": []}),  # a repeated id stays paired
        Turn("agent", "", AT, truncated=True),  # cut before a word was heard
        Turn("dtmf", "1", AT),
        Turn("tool", "transfer failed: busy", AT, tool="transfer"),  # a session note, no tool call behind it
        Turn("agent", "Anything else?", AT),
    ]
    messages = conversation_to_messages("System prompt.", conversation)
    validate_request({"model": MODEL, "messages": messages, "tools": tool_definitions(ALL_TOOL_SPECS)})
    roles = " ".join(message["role"] for message in messages)
    assert roles == "system assistant user assistant user assistant tool tool tool user system assistant"
    assert messages[3] == {"role": "assistant", "content": "Let me look that" + INTERRUPTED_MARKER}
    assert messages[5].get("content") is None and len(list(messages[5]["tool_calls"])) == 3  # type: ignore[typeddict-item]
    assert messages[9] == {"role": "user", "content": "(pressed 1)"}
    assert INTERRUPTED_MARKER.strip() == INTERRUPTION_NOTE  # the prompt explains the marker the adapter writes


def test_the_simulator_refuses_what_the_api_refuses() -> None:
    tools = tool_definitions(ALL_TOOL_SPECS)
    unanswered = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [_call("call_x")]},
        {"role": "user", "content": "hello?"},
    ]
    orphan = [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_y", "content": "{}"}]
    object_arguments = [
        {"role": "assistant", "tool_calls": [{**_call("call_z"), "function": {"name": "f", "arguments": {}}}]}
    ]
    for body, words in [
        ({"model": MODEL, "messages": unanswered, "tools": tools}, "did not have response messages: call_x"),
        ({"model": MODEL, "messages": orphan}, "must be a response to a preceeding message"),
        ({"model": MODEL, "messages": object_arguments}, "expected a string, but got an object"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "Supported values"),
        ({"messages": [{"role": "user", "content": "x"}]}, "must provide a model"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": tools + tools[:1]}, "Duplicate"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream_options": {}}, "only allowed"),
    ]:
        with pytest.raises(InvalidRequest) as refused:
            validate_request(body)
        assert words in refused.value.message


def _call(call_id: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": "end_call", "arguments": "{}"}}


async def test_the_simulator_speaks_the_wire_format_the_sdk_parses(sim: Sim) -> None:
    stream = await sim.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "check both"}],
        tools=tool_definitions(ALL_TOOL_SPECS),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    fragments = [call for chunk in chunks for choice in chunk.choices for call in choice.delta.tool_calls or ()]
    openings = [f for f in fragments if f.id is not None]
    assert [(f.index, f.type, f.function and f.function.name) for f in openings] == [
        (0, "function", "check_availability"),
        (1, "function", "check_availability"),
    ]
    assert all(f.type is None and f.function and f.function.name is None for f in fragments if f.id is None)
    assert len(fragments) > 2 * len(openings)  # arguments arrive in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0

    whole = await sim.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "bye"}])
    assert whole.choices[0].message.content == "Goodbye!" and whole.choices[0].finish_reason == "tool_calls"

    with pytest.raises(openai.BadRequestError) as refused:
        await sim.client.chat.completions.create(
            model=MODEL, messages=[{"role": "tool", "tool_call_id": "call_q", "content": "{}"}]
        )
    assert refused.value.code is None and refused.value.param == "messages.[0].role"


# -- failures: words for the caller, never silence or a crash ---------------------------------------------


async def test_a_rate_limit_is_covered_by_a_holding_line_then_the_reply(sim: Sim) -> None:
    sim.config.faults = [Fault("rate_limit", first=1, count=1, retry_after_ms=10)]
    events = await collect(make_agent(sim), [caller("Hi")])
    texts = [event.text for event in events if isinstance(event, TextDelta)]
    assert texts[0] == HOLDING_LINE + " "
    assert "".join(texts[1:]) == GREETING
    assert len(sim.config.requests) == 2


async def test_a_persistent_outage_ends_in_the_fallback_line(sim: Sim) -> None:
    sim.config.faults = [Fault("server_error", count=None)]
    events = await collect(make_agent(sim, retries=2), [caller("Hi")])
    assert [event.text for event in events if isinstance(event, TextDelta)] == [HOLDING_LINE + " ", FALLBACK_LINE]
    assert len(sim.config.requests) == 3


async def test_a_model_that_never_answers_ends_in_the_fallback_line(sim: Sim) -> None:
    sim.config.faults = [Fault("timeout", count=None)]
    events = await collect(make_agent(sim, retries=1, request_timeout=0.3), [caller("Hi")])
    assert [event.text for event in events if isinstance(event, TextDelta)] == [HOLDING_LINE + " ", FALLBACK_LINE]
    assert len(sim.config.requests) == 2


async def test_no_quota_or_a_refused_key_gives_the_fallback_at_once(sim: Sim) -> None:
    sim.config.faults = [Fault("insufficient_quota", count=None)]
    events = await collect(make_agent(sim), [caller("Hi")])
    assert spoken(events) == FALLBACK_LINE
    sim.config.faults = []
    client = AsyncOpenAI(base_url=str(sim.client.base_url), api_key="sk-wrong")
    try:
        events = await collect(OpenAIAgent(client, model=MODEL, tools=(), system_prompt="x"), [caller("Hi")])
    finally:
        await client.close()
    assert spoken(events) == FALLBACK_LINE
    assert len(sim.config.requests) == 2  # neither was retried


@pytest.mark.parametrize("kind", ["stream_error", "drop", "stall"])
async def test_a_reply_broken_mid_stream_is_finished_without_repeating_itself(sim: Sim, kind: str) -> None:
    sim.config.faults = [Fault(kind, first=1, count=1, after_tokens=4)]  # type: ignore[arg-type]
    events = await collect(make_agent(sim, request_timeout=0.5), [caller("Hi")])
    assert spoken(events) == GREETING  # no holding line in mid-sentence, no words said twice
    assert not any(isinstance(event, ToolCall) for event in events)
    retry = sim.config.requests[-1]
    assert retry is not None and len(sim.config.requests) == 2
    said_before = "Hello, thanks for calling"
    assert retry["messages"][-2:] == [
        {"role": "assistant", "content": said_before},
        {"role": "system", "content": CONTINUE_NOTE},
    ]


async def test_a_reply_broken_mid_sentence_for_good_closes_the_sentence_before_the_fallback(sim: Sim) -> None:
    sim.config.faults = [Fault("drop", first=1, count=1, after_tokens=2), Fault("server_error", first=2, count=None)]
    events = await collect(make_agent(sim, retries=1), [caller("Hi")])
    assert spoken(events) == "Hello, thanks... " + FALLBACK_LINE



async def test_a_chunk_that_is_not_an_object_ends_in_the_fallback_line(sim: Sim) -> None:
    """The chunks are read as plain JSON (no model is built), so one of the wrong shape is refused as such:
    what was said is closed and the fallback line follows, without a retry that would say it all again."""
    sim.config.faults = [Fault("garbled", first=1, count=1, after_tokens=2)]
    events = await collect(make_agent(sim), [caller("Hi")])
    assert spoken(events) == "Hello, thanks... " + FALLBACK_LINE
    assert len(sim.config.requests) == 1

# -- the system prompt ----------------------------------------------------------------------------------


def test_the_system_prompt_holds_the_business_and_the_caller(business: Business) -> None:
    context = CallerContext(
        name="Maria Lopez",
        upcoming=[BookingView("bk_7", "General check-up", datetime(2026, 12, 3, 15, 0, tzinfo=UTC), "Dr. Amelia Lee")],
        timezone="America/Los_Angeles",
        phone="+16465550199",
    )
    prompt = build_system_prompt(business, context, AT)
    for fact in [
        "Riverside Family Clinic",
        "Today is Monday, November 30, 2026 (2026-11-30)",
        "Tuesday 2026-12-01 (tomorrow)",
        "- Saturday: 9 AM to 1 PM",
        "- Sunday: closed",
        "General check-up (id checkup): 30 minutes, with Dr. Amelia Lee or Dr. Rohan Patel",
        "Vaccination (id vaccination): 15 minutes, with Nurse Grace Kim",
        "Dr. Rohan Patel (id dr-patel, staff)",
        "at least 2 hours' notice",
        "up to 60 days ahead",
        "(Christmas)",
        "Calling from (646) 555-0199.",
        "Maria Lopez",
        "General check-up on Thursday, December 3 at 10 AM with Dr. Amelia Lee (booking id bk_7)",
        "America/Los_Angeles",
        "one question at a time",
        "check_availability before offering or booking",
        INTERRUPTION_NOTE,
    ]:
        assert fact in prompt, fact
    assert "Thanksgiving" not in prompt  # past closures are not worth the tokens
    assert build_system_prompt(business, context, AT) == prompt

    stranger = build_system_prompt(business, CallerContext(timezone="America/Detroit"), AT)
    assert "withheld or unknown" in stranger and "ask for their name" in stranger
    assert "America/Detroit" not in stranger  # same clock as the business: nothing to explain


async def test_the_prompt_is_built_once_per_call_and_sent_first(sim: Sim, business: Business) -> None:
    built: list[str] = []

    async def prompt_for(call: CallInfo) -> str:
        built.append(call.call_sid)
        return build_system_prompt(business, CallerContext(name="Maria Lopez", phone=call.caller), AT)

    agent = make_agent(sim, system_prompt=prompt_for)
    await collect(agent, [caller("Hi")])
    await collect(agent, [caller("Hi"), Turn("agent", GREETING, AT), caller("Hello again")])
    assert built == [CALL.call_sid]
    first, second = sim.policy.seen
    assert first[0]["role"] == "system" and "Maria Lopez" in first[0]["content"]
    assert second[0] == first[0]
