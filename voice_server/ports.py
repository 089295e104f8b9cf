"""The seams between the call engine and the speech and agent providers: small Protocols and the values
that cross them. Deepgram, OpenAI and the offline defaults implement these; tests use scripted ones."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CallInfo:
    """Who is on the line, from the stream's ``start`` message and its custom parameters."""

    call_sid: str
    stream_sid: str
    caller: str
    called: str
    parameters: Mapping[str, str] = field(default_factory=dict)
    serves: frozenset[str] | None = None
    """The resources the number called books (``voice_server.lines``); None: the whole business."""


# -- speech to text ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """The caller started speaking (voice activity), before any words are recognised."""


@dataclass(frozen=True, slots=True)
class Transcript:
    """Recognised words. ``end_of_turn`` marks the end of what the caller wanted to say."""

    text: str
    is_final: bool
    end_of_turn: bool = False


SpeechEvent = SpeechStarted | Transcript


@dataclass(frozen=True, slots=True)
class Expectation:
    """What the agent expects the caller to say next, so a constrained recogniser (a JSGF grammar) can
    listen for just that. ``kinds`` names what may come: ``intent``, ``service``, ``day``, ``time``,
    ``yes_no``, ``digits``, ``name``; ``choices`` lists the words a kind may take where the agent knows
    them (service names, staff names, the caller's own name). A recogniser that cannot use a hint (a
    cloud model) ignores it."""

    kinds: tuple[str, ...]
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


class SpeechToTextStream(Protocol):
    async def send(self, mulaw: bytes) -> None:
        """Caller audio, mu-law 8 kHz, in arrival order."""

    def expect(self, expectation: Expectation) -> None:
        """What the caller is likely to say next (applies from the caller's next utterance)."""

    def events(self) -> AsyncIterator[SpeechEvent]:
        """Recognition events until the stream is closed."""

    async def close(self) -> None: ...


class SpeechToText(Protocol):
    async def open(self, call: CallInfo) -> SpeechToTextStream: ...


# -- the agent -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Turn:
    """One line of the conversation. An agent turn holds only what the caller heard; ``truncated`` says
    the caller cut it short."""

    role: Literal["caller", "agent", "tool", "dtmf"]
    text: str
    at: datetime
    truncated: bool = False
    tool: str | None = None


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class EndCall:
    """The agent wants the call to end once its last words have been heard."""

    reason: str


@dataclass(frozen=True, slots=True)
class TransferCall:
    """The agent wants a person to take over, once its last words have been heard."""

    reason: str


@dataclass(frozen=True, slots=True)
class Expect:
    """The agent tells the recogniser what it expects to hear next (see ``Expectation``)."""

    expectation: Expectation


AgentEvent = TextDelta | ToolCall | EndCall | TransferCall | Expect


class Agent(Protocol):
    def respond(self, conversation: Sequence[Turn], call: CallInfo) -> AsyncIterator[AgentEvent]:
        """The agent's next reply, streamed. When it asks for tools, the session runs them, adds their
        results to the conversation and asks again."""


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool the agent may call: its name, what it is for, and its arguments as JSON Schema (the shape
    OpenAI's ``tools`` parameter takes)."""

    name: str
    description: str
    parameters: Mapping[str, Any]


class ToolRunner(Protocol):
    specs: Sequence[ToolSpec]

    async def run(self, call: ToolCall, info: CallInfo) -> Mapping[str, Any]:
        """Run one tool call; the result is small JSON the agent can read back to the caller."""


# -- text to speech ------------------------------------------------------------------------------


class TextToSpeech(Protocol):
    def synthesize(self, text: str) -> AsyncIterator[bytes]:
        """Speech for ``text`` as mu-law 8 kHz, streamed; cancelling the iteration stops synthesis."""


class CallControl(Protocol):
    """Changes to the live call through the telephony provider's API."""

    async def transfer(self, call_sid: str, to_number: str, *, caller_id: str | None) -> None: ...

    async def hangup(self, call_sid: str) -> None: ...


@dataclass(frozen=True, slots=True)
class VoicePorts:
    """The providers one call uses. Without ``control`` the agent can still end a call (by closing the
    stream) but cannot transfer it."""

    stt: SpeechToText
    agent: Agent
    tts: TextToSpeech
    tools: ToolRunner
    control: CallControl | None = None


def closing(iterator: AsyncIterator[T]) -> contextlib.AbstractAsyncContextManager[AsyncIterator[T]]:
    """Close a provider's stream when its consumer stops, even when cancelled (``aclosing``); the ports
    promise an ``AsyncIterator``, so one that is not a generator has nothing to close.

    A generator left to the garbage collector is closed by asyncio's finalizer in a task of its own, in
    no particular order: an outer one's close then awaits the inner one's while the finalizer closes that
    inner one too, which fails with "aclose(): asynchronous generator is already running" and leaves its
    HTTP response unreleased. Closing in the consumer, outer before inner, avoids both."""
    if isinstance(iterator, AsyncGenerator):
        return contextlib.aclosing(iterator)
    return contextlib.nullcontext(iterator)
