"""A recogniser that knows the script, for the Deepgram simulator in load tests and in end-to-end tests
of the production stack: it names each utterance by its exact audio.

Those runs are about the SDKs, the adapters, the timing and the call engine, not about how well an
offline recogniser hears espeak-ng's voice (the offline stack's own tests measure that). The caller
sends audio trimmed to its voice (``trim_to_voice``), and the simulator's result window starts at the
first voiced frame of a segment, so a final result's audio starts with exactly one known utterance.
"""

from __future__ import annotations

from collections.abc import Mapping

from voice_server.audio import MULAW_FRAME_BYTES, mulaw_to_pcm16, rms_dbfs

VAD_THRESHOLD_DBFS = -45.0  # DeepgramSimConfig.vad_threshold_dbfs


def trim_to_voice(mulaw: bytes, threshold_dbfs: float = VAD_THRESHOLD_DBFS) -> bytes:
    """The utterance from its first to its last voiced 20 ms frame (whole frames, as the simulator's voice
    detector cuts them), so "speech ended" at the caller is when the voice ended."""
    frames = [mulaw[i : i + MULAW_FRAME_BYTES] for i in range(0, len(mulaw), MULAW_FRAME_BYTES)]
    voiced = [
        n
        for n, frame in enumerate(frames)
        if len(frame) == MULAW_FRAME_BYTES and rms_dbfs(mulaw_to_pcm16(frame)) > threshold_dbfs
    ]
    if not voiced:
        raise ValueError("the audio holds no voice")
    return b"".join(frames[voiced[0] : voiced[-1] + 1])


class ScriptRecogniser:
    """``transcribe(mulaw) -> text``: the known utterance the audio starts with; "" (and counted in
    ``unknown``) for audio that is neither an utterance nor the beginning of one."""

    def __init__(self, utterances: Mapping[str, bytes]) -> None:
        # Longest first: an utterance that is a prefix of another never shadows it.
        self._known = sorted(((audio, text) for text, audio in utterances.items()), key=lambda p: -len(p[0]))
        self.unknown = 0

    def __call__(self, mulaw: bytes) -> str:
        for audio, text in self._known:
            if mulaw.startswith(audio):
                return text
        if not any(audio.startswith(mulaw) for audio, _ in self._known):
            self.unknown += 1  # an interim is a prefix of an utterance; anything else is a mismatch
        return ""
