"""The offline voice in worker processes (``integrations.espeak_process``): the same speech as in the
server's own process, rendered elsewhere, many sentences at once, and a dead worker costing only the
sentences it held."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import pytest

from integrations.espeak import Espeak, EspeakError
from integrations.espeak_process import CHUNK_BYTES, EspeakProcessTTS
from voice_server.audio import MULAW_FRAME_BYTES

TEXT = "Thanks for calling. We have Tuesday at ten or Wednesday at two. Which would you like?"


@pytest.fixture
async def voice() -> AsyncIterator[EspeakProcessTTS]:
    tts = EspeakProcessTTS(workers=2)
    try:
        yield tts
    finally:
        await tts.aclose()


async def _speak(tts: EspeakProcessTTS, text: str) -> list[bytes]:
    return [chunk async for chunk in tts.synthesize(text)]


async def test_sentences_are_rendered_in_other_processes(voice: EspeakProcessTTS) -> None:
    workers = await voice.start()
    assert len(workers) == 2 and os.getpid() not in workers
    chunks = await _speak(voice, TEXT)
    assert all(len(chunk) % MULAW_FRAME_BYTES == 0 and 0 < len(chunk) <= CHUNK_BYTES for chunk in chunks)
    here = Espeak().synthesize_mulaw(TEXT)
    # The same speech as the in-process engine, padded to whole frames. Within 1%: espeak's output varies
    # by a few samples from one synthesis to the next.
    assert abs(len(b"".join(chunks)) - len(here)) <= max(2 * MULAW_FRAME_BYTES, 0.01 * len(here))
    assert await _speak(voice, "   ") == []


async def test_many_sentences_at_once_each_come_back_whole(voice: EspeakProcessTTS) -> None:
    texts = ["Yes.", "Your booking is confirmed for Tuesday.", "We are open from nine until five, Monday to Friday."]
    alone = [len(Espeak().synthesize_mulaw(text)) for text in texts]
    together = await asyncio.gather(*(_speak(voice, text) for text in texts * 10))
    for chunks, reference in zip(together, alone * 10, strict=True):
        assert abs(len(b"".join(chunks)) - reference) <= max(2 * MULAW_FRAME_BYTES, 0.02 * reference)


async def test_a_dead_worker_fails_its_sentence_and_the_next_one_is_spoken() -> None:
    tts = EspeakProcessTTS(workers=1)
    try:
        [worker] = await tts.start()
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(EspeakError, match="died"):
            for _ in range(50):  # the pool notices the death on the next job it hands out, or soon after
                await _speak(tts, "Hello.")
                await asyncio.sleep(0.05)
        assert b"".join(await _speak(tts, TEXT)), "a new worker speaks the next sentence"
    finally:
        await tts.aclose()


async def test_closing_stops_the_workers() -> None:
    tts = EspeakProcessTTS(workers=1)
    [worker] = await tts.start()
    await tts.aclose()
    with pytest.raises(ProcessLookupError):
        for _ in range(100):  # reaped by the pool's shutdown
            os.kill(worker, 0)
            await asyncio.sleep(0.05)
    await tts.aclose()  # twice is harmless


def test_at_least_one_worker() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        EspeakProcessTTS(workers=0)
