"""How long each caller turn took to answer, and where the time went.

A turn starts when the caller's turn ends: the end-of-turn transcript (or a key press) reaches the call
session. It is answered when the first audio frame of the reply is handed to the socket towards Twilio.
Everything is taken on the monotonic clock (``time.monotonic``), a handful of readings per turn and none
per audio frame. ``TurnTimer`` collects the readings while the reply runs; ``TurnTiming`` is the record
kept per turn (``CallSession.turn_timings``); ``TURN_HISTOGRAMS`` accumulates the parts over every call
of the process, ready to be exported as Prometheus histograms.

The parts of a turn, all in seconds:

``voice_to_voice_server``
    end-of-turn transcript at the session -> first reply frame sent. The caller hears more: the STT's
    endpointing and final result come before it, the network and Twilio's jitter buffer after it.
``stt_final``
    the caller stopped speaking -> end-of-turn transcript at the session (endpointing, the provider's
    final, the network). The server cannot know when the caller stopped, so this part is filled only by a
    harness that does (``observe_speech_end``: the turn benchmark, which plays the caller in-process).
``agent_first_token``
    the agent was asked -> its first text or tool call (first round of the turn).
``tool``
    the first round of tools started -> the first tool result.
``tts_first_byte``
    synthesis of the reply's first utterance was asked -> its first audio bytes.
``server_overhead``
    ``voice_to_voice_server`` minus the time the reply spent *waiting on a provider* before its first
    frame: awaiting the agent's stream (every round before the first frame, including the tokens that
    complete the first sentence), awaiting tool results, and awaiting the text-to-speech stream for the
    first frame's bytes. What remains is our own work on the turn path: handling the transcript,
    barge-in checks, starting the reply task, sentence splitting, framing, pacing and sending. Work
    done inside a provider's iterator (an adapter building its request, an SDK parsing a response)
    counts as that provider's time. The waits are disjoint parts of the turn (the reply awaits one
    thing at a time), so the overhead is never negative.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

from voice_server.ports import TextDelta, ToolCall

FRAME_BYTES = 160  # one 20 ms mu-law frame: the playout sends a frame as soon as it has its bytes

E = TypeVar("E")

# -- histograms ------------------------------------------------------------------------------------

# Upper bounds in seconds. Latencies span tens of milliseconds to seconds; the server's own overhead is
# judged against a 5 ms target, so its buckets are fine below 10 ms.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8,
    0.9, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0,
)  # fmt: skip
OVERHEAD_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip


class Histogram:
    """A Prometheus-style histogram: fixed upper bounds, cumulative bucket counts, a sum and a count.

    >>> h = Histogram("voicebook_turn_tool_seconds", "Tool time", (0.1, 0.5))
    >>> h.observe(0.05); h.observe(0.3)
    >>> h.cumulative()
    [(0.1, 1), (0.5, 2), (inf, 2)]
    """

    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        bounds = tuple(float(b) for b in buckets)
        if not bounds or list(bounds) != sorted(set(bounds)) or not all(math.isfinite(b) for b in bounds):
            raise ValueError(f"{name}: buckets must be finite, distinct and increasing, got {buckets!r}")
        self.name = name
        self.help = help
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus buckets are "le").
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= bound)`` per bucket, ending with ``(inf, count)``."""
        total = 0
        out: list[tuple[float, int]] = []
        for bound, count in zip((*self.bounds, math.inf), self._counts, strict=True):
            total += count
            out.append((bound, total))
        return out

    def quantile(self, q: float) -> float | None:
        """An estimate of the ``q`` quantile, interpolated linearly inside its bucket the way Prometheus's
        ``histogram_quantile`` does (the first bucket starts at 0; a quantile in the +Inf bucket is
        reported as the highest finite bound). None without observations."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile {q} is outside 0..1")
        if self.count == 0:
            return None
        rank = q * self.count
        lower, below = 0.0, 0
        for bound, cumulative in self.cumulative():
            if cumulative >= rank and cumulative > below:
                if math.isinf(bound):
                    return self.bounds[-1]
                return lower + (bound - lower) * (rank - below) / (cumulative - below)
            lower, below = bound, cumulative
        return self.bounds[-1]

    def reset(self) -> None:
        self._counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0


TurnPart = Literal[
    "voice_to_voice_server", "stt_final", "agent_first_token", "tool", "tts_first_byte", "server_overhead"
]


def turn_histograms() -> dict[TurnPart, Histogram]:
    """A fresh set of the turn histograms (one per part, see the module docstring)."""
    parts: list[tuple[TurnPart, str, tuple[float, ...]]] = [
        ("voice_to_voice_server", "End-of-turn transcript at the session to first reply frame sent", LATENCY_BUCKETS),
        ("stt_final", "Caller stopped speaking to end-of-turn transcript (when a harness knows)", LATENCY_BUCKETS),
        ("agent_first_token", "Agent asked to its first text or tool call", LATENCY_BUCKETS),
        ("tool", "First round of tools started to the first tool result", LATENCY_BUCKETS),
        ("tts_first_byte", "Speech synthesis asked to its first audio bytes", LATENCY_BUCKETS),
        ("server_overhead", "Turn time before the first frame not spent waiting on a provider", OVERHEAD_BUCKETS),
    ]
    return {part: Histogram(f"voicebook_turn_{part}_seconds", text, bounds) for part, text, bounds in parts}


TURN_HISTOGRAMS: Mapping[TurnPart, Histogram] = turn_histograms()
"""Every turn of every call in this process (the call sessions observe into it)."""


# -- one turn --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TurnTiming:
    """One caller turn's readings (monotonic seconds; None when that step did not happen) and the time
    the reply spent waiting on each provider before its first frame."""

    trigger: Literal["speech", "dtmf"]
    end_of_turn_at: float
    agent_asked_at: float | None = None
    agent_first_token_at: float | None = None
    agent_rounds: int = 0
    tools_started_at: float | None = None
    first_tool_result_at: float | None = None
    tools_done_at: float | None = None
    tts_asked_at: float | None = None
    tts_first_byte_at: float | None = None
    first_frame_at: float | None = None
    agent_wait: float = 0.0
    tool_wait: float = 0.0
    tts_wait: float = 0.0
    speech_ended_at: float | None = None

    @property
    def answered(self) -> bool:
        """Whether the reply got as far as sending audio."""
        return self.first_frame_at is not None

    @property
    def voice_to_voice_server(self) -> float | None:
        return None if self.first_frame_at is None else self.first_frame_at - self.end_of_turn_at

    @property
    def stt_final(self) -> float | None:
        return None if self.speech_ended_at is None else self.end_of_turn_at - self.speech_ended_at

    @property
    def agent_first_token(self) -> float | None:
        if self.agent_asked_at is None or self.agent_first_token_at is None:
            return None
        return self.agent_first_token_at - self.agent_asked_at

    @property
    def tool(self) -> float | None:
        if self.tools_started_at is None or self.first_tool_result_at is None:
            return None
        return self.first_tool_result_at - self.tools_started_at

    @property
    def tts_first_byte(self) -> float | None:
        if self.tts_asked_at is None or self.tts_first_byte_at is None:
            return None
        return self.tts_first_byte_at - self.tts_asked_at

    @property
    def server_overhead(self) -> float | None:
        total = self.voice_to_voice_server
        return None if total is None else total - self.agent_wait - self.tool_wait - self.tts_wait

    def parts(self) -> Iterator[tuple[TurnPart, float]]:
        """The parts this turn has, by histogram name."""
        for part in ("voice_to_voice_server", "stt_final", "agent_first_token", "tool", "tts_first_byte"):
            value = getattr(self, part)
            if value is not None:
                yield part, value
        overhead = self.server_overhead
        if overhead is not None:
            yield "server_overhead", overhead


def observe(timing: TurnTiming, histograms: Mapping[TurnPart, Histogram] = TURN_HISTOGRAMS) -> None:
    """Add a finished turn's parts to ``histograms`` (``stt_final`` is left to ``observe_speech_end``);
    a turn of the process (``TURN_HISTOGRAMS``) goes to the Prometheus histograms of /metrics too."""
    for part, value in timing.parts():
        if part != "stt_final":
            histograms[part].observe(value)
    if histograms is TURN_HISTOGRAMS:
        # Imported here: voice_server.metrics builds its histograms from this module's buckets.
        from voice_server.metrics import observe_turn

        observe_turn(timing)


def observe_speech_end(
    timing: TurnTiming, speech_ended_at: float, histograms: Mapping[TurnPart, Histogram] = TURN_HISTOGRAMS
) -> TurnTiming:
    """A harness that knows when the caller stopped speaking (on the same monotonic clock) adds it: the
    turn with ``speech_ended_at``, its ``stt_final`` observed."""
    known = replace(timing, speech_ended_at=speech_ended_at)
    stt = known.stt_final
    if stt is not None:
        histograms["stt_final"].observe(stt)
    return known


class TurnTimer:
    """Collects one turn's readings while its reply runs. The session wraps the agent's stream and the
    first utterance's audio with ``agent`` and ``audio``, brackets tool rounds with ``tools_started`` /
    ``tool_finished`` / ``tools_done``, and calls ``finish`` once when the reply is over (or cut off)."""

    def __init__(
        self,
        trigger: Literal["speech", "dtmf"],
        end_of_turn_at: float,
        *,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._now = now
        self._timing = TurnTiming(trigger, end_of_turn_at)
        self._fields: dict[str, Any] = {}
        self._finished: TurnTiming | None = None
        self._tool_round_began: float | None = None
        self._frames_before: int | None = None  # frames the playout had sent when the first audio began

    def _set_once(self, name: str, value: Any) -> None:
        if name not in self._fields:
            self._fields[name] = value

    def _add(self, name: str, seconds: float) -> None:
        self._fields[name] = self._fields.get(name, 0.0) + seconds

    @property
    def spoke(self) -> bool:
        """Whether the reply's first frame has gone out (after that nothing on the turn path is timed)."""
        return "first_frame_at" in self._fields

    async def agent(self, events: AsyncIterator[E]) -> AsyncIterator[E]:
        """``events`` (one round of the agent's reply), timing the waits for it until the first frame."""
        waiting_since = self._now()
        self._set_once("agent_asked_at", waiting_since)
        self._fields["agent_rounds"] = self._fields.get("agent_rounds", 0) + 1
        async for event in events:
            arrived = self._now()
            if not self.spoke:
                self._add("agent_wait", arrived - waiting_since)
            if self._fields["agent_rounds"] == 1 and isinstance(event, TextDelta | ToolCall):
                self._set_once("agent_first_token_at", arrived)
            yield event
            waiting_since = self._now()
        if not self.spoke:
            self._add("agent_wait", self._now() - waiting_since)

    def tools_started(self) -> None:
        self._tool_round_began = self._now()
        self._set_once("tools_started_at", self._tool_round_began)

    def tool_finished(self, _: object = None) -> None:
        """A tool of the turn returned (usable as a task's done callback)."""
        self._set_once("first_tool_result_at", self._now())

    def tools_done(self) -> None:
        done = self._now()
        self._set_once("tools_done_at", done)
        if not self.spoke and self._tool_round_began is not None:
            self._add("tool_wait", done - self._tool_round_began)
        self._tool_round_began = None

    async def audio(self, audio: AsyncIterator[bytes], frames_sent: Callable[[], int]) -> AsyncIterator[bytes]:
        """The first utterance's audio, unchanged as a byte stream. The first frame's bytes are handed
        over alone: the playout (a fresh framer per utterance) sends that frame before it asks for more,
        so the moment it asks again is when the first frame went out (``frames_sent`` confirms it)."""
        if self.spoke:
            async for chunk in audio:
                yield chunk
            return
        asked = self._now()
        self._set_once("tts_asked_at", asked)
        before = self._frames_before = frames_sent()
        pending = bytearray()
        async for chunk in audio:
            if self.spoke:
                yield chunk
                continue
            if chunk:
                self._set_once("tts_first_byte_at", self._now())
            pending += chunk
            if len(pending) < FRAME_BYTES:
                continue
            self._add("tts_wait", self._now() - asked)
            yield bytes(pending[:FRAME_BYTES])
            if frames_sent() > before:
                self._set_once("first_frame_at", self._now())
            rest = bytes(pending[FRAME_BYTES:])
            pending.clear()
            if rest:
                yield rest
            asked = self._now()  # not spoken yet (the frame did not go out): wait again for bytes
        if pending:  # shorter than a frame: the playout pads and sends it after this stream ends
            self._add("tts_wait", self._now() - asked)
            yield bytes(pending)

    def utterance_played(self, frames_sent: int) -> None:
        """The playout finished an utterance (``frames_sent`` so far): catches a first utterance shorter
        than one frame, whose only frame goes out after its stream has ended."""
        if not self.spoke and self._frames_before is not None and frames_sent > self._frames_before:
            self._set_once("first_frame_at", self._now())

    def finish(self) -> TurnTiming:
        """The turn's record (the same one if called again)."""
        if self._finished is None:
            self._finished = replace(self._timing, **self._fields)
        return self._finished


__all__ = [
    "LATENCY_BUCKETS",
    "OVERHEAD_BUCKETS",
    "TURN_HISTOGRAMS",
    "Histogram",
    "TurnPart",
    "TurnTimer",
    "TurnTiming",
    "observe",
    "observe_speech_end",
    "turn_histograms",
]
