"""Scripted speech and agent providers for call-engine tests (the real ones arrive with the speech work).
They implement the ports in voice_server/ports.py and behave like the real thing where it matters: the
recogniser hears energy in the audio, the synthesiser's audio lasts as long as its text takes to say."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from voice_server.audio import mulaw_to_pcm16, rms_dbfs
from voice_server.ports import (
    AgentEvent,
    CallControl,
    CallInfo,
    EndCall,
    Expectation,
    SpeechEvent,
    SpeechStarted,
    TextDelta,
    ToolCall,
    ToolSpec,
    Transcript,
    TransferCall,
    Turn,
    VoicePorts,
)

SPEECH_DBFS = -40.0
END_OF_TURN_SILENT_FRAMES = 10  # 200 ms of silence ends the caller's turn


class EnergyRecogniser:
    """Speech starts when a frame is loud; the turn ends after 200 ms of silence and "recognises" the
    next line of the script."""

    def __init__(self, script: list[str]) -> None:
        self._script = script
        self._events: asyncio.Queue[SpeechEvent | None] = asyncio.Queue()
        self._speaking = False
        self._silent = 0
        self.frames = 0
        self.expectations: list[Expectation] = []

    async def send(self, mulaw: bytes) -> None:
        self.frames += 1
        loud = rms_dbfs(mulaw_to_pcm16(mulaw)) > SPEECH_DBFS
        if loud and not self._speaking:
            self._speaking, self._silent = True, 0
            await self._events.put(SpeechStarted())
        elif not loud and self._speaking:
            self._silent += 1
            if self._silent >= END_OF_TURN_SILENT_FRAMES:
                self._speaking = False
                text = self._script.pop(0) if self._script else "(unclear)"
                await self._events.put(Transcript(text, is_final=True, end_of_turn=True))

    def expect(self, expectation: Expectation) -> None:
        self.expectations.append(expectation)

    async def events(self) -> AsyncIterator[SpeechEvent]:
        while (event := await self._events.get()) is not None:
            yield event

    async def close(self) -> None:
        await self._events.put(None)


@dataclass
class ScriptedSTT:
    script: list[str]
    opened: list[EnergyRecogniser] = field(default_factory=list)

    async def open(self, call: CallInfo) -> EnergyRecogniser:
        recogniser = EnergyRecogniser(list(self.script))
        self.opened.append(recogniser)
        return recogniser


class ScriptedAgent:
    """Echoes the caller; "book" asks for the booking tool; "story" talks for a long time; "bye" ends."""

    async def respond(self, conversation: Sequence[Turn], call: CallInfo) -> AsyncIterator[AgentEvent]:
        last = conversation[-1]
        if last.role == "tool":
            yield TextDelta("You are booked. ")
            yield TextDelta("Anything else?")
            return
        if last.role == "dtmf":
            yield TextDelta(f"You pressed {last.text}.")
            return
        text = last.text.lower()
        if "book" in text:
            yield TextDelta("One moment while I book that.")
            yield ToolCall("call-1", "book_appointment", {"service": "checkup"})
        elif "story" in text:
            for n in range(1, 9):
                yield TextDelta(f"This is sentence number {n} of a long story. ")
        elif "person" in text:
            yield TextDelta("Let me put you through to a person.")
            yield TransferCall("the caller asked for a person")
        elif "bye" in text:
            yield TextDelta("Goodbye, Dr. Lee will see you soon.")
            yield EndCall("caller said goodbye")
        else:
            yield TextDelta(f"You said {last.text}. ")
            yield TextDelta("Is there anything else?")


class ScriptedTTS:
    """10 ms of audio per character, as a few chunks (a mid-level tone, so it is not silence).
    ``closed_by`` names, for every stream that ended, what ran its end: the consumer's own task (a
    ``coroutine``), or asyncio's finalizer for a stream left to the garbage collector
    (``async_generator_athrow``)."""

    def __init__(self) -> None:
        self.closed_by: list[str] = []

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        total = len(text) * 80
        try:
            for start in range(0, total, 800):
                await asyncio.sleep(0)
                yield bytes([0x30]) * min(800, total - start)
        finally:
            task = asyncio.current_task()
            self.closed_by.append(type(task.get_coro()).__name__ if task is not None else "no task")


@dataclass
class SlowTools:
    seconds: float = 0.3
    finished: list[str] = field(default_factory=list)
    specs: Sequence[ToolSpec] = ()
    ran: asyncio.Event = field(default_factory=asyncio.Event)  # set when a tool call has finished

    async def run(self, call: ToolCall, info: CallInfo) -> Mapping[str, Any]:
        await asyncio.sleep(self.seconds)
        self.finished.append(call.name)
        self.ran.set()
        return {"booked": True, "booking_id": "bk-test"}


def scripted_ports(script: list[str], tools: SlowTools | None = None, control: CallControl | None = None) -> VoicePorts:
    return VoicePorts(
        stt=ScriptedSTT(script), agent=ScriptedAgent(), tts=ScriptedTTS(), tools=tools or SlowTools(), control=control
    )


__all__ = ["EndCall", "ScriptedAgent", "ScriptedSTT", "ScriptedTTS", "SlowTools", "scripted_ports"]
