"""Replay a recorded call against a running server, and say how the server's behaviour differs.

The replay plays Twilio: it opens the Media Streams WebSocket (signed like Twilio signs it when a token
is given) and re-sends the recording's inbound side under a fresh CallSid and StreamSid, so the ledger
never mixes the replay with the original call. No voice webhook is posted first: the media endpoint needs
no ledger row to take a stream (it files one when the call ends), and who is calling travels in the
``start`` message's custom parameters, which are re-sent.

Timing follows the caller, not the clock. The server paces its own audio in real time whatever we do,
so a recording replayed purely by its timestamps would have the caller talk over a greeting they had
waited for. Instead the recorded mark echoes are the anchors: a mark echo means "the caller has heard
this far", and every later caller message is sent that long after the matching echo of the replay, the
gap divided by ``speed``. The replay echoes the server's *own* marks, when the audio before them has
played in real time (at once on ``clear``), exactly as Twilio does; recorded mark names are never sent.

What the server did is read back from the ledger, the system of record: the server files the call's
transcript (tool calls and their results included) before it closes the stream, so once the socket is
closed the replayed call's turns and end reason are there. Barge-ins are the ``clear`` messages the
server sends (one per barge-in); the replay counts them on the wire.

``diff_calls`` compares what was recorded with what happened: caller and agent lines, tool calls
(names and arguments), tool results (booking ids, which differ from run to run, are numbered by first
appearance, so "cancel the booking made above" still compares equal), barge-ins and how the call ended.

Usage::

    voicebook replay var/recordings/CA....jsonl --url ws://127.0.0.1:8080/twilio/media --speed 4
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import difflib
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import structlog
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from booking.ledger.calls_repository import CallLedger
from booking.ledger.database import Database
from voice_server.audio import SAMPLE_RATE
from voice_server.recording import RecordedCall

log = structlog.get_logger("voicebook.replay")

CONNECTED = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
FILED_POLL_SECONDS = 0.05


class ReplayError(RuntimeError):
    """The replay could not run (server unreachable, upgrade refused, ledger unreadable)."""


# -- what is compared ----------------------------------------------------------------------------


class TurnLike(Protocol):
    @property
    def role(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def truncated(self) -> bool: ...
    @property
    def tool(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class ToolUse:
    name: str
    arguments: Any
    result: Any


@dataclass(frozen=True, slots=True)
class CallSummary:
    """The parts of a call a replay must reproduce."""

    lines: tuple[tuple[str, str, bool], ...]
    """(role, text, truncated) of each caller, agent and DTMF turn."""
    tools: tuple[ToolUse, ...]
    clears: int
    """``clear`` messages the server sent: one per barge-in."""
    end_reason: str | None

    @classmethod
    def from_turns(cls, turns: Iterable[TurnLike], *, clears: int, end_reason: str | None) -> CallSummary:
        ids = _BookingIds()
        lines: list[tuple[str, str, bool]] = []
        tools: list[ToolUse] = []
        turns = list(turns)
        for turn in turns:  # ids first, so an agent line may mention a booking made after it in the list
            if turn.role == "tool":
                ids.collect(_tool_body(turn.text))
        for turn in turns:
            if turn.role == "tool":
                body = _tool_body(turn.text)
                if isinstance(body, dict) and "result" in body:
                    tools.append(ToolUse(turn.tool or "", ids.mask(body.get("arguments")), ids.mask(body["result"])))
                else:  # a transfer, noted as text
                    tools.append(ToolUse(turn.tool or "", None, ids.mask_text(turn.text)))
            else:
                lines.append((turn.role, ids.mask_text(turn.text), turn.truncated))
        return cls(tuple(lines), tuple(tools), clears, end_reason)


def _tool_body(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


class _BookingIds:
    """Booking ids in order of first appearance, so two runs compare by position, not by value."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def collect(self, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "booking_id" and isinstance(value, str):
                    self.names.setdefault(value, f"<booking {len(self.names) + 1}>")
                else:
                    self.collect(value)
        elif isinstance(node, list):
            for item in node:
                self.collect(item)

    def mask(self, node: Any) -> Any:
        if isinstance(node, dict):
            return {key: self.mask(value) for key, value in node.items()}
        if isinstance(node, list):
            return [self.mask(item) for item in node]
        if isinstance(node, str):
            return self.mask_text(node)
        return node

    def mask_text(self, text: str) -> str:
        for value, name in self.names.items():
            text = text.replace(value, name)
        return text


@dataclass(frozen=True, slots=True)
class Difference:
    kind: str
    """transcript, tool_call, tool_result, barge_ins, end or replay."""
    expected: str
    actual: str

    def __str__(self) -> str:
        return f"{self.kind}: expected {self.expected}; got {self.actual}"


def _line(line: tuple[str, str, bool] | None) -> str:
    if line is None:
        return "nothing"
    role, text, truncated = line
    return f"{role} {text!r}" + (" (cut off)" if truncated else "")


def _call(use: ToolUse | None) -> str:
    if use is None:
        return "no call"
    return f"{use.name}({orjson.dumps(use.arguments, option=orjson.OPT_SORT_KEYS).decode()})"


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _aligned(expected: Sequence[Any], actual: Sequence[Any]) -> Iterable[tuple[str, int | None, int | None]]:
    """Align two sequences (difflib) item by item: (opcode, index in expected, index in actual), an index
    None where one side has nothing to pair."""
    matcher = difflib.SequenceMatcher(a=[_json(item) for item in expected], b=[_json(item) for item in actual])
    for opcode, a0, a1, b0, b1 in matcher.get_opcodes():
        for i in range(max(a1 - a0, b1 - b0)):
            yield opcode, (a0 + i if a0 + i < a1 else None), (b0 + i if b0 + i < b1 else None)


def diff_calls(expected: CallSummary, actual: CallSummary) -> list[Difference]:
    """What ``actual`` did differently from ``expected``; empty when the replay matched."""
    differences: list[Difference] = []
    for opcode, i, j in _aligned(expected.lines, actual.lines):
        if opcode != "equal":
            want = expected.lines[i] if i is not None else None
            got = actual.lines[j] if j is not None else None
            differences.append(Difference("transcript", _line(want), _line(got)))
    calls = [(use.name, use.arguments) for use in expected.tools], [(use.name, use.arguments) for use in actual.tools]
    for opcode, i, j in _aligned(*calls):
        want_use = expected.tools[i] if i is not None else None
        got_use = actual.tools[j] if j is not None else None
        if opcode != "equal":
            differences.append(Difference("tool_call", _call(want_use), _call(got_use)))
        elif want_use is not None and got_use is not None and _json(want_use.result) != _json(got_use.result):
            differences.append(
                Difference("tool_result", f"{want_use.name} -> {_json(want_use.result)}", _json(got_use.result))
            )
    if expected.clears != actual.clears:
        differences.append(Difference("barge_ins", f"{expected.clears} clear(s)", f"{actual.clears} clear(s)"))
    if expected.end_reason is not None and expected.end_reason != actual.end_reason:
        differences.append(Difference("end", repr(expected.end_reason), repr(actual.end_reason)))
    return differences


def recorded_summary(call: RecordedCall) -> CallSummary:
    clears = sum(1 for message in call.outbound if message.event == "clear")
    return CallSummary.from_turns(call.turns, clears=clears, end_reason=call.end_reason)


# -- the plan: what to send, and after what ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    message: dict[str, Any] | str | bytes
    """A JSON message (re-numbered when sent), or a malformed text or binary frame re-sent as it was."""
    anchor: int
    """How many mark echoes the caller had sent before this message (0: none, timed from the start)."""
    delay: float
    """Recorded seconds between that echo (or the start) and this message."""
    recorded_t: float


def _swap_sids(node: Any, swaps: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: _swap_sids(value, swaps) for key, value in node.items() if key != "sequenceNumber"}
    if isinstance(node, list):
        return [_swap_sids(item, swaps) for item in node]
    if isinstance(node, str):
        return swaps.get(node, node)
    return node


def plan_replay(call: RecordedCall, *, call_sid: str, stream_sid: str) -> list[Step]:
    """The recording's inbound side as steps for a call with new SIDs. Recorded mark echoes become
    anchors, not messages: the replay echoes the marks its own server sends."""
    swaps = {call.call_sid: call_sid, call.stream_sid: stream_sid}
    steps: list[Step] = []
    inbound = call.inbound
    origin = next((message.t for message in inbound if message.event == "start"), 0.0)
    anchor, anchor_t = 0, origin
    if not any(message.event == "connected" for message in inbound):
        steps.append(Step(dict(CONNECTED), 0, 0.0, origin))  # recordings begin at start; Twilio says hello first
    for message in inbound:
        delay = max(0.0, message.t - anchor_t)
        if message.text is None:
            steps.append(Step(bytes(message.binary), anchor, delay, message.t))
            continue
        parsed = message.json()
        if parsed is None:
            steps.append(Step(message.text, anchor, delay, message.t))
        elif parsed.get("event") == "mark":
            anchor, anchor_t = anchor + 1, message.t
        else:
            steps.append(Step(_swap_sids(parsed, swaps), anchor, delay, message.t))
    return steps


# -- the replaying client --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    url: str
    """The Media Streams WebSocket, ``ws://HOST:PORT/twilio/media``."""
    public_url: str | None = None
    """The URL Twilio would have been given (what the server checks signatures against); default ``url``."""
    auth_token: str | None = None
    """Sign the upgrade like Twilio when given."""
    speed: float = 1.0
    anchor_timeout: float = 10.0
    """How long to wait for an echo the recording had before going on without it."""
    end_timeout: float = 15.0
    """How long to wait for the server to end and file the call after the last message."""


@dataclass
class ReplayOutcome:
    call_sid: str
    stream_sid: str
    sent: list[tuple[float, float]] = field(default_factory=list)
    """(recorded t, replay t) of every message sent from the plan, both from the start."""
    media_received: int = 0
    marks_received: int = 0
    marks_echoed: int = 0
    clears: int = 0
    stalls: int = 0
    """Anchors the server never reached: it played fewer utterances than the recording heard."""
    unsent: int = 0
    """Steps not sent because the server had closed the stream."""
    closed_by_server: bool = False
    elapsed: float = 0.0


class _Phone:
    """Twilio's side of one replayed stream: plays the server's audio in real time, echoes each mark when
    the audio before it has played, and every pending mark at once on ``clear``."""

    def __init__(self, ws: ClientConnection, outcome: ReplayOutcome) -> None:
        self._ws = ws
        self._outcome = outcome
        self._sequence = 0
        self._play_end = 0.0
        self._echoes: dict[str, asyncio.Task[None]] = {}
        self._echoed = asyncio.Event()
        self._closed = False
        self.echo_times: list[float] = []

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        if isinstance(message, dict):
            if message.get("event") != "connected":
                self._sequence += 1
                message = {"event": message.get("event"), "sequenceNumber": str(self._sequence), **message}
            message = orjson.dumps(message).decode()
        await self._ws.send(message)

    async def echoed(self, count: int, within: float) -> float | None:
        """When the ``count``-th mark echo went out (waiting for it), or None if it did not ``within`` seconds
        or the server closed the stream first."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while len(self.echo_times) < count and not self._closed:
                    self._echoed.clear()
                    await self._echoed.wait()
        return self.echo_times[count - 1] if len(self.echo_times) >= count else None

    async def listen(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for raw in self._ws:
                try:
                    message = orjson.loads(raw)
                    event = message["event"]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    log.warning("replay_unreadable_message")
                    continue
                if event == "media":
                    self._outcome.media_received += 1
                    self._play_end = max(self._play_end, loop.time()) + _seconds_of(message)
                elif event == "mark":
                    self._outcome.marks_received += 1
                    name = str(message.get("mark", {}).get("name", ""))
                    self._echoes[name] = loop.create_task(self._echo_at(name, self._play_end))
                elif event == "clear":
                    self._outcome.clears += 1
                    self._play_end = loop.time()
                    for name, task in list(self._echoes.items()):
                        if not task.done():
                            task.cancel()
                            await self._echo(name)  # Twilio returns cleared marks at once
        except ConnectionClosed:
            pass  # the server hung up (or failed): the replay's end, seen by the sender through ``_closed``
        finally:
            self._closed = True
            self._echoed.set()

    async def _echo_at(self, name: str, at: float) -> None:
        await asyncio.sleep(max(0.0, at - asyncio.get_running_loop().time()))
        await self._echo(name)

    async def _echo(self, name: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.send({"event": "mark", "streamSid": self._outcome.stream_sid, "mark": {"name": name}})
            self._outcome.marks_echoed += 1
            self.echo_times.append(asyncio.get_running_loop().time())
            self._echoed.set()

    async def aclose(self) -> None:
        for task in self._echoes.values():
            task.cancel()
        await asyncio.gather(*self._echoes.values(), return_exceptions=True)


def _seconds_of(message: dict[str, Any]) -> float:
    try:
        return len(base64.b64decode(message["media"]["payload"])) / SAMPLE_RATE
    except (KeyError, TypeError, binascii.Error, ValueError):
        return 0.0


def fresh_sids() -> tuple[str, str]:
    """A new CallSid and StreamSid, shaped like Twilio's (two letters and 32 hex digits)."""
    return "CA" + uuid.uuid4().hex, "MZ" + uuid.uuid4().hex


async def replay_call(call: RecordedCall, options: ReplayOptions) -> ReplayOutcome:
    """Send the recording's inbound side to the server and play Twilio's part until the server ends the
    call (or ``end_timeout`` after the last message, when the replay hangs up itself)."""
    if options.speed <= 0:
        raise ValueError("speed must be positive")
    call_sid, stream_sid = fresh_sids()
    outcome = ReplayOutcome(call_sid, stream_sid)
    steps = plan_replay(call, call_sid=call_sid, stream_sid=stream_sid)
    headers = {}
    if options.auth_token:
        signed = options.public_url or options.url
        headers["X-Twilio-Signature"] = RequestValidator(options.auth_token).compute_signature(signed, {})
    try:
        ws = await connect(options.url, additional_headers=headers, compression=None, open_timeout=10)
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        raise ReplayError(f"cannot open {options.url}: {exc}") from exc
    log.info("replay_started", original=call.call_sid, call_sid=call_sid, steps=len(steps), speed=options.speed)
    phone = _Phone(ws, outcome)
    listener = asyncio.get_running_loop().create_task(phone.listen())
    started = time.monotonic()
    try:
        await _send_plan(phone, steps, options, outcome)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(options.end_timeout):
                await ws.wait_closed()
        outcome.closed_by_server = ws.close_code is not None
    finally:
        outcome.elapsed = time.monotonic() - started
        await ws.close()
        await phone.aclose()
        await asyncio.gather(listener, return_exceptions=True)
    return outcome


async def _send_plan(phone: _Phone, steps: Sequence[Step], options: ReplayOptions, outcome: ReplayOutcome) -> None:
    loop = asyncio.get_running_loop()
    origin = loop.time()
    bases: dict[int, float] = {0: origin}
    previous = origin
    for index, step in enumerate(steps):
        if step.anchor not in bases:
            echoed = await phone.echoed(step.anchor, options.anchor_timeout)
            if echoed is None:
                outcome.stalls += 1
                log.warning("replay_anchor_missed", anchor=step.anchor, recorded_t=step.recorded_t)
            bases[step.anchor] = echoed if echoed is not None else loop.time()
        at = max(previous, bases[step.anchor] + step.delay / options.speed)
        await asyncio.sleep(max(0.0, at - loop.time()))
        previous = at
        try:
            await phone.send(step.message)
        except ConnectionClosed:
            outcome.unsent = len(steps) - index
            return
        outcome.sent.append((step.recorded_t, loop.time() - origin))


# -- the whole run ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayReport:
    original_sid: str
    outcome: ReplayOutcome
    expected: CallSummary
    actual: CallSummary
    differences: list[Difference]

    def render(self) -> str:
        o = self.outcome
        head = (
            f"replayed {self.original_sid} as {o.call_sid} in {o.elapsed:.1f} s: "
            f"{len(o.sent)} messages sent, {o.media_received} media, {o.marks_received} marks and "
            f"{o.clears} clears received, {o.marks_echoed} marks echoed"
        )
        if o.stalls or o.unsent:
            head += f"; {o.stalls} recorded echo(es) never came, {o.unsent} message(s) not sent"
        head += "; the server ended the call" if o.closed_by_server else "; the replay hung up"
        if not self.differences:
            return head + "\nno differences"
        return "\n".join([head, f"{len(self.differences)} difference(s):", *(f"  {d}" for d in self.differences)])


async def filed_call(database: Database, call_sid: str, *, within: float) -> tuple[list[TurnLike], str | None]:
    """The call's transcript and end reason once the server has filed it (waiting up to ``within`` seconds)."""
    calls = CallLedger(database)
    deadline = time.monotonic() + within
    while True:
        record = await calls.get_call(call_sid)
        if record is not None and record.end_reason is not None:
            return list(await calls.transcript(call_sid)), record.end_reason
        if time.monotonic() > deadline:
            return [], None
        await asyncio.sleep(FILED_POLL_SECONDS)


async def replay(call: RecordedCall, options: ReplayOptions, database_url: str) -> ReplayReport:
    """Replay ``call`` and compare it with what the server filed in the ledger at ``database_url``."""
    try:
        database = Database.connect(database_url)  # before the call: a bad URL costs no replay
    except ValueError as exc:  # LedgerConfigurationError
        raise ReplayError(str(exc)) from exc
    try:
        outcome = await replay_call(call, options)
        try:
            turns, end_reason = await filed_call(database, outcome.call_sid, within=options.end_timeout)
        except Exception as exc:  # any driver error: the ledger is not readable from here
            raise ReplayError(f"cannot read the replayed call from the ledger: {exc!r}") from exc
    finally:
        await database.dispose()
    expected = recorded_summary(call)
    actual = CallSummary.from_turns(turns, clears=outcome.clears, end_reason=end_reason)
    differences = diff_calls(expected, actual)
    if end_reason is None:
        differences.append(Difference("replay", "the call filed in the ledger", "no call filed"))
    if outcome.stalls:
        missed = f"{outcome.stalls} never played (the replay went on without them)"
        differences.append(Difference("replay", "every utterance the recorded caller heard", missed))
    return ReplayReport(call.call_sid, outcome, expected, actual, differences)
