"""pocketsphinx decoding in worker processes, for the server's offline ear.

The binding holds the interpreter lock for the whole decode: a 2.5 s utterance under the broad grammar
held every call's event loop for 0.4 s on a worker thread, so a few callers finishing a sentence
together stalled everyone's audio for a second or more (long enough for a silence timer to fire on a
caller who was talking). Here the trimming, conditioning and decoding run in ``workers`` spawn processes
(``integrations.worker_processes``), each with one decoder that keeps its compiled grammars; the event
loop's share is pickling the utterance (80 kB for 5 s) and the reply.

A worker that dies while decoding costs one retry on a new pool; if that fails too the utterance counts
as unheard (logged), and the dialog asks again as it does for anything it did not catch.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import numpy.typing as npt
import structlog

from integrations.sphinx import SphinxRecognizer, SphinxSettings
from integrations.worker_processes import WorkerDied, WorkerProcesses
from voice_server.ports import Expectation

log = structlog.get_logger(__name__)

_recognizer: SphinxRecognizer | None = None
"""In a worker: its recogniser, built on the first job."""


def _worker_recognizer(settings: SphinxSettings) -> SphinxRecognizer:
    global _recognizer
    if _recognizer is None or _recognizer.settings != settings:
        _recognizer = SphinxRecognizer(settings)
    return _recognizer


def recognize_in_worker(settings: SphinxSettings, pcm: npt.NDArray[np.int16], expectation: Expectation | None) -> str:
    """In a worker: the words in one utterance."""
    return _worker_recognizer(settings).recognize_pcm(pcm, expectation)


def warm_worker(settings: SphinxSettings) -> int:
    """In a worker: load the model and build the decoder now; returns the worker's process id."""
    _worker_recognizer(settings).warm_up()
    return os.getpid()


class SphinxProcessRecognizer:
    """An ``UtteranceRecognizer`` decoding in ``workers`` processes (default: one per core, at most
    ``settings.max_decoders``)."""

    def __init__(self, settings: SphinxSettings | None = None, *, workers: int | None = None) -> None:
        base = settings or SphinxSettings()
        count = workers or max(1, min(base.max_decoders, os.cpu_count() or 1))
        # One decoder per worker: a worker decodes one utterance at a time.
        self.settings = dataclasses.replace(base, max_decoders=1)
        self._processes = WorkerProcesses(count)

    @property
    def workers(self) -> int:
        return self._processes.workers

    async def start(self) -> list[int]:
        """Start every worker and build its decoder; returns their process ids."""
        return await self._processes.start(warm_worker, self.settings)

    async def recognize_utterance(self, pcm: npt.NDArray[np.int16], expectation: Expectation | None) -> str:
        for attempt in (1, 2):
            try:
                return await self._processes.run(recognize_in_worker, self.settings, pcm, expectation)
            except WorkerDied as error:
                log.warning("sphinx_worker_died", attempt=attempt, error=str(error), samples=int(pcm.size))
        log.error("utterance_unheard", reason="sphinx_worker_died", samples=int(pcm.size))
        return ""

    async def aclose(self) -> None:
        await self._processes.aclose()


__all__ = ["SphinxProcessRecognizer", "recognize_in_worker", "warm_worker"]
