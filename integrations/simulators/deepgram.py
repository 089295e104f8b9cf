"""Deepgram's speech APIs on loopback: live transcription (``ws /v1/listen``), text to speech over REST
(``POST /v1/speak``) and over a WebSocket (``ws /v1/speak``). The recogniser and the voice are injected
(``transcribe(mulaw) -> text``, ``synthesize(text) -> mulaw``), so tests can use tiny deterministic
stand-ins and the offline demo uses pocketsphinx and espeak-ng (``default_simulator``).

Strict where Deepgram's wire format is clear: every message the simulator sends is validated against
an ``extra="forbid"`` schema first (the SDK parses leniently, so a wrong field would otherwise pass
unnoticed), unknown query parameters are refused, and errors use Deepgram's JSON error body. Latency
and faults (refusals, dropped sockets, a malformed message) come from one frozen ``DeepgramSimConfig``;
what happened is counted in ``DeepgramSimState`` (``app.state.deepgram``) for tests and load tests.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.routing import Route, WebSocketRoute

from integrations.simulators.deepgram_listen import ListenEndpoint, ListenFaults
from integrations.simulators.deepgram_speak import SpeakFaults, SpeakRestEndpoint, SpeakSocketEndpoint


@dataclass(frozen=True, slots=True)
class DeepgramSimConfig:
    """Behaviour, latency and faults of one simulator. Durations of audio (``*_ms`` below the listen
    heading) are measured on the audio timeline, not the wall clock, so results do not depend on how
    fast a test streams; latencies (``*_delay_ms``, ``tts_first_byte_ms``) are wall time."""

    api_key: str = "sim-deepgram-key"

    # -- listen ------------------------------------------------------------------------------------
    vad_threshold_dbfs: float = -45.0  # a 20 ms unit louder than this is voice
    interim_interval_ms: int = 500  # audio between interim results while someone speaks
    # Interim results run the recogniser on the audio so far; with pocketsphinx that costs a decode per
    # interim, so load tests turn it off and interims repeat the last text of the segment.
    interim_transcription: bool = True
    no_endpointing_gap_ms: int = 300  # with endpointing=false: silence that closes an is_final segment
    stt_final_delay_ms: int = 0  # injected latency before each final result
    idle_timeout_s: float = 10.0  # no audio and no text message for this long: NET-0001 close
    listen: ListenFaults = field(default_factory=ListenFaults)

    # -- speak -------------------------------------------------------------------------------------
    tts_first_byte_ms: int = 0
    tts_realtime_factor: float = 8.0  # audio streamed this many times faster than real time; 0 = at once
    tts_chunk_bytes: int = 1000  # not a multiple of 160 on purpose: Deepgram's chunks are not frames
    speak: SpeakFaults = field(default_factory=SpeakFaults)


@dataclass
class DeepgramSimState:
    """What the simulator saw, for assertions. Mutated only by the simulator's handlers."""

    listen_connections: int = 0
    listen_refused: int = 0
    listen_closes: list[tuple[int, str]] = field(default_factory=list)  # (code, reason) the server sent
    listen_sent: Counter[str] = field(default_factory=Counter)  # listen messages sent, by type
    keepalives: int = 0
    configures: list[list[str]] = field(default_factory=list)  # keyterms of each accepted Configure
    audio_bytes: int = 0
    audio_messages: int = 0  # binary listen messages received (each a chunk of the caller's audio)
    speak_requests: int = 0
    speak_completed: int = 0
    speak_cancelled: int = 0  # REST streams the client closed before the end
    speak_sockets: int = 0


def create_deepgram_simulator(
    config: DeepgramSimConfig,
    *,
    transcribe: Callable[[bytes], str],
    synthesize: Callable[[str], bytes],
    state: DeepgramSimState | None = None,
) -> Starlette:
    """The simulator app; its ``state.deepgram`` is the ``DeepgramSimState`` it records into.

    ``transcribe`` and ``synthesize`` are called in a worker thread (they may be slow: a pocketsphinx
    decode, an espeak-ng synthesis) and must be safe to call from several threads."""
    sim_state = state if state is not None else DeepgramSimState()
    listen = ListenEndpoint(config, sim_state, transcribe)
    speak_rest = SpeakRestEndpoint(config, sim_state, synthesize)
    speak_socket = SpeakSocketEndpoint(config, sim_state, synthesize)
    app = Starlette(
        routes=[
            WebSocketRoute("/v1/listen", listen),
            Route("/v1/speak", speak_rest.handle, methods=["POST"]),
            WebSocketRoute("/v1/speak", speak_socket),
        ]
    )
    app.state.deepgram = sim_state
    return app


def default_simulator(config: DeepgramSimConfig | None = None) -> Starlette:
    """The simulator with the offline engines: pocketsphinx hears, espeak-ng speaks (imported here, so
    tests with stand-ins never load them). One lock per engine: their decoders are not shared safely
    between threads."""
    from integrations.espeak import Espeak
    from integrations.sphinx import SphinxRecognizer

    recognizer, voice = SphinxRecognizer(), Espeak()
    hearing, speaking = threading.Lock(), threading.Lock()

    def transcribe(mulaw: bytes) -> str:
        with hearing:
            return recognizer.recognize(mulaw)

    def synthesize(text: str) -> bytes:
        with speaking:
            return voice.synthesize_mulaw(text)

    return create_deepgram_simulator(config or DeepgramSimConfig(), transcribe=transcribe, synthesize=synthesize)
