"""Deepgram adapters driven through the real deepgram SDK against the Deepgram simulator on loopback.

The simulator's recogniser and voice are tiny deterministic stand-ins: each word of a small vocabulary
is a 160 ms tone of its own pitch, and the recogniser names the pitch of each 20 ms of voiced audio.
Partial audio therefore transcribes to the words heard so far, as a real recogniser's would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import numpy as np
import pytest
from deepgram import AsyncDeepgramClient
from deepgram.core.api_error import ApiError
from pydantic import ValidationError

from integrations.deepgram_stt import (
    DeepgramSTT,
    DeepgramSTTStream,
    SpeechProviderError,
    StreamState,
    deepgram_client,
)
from integrations.deepgram_tts import DeepgramTTS
from integrations.http_pool import ShardedTransport
from integrations.simulators.deepgram import DeepgramSimConfig, DeepgramSimState, create_deepgram_simulator
from integrations.simulators.deepgram_listen import NET_0001, ListenFaults, ListenTimeline, parse_listen_options
from integrations.simulators.deepgram_speak import SpeakFaults
from integrations.simulators.deepgram_wire import validate_listen_message
from tests.conftest import serving
from voice_server.audio import MULAW_FRAME_BYTES, mulaw_to_pcm16, pcm16_to_mulaw, rms_dbfs, silence
from voice_server.ports import CallInfo, Expectation, SpeechEvent, SpeechStarted, Transcript
from voice_server.providers import deepgram_http_client

# -- the stand-in voice and ear ------------------------------------------------------------------

VOCABULARY = {
    "book": 400, "a": 520, "cleaning": 640, "tomorrow": 760, "at": 880, "nine": 1000,
    "yes": 1120, "please": 1240, "thanks": 1360, "hello": 1480,
}  # fmt: skip
WORD_MS = 160


def tone_synthesize(text: str) -> bytes:
    """Each word as a tone of its own pitch, one after another without gaps."""
    t = np.arange(WORD_MS * 8) / 8000
    pieces = [(8000 * np.sin(2 * math.pi * VOCABULARY[word] * t)).astype(np.int16) for word in text.lower().split()]
    return pcm16_to_mulaw(np.concatenate(pieces))


def tone_transcribe(mulaw: bytes) -> str:
    """The words whose tones fill at least three 20 ms units in a row."""
    pcm = mulaw_to_pcm16(mulaw)
    names, pitches = list(VOCABULARY), np.array(list(VOCABULARY.values()))
    heard: list[str | None] = []
    for offset in range(0, len(pcm) - 159, 160):
        unit = pcm[offset : offset + 160]
        if rms_dbfs(unit) <= -45:
            heard.append(None)
            continue
        peak = float(np.argmax(np.abs(np.fft.rfft(unit.astype(np.float64))))) * 8000 / 160
        heard.append(names[int(np.argmin(np.abs(pitches - peak)))])
    words: list[str] = []
    run_word, run = None, 0
    for word in [*heard, None]:
        if word == run_word:
            run += 1
            continue
        if run_word is not None and run >= 3:
            words.append(run_word)
        run_word, run = word, 1
    return " ".join(words)


def utterance(text: str, *, lead_ms: int = 200, trail_ms: int = 0) -> bytes:
    return silence(lead_ms) + tone_synthesize(text) + silence(trail_ms)


def test_stand_ins_understand_each_other() -> None:
    assert tone_transcribe(utterance("book a cleaning tomorrow", trail_ms=100)) == "book a cleaning tomorrow"
    assert tone_transcribe(utterance("book a cleaning")[: 200 * 8 + 2 * WORD_MS * 8]) == "book a"


# -- harness -------------------------------------------------------------------------------------

CALL = CallInfo(call_sid="CA0123", stream_sid="MZ0123", caller="+16465550199", called="+12125550100")


@contextlib.asynccontextmanager
async def simulator(
    config: DeepgramSimConfig | None = None,
) -> AsyncIterator[tuple[AsyncDeepgramClient, DeepgramSimState]]:
    config = config or DeepgramSimConfig()
    app = create_deepgram_simulator(config, transcribe=tone_transcribe, synthesize=tone_synthesize)
    async with serving(app, lifespan="off", ws="websockets-sansio") as url, httpx.AsyncClient() as http:
        yield deepgram_client(config.api_key, base_url=url, http=http), app.state.deepgram


async def feed(stream: DeepgramSTTStream, audio: bytes) -> None:
    for offset in range(0, len(audio), MULAW_FRAME_BYTES):
        await stream.send(audio[offset : offset + MULAW_FRAME_BYTES])


async def collect(
    stream: DeepgramSTTStream, until: Callable[[list[SpeechEvent]], bool], events: list[SpeechEvent] | None = None
) -> list[SpeechEvent]:
    """Events until ``until`` holds (the timeout only guards against a hang)."""
    seen = [] if events is None else events
    async with asyncio.timeout(20):
        async for event in stream.events():
            seen.append(event)
            if until(seen):
                break
    return seen


async def eventually(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(20):
        while not condition():  # noqa: ASYNC110 - polls counters the simulator and stream keep; no event to await
            await asyncio.sleep(0.01)


def end_of_turn(events: list[SpeechEvent]) -> bool:
    return any(isinstance(e, Transcript) and e.end_of_turn for e in events)


def finals(events: list[SpeechEvent]) -> list[Transcript]:
    return [e for e in events if isinstance(e, Transcript) and e.is_final]


def interims(events: list[SpeechEvent]) -> list[Transcript]:
    return [e for e in events if isinstance(e, Transcript) and not e.is_final]


FAST_INTERIMS = DeepgramSimConfig(interim_interval_ms=100)


# -- speech to text ------------------------------------------------------------------------------


async def test_a_turn_gives_speech_started_interims_and_a_speech_final_transcript() -> None:
    async with simulator(FAST_INTERIMS) as (client, state):
        stream = await DeepgramSTT(client, endpointing_ms=200, utterance_end_ms=1000).open(CALL)
        await feed(stream, utterance("book a cleaning tomorrow", trail_ms=1500))
        events = await collect(stream, end_of_turn)
        await eventually(lambda: state.listen_sent["UtteranceEnd"] == 1)
        await stream.close()

    assert isinstance(events[0], SpeechStarted)
    assert [e.text for e in interims(events)][-1] == "book a cleaning tomorrow"
    assert "book" in interims(events)[0].text.split()
    assert finals(events) == [Transcript("book a cleaning tomorrow", is_final=True, end_of_turn=True)]
    # speech_final already ended the turn, so the UtteranceEnd that followed adds no second end
    assert [e for e in await drain(stream) if isinstance(e, Transcript) and e.end_of_turn] == []


async def drain(stream: DeepgramSTTStream) -> list[SpeechEvent]:
    return [event async for event in stream.events()]


async def test_without_endpointing_utterance_end_ends_the_turn() -> None:
    async with simulator(FAST_INTERIMS) as (client, state):
        stream = await DeepgramSTT(client, endpointing_ms=None, utterance_end_ms=1000).open(CALL)
        await feed(stream, utterance("yes please", trail_ms=1500))
        events = await collect(stream, end_of_turn)
        await stream.close()

    assert state.listen_sent["UtteranceEnd"] == 1
    assert finals(events) == [
        Transcript("yes please", is_final=True, end_of_turn=False),
        Transcript("", is_final=True, end_of_turn=True),
    ]


async def test_keepalive_holds_a_quiet_stream_open_past_the_idle_limit() -> None:
    config = DeepgramSimConfig(idle_timeout_s=1.0)
    async with simulator(config) as (client, state):
        stream = await DeepgramSTT(client, keepalive_s=0.1).open(CALL)
        await eventually(lambda: state.keepalives >= 15)  # well past the idle limit
        assert state.listen_closes == []
        assert stream.state is StreamState.OPEN and stream.reconnects == 0
        await stream.close()


async def test_a_quiet_stream_without_keepalive_is_closed_with_net_0001_and_reopened() -> None:
    config = DeepgramSimConfig(idle_timeout_s=0.3)
    async with simulator(config) as (client, state):
        stream = await DeepgramSTT(client, keepalive_s=3600).open(CALL)
        await eventually(lambda: stream.reconnects >= 1 and stream.state is StreamState.OPEN)
        assert state.listen_closes[0] == NET_0001
        assert state.keepalives == 0
        await stream.close()


@pytest.mark.parametrize(("chunk_ms", "messages"), [(100, 10), (40, 25), (20, 50)])
async def test_caller_audio_goes_out_in_chunks_of_chunk_ms(chunk_ms: int, messages: int) -> None:
    """Twilio's 20 ms frames are gathered into one WebSocket message per ``chunk_ms`` of audio."""
    async with simulator() as (client, state):
        stream = await DeepgramSTT(client, chunk_ms=chunk_ms).open(CALL)
        await feed(stream, silence(1000))
        await stream.close()
    assert state.audio_bytes == 8000
    assert state.audio_messages == messages


async def test_finalize_and_close_send_a_part_chunk_at_once() -> None:
    async with simulator() as (client, state):
        stream = await DeepgramSTT(client).open(CALL)
        await feed(stream, silence(240))  # two whole 100 ms chunks, and 40 ms gathered
        await stream.finalize()
        await eventually(lambda: state.audio_messages == 3)
        await feed(stream, silence(60))
        await stream.close()
    assert state.audio_messages == 4
    assert state.audio_bytes == 300 * 8


async def test_finalize_flushes_the_pending_words_as_the_end_of_the_turn() -> None:
    async with simulator() as (client, _):
        stream = await DeepgramSTT(client).open(CALL)
        await feed(stream, utterance("yes please"))  # no trailing silence: endpointing cannot fire
        await stream.finalize()
        events = await collect(stream, end_of_turn)
        await stream.close()
    assert finals(events) == [Transcript("yes please", is_final=True, end_of_turn=True)]


async def test_finalize_through_the_sdk_answers_from_finalize() -> None:
    async with (
        simulator() as (client, _),
        client.listen.v1.connect(
            model="nova-3", encoding="mulaw", sample_rate=8000, interim_results="false", endpointing="false"
        ) as socket,
    ):
        await socket.send_media(utterance("hello"))
        await socket.send_finalize()
        async with asyncio.timeout(20):
            async for message in socket:
                if getattr(message, "type", None) == "Results":
                    break
    assert message.is_final and message.from_finalize and not message.speech_final
    assert message.channel.alternatives[0].transcript == "hello"
    assert [w.word for w in message.channel.alternatives[0].words] == ["hello"]


DROP_AFTER_FIRST_RESULT = dataclasses.replace(FAST_INTERIMS, listen=ListenFaults(drop_after_results=1))


async def speak_through_a_drop(client: AsyncDeepgramClient) -> list[SpeechEvent]:
    """One turn spoken across a dropped socket (``DROP_AFTER_FIRST_RESULT``): "book a cleaning" until the
    first interim (then Deepgram drops the socket), the reconnect, "tomorrow at nine", the end of the
    turn; the stream closed. Returns what the stream heard."""
    stream = await DeepgramSTT(client, endpointing_ms=200, reconnect_backoff_s=0.01).open(CALL)
    events: list[SpeechEvent] = []
    await feed(stream, utterance("book a cleaning"))
    await collect(stream, lambda seen: bool(interims(seen)), events)  # the first interim, then the drop
    await eventually(lambda: stream.reconnects == 1 and stream.state is StreamState.OPEN)
    await feed(stream, tone_synthesize("tomorrow at nine") + silence(500))
    await collect(stream, end_of_turn, events)
    await stream.close()
    return events


async def test_a_socket_dropped_mid_utterance_reconnects_and_loses_no_words() -> None:
    async with simulator(DROP_AFTER_FIRST_RESULT) as (client, state):
        events = await speak_through_a_drop(client)

    assert state.listen_closes[0] == (1011, "simulated drop")
    assert state.listen_connections == 2
    assert finals(events) == [Transcript("book a cleaning tomorrow at nine", is_final=True, end_of_turn=True)]
    assert sum(isinstance(e, SpeechStarted) for e in events) == 1  # the replayed start is not reported twice


async def test_a_socket_dropped_after_some_seconds_is_reopened() -> None:
    config = DeepgramSimConfig(listen=ListenFaults(drop_after_s=0.1))
    async with simulator(config) as (client, state):
        stream = await DeepgramSTT(client, reconnect_backoff_s=0.01).open(CALL)
        await eventually(lambda: stream.reconnects == 1 and stream.state is StreamState.OPEN)
        await feed(stream, utterance("thanks", trail_ms=400))
        events = await collect(stream, end_of_turn)
        await stream.close()
    assert state.listen_closes[0] == (1011, "simulated drop")
    assert finals(events) == [Transcript("thanks", is_final=True, end_of_turn=True)]


async def test_close_stream_returns_metadata_for_all_the_audio() -> None:
    audio = utterance("hello", trail_ms=400)
    async with simulator() as (client, state):
        stream = await DeepgramSTT(client).open(CALL)
        await feed(stream, audio)
        await stream.close()
        await stream.close()  # idempotent
    assert stream.metadata is not None
    assert stream.metadata.sha256 == hashlib.sha256(audio).hexdigest()
    assert stream.metadata.duration == pytest.approx(len(audio) / 8000)
    assert stream.state is StreamState.CLOSED
    assert state.listen_closes == [(1000, "")]


async def test_a_malformed_message_is_skipped_and_the_stream_carries_on() -> None:
    config = dataclasses.replace(FAST_INTERIMS, listen=ListenFaults(malformed_after_results=1))
    async with simulator(config) as (client, _):
        stream = await DeepgramSTT(client, endpointing_ms=200).open(CALL)
        await feed(stream, utterance("book a cleaning", trail_ms=400))
        events = await collect(stream, end_of_turn)
        await stream.close()
    assert stream.malformed_messages == 1
    assert finals(events)[-1] == Transcript("book a cleaning", is_final=True, end_of_turn=True)


def _results(**changes: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "Results", "channel_index": [0, 1], "duration": 1.0, "start": 0.0,
        "is_final": True, "speech_final": True, "from_finalize": False,
        "channel": {"alternatives": [{"transcript": "hello", "confidence": 0.9, "words": [
            {"word": "hello", "start": 0.2, "end": 0.6, "confidence": 0.9, "punctuated_word": "Hello"}]}]},
        "metadata": {"request_id": "r", "model_info": {"name": "n", "version": "v", "arch": "a"}, "model_uuid": "u"},
    }  # fmt: skip
    message.update(changes)
    return message


@pytest.mark.parametrize(
    "message",
    [
        _results(extra_field=1),
        _results(is_final=False),  # speech_final without is_final
        _results(start=0.7),  # the word lies before the result's window
        {key: value for key, value in _results().items() if key != "channel"},
        _results(duration="1.0"),
        {"type": "UtteranceEnd", "channel": [0, 1]},
        {"type": "Metadata", "transaction_key": "k", "request_id": "r", "sha256": "nothex", "created": "c",
         "duration": 1.0, "channels": 1},
        {"type": "Nonsense"},
    ],
)  # fmt: skip
def test_the_strict_validator_rejects_malformed_messages(message: dict[str, Any]) -> None:
    validate_listen_message(_results())  # the well-formed original passes
    with pytest.raises(ValidationError):
        validate_listen_message(message)


async def test_a_refused_handshake_is_retried_and_a_bad_key_is_permanent() -> None:
    config = DeepgramSimConfig(listen=ListenFaults(refuse=(429, 503)))
    async with simulator(config) as (client, state):
        stream = await DeepgramSTT(client, reconnect_backoff_s=0.01).open(CALL)
        assert state.listen_refused == 2 and stream.reconnects == 2
        await stream.close()
    async with simulator() as (client, _):
        wrong_key = AsyncDeepgramClient(api_key="wrong", environment=client._client_wrapper.get_environment())
        with pytest.raises(SpeechProviderError) as refused:
            await DeepgramSTT(wrong_key).open(CALL)
    assert refused.value.status == 401 and not refused.value.transient


async def test_the_simulator_refuses_encodings_it_cannot_decode() -> None:
    async with simulator() as (client, _):
        with pytest.raises(ApiError) as refused:
            async with client.listen.v1.connect(model="nova-3", encoding="opus", sample_rate=8000):
                pass
    assert refused.value.status_code == 400


async def test_expectations_become_keyterms_mid_stream() -> None:
    async with simulator() as (client, state):
        stream = await DeepgramSTT(client).open(CALL)
        stream.expect(Expectation(kinds=("service",), choices={"service": ("cleaning", "whitening")}))
        await feed(stream, silence(100))
        await eventually(lambda: state.configures == [["cleaning", "whitening"]])
        await stream.close()


# -- text to speech ------------------------------------------------------------------------------


class RecordedSleeps:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


async def test_tts_streams_raw_mulaw_in_whole_frames() -> None:
    text = "hello book a cleaning tomorrow at nine please"
    async with simulator(DeepgramSimConfig(tts_chunk_bytes=333)) as (client, state):
        chunks = [chunk async for chunk in DeepgramTTS(client).synthesize(text)]
    audio = b"".join(chunks)
    assert audio == tone_synthesize(text)  # container=none: no RIFF header in front
    assert all(len(chunk) % MULAW_FRAME_BYTES == 0 for chunk in chunks[:-1])
    assert len(chunks) > 1 and state.speak_completed == 1


async def test_tts_without_container_none_would_start_with_a_wav_header() -> None:
    async with simulator() as (client, _):
        audio = b"".join(
            [c async for c in client.speak.v1.audio.generate(text="hello", encoding="mulaw", sample_rate=8000)]
        )
    assert audio[:4] == b"RIFF" and audio[8:12] == b"WAVE"
    assert audio[44:] == tone_synthesize("hello")


async def test_cancelling_tts_mid_stream_closes_the_response() -> None:
    config = DeepgramSimConfig(tts_realtime_factor=1.0, tts_chunk_bytes=160)  # slow enough to interrupt
    async with simulator(config) as (client, state):
        speech = DeepgramTTS(client).synthesize("book a cleaning tomorrow at nine please thanks hello")
        first = await anext(speech)
        await speech.aclose()
        await eventually(lambda: state.speak_cancelled == 1)
    assert len(first) == MULAW_FRAME_BYTES and state.speak_completed == 0


async def test_tts_retries_a_429_after_its_retry_after() -> None:
    config = DeepgramSimConfig(speak=SpeakFaults(fail=(429,), retry_after_s=2))
    sleeps = RecordedSleeps()
    async with simulator(config) as (client, state):
        audio = b"".join([c async for c in DeepgramTTS(client, sleep=sleeps).synthesize("yes please")])
    assert audio == tone_synthesize("yes please")
    assert sleeps.waits == [2.0] and state.speak_requests == 2


async def test_tts_gives_up_after_two_server_errors_with_a_transient_error() -> None:
    config = DeepgramSimConfig(speak=SpeakFaults(fail=(500, 500, 500), retry_after_s=0))
    async with simulator(config) as (client, state):
        with pytest.raises(SpeechProviderError) as failed:
            _ = [c async for c in DeepgramTTS(client, sleep=RecordedSleeps()).synthesize("yes")]
    assert failed.value.transient and failed.value.status == 500
    assert state.speak_requests == 2


async def test_tts_does_not_retry_a_permanent_error() -> None:
    async with simulator() as (client, state):
        with pytest.raises(SpeechProviderError) as failed:
            _ = [c async for c in DeepgramTTS(client, sleep=RecordedSleeps()).synthesize("   ")]
    assert not failed.value.transient and failed.value.status == 400
    assert state.speak_requests == 1


async def test_speak_websocket_flush_and_clear() -> None:
    async with (
        simulator() as (client, _),
        client.speak.v1.connect(model="aura-2-thalia-en", encoding="mulaw", sample_rate=8000) as socket,
    ):
        from deepgram.speak.v1.types import SpeakV1Text

        received: list[Any] = []
        await socket.send_text(SpeakV1Text(type="Speak", text="hello"))
        await socket.send_flush()
        async with asyncio.timeout(20):
            async for message in socket:
                received.append(message)
                if getattr(message, "type", None) == "Flushed":
                    break
            await socket.send_clear()
            async for message in socket:
                received.append(message)
                break
            await socket.send_close()
    kinds = [m if isinstance(m, bytes) else m.type for m in received]
    assert kinds[0] == "Metadata" and kinds[-2:] == ["Flushed", "Cleared"]
    assert b"".join(m for m in received if isinstance(m, bytes)) == tone_synthesize("hello")
    assert received[-2].sequence_id == 0


async def test_what_tts_says_stt_hears() -> None:
    async with simulator() as (client, _):
        speech = b"".join([c async for c in DeepgramTTS(client).synthesize("book a cleaning tomorrow")])
        stream = await DeepgramSTT(client).open(CALL)
        await feed(stream, silence(200) + speech + silence(400))
        events = await collect(stream, end_of_turn)
        await stream.close()
    assert finals(events)[-1].text == "book a cleaning tomorrow"


async def test_real_espeak_voice_through_tts_and_the_simulators_voice_detection() -> None:
    """espeak-ng as the simulator's voice: the adapter streams it in whole frames, and the simulator's
    voice detection finds one utterance in real speech (the recogniser stays a stand-in that names it)."""
    from integrations.espeak import Espeak

    voice = Espeak()
    heard: list[int] = []

    def transcribe(mulaw: bytes) -> str:
        heard.append(len(mulaw))
        return "book a cleaning"

    app = create_deepgram_simulator(DeepgramSimConfig(), transcribe=transcribe, synthesize=voice.synthesize_mulaw)
    async with serving(app, lifespan="off", ws="websockets-sansio") as url, httpx.AsyncClient() as http:
        client = deepgram_client(DeepgramSimConfig().api_key, base_url=url, http=http)
        chunks = [chunk async for chunk in DeepgramTTS(client).synthesize("book a cleaning")]
        speech = b"".join(chunks)
        stream = await DeepgramSTT(client, endpointing_ms=500).open(CALL)
        await feed(stream, silence(300) + speech + silence(700))
        events = await collect(stream, end_of_turn)
        await stream.close()
    assert speech[:4] != b"RIFF" and len(speech) > 8000 // 2  # more than half a second of speech
    assert all(len(chunk) % MULAW_FRAME_BYTES == 0 for chunk in chunks[:-1])
    assert isinstance(events[0], SpeechStarted)
    assert finals(events) == [Transcript("book a cleaning", is_final=True, end_of_turn=True)]


# -- connection reuse --------------------------------------------------------------------------------


async def concurrent_syntheses(client: AsyncDeepgramClient, n: int) -> None:
    text = "hello book a cleaning tomorrow at nine please"
    tts = DeepgramTTS(client)

    async def one() -> None:
        assert b"".join([chunk async for chunk in tts.synthesize(text)])

    await asyncio.gather(*(one() for _ in range(n)))


async def connections_opened(http: httpx.AsyncClient, rounds: int, calls: int) -> tuple[int, int]:
    """(connections after the first round, connections opened in the later rounds) when ``calls`` calls
    synthesize a sentence at once, ``rounds`` times, through ``http``'s pool."""
    config = DeepgramSimConfig()
    app = create_deepgram_simulator(config, transcribe=tone_transcribe, synthesize=tone_synthesize)
    transport = http._transport

    def held() -> list[Any]:  # what it holds open: our shards' connections, or httpx's own pool's
        if isinstance(transport, ShardedTransport):
            return transport.connections()
        return list(transport._pool.connections)  # type: ignore[attr-defined]

    async with serving(app, lifespan="off", ws="websockets-sansio") as url:
        client = deepgram_client(config.api_key, base_url=url, http=http)
        await concurrent_syntheses(client, calls)
        first = {id(connection) for connection in held()}
        seen = set(first)
        for _ in range(rounds - 1):
            await concurrent_syntheses(client, calls)
            seen |= {id(connection) for connection in held()}
    return len(first), len(seen - first)


async def test_every_call_speaking_at_once_reuses_its_connection() -> None:
    # The server's client keeps an idle connection for each call speaking at once; httpx's default pool
    # (20 idle) closes the rest after every sentence, so the next sentences pay a new connection (a TLS
    # handshake to the real Deepgram). Both measured here, in the same run.
    calls = 40
    async with deepgram_http_client() as ours:
        kept, opened_again = await connections_opened(ours, rounds=3, calls=calls)
    assert kept > 20 and opened_again == 0, (kept, opened_again)
    async with httpx.AsyncClient() as default:
        kept_default, opened_again_default = await connections_opened(default, rounds=3, calls=calls)
    assert kept_default <= 20 and opened_again_default > 0, (kept_default, opened_again_default)


async def test_requests_and_sockets_do_not_read_the_sdks_package_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's headers are computed once (``deepgram_client``): its own ``get_headers`` reads the
    installed package's metadata on every request and socket, which stalled the event loop under load."""
    reads: list[str] = []
    real_version = importlib.metadata.version

    def counting(name: str) -> str:
        reads.append(name)
        return real_version(name)

    async with simulator(FAST_INTERIMS) as (client, state):
        monkeypatch.setattr(importlib.metadata, "version", counting)
        audio = [chunk async for chunk in DeepgramTTS(client).synthesize("book a cleaning tomorrow")]
        stream = await DeepgramSTT(client).open(CALL)
        await stream.close()
        headers = client._client_wrapper.get_headers()
    assert audio and state.speak_completed == 1 and state.listen_connections == 1
    assert reads == []
    assert headers["Authorization"] == f"Token {DeepgramSimConfig().api_key}"
    assert headers["User-Agent"].startswith("deepgram-sdk/")


async def test_close_stream_counts_a_trailing_part_unit_of_speech_and_not_its_padding() -> None:
    # Driven directly (no socket): 130 ms of loud audio, so the last 10 ms is half a 20 ms unit.
    heard: list[bytes] = []

    def transcribe(window: bytes) -> str:
        heard.append(window)
        return "hello"

    options = parse_listen_options([("encoding", "mulaw"), ("sample_rate", "8000"), ("endpointing", "300")])
    timeline = ListenTimeline(options, DeepgramSimConfig(), transcribe)
    loud = pcm16_to_mulaw(np.tile(np.array([12000, -12000], dtype=np.int16), 520))  # 1,040 bytes
    assert await timeline.push(loud) == []  # still speaking: no final before the silence
    out = await timeline.close_stream()
    assert [message["is_final"] for message, _ in out] == [True]
    assert out[0][0]["channel"]["alternatives"][0]["transcript"] == "hello"
    assert len(heard[-1]) == 1_120  # six whole units and the padded seventh
    assert timeline.position_ms == 140
    assert timeline.audio_bytes == 1_040  # the padding is not audio the client sent
    assert timeline.sha256.hexdigest() == hashlib.sha256(loud).hexdigest()
