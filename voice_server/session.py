"""One phone call: listens, decides when the caller's turn ends, lets the agent answer, speaks the answer
sentence by sentence, and yields the floor the moment the caller speaks over it (barge-in).

Every task the session starts is kept in ``_tasks`` and cancelled and awaited when the call ends. A tool
call that has started (a booking) is never cancelled by barge-in: it runs to completion in its own task
and its result stays in the conversation.

Each caller turn is timed (``voice_server.turn_timing``): from the end-of-turn transcript to the first
reply frame sent, with the waits on the agent, the tools and text-to-speech; the records are kept in
``turn_timings`` and observed into ``TURN_HISTOGRAMS``.
"""

from __future__ import annotations

import asyncio
import enum
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace

from booking.consent import withdraws_consent
from voice_server import metrics
from voice_server.playout import Playout
from voice_server.ports import (
    CallInfo,
    EndCall,
    Expect,
    SpeechStarted,
    SpeechToTextStream,
    TextDelta,
    ToolCall,
    Transcript,
    TransferCall,
    Turn,
    VoicePorts,
    closing,
)
from voice_server.tracing import record_tool_result, record_turn
from voice_server.turn_timing import TurnTimer, TurnTiming, observe

log = structlog.get_logger("voicebook.session")
_tracer = trace.get_tracer("voicebook.calls")  # a span per turn and per tool call; never per audio frame

MAX_TOOL_ROUNDS = 5
MARK_SLACK_SECONDS = 2.0


class CallState(enum.StrEnum):
    CONNECTING = "connecting"
    GREETING = "greeting"
    LISTENING = "listening"
    THINKING = "thinking"
    SPEAKING = "speaking"
    TRANSFERRING = "transferring"
    ENDING = "ending"
    ENDED = "ended"


_LEGAL: dict[CallState, frozenset[CallState]] = {
    CallState.CONNECTING: frozenset({CallState.GREETING, CallState.ENDING}),
    CallState.GREETING: frozenset({CallState.SPEAKING, CallState.LISTENING, CallState.THINKING, CallState.ENDING}),
    CallState.LISTENING: frozenset({CallState.THINKING, CallState.ENDING}),
    CallState.THINKING: frozenset({CallState.SPEAKING, CallState.LISTENING, CallState.TRANSFERRING, CallState.ENDING}),
    CallState.SPEAKING: frozenset({CallState.THINKING, CallState.LISTENING, CallState.TRANSFERRING, CallState.ENDING}),
    # A transfer that fails hands the call back to the agent.
    CallState.TRANSFERRING: frozenset({CallState.THINKING, CallState.ENDING}),
    CallState.ENDING: frozenset({CallState.ENDED}),
    CallState.ENDED: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """Timers of a call: how long silence is tolerated, how often the caller is prompted again, and how
    long a call may last at all."""

    greeting: str
    silence_seconds: float = 8.0
    reprompts: int = 2
    reprompt: str = "Are you still there?"
    silence_goodbye: str = "I haven't heard anything, so I'll end the call now. Goodbye."
    max_call_seconds: float = 900.0
    max_call_goodbye: str = "We've reached the time limit for this call. Please call again anytime. Goodbye."
    transfer_number: str | None = None
    caller_id: str | None = None
    transfer_unavailable: str = "I'm sorry, I can't put you through to a person right now. I can help you here."
    consent_withdrawn: str = "Understood. Nothing more of this call will be recorded or transcribed. How can I help?"


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ABBREVIATIONS = ("Dr.", "Mr.", "Mrs.", "Ms.", "St.", "No.", "a.m.", "p.m.")


def split_sentences(buffer: str) -> tuple[list[str], str]:
    """Whole sentences in ``buffer`` and the unfinished rest. An abbreviation (``Dr. Lee``) does not end a
    sentence, so TTS never says "Doctor" and "Lee" as two utterances."""
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(buffer):
        candidate = buffer[start : match.start()].strip()
        if candidate.endswith(_ABBREVIATIONS):
            continue
        if candidate:
            sentences.append(candidate)
        start = match.end()
    return sentences, buffer[start:]


class CallSession:
    def __init__(
        self,
        info: CallInfo,
        ports: VoicePorts,
        playout: Playout,
        *,
        policy: SessionPolicy,
        clock: Callable[[], datetime],
        on_end: Callable[[CallSession], Awaitable[None]],
        on_consent_withdrawn: Callable[[datetime], Awaitable[None]] | None = None,
    ) -> None:
        self.info = info
        self._ports = ports
        self._playout = playout
        self._policy = policy
        self._silence: asyncio.Task[None] | None = None
        self._reprompts_used = 0
        self._clock = clock
        self._on_end = on_end
        self._on_consent_withdrawn = on_consent_withdrawn
        """Told when the caller withdraws consent to recording mid-call (None: nothing was asked)."""
        self.consent_withdrawn_at: datetime | None = None
        self.state = CallState.CONNECTING
        self.transcript: list[Turn] = []
        self.end_reason: str | None = None
        self.barge_ins = 0
        self.turn_timings: list[TurnTiming] = []  # one per caller turn the agent answered (or began to)
        self._stt: SpeechToTextStream | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tools: set[asyncio.Task[Any]] = set()
        self._unstarted_tools: list[ToolCall] = []
        """Tool calls of the reply in flight that wait for its words to be heard before they start."""
        self._tools_parent: otel_context.Context | None = None
        """The trace context (the turn's span) those tool calls' spans belong to."""
        self._turns = 0
        self._reply: asyncio.Task[None] | None = None
        self._spoken: list[tuple[str, str]] = []  # (mark, sentence) of the reply being spoken
        self._reply_complete = False  # the agent finished the reply being spoken (all of it was sent)
        self._caller_words: list[str] = []
        self._hangup_requested: str | None = None
        self._transfer_requested: str | None = None
        self.ended = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------------
    def _move(self, target: CallState) -> None:
        if target is self.state:
            return
        if target not in _LEGAL[self.state]:
            raise IllegalTransition(f"call {self.info.call_sid}: {self.state} -> {target} is not allowed")
        self.state = target

    def _spawn(self, work: Coroutine[Any, Any, Any], into: set[asyncio.Task[Any]] | None = None) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(work)
        owner = self._tasks if into is None else into
        owner.add(task)
        task.add_done_callback(owner.discard)
        task.add_done_callback(self._report_failure)
        return task

    def _report_failure(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "session_task_failed", call_sid=self.info.call_sid, state=self.state.value, error=repr(task.exception())
            )

    async def start(self) -> None:
        self._stt = await self._ports.stt.open(self.info)
        self._spawn(self._listen(self._stt))
        self._move(CallState.GREETING)
        self._reply = self._spawn(self._say_line(self._policy.greeting))
        self._spawn(self._limit_duration())

    async def _say_line(self, text: str, *, then_end: str | None = None) -> None:
        """Speak a fixed line (greeting, re-prompt, goodbye), then listen again or end the call."""
        await self._speak_reply(self._line(text))
        if then_end is not None:
            self._spawn(self.end(then_end))
        else:
            self._listen_again()

    @staticmethod
    async def _line(text: str) -> AsyncIterator[TextDelta]:
        yield TextDelta(text)

    def _listen_again(self) -> None:
        """The agent has finished speaking: wait for the caller, and re-prompt if they stay silent."""
        if self.state in (CallState.GREETING, CallState.THINKING, CallState.SPEAKING):
            self._move(CallState.LISTENING)
        if self.state is CallState.LISTENING:
            self._cancel_silence()
            self._silence = self._spawn(self._on_silence())

    def _cancel_silence(self) -> None:
        if self._silence is not None and self._silence is not asyncio.current_task():
            self._silence.cancel()
        self._silence = None

    async def _on_silence(self) -> None:
        await asyncio.sleep(self._policy.silence_seconds)
        if self.state is not CallState.LISTENING:
            return
        self._silence = None
        self._move(CallState.THINKING)
        if self._reprompts_used < self._policy.reprompts:
            self._reprompts_used += 1
            self._reply = self._spawn(self._say_line(self._policy.reprompt))
        else:
            self._reply = self._spawn(self._say_line(self._policy.silence_goodbye, then_end="silence"))

    async def _limit_duration(self) -> None:
        await asyncio.sleep(self._policy.max_call_seconds)
        await self.close_politely(self._policy.max_call_goodbye, reason="max_duration")

    async def close_politely(self, goodbye: str, *, reason: str) -> None:
        """End the call on our side (time limit, server shutting down): stop whatever is being said, say
        ``goodbye``, then hang up. Returns once the goodbye is under way; ``ended`` is set when done."""
        if self.state in (CallState.ENDING, CallState.ENDED, CallState.TRANSFERRING):
            return
        await self._barge_in_if_speaking()
        self._cancel_silence()
        if self.state is CallState.LISTENING:
            self._move(CallState.THINKING)
        self._reply = self._spawn(self._say_line(goodbye, then_end=reason))

    async def end(self, reason: str) -> None:
        """End the call (stream stopped, socket dropped, agent hung up): stop every task, keep what was
        heard, persist. Safe to call more than once."""
        if self.state in (CallState.ENDING, CallState.ENDED):
            await self.ended.wait()
            return
        self._move(CallState.ENDING)
        self.end_reason = reason
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in self._tasks if t is not current), return_exceptions=True)
        self._close_agent_turn()
        if self._tools:  # bookings under way finish and are recorded before the call is filed
            await asyncio.gather(*self._tools, return_exceptions=True)
        if self._stt is not None:
            await self._stt.close()
        self._move(CallState.ENDED)
        try:
            await self._on_end(self)
        finally:
            self.ended.set()

    # -- inbound -------------------------------------------------------------------------------------
    async def on_audio(self, mulaw: bytes) -> None:
        if self._stt is not None and self.state not in (CallState.ENDING, CallState.ENDED):
            await self._stt.send(mulaw)

    def on_mark(self, name: str) -> None:
        self._playout.on_mark(name)

    async def on_dtmf(self, digit: str) -> None:
        pressed = time.monotonic()
        if self.state in (CallState.ENDING, CallState.ENDED):
            return
        self._cancel_silence()
        await self._barge_in_if_speaking()
        self.transcript.append(Turn("dtmf", digit, self._clock()))
        self._start_reply(TurnTimer("dtmf", pressed))

    async def _listen(self, stt: SpeechToTextStream) -> None:
        async for event in stt.events():
            self._cancel_silence()  # the caller is there
            self._reprompts_used = 0
            if isinstance(event, SpeechStarted):
                await self._barge_in_if_speaking()
            elif isinstance(event, Transcript):
                arrived = time.monotonic()  # a turn's clock starts when the transcript ending it arrives
                if event.text and event.is_final:
                    await self._barge_in_if_speaking()
                    self._caller_words.append(event.text.strip())
                if event.end_of_turn and self._caller_words:
                    said = " ".join(self._caller_words)
                    self._caller_words.clear()
                    if self._withdrawing(said):
                        await self._withdraw_consent()
                        continue
                    self.transcript.append(Turn("caller", said, self._clock()))
                    self._start_reply(TurnTimer("speech", arrived))

    def _withdrawing(self, said: str) -> bool:
        return self._on_consent_withdrawn is not None and self.consent_withdrawn_at is None and withdraws_consent(said)

    async def _withdraw_consent(self) -> None:
        """The caller asked us to stop recording: from this moment nothing more is kept (the request
        itself included; the ledger drops every turn from this time on), and they hear that it was done.
        The agent is not asked: this is not a turn of the booking conversation."""
        assert self._on_consent_withdrawn is not None
        self.consent_withdrawn_at = self._clock()
        log.info("consent_withdrawn", call_sid=self.info.call_sid)
        await self._on_consent_withdrawn(self.consent_withdrawn_at)
        if self.state in (CallState.ENDING, CallState.ENDED, CallState.TRANSFERRING):
            return
        if self.state is CallState.LISTENING:
            self._move(CallState.THINKING)
        self._reply = self._spawn(self._say_line(self._policy.consent_withdrawn))

    async def _barge_in_if_speaking(self) -> None:
        """The caller is talking: stop the reply in flight. Audio still unheard is cleared from Twilio's
        buffer (a barge-in); a reply already fully heard just ends."""
        reply = self._reply
        if reply is None or reply.done():
            return
        fully_heard = self._reply_complete and all(self._playout.was_heard(mark) for mark, _ in self._spoken)
        if fully_heard:
            # The caller heard the whole reply ("One moment while I book that.") before speaking again:
            # what it announced goes ahead; only a reply cut off before it was heard drops its tools.
            self._start_tools()
        self._unstarted_tools = []
        reply.cancel()
        await asyncio.gather(reply, return_exceptions=True)
        if not fully_heard:
            self.barge_ins += 1
            metrics.BARGE_INS.inc()
            log.info("barge_in", call_sid=self.info.call_sid, state=self.state.value)
            await self._playout.clear()
        self._close_agent_turn()
        if self.state in (CallState.THINKING, CallState.SPEAKING, CallState.GREETING):
            self._move(CallState.LISTENING)

    # -- the reply -----------------------------------------------------------------------------------
    def _start_reply(self, timer: TurnTimer) -> None:
        if self.state in (CallState.ENDING, CallState.ENDED, CallState.TRANSFERRING):
            return
        self._move(CallState.THINKING)
        self._reply = self._spawn(self._agent_reply(timer))

    async def _agent_reply(self, timer: TurnTimer) -> None:
        self._turns += 1
        span = _tracer.start_span("turn", attributes={"voicebook.turn.number": self._turns})
        try:
            with trace.use_span(span):
                for _ in range(MAX_TOOL_ROUNDS):
                    calls: list[ToolCall] = []
                    self._unstarted_tools = calls
                    self._tools_parent = otel_context.get_current()  # the tools this round starts are the turn's
                    answer = self._ports.agent.respond(list(self.transcript), self.info)
                    # Closed here when the reply is cancelled (barge-in, hang-up), outer before inner.
                    async with closing(answer) as answer, closing(timer.agent(answer)) as events:
                        await self._speak_reply(events, calls, timer)
                    if not calls:
                        break
                    # Tools run in tasks of their own: a barge-in cancels this reply, never a booking under way.
                    timer.tools_started()
                    runs = self._start_tools()
                    for run in runs:
                        run.add_done_callback(timer.tool_finished)
                    await asyncio.shield(asyncio.gather(*runs))
                    timer.tools_done()
                if self._transfer_requested is not None:
                    await self._transfer(self._transfer_requested)
                elif self._hangup_requested is not None:
                    await self._hang_up(self._hangup_requested)
                else:
                    self._listen_again()
        except asyncio.CancelledError:
            span.set_attribute("voicebook.turn.outcome", "interrupted")  # barge-in, or the call ended
            raise
        finally:  # answered, cut off by the caller, or ended with the call: the turn is filed either way
            timing = timer.finish()
            self.turn_timings.append(timing)
            observe(timing)
            record_turn(span, timing)
            span.end()

    async def _transfer(self, reason: str) -> None:
        """Hand the caller to a person through the telephony API; if that cannot happen, say so and
        carry on."""
        self._transfer_requested = None
        control, number = self._ports.control, self._policy.transfer_number
        if control is None or number is None:
            log.warning("transfer_unavailable", call_sid=self.info.call_sid, reason="not configured")
        else:
            self._move(CallState.TRANSFERRING)
            try:
                await control.transfer(self.info.call_sid, number, caller_id=self._policy.caller_id)
            except Exception as error:  # the caller must hear something, whatever went wrong
                log.error("transfer_failed", call_sid=self.info.call_sid, error=repr(error))
                self.transcript.append(Turn("tool", f"transfer failed: {error}", self._clock(), tool="transfer"))
                self._move(CallState.THINKING)
                await self._speak_reply(self._line(self._policy.transfer_unavailable))
                self._listen_again()
                return
            self.transcript.append(Turn("tool", f"transferred to a person: {reason}", self._clock(), tool="transfer"))
            self._spawn(self.end("transferred"))
            return
        await self._speak_reply(self._line(self._policy.transfer_unavailable))
        self._listen_again()

    async def _hang_up(self, reason: str) -> None:
        """The agent ended the call: hang up through the telephony API when there is one (the stream
        closing ends it too, so a failure here loses nothing)."""
        if self._ports.control is not None:
            try:
                await self._ports.control.hangup(self.info.call_sid)
            except Exception as error:
                log.warning("hangup_failed", call_sid=self.info.call_sid, error=repr(error))
        self._spawn(self.end(reason))

    def _start_tools(self) -> list[asyncio.Task[None]]:
        """Start the reply's tool calls (once: a barge-in may have started them first)."""
        calls, self._unstarted_tools = self._unstarted_tools, []
        return [self._spawn(self._run_tool(call, self._tools_parent), into=self._tools) for call in calls]

    async def _run_tool(self, call: ToolCall, parent: otel_context.Context | None = None) -> None:
        # A child of the turn that asked for it, even when a barge-in is what starts it.
        with _tracer.start_as_current_span(
            "tool", context=parent, attributes={"voicebook.tool.name": call.name}, record_exception=False
        ) as span:
            try:
                result: dict[str, Any] | Any = dict(await self._ports.tools.run(call, self.info))
            except Exception as error:  # a failing tool is told to the agent, not to the caller as silence
                log.exception("tool_failed", call_sid=self.info.call_sid, tool=call.name)
                span.record_exception(error)
                span.set_status(trace.StatusCode.ERROR, type(error).__name__)
                result = {"error": f"{type(error).__name__}: {error}"}
            record_tool_result(span, result)
        self.transcript.append(
            Turn(
                "tool",
                orjson.dumps({"id": call.id, "arguments": dict(call.arguments), "result": result}).decode(),
                self._clock(),
                tool=call.name,
            )
        )

    async def _speak_reply(
        self, events: AsyncIterator[Any], tool_calls: list[ToolCall] | None = None, timer: TurnTimer | None = None
    ) -> None:
        """Speak what the agent streams, sentence by sentence as they complete, a mark after each; then
        wait for the marks and file the turn with only what was heard."""
        self._spoken = []
        self._reply_complete = False
        pending = ""
        async for event in events:
            if isinstance(event, TextDelta):
                sentences, pending = split_sentences(pending + event.text)
                for sentence in sentences:
                    await self._say(sentence, timer)
            elif isinstance(event, ToolCall) and tool_calls is not None:
                tool_calls.append(event)
            elif isinstance(event, EndCall):
                self._hangup_requested = event.reason
            elif isinstance(event, TransferCall):
                self._transfer_requested = event.reason
            elif isinstance(event, Expect) and self._stt is not None:
                self._stt.expect(event.expectation)
        if pending.strip():
            await self._say(pending.strip(), timer)
        self._reply_complete = True
        await self._await_marks()
        self._close_agent_turn()

    async def _say(self, sentence: str, timer: TurnTimer | None = None) -> None:
        if self.state in (CallState.THINKING, CallState.GREETING):
            self._move(CallState.SPEAKING)
        mark = f"{uuid.uuid4().hex[:12]}"
        self._spoken.append((mark, sentence))
        # Closed here when the reply is cancelled (barge-in, hang-up), outer before inner: see ports.closing.
        async with closing(self._ports.tts.synthesize(sentence)) as audio:
            if timer is None or timer.spoke:
                await self._playout.play(audio, mark)
                return
            async with closing(timer.audio(audio, lambda: self._playout.frames_sent)) as timed:
                await self._playout.play(timed, mark)
        timer.utterance_played(self._playout.frames_sent)

    async def _await_marks(self) -> None:
        """Wait until the reply has played (its marks echoed), allowing for the audio still buffered."""
        try:
            async with asyncio.timeout(self._playout.buffered + MARK_SLACK_SECONDS):
                for mark, _ in self._spoken:
                    await self._playout.heard(mark)
        except TimeoutError:
            log.warning("marks_not_echoed", call_sid=self.info.call_sid, marks=len(self._spoken))

    def _close_agent_turn(self) -> None:
        """File the agent's words the caller heard (their marks came back before any clear). The turn is
        truncated when a sentence went unheard or the agent had not finished the reply."""
        if not self._spoken:
            return
        heard = [sentence for mark, sentence in self._spoken if self._playout.was_heard(mark)]
        cut = not self._reply_complete or len(heard) < len(self._spoken)
        self._spoken = []
        if heard or cut:
            self.transcript.append(Turn("agent", " ".join(heard), self._clock(), truncated=cut))
