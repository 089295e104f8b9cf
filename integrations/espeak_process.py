"""The offline voice rendered in a process of its own (``TextToSpeech`` port).

libespeak-ng renders a sentence some 800 times faster than it plays (4.5 s of speech in 6 ms here), so
the synthesis itself is never what makes a caller wait. Rendering it inside the server is: the library is
not thread-safe, so a process holds one engine behind a lock, and its callback hands Python a 100 ms
chunk at a time, each chunk waiting for the interpreter lock that the event loop holds most of the time
under load. Measured under 100 calls with the primary voice failing over to this one: 35 to 45 ms of
engine time per sentence, every sentence of every call through the one engine, first bytes queued for up
to 5 s, and the resampling and encoding on the calls' interpreter.

Here each sentence is rendered whole, resampled and encoded in a worker process
(``integrations.worker_processes``), with an engine of its own and no interpreter shared with the
calls. The server's side is one request and one reply per sentence. A sentence's audio then
comes back at once, so there is nothing to stop part way; a caller who barges in drops the reply, and
the worker's few milliseconds of work are not worth interrupting. A worker that dies fails the sentences
it held with :class:`EspeakError` (the session speaks the next one) and the next sentence starts a new
pool. The pool starts on the first sentence, or at once with :meth:`start`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from integrations.espeak import Espeak, EspeakError
from integrations.worker_processes import WorkerDied, WorkerProcesses
from voice_server.audio import MULAW_FRAME_BYTES, MULAW_SILENCE

CHUNK_BYTES = 8 * MULAW_FRAME_BYTES
"""How the rendered sentence is handed on: whole 20 ms frames, 160 ms at a time."""


def render_mulaw(voice: str, wpm: int, text: str) -> bytes:
    """In the worker: ``text`` as 8 kHz mu-law, padded to whole 20 ms frames."""
    audio = Espeak(voice=voice, wpm=wpm).synthesize_mulaw(text)
    short = -len(audio) % MULAW_FRAME_BYTES
    return audio + bytes([MULAW_SILENCE]) * short


def _worker_ready() -> int:
    """In the worker: load the library now, so the first sentence does not pay for it."""
    Espeak().synthesize_mulaw("ready")
    return os.getpid()


class EspeakProcessTTS:
    """Sentences rendered by libespeak-ng in ``workers`` processes (see the module doc)."""

    def __init__(self, espeak: Espeak | None = None, *, workers: int = 1) -> None:
        self._espeak = espeak or Espeak()
        self._processes = WorkerProcesses(workers)

    async def start(self) -> list[int]:
        """Start the workers and load the library in each; returns their process ids."""
        return await self._processes.start(_worker_ready)

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        if not text.strip():
            return
        try:
            audio = await self._processes.run(render_mulaw, self._espeak.voice, self._espeak.wpm, text)
        except WorkerDied as error:
            raise EspeakError(f"the espeak worker process died: {error}") from error
        for start in range(0, len(audio), CHUNK_BYTES):
            yield audio[start : start + CHUNK_BYTES]

    async def aclose(self) -> None:
        """Stop the workers (sentences still queued are dropped)."""
        await self._processes.aclose()


__all__ = ["CHUNK_BYTES", "EspeakProcessTTS", "render_mulaw"]
