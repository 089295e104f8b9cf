"""Offline speech-to-text: CMU pocketsphinx 5 with a JSGF grammar per dialog state.

The packaged en-US acoustic model was trained on 16 kHz speech. Twilio carries 8 kHz mu-law, so each
utterance is decoded from mu-law, upsampled to 16 kHz and decoded under a grammar built from what the
dialog expects (``integrations.jsgf``). Measured on the 56 espeak phrases of
tests/test_offline_speech.py sent through the phone codec: 79% came back word for word upsampled to
16 kHz, 5% with the decoder configured for 8 kHz (samprate 8000, nfft 256, upperf 3500), whose filter
bank no longer matches the model's training.

What else mattered, measured the same way:
- ``bestpath`` off: the lattice best path of a looping grammar returned partial hypotheses and took
  seconds per utterance; the grammar's own Viterbi path is right more often and takes ~0.1 s.
- a faint noise floor added after upsampling (52% without): digital silence (mu-law 0xFF decodes to
  exactly 0) and the empty band above 4 kHz are unlike anything the model heard in training;
- silence trimmed to a short margin around the speech, so long pauses do not turn into short words.
- a lower language weight, word insertion penalty and a higher silence probability together (see
  ``SphinxSettings``); accuracy varies by a few phrases from run to run, as espeak's output does.

A decoder takes ~0.15 s to create, so decoders are pooled and each keeps the searches (compiled
grammars) it has already built. ``SphinxSTT`` streams: it finds utterances with a voice activity
detector on the 20 ms frames and hands each whole utterance to an :class:`UtteranceRecognizer`. The
binding holds the interpreter lock while it decodes (0.34 s for a 2.5 s utterance under the broad
grammar), so the server decodes in worker processes (``integrations.sphinx_process``); a
:class:`SphinxRecognizer` decodes on threads of the calling process, for tools and tests.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import threading
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
import pocketsphinx  # type: ignore[import-untyped]  # no type information shipped

from integrations.jsgf import build_grammar
from voice_server.audio import SAMPLE_RATE, Framer, StreamResampler, mulaw_to_pcm16, rms_dbfs
from voice_server.ports import CallInfo, Expectation, SpeechEvent, SpeechStarted, Transcript

DECODER_RATE = 16000  # the rate the packaged acoustic model was trained at


@dataclass(frozen=True, slots=True)
class SphinxSettings:
    """Decoder tuning. The defaults were chosen by measuring phrase accuracy on 8 kHz mu-law speech."""

    # Below pocketsphinx's defaults (6.5, 0.65, 0.005): let the acoustics rather than the grammar
    # choose, insert fewer words, allow more silence. Each alone measured within the noise; all three
    # back at their defaults lost about a tenth of the phrases.
    language_weight: float = 1.0
    word_insertion_penalty: float = 0.05
    silence_probability: float = 0.1
    # Active HMMs per frame: bounds the search (and the CPU of a broad grammar) at little cost in accuracy.
    max_hmms_per_frame: int = 3000
    noise_floor: float = 100.0  # standard deviation, in int16 units (about -50 dBFS), of the floor
    # Silence kept around the speech by ``trim_silence``, in 10 ms frames: enough for a weak first or
    # last consonant (5 to 30 frames measured alike on espeak, whose consonants are not weak).
    lead_frames: int = 10
    tail_frames: int = 15
    max_decoders: int = 4  # decoders alive at once; more callers wait for one to be free
    searches_per_decoder: int = 16  # compiled grammars each decoder keeps for reuse


_TRIM_FRAME = SAMPLE_RATE // 100  # 10 ms at 8 kHz
_SPEECH_FLOOR_DBFS = -50.0  # quieter than this is never speech
_SPEECH_BELOW_PEAK_DB = 35.0  # nor is anything this far below the utterance's loudest frame


def trim_silence(pcm: npt.NDArray[np.int16], lead_frames: int = 10, tail_frames: int = 15) -> npt.NDArray[np.int16]:
    """The span of 8 kHz ``pcm`` that holds speech, with ``lead_frames``/``tail_frames`` of 10 ms kept
    either side; empty if nothing rises above the silence threshold."""
    n_frames = len(pcm) // _TRIM_FRAME
    if n_frames == 0:
        return pcm[:0]
    frames = pcm[: n_frames * _TRIM_FRAME].astype(np.float64).reshape(n_frames, _TRIM_FRAME)
    power = np.mean(np.square(frames), axis=1) / 32768.0**2
    dbfs = 10.0 * np.log10(power + 1e-12)
    threshold = max(_SPEECH_FLOOR_DBFS, float(dbfs.max()) - _SPEECH_BELOW_PEAK_DB)
    loud = np.flatnonzero(dbfs > threshold)
    if loud.size == 0:
        return pcm[:0]
    start = max(0, int(loud[0]) - lead_frames) * _TRIM_FRAME
    end = min(n_frames, int(loud[-1]) + 1 + tail_frames) * _TRIM_FRAME
    return pcm[start:end]


def condition(pcm: npt.NDArray[np.int16], noise_floor: float) -> bytes:
    """8 kHz speech as the decoder wants it: 16 kHz int16 bytes with a faint, reproducible noise floor."""
    resampler = StreamResampler(SAMPLE_RATE, DECODER_RATE)
    upsampled = np.concatenate([resampler.process(pcm), resampler.flush()]).astype(np.float64)
    # A fixed seed: the same audio always gives the same transcript.
    upsampled += np.random.default_rng(0).normal(0.0, noise_floor, upsampled.size)
    return np.clip(upsampled, -32768, 32767).astype(np.int16).tobytes()


class _PooledDecoder:
    """One pocketsphinx decoder and the grammars compiled into it, least recently used first."""

    def __init__(self, settings: SphinxSettings) -> None:
        config = pocketsphinx.Config(lm=None, loglevel="FATAL")
        config["samprate"] = DECODER_RATE
        config.set_float("lw", settings.language_weight)
        config.set_float("wip", settings.word_insertion_penalty)
        config.set_float("silprob", settings.silence_probability)
        config["maxhmmpf"] = settings.max_hmms_per_frame
        # The best path through the word lattice adds nothing a grammar's Viterbi path lacks, and
        # building that lattice for a looping grammar took seconds per utterance (0.1 s without).
        config["bestpath"] = False
        self.decoder = pocketsphinx.Decoder(config)
        self._searches: OrderedDict[str, None] = OrderedDict()
        self._limit = settings.searches_per_decoder

    def activate(self, grammar: str) -> None:
        name = "g" + hashlib.blake2b(grammar.encode(), digest_size=8).hexdigest()
        if name in self._searches:
            self._searches.move_to_end(name)
        else:
            self.decoder.add_jsgf_string(name, grammar)
            self._searches[name] = None
            if len(self._searches) > self._limit:
                oldest, _ = self._searches.popitem(last=False)
                self.decoder.remove_search(oldest)
        self.decoder.activate_search(name)

    def decode(self, audio: bytes) -> str:
        self.decoder.start_utt()
        self.decoder.process_raw(audio, full_utt=True)
        self.decoder.end_utt()
        hypothesis = self.decoder.hyp()
        return str(hypothesis.hypstr) if hypothesis is not None else ""


class _DecoderPool:
    """At most ``size`` decoders; a thread takes one for a whole utterance and gives it back."""

    def __init__(self, settings: SphinxSettings) -> None:
        self._settings = settings
        self._idle: list[_PooledDecoder] = []
        self._created = 0
        self._available = threading.Condition()

    @contextmanager
    def decoder(self) -> Iterator[_PooledDecoder]:
        with self._available:
            while not self._idle and self._created >= self._settings.max_decoders:
                self._available.wait()
            pooled = self._idle.pop() if self._idle else None
            if pooled is None:
                self._created += 1
        if pooled is None:
            try:
                pooled = _PooledDecoder(self._settings)  # slow: built outside the lock
            except BaseException:
                with self._available:
                    self._created -= 1
                    self._available.notify()
                raise
        try:
            yield pooled
        finally:
            with self._available:
                self._idle.append(pooled)
                self._available.notify()


class UtteranceRecognizer(Protocol):
    async def recognize_utterance(self, pcm: npt.NDArray[np.int16], expectation: Expectation | None) -> str:
        """The words in one utterance of 8 kHz int16 samples, or "" when nothing was recognised."""


class SphinxRecognizer:
    """Whole-utterance recognition, synchronous and thread-safe:
    ``SphinxRecognizer().recognize(mulaw, Expectation(("yes_no",)))`` -> ``"yes"``.

    Blocks for the decode (a few percent of the audio's duration); call it from a worker thread in
    async code.
    """

    def __init__(self, settings: SphinxSettings | None = None) -> None:
        self.settings = settings or SphinxSettings()
        self._pool = _DecoderPool(self.settings)

    def recognize(self, mulaw: bytes, expectation: Expectation | None = None) -> str:
        """The words in one utterance of 8 kHz mu-law, or "" when nothing was recognised."""
        return self.recognize_pcm(mulaw_to_pcm16(mulaw), expectation)

    def recognize_pcm(self, pcm: npt.NDArray[np.int16], expectation: Expectation | None = None) -> str:
        """As ``recognize``, from 8 kHz int16 samples."""
        speech = trim_silence(pcm, self.settings.lead_frames, self.settings.tail_frames)
        if speech.size == 0:
            return ""
        audio = condition(speech, self.settings.noise_floor)
        grammar = build_grammar(expectation)
        with self._pool.decoder() as pooled:
            pooled.activate(grammar)
            return pooled.decode(audio)

    async def recognize_utterance(self, pcm: npt.NDArray[np.int16], expectation: Expectation | None) -> str:
        """``recognize_pcm`` on a worker thread (which the decode holds the interpreter lock against)."""
        return await asyncio.to_thread(self.recognize_pcm, pcm, expectation)

    def warm_up(self, count: int = 1) -> None:
        """Create ``count`` decoders now (with the broad grammar) rather than on the first utterance."""
        count = min(count, self.settings.max_decoders)
        grammar = build_grammar(None)
        with ExitStack() as stack:
            for _ in range(count):
                stack.enter_context(self._pool.decoder()).activate(grammar)


# -- streaming ---------------------------------------------------------------------------------------


class StreamState(enum.Enum):
    """A stream listens for speech, follows an utterance until its silence, and ends once closed."""

    LISTENING = "listening"
    SPEAKING = "speaking"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class EndpointSettings:
    """Where an utterance starts and ends, in 20 ms frames of caller audio."""

    silence_ms: int = 500  # this much silence after speech ends the caller's turn
    onset_ms: int = 60  # speech this long (without a gap) starts an utterance: a click does not
    preroll_ms: int = 300  # audio kept from before the onset, so the first consonant is not lost
    max_utterance_ms: int = 15_000  # a caller talking over a noisy line still gets an answer
    vad_mode: int = 0  # pocketsphinx Vad aggressiveness 0 (loose) ..= 3 (strict)
    min_dbfs: float = -55.0  # quieter frames are silence whatever the Vad says


_FRAME_MS = 20


class SphinxSTT:
    """The offline ``SpeechToText``. One recogniser (and its decoders) serves every call."""

    def __init__(self, recognizer: UtteranceRecognizer | None = None, endpoint: EndpointSettings | None = None) -> None:
        self.recognizer = recognizer or SphinxRecognizer()
        self.endpoint = endpoint or EndpointSettings()

    async def open(self, call: CallInfo) -> SphinxStream:
        return SphinxStream(self.recognizer, self.endpoint)


class SphinxStream:
    """Voice activity detection on the event loop (a C call per 20 ms frame, about a microsecond), and
    one decode per utterance by the recogniser, in order, by a task the stream owns.

    Events: ``SpeechStarted`` when an utterance begins, then ``Transcript(text, is_final=True,
    end_of_turn=True)`` once it has ended and been recognised; nothing when nothing was recognised.
    """

    def __init__(self, recognizer: UtteranceRecognizer, endpoint: EndpointSettings) -> None:
        self._recognizer = recognizer
        self._endpoint = endpoint
        self._vad = pocketsphinx.Vad(endpoint.vad_mode, SAMPLE_RATE, _FRAME_MS / 1000)
        self._framer = Framer()
        self.state = StreamState.LISTENING
        self._expectation: Expectation | None = None
        self._preroll: deque[npt.NDArray[np.int16]] = deque(maxlen=max(1, endpoint.preroll_ms // _FRAME_MS))
        self._utterance: list[npt.NDArray[np.int16]] = []
        self._utterance_expectation: Expectation | None = None
        self._voiced_run = 0  # consecutive speech frames while listening
        self._silent_run = 0  # consecutive silent frames while speaking
        self._events: asyncio.Queue[SpeechEvent | None] = asyncio.Queue()
        self._utterances: asyncio.Queue[tuple[npt.NDArray[np.int16], Expectation | None] | None] = asyncio.Queue()
        self._decoder_task = asyncio.create_task(self._decode_utterances())

    async def send(self, mulaw: bytes) -> None:
        if self.state is StreamState.CLOSED:
            return  # audio racing a hang-up has nobody left to hear it
        for frame in self._framer.push(mulaw):
            self._on_frame(mulaw_to_pcm16(frame))

    def expect(self, expectation: Expectation) -> None:
        self._expectation = expectation

    async def events(self) -> AsyncIterator[SpeechEvent]:
        while (event := await self._events.get()) is not None:
            yield event

    async def close(self) -> None:
        """Recognise what the caller was still saying, wait for pending decodes, then end ``events``."""
        if self.state is StreamState.CLOSED:
            return
        if self.state is StreamState.SPEAKING:
            self._end_utterance()
        self.state = StreamState.CLOSED
        self._utterances.put_nowait(None)
        try:
            await self._decoder_task
        finally:
            self._events.put_nowait(None)

    def _is_speech(self, frame: npt.NDArray[np.int16]) -> bool:
        return rms_dbfs(frame) > self._endpoint.min_dbfs and bool(self._vad.is_speech(frame.tobytes()))

    def _on_frame(self, frame: npt.NDArray[np.int16]) -> None:
        speech = self._is_speech(frame)
        if self.state is StreamState.LISTENING:
            self._preroll.append(frame)
            self._voiced_run = self._voiced_run + 1 if speech else 0
            if self._voiced_run * _FRAME_MS >= self._endpoint.onset_ms:
                self.state = StreamState.SPEAKING
                self._utterance = list(self._preroll)
                self._preroll.clear()
                self._utterance_expectation = self._expectation  # a change mid-utterance waits its turn
                self._silent_run = 0
                self._events.put_nowait(SpeechStarted())
            return
        self._utterance.append(frame)
        self._silent_run = 0 if speech else self._silent_run + 1
        ended = self._silent_run * _FRAME_MS >= self._endpoint.silence_ms
        if ended or len(self._utterance) * _FRAME_MS >= self._endpoint.max_utterance_ms:
            self._end_utterance()

    def _end_utterance(self) -> None:
        self._utterances.put_nowait((np.concatenate(self._utterance), self._utterance_expectation))
        self._utterance = []
        self._voiced_run = 0
        self.state = StreamState.LISTENING

    async def _decode_utterances(self) -> None:
        while (item := await self._utterances.get()) is not None:
            pcm, expectation = item
            text = await self._recognizer.recognize_utterance(pcm, expectation)
            if text:
                self._events.put_nowait(Transcript(text, is_final=True, end_of_turn=True))
