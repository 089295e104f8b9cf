"""The offline ear in worker processes (``integrations.sphinx_process``): the same words as decoding in
the server's own process, an event loop left free while utterances decode, and a killed worker costing
a retry rather than the utterance."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import numpy as np
import numpy.typing as npt
import pytest

from integrations.espeak import Espeak
from integrations.sphinx import EndpointSettings, SphinxRecognizer, SphinxSTT, UtteranceRecognizer
from integrations.sphinx_process import SphinxProcessRecognizer
from voice_server.audio import MULAW_FRAME_BYTES, mulaw_to_pcm16, silence
from voice_server.ports import CallInfo, Expectation, SpeechStarted, Transcript

PHRASE = "I would like to make an appointment"


@pytest.fixture(scope="module")
def utterance() -> npt.NDArray[np.int16]:
    return mulaw_to_pcm16(Espeak().synthesize_mulaw(PHRASE))


@pytest.fixture
async def ear() -> AsyncIterator[SphinxProcessRecognizer]:
    recognizer = SphinxProcessRecognizer(workers=2)
    try:
        yield recognizer
    finally:
        await recognizer.aclose()


async def test_utterances_decode_in_other_processes_to_the_same_words(
    ear: SphinxProcessRecognizer, utterance: npt.NDArray[np.int16]
) -> None:
    workers = await ear.start()
    assert workers and os.getpid() not in workers
    here = SphinxRecognizer().recognize_pcm(utterance, None)
    assert here == PHRASE.lower()
    heard = await asyncio.gather(*(ear.recognize_utterance(utterance, None) for _ in range(4)))
    assert heard == [here] * 4
    assert await ear.recognize_utterance(np.zeros(0, np.int16), Expectation(("yes_no",))) == ""


async def _longest_loop_gap(recognizer: UtteranceRecognizer, utterance: npt.NDArray[np.int16]) -> float:
    """The longest the event loop went without a turn while four utterances decoded."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        while not done.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.002)
            gaps.append(time.perf_counter() - started)

    ticker = asyncio.create_task(tick())
    await asyncio.gather(*(recognizer.recognize_utterance(utterance, None) for _ in range(4)))
    done.set()
    await ticker
    return max(gaps)


async def test_decoding_leaves_the_event_loop_free(
    ear: SphinxProcessRecognizer, utterance: npt.NDArray[np.int16]
) -> None:
    """A decode on a thread holds the interpreter lock, so the loop waits for it; in a worker process it
    does not. Compared within one run (no absolute timing): the threads' longest gap is several times
    the processes'."""
    await ear.start()
    threads = SphinxRecognizer()
    threads.warm_up(4)
    on_threads = await _longest_loop_gap(threads, utterance)
    in_processes = await _longest_loop_gap(ear, utterance)
    assert on_threads > 4 * in_processes, (on_threads, in_processes)


async def test_a_killed_worker_costs_a_retry_not_the_utterance(utterance: npt.NDArray[np.int16]) -> None:
    ear = SphinxProcessRecognizer(workers=1)
    try:
        [worker] = await ear.start()
        os.kill(worker, signal.SIGKILL)
        await asyncio.sleep(0.2)  # the pool notices the death and fails what it held
        assert await ear.recognize_utterance(utterance, None) == PHRASE.lower()
    finally:
        await ear.aclose()


async def test_the_stream_hears_through_the_worker_processes(ear: SphinxProcessRecognizer) -> None:
    stt = SphinxSTT(ear, EndpointSettings(silence_ms=500))
    stream = await stt.open(CallInfo(call_sid="CA1", stream_sid="MZ1", caller="+15555550123", called="+12125550100"))
    stream.expect(Expectation(("yes_no",)))
    speech = silence(300) + Espeak().synthesize_mulaw("yes") + silence(900)
    for start in range(0, len(speech), MULAW_FRAME_BYTES):
        await stream.send(speech[start : start + MULAW_FRAME_BYTES])
    await stream.close()
    events = [event async for event in stream.events()]
    assert isinstance(events[0], SpeechStarted)
    assert events[1:] == [Transcript("yes", is_final=True, end_of_turn=True)]
