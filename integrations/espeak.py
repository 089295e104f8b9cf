"""Offline text-to-speech: libespeak-ng from the ``espeakng-loader`` wheel, driven through ctypes.

libespeak-ng keeps its state in globals (the voice, the parameters, the synth callback) and is not
thread-safe, so one process-wide engine initialises the library once and serialises every synthesis
with a lock. In synchronous mode ``espeak_Synth`` renders on the calling thread and hands audio to our
callback in short chunks as it goes; a callback that returns 1 aborts the synthesis. The server speaks
through ``integrations.espeak_process``, which renders each sentence with this in a worker process.

espeak renders at 22050 Hz; the phone wants 8 kHz mu-law, so each chunk goes through a streaming
resampler (soxr, state kept across chunks) and the mu-law table of ``voice_server.audio``.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass

import espeakng_loader  # type: ignore[import-untyped]  # no type information shipped
import numpy as np
import numpy.typing as npt

from voice_server.audio import SAMPLE_RATE, StreamResampler, pcm16_to_mulaw

# Values from espeak-ng's speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2  # render on the calling thread, audio through the callback
_INITIALIZE_DONT_EXIT = 0x8000  # report errors instead of calling exit() inside the library
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000  # a short pause after the text, so the last word is not cut
_RATE = 1  # espeak_PARAMETER: words per minute
_EE_OK = 0
_CALLBACK_CHUNK_MS = 100  # audio handed to the callback at a time

_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

# Receives each rendered chunk of int16 samples; returns False to abort the synthesis.
ChunkSink = Callable[[npt.NDArray[np.int16]], bool]


class EspeakError(RuntimeError):
    """libespeak-ng could not be loaded, initialised or asked to speak."""


class _Engine:
    """The one libespeak-ng instance of this process. ``render`` holds the lock for a whole synthesis."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.POINTER(ctypes.c_uint),
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        data_path = espeakng_loader.get_data_path().encode()
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, _CALLBACK_CHUNK_MS, data_path, _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise EspeakError(f"espeak_Initialize failed with data at {data_path.decode()!r}")
        self.sample_rate: int = rate
        self._lib = lib
        self.lock = threading.Lock()
        self._sink: ChunkSink | None = None
        self._error: BaseException | None = None
        self._voice: str | None = None
        self._wpm: int | None = None
        # Kept on the instance: ctypes frees the trampoline when the Python object goes.
        self._callback = _SynthCallback(self._on_audio)
        lib.espeak_SetSynthCallback(self._callback)

    def _on_audio(self, wav: ctypes._Pointer[ctypes.c_short] | None, n_samples: int, _events: int | None) -> int:
        sink = self._sink
        if sink is None:
            return 1
        if not wav or n_samples <= 0:  # a NULL buffer marks the end; events-only calls carry no audio
            return 0
        samples = np.ctypeslib.as_array(wav, shape=(n_samples,)).astype(np.int16, copy=True)
        try:
            return 0 if sink(samples) else 1
        except BaseException as error:
            # An exception cannot cross the C frames: abort the synthesis and re-raise it in ``render``.
            self._error = error
            return 1

    def render(self, text: str, voice: str, wpm: int, sink: ChunkSink) -> None:
        """Speak ``text`` into ``sink`` chunk by chunk, on the calling thread."""
        encoded = text.encode("utf-8") + b"\0"
        with self.lock:
            if voice != self._voice:
                if self._lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
                    raise EspeakError(f"espeak has no voice named {voice!r}")
                self._voice = voice
                self._wpm = None  # a new voice resets the parameters
            if wpm != self._wpm:
                self._lib.espeak_SetParameter(_RATE, wpm, 0)
                self._wpm = wpm
            buffer = ctypes.create_string_buffer(encoded, len(encoded))
            self._sink = sink
            try:
                status = self._lib.espeak_Synth(
                    buffer, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8 | _ENDPAUSE, None, None
                )
            finally:
                self._sink = None
                error, self._error = self._error, None
            if error is not None:
                raise error
            # An aborted synthesis (our sink said stop) still returns EE_OK; anything else is a failure.
            if status != _EE_OK:
                raise EspeakError(f"espeak_Synth failed with status {status}")


_engine: _Engine | None = None
_engine_lock = threading.Lock()


def _get_engine() -> _Engine:
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = _Engine()
        return _engine


@dataclass(frozen=True, slots=True)
class Espeak:
    """Synchronous, thread-safe speech synthesis: ``Espeak(voice="en-us", wpm=165).synthesize_mulaw(text)``.

    Instances are cheap value objects; they share the process's single libespeak-ng engine.
    """

    voice: str = "en-us"
    wpm: int = 165

    def synthesize_pcm(self, text: str) -> tuple[npt.NDArray[np.int16], int]:
        """The whole of ``text`` at espeak's native rate: (int16 samples, sample rate)."""
        engine = _get_engine()
        chunks: list[npt.NDArray[np.int16]] = []

        def collect(chunk: npt.NDArray[np.int16]) -> bool:
            chunks.append(chunk)
            return True

        if text.strip():
            engine.render(text, self.voice, self.wpm, collect)
        samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
        return samples, engine.sample_rate

    def synthesize_mulaw(self, text: str) -> bytes:
        """The whole of ``text`` as 8 kHz mu-law (not padded to whole frames)."""
        engine = _get_engine()
        encoder = _MulawEncoder(engine.sample_rate)
        out = bytearray()

        def collect(chunk: npt.NDArray[np.int16]) -> bool:
            out.extend(encoder.encode(chunk))
            return True

        if text.strip():
            engine.render(text, self.voice, self.wpm, collect)
        out += encoder.flush()
        return bytes(out)


class _MulawEncoder:
    """Native-rate int16 chunks in, 8 kHz mu-law out, with resampler state kept between chunks."""

    def __init__(self, in_rate: int) -> None:
        self._resampler = StreamResampler(in_rate, SAMPLE_RATE)

    def encode(self, chunk: npt.NDArray[np.int16]) -> bytes:
        return pcm16_to_mulaw(self._resampler.process(chunk))

    def flush(self) -> bytes:
        return pcm16_to_mulaw(self._resampler.flush())
