"""Audio codec layer for Twilio Media Streams: G.711 mu-law, 8 kHz mono, 20 ms frames of 160 bytes.

Everything here is pure (no I/O). mu-law conversion goes through lookup tables built once at import,
because the stdlib `audioop` is gone in Python 3.13 and a per-sample Python loop costs ~20x more.
Resampling keeps filter state across frames (soxr), so chunked output matches one-shot output up to
the last bit or two that soxr's int16 dither moves.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import soxr

SAMPLE_RATE = 8000
FRAME_MS = 20
MULAW_FRAME_BYTES = SAMPLE_RATE * FRAME_MS // 1000  # 160: one byte per sample
MULAW_SILENCE = 0xFF  # the encoding of sample 0

_BIAS = 0x84  # added before the segment search so every segment starts at a power of two
_CLIP = 32635  # largest magnitude that still fits the top segment after the bias
_BYTES_PER_MS = SAMPLE_RATE // 1000


def _build_decode_table() -> npt.NDArray[np.int16]:
    code = ~np.arange(256, dtype=np.int32) & 0xFF  # mu-law bytes are sent inverted
    exponent = (code >> 4) & 0x07
    mantissa = code & 0x0F
    magnitude = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    return np.where(code & 0x80, -magnitude, magnitude).astype(np.int16)


def _build_encode_table() -> npt.NDArray[np.uint8]:
    # Indexed by the uint16 view of an int16 sample, so encoding is a single gather.
    sample = np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.int32)
    sign = np.where(sample < 0, 0x80, 0)
    biased = np.minimum(np.abs(sample), _CLIP) + _BIAS  # 132 ..= 32767
    exponent = np.zeros_like(biased)
    for segment in range(1, 8):
        exponent += biased >= (0x80 << segment)
    mantissa = (biased >> (exponent + 3)) & 0x0F
    table: npt.NDArray[np.uint8] = (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8)
    return table


_DECODE = _build_decode_table()
_ENCODE = _build_encode_table()


def mulaw_to_pcm16(data: bytes) -> npt.NDArray[np.int16]:
    """Decode mu-law bytes into one int16 sample per byte."""
    return _DECODE[np.frombuffer(data, dtype=np.uint8)]


def pcm16_to_mulaw(samples: npt.NDArray[np.int16]) -> bytes:
    """Encode int16 samples into one mu-law byte per sample."""
    if samples.dtype != np.int16:
        raise TypeError(f"pcm16_to_mulaw needs int16 samples, got {samples.dtype}")
    return _ENCODE[samples.view(np.uint16)].tobytes()


def frames_duration_ms(n_bytes: int) -> float:
    """Playback time of `n_bytes` of 8 kHz mu-law audio, in milliseconds."""
    return n_bytes / _BYTES_PER_MS


def silence(ms: int) -> bytes:
    """`ms` milliseconds of mu-law silence."""
    if ms < 0:
        raise ValueError(f"silence needs a non-negative duration, got {ms} ms")
    return bytes([MULAW_SILENCE]) * (ms * _BYTES_PER_MS)


def frame_levels_dbfs(mulaw: bytes | bytearray | memoryview, frame_bytes: int) -> npt.NDArray[np.float64]:
    """``rms_dbfs`` of each whole ``frame_bytes`` frame of mu-law audio, in one pass (a trailing part frame
    is left out); -inf for a frame of digital silence. Each square is at most 2**30, so a frame's sum of
    squares is exact in float64 up to 2**23 samples, and each level equals ``rms_dbfs`` of that frame alone."""
    whole = len(mulaw) - len(mulaw) % frame_bytes
    samples = _DECODE[np.frombuffer(mulaw, dtype=np.uint8, count=whole)].reshape(-1, frame_bytes)
    mean_square = np.mean(np.square(samples, dtype=np.float64), axis=1)
    with np.errstate(divide="ignore"):
        levels: npt.NDArray[np.float64] = 10.0 * np.log10(mean_square / 32768.0**2)
    return levels


def rms_dbfs(samples: npt.NDArray[np.int16]) -> float:
    """Energy of int16 samples in dB relative to full scale; -inf for digital silence or no samples."""
    if samples.size == 0:
        return -math.inf
    mean_square = float(np.mean(np.square(samples, dtype=np.float64)))
    if mean_square == 0.0:
        return -math.inf
    return 10.0 * math.log10(mean_square / 32768.0**2)


class StreamResampler:
    """Resample int16 mono audio chunk by chunk, keeping filter state between chunks.

    Usage: `r = StreamResampler(24000, SAMPLE_RATE)`; `r.process(chunk)` for each chunk as it arrives;
    `r.flush()` at the end of the stream returns the tail held back by the filter. After `flush` the
    resampler starts afresh, so one instance can serve one utterance after another.
    """

    def __init__(self, in_rate: int, out_rate: int, quality: str = "HQ") -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16", quality=quality)

    def process(self, samples: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
        """Feed one chunk; returns the output samples ready so far (possibly none)."""
        if samples.dtype != np.int16:
            raise TypeError(f"StreamResampler needs int16 samples, got {samples.dtype}")
        return self._resample(np.ascontiguousarray(samples), last=False)

    def flush(self) -> npt.NDArray[np.int16]:
        """End the stream: returns the remaining output and resets the filter state."""
        tail = self._resample(np.zeros(0, dtype=np.int16), last=True)
        self._stream.clear()
        return tail

    def _resample(self, samples: npt.NDArray[np.int16], *, last: bool) -> npt.NDArray[np.int16]:
        out: npt.NDArray[np.int16] = np.asarray(self._stream.resample_chunk(samples, last=last), dtype=np.int16)
        return out


class Framer:
    """Cut a stream of mu-law byte chunks of any size into whole 160-byte (20 ms) frames."""

    def __init__(self) -> None:
        self._pending = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held back, waiting for the rest of their frame."""
        return len(self._pending)

    def push(self, data: bytes) -> list[bytes]:
        """Add a chunk; returns every frame now complete, in order."""
        self._pending += data
        whole = len(self._pending) - len(self._pending) % MULAW_FRAME_BYTES
        frames = [bytes(self._pending[i : i + MULAW_FRAME_BYTES]) for i in range(0, whole, MULAW_FRAME_BYTES)]
        del self._pending[:whole]
        return frames

    def flush(self, pad: bool = True) -> bytes | None:
        """Return the last partial frame (padded with silence to 160 bytes if `pad`), or None if empty."""
        if not self._pending:
            return None
        tail = bytes(self._pending)
        self._pending.clear()
        if pad:
            tail += bytes([MULAW_SILENCE]) * (MULAW_FRAME_BYTES - len(tail))
        return tail
