"""Speech provider fallback (voice_server.fallback): small fake providers for each behaviour, then the real
Deepgram adapters failing against the Deepgram simulator."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from booking.metrics import sample
from integrations.deepgram_stt import DeepgramSTT, deepgram_client
from integrations.deepgram_tts import DeepgramTTS
from integrations.simulators.deepgram import DeepgramSimConfig, create_deepgram_simulator
from integrations.simulators.deepgram_listen import ListenFaults
from integrations.simulators.deepgram_speak import SpeakFaults
from integrations.simulators.deepgram_wire import fault_response
from tests.conftest import cyclic_garbage, garbage_of, serving
from tests.test_deepgram import CALL, tone_synthesize, tone_transcribe, utterance
from voice_server.audio import MULAW_FRAME_BYTES, mulaw_to_pcm16, rms_dbfs, silence
from voice_server.fallback import FallbackSTT, FallbackSTTStream, FallbackTTS
from voice_server.metrics import RecentLag
from voice_server.ports import CallInfo, Expectation, SpeechEvent, SpeechStarted, Transcript


class ProviderDown(RuntimeError):
    pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- text to speech ------------------------------------------------------------------------------


class FakeVoice:
    """Three 160-byte chunks per sentence, each tagged with the voice's byte and its index. ``fail_at``
    raises ``error`` (a ``ProviderDown`` unless given) before chunk k (0: before the first byte);
    ``hang_at`` waits forever before chunk k."""

    def __init__(
        self, tag: int, *, fail_at: int | None = None, hang_at: int | None = None, error: Exception | None = None
    ) -> None:
        self.tag = tag
        self.fail_at = fail_at
        self.hang_at = hang_at
        self.error = error
        self.requests: list[str] = []
        self.closed = 0  # iterators finished, closed or cancelled

    def chunk(self, index: int) -> bytes:
        return bytes([self.tag, index]) * (MULAW_FRAME_BYTES // 2)

    def sentence(self) -> bytes:
        return b"".join(self.chunk(i) for i in range(3))

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        self.requests.append(text)
        try:
            for index in range(3):
                if self.fail_at == index:
                    raise self.error or ProviderDown(f"voice {self.tag} down")
                if self.hang_at == index:
                    await asyncio.Event().wait()
                await asyncio.sleep(0)
                yield self.chunk(index)
        finally:
            self.closed += 1


async def spoken(tts: FallbackTTS, text: str = "Hello there.") -> bytes:
    return b"".join([chunk async for chunk in tts.synthesize(text)])


async def test_a_primary_failing_before_its_first_byte_is_replaced_by_the_fallback_voice() -> None:
    primary, fallback = FakeVoice(1, fail_at=0), FakeVoice(2)
    tts = FallbackTTS(primary, fallback, failure_threshold=1)
    assert await spoken(tts, "Your booking is confirmed.") == fallback.sentence()
    assert fallback.requests == ["Your booking is confirmed."]
    assert primary.closed == 1 and fallback.closed == 1
    assert tts.breaker.is_open


async def test_a_healthy_primary_is_used_and_the_fallback_is_untouched() -> None:
    primary, fallback = FakeVoice(1), FakeVoice(2)
    tts = FallbackTTS(primary, fallback)
    assert await spoken(tts) == primary.sentence()
    assert fallback.requests == [] and not tts.breaker.is_open


async def test_a_primary_failing_mid_sentence_never_repeats_audio_and_the_next_sentence_falls_back() -> None:
    primary, fallback = FakeVoice(1, fail_at=2), FakeVoice(2)
    tts = FallbackTTS(primary, fallback, failure_threshold=1)
    assert await spoken(tts, "First sentence.") == primary.chunk(0) + primary.chunk(1)  # the rest is dropped
    assert fallback.requests == []
    assert await spoken(tts, "Second sentence.") == fallback.sentence()
    assert primary.requests == ["First sentence."]  # the breaker kept the primary out of the way


async def test_the_breaker_keeps_the_primary_out_for_the_cooldown_then_probes_it() -> None:
    clock = Clock()
    primary, fallback = FakeVoice(1, fail_at=0), FakeVoice(2)
    tts = FallbackTTS(primary, fallback, cooldown_s=30.0, clock=clock, failure_threshold=1)
    await spoken(tts, "one")
    clock.now += 29.0
    assert await spoken(tts, "two") == fallback.sentence()
    assert primary.requests == ["one"]

    clock.now += 1.0  # cooled down: the primary is tried again, fails again, and the cooldown restarts
    assert await spoken(tts, "three") == fallback.sentence()
    assert primary.requests == ["one", "three"]
    clock.now += 29.0
    await spoken(tts, "four")
    assert primary.requests == ["one", "three"]

    clock.now += 1.0
    primary.fail_at = None  # the provider is back
    assert await spoken(tts, "five") == primary.sentence()
    assert not tts.breaker.is_open
    assert await spoken(tts, "six") == primary.sentence()
    assert fallback.requests == ["one", "two", "three", "four"]


async def test_while_one_sentence_probes_the_primary_the_others_use_the_fallback() -> None:
    clock = Clock()
    primary, fallback = FakeVoice(1, fail_at=0), FakeVoice(2)
    tts = FallbackTTS(primary, fallback, cooldown_s=30.0, clock=clock, failure_threshold=1)
    await spoken(tts, "one")
    clock.now += 30.0
    primary.fail_at, primary.hang_at = None, 0  # the probe hangs before its first byte
    probe = tts.synthesize("probe")
    probing = asyncio.ensure_future(anext(probe))
    await asyncio.sleep(0.01)
    assert primary.requests == ["one", "probe"]
    assert await spoken(tts, "meanwhile") == fallback.sentence()
    probing.cancel()  # the probe's caller barged in: it told nothing, so the next sentence probes
    await asyncio.gather(probing, return_exceptions=True)
    await probe.aclose()
    primary.hang_at = None
    assert await spoken(tts, "after") == primary.sentence()
    assert not tts.breaker.is_open


async def test_cancelling_the_speech_propagates_and_closes_the_primary_iterator() -> None:
    primary, fallback = FakeVoice(1, hang_at=1), FakeVoice(2)
    tts = FallbackTTS(primary, fallback)
    heard: list[bytes] = []

    async def play() -> None:
        async for chunk in tts.synthesize("A long sentence."):
            heard.append(chunk)

    player = asyncio.ensure_future(play())
    while not heard:  # noqa: ASYNC110 - waits for the first chunk the fake hands out; nothing to await
        await asyncio.sleep(0)
    player.cancel()
    await asyncio.gather(player, return_exceptions=True)
    assert player.cancelled()
    assert heard == [primary.chunk(0)]
    assert primary.closed == 1
    assert fallback.requests == [] and not tts.breaker.is_open  # a barge-in is not a provider failure


async def test_closing_the_speech_early_closes_the_primary_iterator() -> None:
    primary, fallback = FakeVoice(1), FakeVoice(2)
    tts = FallbackTTS(primary, fallback)
    speech = tts.synthesize("Closed after the first chunk.")
    assert await anext(speech) == primary.chunk(0)
    await speech.aclose()  # the player stopped between chunks: the provider's stream must end too
    assert primary.closed == 1 and fallback.requests == [] and not tts.breaker.is_open


async def test_closing_the_speech_early_closes_the_fallback_iterator() -> None:
    primary, fallback = FakeVoice(1, fail_at=0), FakeVoice(2)
    tts = FallbackTTS(primary, fallback)
    speech = tts.synthesize("Closed after the first chunk.")
    assert await anext(speech) == fallback.chunk(0)
    await speech.aclose()
    assert fallback.closed == 1 and primary.closed == 1


async def test_a_primary_that_never_starts_is_given_up_after_the_first_byte_timeout() -> None:
    primary, fallback = FakeVoice(1, hang_at=0), FakeVoice(2)
    tts = FallbackTTS(primary, fallback, first_byte_timeout_s=0.05, failure_threshold=1)
    assert await spoken(tts) == fallback.sentence()
    assert primary.closed == 1 and tts.breaker.is_open


async def test_a_sentence_under_a_first_byte_deadline_leaves_no_cycle_for_the_collector() -> None:
    # The deadline's timer and its callback (a closure that scheduled itself) referred to each other:
    # every sentence spoken left them, the timeout scope and the call's context to the cycle collector,
    # whose passes pause the event loop.
    tts = FallbackTTS(FakeVoice(1), FakeVoice(2), first_byte_timeout_s=5.0)
    await spoken(tts)
    with cyclic_garbage() as found:
        for _ in range(10):
            assert await spoken(tts) == FakeVoice(1).sentence()
    assert garbage_of(found, asyncio.TimerHandle) == 0
    assert garbage_of(found, asyncio.Timeout) == 0


async def test_when_both_voices_fail_the_sentence_ends_quietly() -> None:
    tts = FallbackTTS(FakeVoice(1, fail_at=0), FakeVoice(2, fail_at=1))
    assert await spoken(tts) == FakeVoice(2).chunk(0)  # what the fallback said before it failed
    assert await spoken(tts) == FakeVoice(2).chunk(0)  # and the next sentence is tried all the same


async def test_failures_below_the_threshold_fall_back_for_their_sentence_only() -> None:
    primary, fallback = FakeVoice(1, fail_at=0), FakeVoice(2)
    tts = FallbackTTS(primary, fallback, failure_threshold=3)
    assert await spoken(tts, "one") == fallback.sentence()  # the caller still hears the sentence
    assert await spoken(tts, "two") == fallback.sentence()
    assert primary.requests == ["one", "two"]  # each went to the primary first: the breaker stayed closed
    assert not tts.breaker.is_open and tts.breaker.failures == 2
    await spoken(tts, "three")  # the third in a row opens it
    assert tts.breaker.is_open
    assert await spoken(tts, "four") == fallback.sentence()
    assert primary.requests == ["one", "two", "three"]


async def test_a_success_starts_the_failure_count_again() -> None:
    primary, fallback = FakeVoice(1, fail_at=0), FakeVoice(2)
    tts = FallbackTTS(primary, fallback, failure_threshold=3)
    await spoken(tts, "one")
    await spoken(tts, "two")
    primary.fail_at = None
    assert await spoken(tts, "three") == primary.sentence()
    assert tts.breaker.failures == 0
    primary.fail_at = 0
    await spoken(tts, "four")
    await spoken(tts, "five")
    assert not tts.breaker.is_open  # two in a row since the success, not four
    await spoken(tts, "six")
    assert tts.breaker.is_open


async def test_a_failed_probe_opens_the_breaker_again_at_once() -> None:
    clock = Clock()
    primary, fallback = FakeVoice(1, fail_at=0), FakeVoice(2)
    tts = FallbackTTS(primary, fallback, cooldown_s=30.0, clock=clock, failure_threshold=3)
    for text in ("one", "two", "three"):
        await spoken(tts, text)
    clock.now += 30.0
    assert await spoken(tts, "probe") == fallback.sentence()
    assert tts.breaker.is_open  # one failed probe is enough: the threshold counts only while closed
    await spoken(tts, "after")
    assert primary.requests == ["one", "two", "three", "probe"]


def fallbacks(role: str) -> dict[str, float]:
    return {
        reason: sample("voicebook_speech_fallbacks_total", {"role": role, "reason": reason})
        for reason in ("failed", "breaker_open")
    }


def breaker_open(role: str) -> float:
    return sample("voicebook_speech_breaker_open", {"role": role})


async def test_fallbacks_are_counted_by_reason_and_the_breaker_state_is_a_gauge() -> None:
    clock = Clock()
    primary, fallback = FakeVoice(1, fail_at=0), FakeVoice(2)
    tts = FallbackTTS(primary, fallback, cooldown_s=30.0, clock=clock, failure_threshold=2)
    before = fallbacks("tts")
    assert breaker_open("tts") == 0
    await spoken(tts, "one")
    assert breaker_open("tts") == 0
    await spoken(tts, "two")
    assert breaker_open("tts") == 1
    await spoken(tts, "three")
    await spoken(tts, "four")
    after = fallbacks("tts")
    assert after["failed"] - before["failed"] == 2
    assert after["breaker_open"] - before["breaker_open"] == 2

    clock.now += 30.0
    primary.fail_at = None
    assert await spoken(tts, "five") == primary.sentence()  # the probe closes the breaker
    assert breaker_open("tts") == 0
    assert fallbacks("tts") == after  # a sentence the primary spoke is no fallback

    primary.fail_at = 2
    await spoken(tts, "six")  # failed after some audio: nothing is handed to the fallback
    assert fallbacks("tts") == after


async def test_a_first_byte_timeout_counts_as_a_timeout_of_the_provider() -> None:
    labels = {"provider": "deepgram", "kind": "timeout"}
    before = sample("voicebook_provider_errors_total", labels)
    tts = FallbackTTS(FakeVoice(1, hang_at=0), FakeVoice(2), first_byte_timeout_s=0.05, provider="deepgram")
    assert await spoken(tts) == FakeVoice(2).sentence()
    assert sample("voicebook_provider_errors_total", labels) - before == 1

    # Without a provider nothing is counted; and a timeout the provider raised itself is the adapter's to
    # count (it saw it), not this class's.
    await spoken(FallbackTTS(FakeVoice(1, hang_at=0), FakeVoice(2), first_byte_timeout_s=0.05))
    own_timeout = FakeVoice(1, fail_at=0, error=TimeoutError("read timed out"))
    await spoken(FallbackTTS(own_timeout, FakeVoice(2), first_byte_timeout_s=5.0, provider="deepgram"))
    assert sample("voicebook_provider_errors_total", labels) - before == 1


class LateStart:
    """A voice whose first chunk comes ``delay_s`` after the request; ``block_s`` first holds the whole event
    loop that long (a synchronous stall, as an overloaded process has)."""

    def __init__(self, delay_s: float, *, block_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.block_s = block_s

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        if self.block_s:
            time.sleep(self.block_s)  # noqa: ASYNC251 - the stall is the point
        await asyncio.sleep(self.delay_s)
        yield FakeVoice(1).chunk(0)


def extensions() -> float:
    return sample("voicebook_speech_deadline_extended_total", {"role": "tts"})


async def test_a_deadline_missed_while_the_loop_is_overloaded_is_extended_and_not_blamed() -> None:
    before = extensions()
    overloaded = FallbackTTS(
        LateStart(0.3), FakeVoice(2), first_byte_timeout_s=0.2, failure_threshold=1, loop_lag=lambda since: 0.2
    )
    assert await spoken(overloaded) == FakeVoice(1).chunk(0), "the primary's late answer was waited for"
    assert not overloaded.breaker.is_open and extensions() - before == 1

    # The same answer with a loop that kept up: the provider was late, and it is failed as before.
    calm = FallbackTTS(
        LateStart(0.3), FakeVoice(2), first_byte_timeout_s=0.2, failure_threshold=1, loop_lag=lambda since: 0.01
    )
    assert await spoken(calm) == FakeVoice(2).sentence()
    assert calm.breaker.is_open and extensions() - before == 1


async def test_a_deadline_is_extended_once_only() -> None:
    before = extensions()
    tts = FallbackTTS(
        FakeVoice(1, hang_at=0), FakeVoice(2), first_byte_timeout_s=0.05, failure_threshold=1, loop_lag=lambda _: 0.5
    )
    assert await spoken(tts) == FakeVoice(2).sentence(), "still nothing at the extended deadline: it failed"
    assert tts.breaker.is_open and extensions() - before == 1


async def test_a_deadline_whose_own_timer_fires_late_is_extended_without_a_lag_monitor() -> None:
    before = extensions()
    # The primary stalls the loop for 0.2 s, so the 0.05 s deadline fires at least 0.15 s late.
    tts = FallbackTTS(LateStart(0.01, block_s=0.2), FakeVoice(2), first_byte_timeout_s=0.05, failure_threshold=1)
    assert await spoken(tts) == FakeVoice(1).chunk(0)
    assert not tts.breaker.is_open and extensions() - before == 1


def test_recent_lag_is_the_worst_sample_since_a_time() -> None:
    recent = RecentLag(keep=3)
    assert recent.worst_since(0.0) == 0.0
    for at, lag in ((1.0, 0.5), (2.0, 0.01), (3.0, 0.2), (4.0, 0.03)):
        recent.observe(at, lag)
    assert recent.worst_since(2.5) == 0.2
    assert recent.worst_since(3.5) == 0.03
    assert recent.worst_since(0.0) == 0.2, "only the last three samples are kept"
    assert recent.worst_since(5.0) == 0.0


def test_the_failure_threshold_must_be_at_least_one() -> None:
    try:
        FallbackTTS(FakeVoice(1), FakeVoice(2), failure_threshold=0)
    except ValueError as error:
        assert "failure_threshold" in str(error)
    else:
        raise AssertionError("a threshold of 0 should be refused")


# -- speech to text ------------------------------------------------------------------------------


class FakeStream:
    """A recogniser the test drives: ``emit`` queues an event, ``die`` makes ``events()`` raise."""

    def __init__(self) -> None:
        self.audio = bytearray()
        self.expectations: list[Expectation] = []
        self.closed = False
        self.fail_send = False
        self._events: asyncio.Queue[SpeechEvent | Exception | None] = asyncio.Queue()

    async def send(self, mulaw: bytes) -> None:
        if self.fail_send:
            raise ProviderDown("send failed")
        self.audio += mulaw

    def expect(self, expectation: Expectation) -> None:
        self.expectations.append(expectation)

    async def events(self) -> AsyncIterator[SpeechEvent]:
        while (item := await self._events.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item

    async def close(self) -> None:
        self.closed = True
        self._events.put_nowait(None)

    def emit(self, event: SpeechEvent) -> None:
        self._events.put_nowait(event)

    def die(self) -> None:
        self._events.put_nowait(ProviderDown("stream lost"))


class FakeSTT:
    def __init__(self, *, fail_open: bool = False) -> None:
        self.fail_open = fail_open
        self.gate: asyncio.Event | None = None  # when set, open() waits for it
        self.opened: list[FakeStream] = []
        self.attempts = 0

    async def open(self, call: CallInfo) -> FakeStream:
        self.attempts += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_open:
            raise ProviderDown("refused")
        stream = FakeStream()
        self.opened.append(stream)
        return stream


FIRST = Expectation(kinds=("service",), choices={"service": ("cleaning",)})
SECOND = Expectation(kinds=("yes_no",))
HELLO = Transcript("hello", is_final=True, end_of_turn=True)
AGAIN = Transcript("book a cleaning", is_final=True, end_of_turn=True)


async def next_event(events: AsyncIterator[SpeechEvent]) -> SpeechEvent:
    async with asyncio.timeout(10):  # guards against a hang only
        return await anext(events)


async def test_stt_primary_dying_mid_call_continues_on_the_fallback_in_the_same_iteration() -> None:
    primary, fallback = FakeSTT(), FakeSTT()
    stream = await FallbackSTT(primary, fallback).open(CALL)
    events = stream.events()
    stream.expect(FIRST)
    await stream.send(b"a" * 160)
    primary.opened[0].emit(HELLO)
    assert await next_event(events) == HELLO
    await stream.send(b"b" * 160)  # not yet recognised by the primary

    fallback.gate = asyncio.Event()  # hold the switch open to send audio and a hint during it
    primary.opened[0].die()
    while fallback.attempts == 0:  # noqa: ASYNC110 - waits for the switch to reach the fake's open()
        await asyncio.sleep(0)
    await stream.send(b"c" * 160)
    stream.expect(SECOND)
    fallback.gate.set()
    while not stream.on_fallback:  # noqa: ASYNC110 - the switch finishes in the stream's own task
        await asyncio.sleep(0)
    await stream.send(b"d" * 160)

    replacement = fallback.opened[0]
    replacement.emit(AGAIN)
    assert await next_event(events) == AGAIN
    assert replacement.expectations == [SECOND]
    assert bytes(replacement.audio) == b"b" * 160 + b"c" * 160 + b"d" * 160  # finalised audio is not replayed
    assert primary.opened[0].closed
    await stream.close()
    assert replacement.closed
    assert [e async for e in events] == []


async def test_stt_replays_only_the_newest_audio_within_the_limit() -> None:
    primary, fallback = FakeSTT(), FakeSTT()
    stream = await FallbackSTT(primary, fallback, replay_limit_s=0.1).open(CALL)  # 800 bytes
    for n in range(10):
        await stream.send(bytes([n]) * 160)
    primary.opened[0].die()
    events = stream.events()
    fallback_ready = asyncio.ensure_future(next_event(events))
    while not stream.on_fallback:  # noqa: ASYNC110 - the switch finishes in the stream's own task
        await asyncio.sleep(0)
    fallback.opened[0].emit(HELLO)
    assert await fallback_ready == HELLO
    assert bytes(fallback.opened[0].audio) == b"".join(bytes([n]) * 160 for n in range(5, 10))
    await stream.close()


async def test_stt_primary_failing_to_open_uses_the_fallback_and_the_breaker_spares_the_next_calls() -> None:
    clock = Clock()
    primary, fallback = FakeSTT(fail_open=True), FakeSTT()
    stt = FallbackSTT(primary, fallback, cooldown_s=30.0, clock=clock, failure_threshold=1)
    stream = await stt.open(CALL)
    assert stream.on_fallback and primary.attempts == 1 and len(fallback.opened) == 1
    stream.expect(FIRST)
    await stream.send(b"x" * 160)
    fallback.opened[0].emit(HELLO)
    assert await next_event(stream.events()) == HELLO
    assert fallback.opened[0].expectations == [FIRST] and bytes(fallback.opened[0].audio) == b"x" * 160
    await stream.close()

    second = await stt.open(CALL)
    assert primary.attempts == 1 and second.on_fallback
    await second.close()
    clock.now += 30.0
    primary.fail_open = False
    third = await stt.open(CALL)
    assert primary.attempts == 2 and not third.on_fallback and not stt.breaker.is_open
    await third.close()


async def test_stt_open_failures_below_the_threshold_keep_trying_the_primary_and_are_counted() -> None:
    primary, fallback = FakeSTT(fail_open=True), FakeSTT()
    stt = FallbackSTT(primary, fallback, failure_threshold=2)
    before = fallbacks("stt")
    first = await stt.open(CALL)
    assert first.on_fallback and not stt.breaker.is_open and breaker_open("stt") == 0
    second = await stt.open(CALL)
    assert second.on_fallback and primary.attempts == 2 and stt.breaker.is_open and breaker_open("stt") == 1
    third = await stt.open(CALL)
    assert third.on_fallback and primary.attempts == 2
    after = fallbacks("stt")
    assert after["failed"] - before["failed"] == 2
    assert after["breaker_open"] - before["breaker_open"] == 1
    for stream in (first, second, third):
        await stream.close()


async def test_stt_a_call_switching_mid_call_is_counted_and_one_switch_leaves_the_breaker_closed() -> None:
    primary, fallback = FakeSTT(), FakeSTT()
    stt = FallbackSTT(primary, fallback)
    before = fallbacks("stt")
    stream = await stt.open(CALL)
    primary.opened[0].die()
    while not stream.on_fallback:  # noqa: ASYNC110 - the switch finishes in the stream's own task
        await asyncio.sleep(0)
    assert fallbacks("stt")["failed"] - before["failed"] == 1
    assert not stt.breaker.is_open and stt.breaker.failures == 1
    following = await stt.open(CALL)
    assert not following.on_fallback and len(primary.opened) == 2  # the next call still gets the primary
    assert stt.breaker.failures == 0
    await stream.close()
    await following.close()


async def test_stt_primary_send_failing_switches_with_that_audio_replayed() -> None:
    primary, fallback = FakeSTT(), FakeSTT()
    stream = await FallbackSTT(primary, fallback).open(CALL)
    primary.opened[0].fail_send = True
    await stream.send(b"e" * 160)
    while not stream.on_fallback:  # noqa: ASYNC110 - the switch finishes in the stream's own task
        await asyncio.sleep(0)
    assert bytes(fallback.opened[0].audio) == b"e" * 160
    assert primary.opened[0].closed
    await stream.close()


async def test_stt_closing_during_the_switch_closes_the_fallback_it_opened() -> None:
    primary, fallback = FakeSTT(), FakeSTT()
    stream = await FallbackSTT(primary, fallback).open(CALL)
    fallback.gate = asyncio.Event()
    primary.opened[0].die()
    while fallback.attempts == 0:  # noqa: ASYNC110 - waits for the switch to reach the fake's open()
        await asyncio.sleep(0)
    closing = asyncio.ensure_future(stream.close())
    await asyncio.sleep(0)
    fallback.gate.set()
    await closing
    assert primary.opened[0].closed and fallback.opened[0].closed
    assert [e async for e in stream.events()] == []


async def test_stt_when_the_fallback_fails_too_events_raises_instead_of_hanging() -> None:
    primary, fallback = FakeSTT(), FakeSTT(fail_open=True)
    stream = await FallbackSTT(primary, fallback).open(CALL)
    primary.opened[0].die()
    events = stream.events()
    try:
        await next_event(events)
    except ProviderDown as error:
        assert str(error) == "refused"
    else:
        raise AssertionError("events() should raise the fallback's failure")
    await stream.close()


async def test_stt_a_primary_stream_ending_unasked_also_switches() -> None:
    primary, fallback = FakeSTT(), FakeSTT()
    stream = await FallbackSTT(primary, fallback).open(CALL)
    await primary.opened[0].close()  # the provider hung up on its own
    while not stream.on_fallback:  # noqa: ASYNC110 - the switch finishes in the stream's own task
        await asyncio.sleep(0)
    fallback.opened[0].emit(HELLO)
    assert await next_event(stream.events()) == HELLO
    await stream.close()


# -- the real Deepgram adapters against the simulator --------------------------------------------


class RefuseListenAfterFirst:
    """Wraps the simulator: the first ``/v1/listen`` handshake goes through, every later one is refused
    with a 503 (a Deepgram outage that begins with a dropped socket)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.accepted = 0
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == "/v1/listen":
            if self.accepted >= 1:
                self.refused += 1
                await WebSocket(scope, receive, send).send_denial_response(fault_response(503, 0))
                return
            self.accepted += 1
        await self.app(scope, receive, send)


class ToneRecogniser:
    """The fallback ear: the stand-in recogniser of tests/test_deepgram.py on whole utterances, which
    end after 300 ms of silence."""

    def __init__(self) -> None:
        self.audio = bytearray()
        self.expectations: list[Expectation] = []
        self._utterance = bytearray()
        self._pending = bytearray()
        self._quiet = 0
        self._events: asyncio.Queue[SpeechEvent | None] = asyncio.Queue()

    async def send(self, mulaw: bytes) -> None:
        self.audio += mulaw
        self._pending += mulaw
        while len(self._pending) >= MULAW_FRAME_BYTES:
            frame = bytes(self._pending[:MULAW_FRAME_BYTES])
            del self._pending[:MULAW_FRAME_BYTES]
            voiced = rms_dbfs(mulaw_to_pcm16(frame)) > -45
            if voiced and not self._utterance:
                self._events.put_nowait(SpeechStarted())
            if voiced or self._utterance:
                self._utterance += frame
            self._quiet = 0 if voiced else self._quiet + 1
            if self._utterance and self._quiet >= 15:
                text = tone_transcribe(bytes(self._utterance))
                self._events.put_nowait(Transcript(text, is_final=True, end_of_turn=True))
                self._utterance.clear()

    def expect(self, expectation: Expectation) -> None:
        self.expectations.append(expectation)

    async def events(self) -> AsyncIterator[SpeechEvent]:
        while (event := await self._events.get()) is not None:
            yield event

    async def close(self) -> None:
        self._events.put_nowait(None)


class ToneSTT:
    def __init__(self) -> None:
        self.opened: list[ToneRecogniser] = []

    async def open(self, call: CallInfo) -> ToneRecogniser:
        self.opened.append(ToneRecogniser())
        return self.opened[-1]


async def feed(stream: FallbackSTTStream, audio: bytes) -> None:
    for offset in range(0, len(audio), MULAW_FRAME_BYTES):
        await stream.send(audio[offset : offset + MULAW_FRAME_BYTES])


async def test_deepgram_speak_failing_on_every_request_falls_back_to_the_other_voice() -> None:
    config = DeepgramSimConfig(speak=SpeakFaults(fail=(500,) * 10, retry_after_s=0))
    app = create_deepgram_simulator(config, transcribe=tone_transcribe, synthesize=tone_synthesize)
    fallback = FakeVoice(2)
    async with serving(app, lifespan="off") as url, httpx.AsyncClient() as http:
        primary = DeepgramTTS(deepgram_client(config.api_key, base_url=url, http=http))
        tts = FallbackTTS(primary, fallback, failure_threshold=1)
        first = await spoken(tts, "book a cleaning")
        second = await spoken(tts, "tomorrow at nine")
    assert first == second == fallback.sentence()
    assert fallback.requests == ["book a cleaning", "tomorrow at nine"]
    # the adapter tried twice (one retry) for the first sentence; the breaker spared the second
    assert app.state.deepgram.speak_requests == 2


async def test_deepgram_listen_lost_for_good_switches_to_the_fallback_without_losing_words() -> None:
    config = dataclasses.replace(DeepgramSimConfig(interim_interval_ms=100), listen=ListenFaults(drop_after_results=1))
    simulator = create_deepgram_simulator(config, transcribe=tone_transcribe, synthesize=tone_synthesize)
    app = RefuseListenAfterFirst(simulator)
    fallback = ToneSTT()
    async with serving(app, lifespan="off", ws="websockets-sansio") as url, httpx.AsyncClient() as http:
        client = deepgram_client(config.api_key, base_url=url, http=http)
        primary = DeepgramSTT(client, endpointing_ms=200, reconnect_attempts=2, reconnect_backoff_s=0.01)
        stream = await FallbackSTT(primary, fallback).open(CALL)
        stream.expect(FIRST)
        events = stream.events()
        await feed(stream, utterance("book a cleaning"))
        seen = [await next_event(events)]  # from Deepgram, before its socket drops for good
        while not stream.on_fallback:  # noqa: ASYNC110 - the switch follows the adapter's last refusal
            await asyncio.sleep(0.01)
        await feed(stream, tone_synthesize("tomorrow at nine") + silence(400))
        seen.append(await next_event(events))
        while not (isinstance(seen[-1], Transcript) and seen[-1].end_of_turn):
            seen.append(await next_event(events))
        await stream.close()

    assert simulator.state.deepgram.listen_closes[0] == (1011, "simulated drop")
    assert app.refused == 2  # the adapter's two reconnect attempts, then the switch
    recogniser = fallback.opened[0]
    assert recogniser.expectations == [FIRST]
    assert seen[-1] == Transcript("book a cleaning tomorrow at nine", is_final=True, end_of_turn=True)
