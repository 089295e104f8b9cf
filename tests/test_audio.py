from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

from voice_server.audio import (
    FRAME_MS,
    MULAW_FRAME_BYTES,
    SAMPLE_RATE,
    Framer,
    StreamResampler,
    frame_levels_dbfs,
    frames_duration_ms,
    mulaw_to_pcm16,
    pcm16_to_mulaw,
    rms_dbfs,
    silence,
)

ALL_SAMPLES = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)


# Straightforward per-sample G.711 mu-law, written from the spec, to check the tables against.
def ref_encode(sample: int) -> int:
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), 32635) + 0x84
    exponent = magnitude.bit_length() - 8
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def ref_decode(byte: int) -> int:
    code = ~byte & 0xFF
    exponent = (code >> 4) & 0x07
    magnitude = ((((code & 0x0F) << 3) + 0x84) << exponent) - 0x84
    return -magnitude if code & 0x80 else magnitude


def tone(freq: float, rate: int, seconds: float, amplitude: float = 10000.0) -> npt.NDArray[np.int16]:
    t = np.arange(int(rate * seconds)) / rate
    return np.round(amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def test_constants_describe_twilio_frames() -> None:
    assert (MULAW_FRAME_BYTES, SAMPLE_RATE, FRAME_MS) == (160, 8000, 20)
    assert frames_duration_ms(MULAW_FRAME_BYTES) == FRAME_MS


@pytest.mark.parametrize(("byte", "sample"), [(0x00, -32124), (0x80, 32124), (0xFF, 0), (0x7F, 0), (0x7E, -8)])
def test_decode_known_values(byte: int, sample: int) -> None:
    assert mulaw_to_pcm16(bytes([byte])).tolist() == [sample]


def test_decode_table_matches_reference() -> None:
    decoded = mulaw_to_pcm16(bytes(range(256)))
    assert decoded.dtype == np.int16
    assert decoded.tolist() == [ref_decode(b) for b in range(256)]


def test_encode_table_matches_reference_for_every_sample() -> None:
    encoded = pcm16_to_mulaw(ALL_SAMPLES)
    assert len(encoded) == 65536
    assert list(encoded) == [ref_encode(int(s)) for s in ALL_SAMPLES]


@pytest.mark.parametrize(("sample", "byte"), [(0, 0xFF), (-1, 0x7F), (32767, 0x80), (-32768, 0x00)])
def test_encode_known_values(sample: int, byte: int) -> None:
    assert pcm16_to_mulaw(np.array([sample], dtype=np.int16)) == bytes([byte])


def test_round_trip_within_quantisation_step() -> None:
    encoded = pcm16_to_mulaw(ALL_SAMPLES)
    decoded = mulaw_to_pcm16(encoded).astype(np.int32)
    clipped = np.clip(ALL_SAMPLES.astype(np.int32), -32635, 32635)
    exponent = ((~np.frombuffer(encoded, dtype=np.uint8)) >> 4) & 0x07
    half_step = 4 << exponent.astype(np.int32)  # the decoder returns the middle of each interval
    assert np.all(np.abs(decoded - clipped) <= half_step)


def test_decoded_values_encode_back_to_the_same_byte() -> None:
    codes = bytes(b for b in range(256) if b != 0x7F)  # 0x7F is "negative zero": it re-encodes as 0xFF
    assert pcm16_to_mulaw(mulaw_to_pcm16(codes)) == codes
    assert pcm16_to_mulaw(mulaw_to_pcm16(b"\x7f")) == b"\xff"


def test_encode_accepts_a_strided_view() -> None:
    samples = ALL_SAMPLES[::7]
    assert pcm16_to_mulaw(samples) == pcm16_to_mulaw(samples.copy())


def test_encode_rejects_other_dtypes() -> None:
    with pytest.raises(TypeError, match="int16"):
        pcm16_to_mulaw(np.zeros(4, dtype=np.float32))


def test_lookup_tables_are_much_faster_than_per_sample_python() -> None:
    frame = pcm16_to_mulaw(tone(440, SAMPLE_RATE, FRAME_MS / 1000))
    rounds = 200

    def best_of(fn: Callable[[], object], repeats: int = 5) -> float:
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(rounds):
                fn()
            best = min(best, time.perf_counter() - start)
        return best

    lut = best_of(lambda: pcm16_to_mulaw(mulaw_to_pcm16(frame)))
    ref = best_of(lambda: bytes(ref_encode(ref_decode(b)) for b in frame))
    assert ref / lut >= 10, f"lookup path only {ref / lut:.1f}x faster than per-sample Python"


@pytest.mark.parametrize(("in_rate", "out_rate"), [(16000, 8000), (24000, 8000), (8000, 16000), (44100, 8000)])
def test_chunked_resampling_matches_one_shot(in_rate: int, out_rate: int) -> None:
    signal = tone(1000, in_rate, 0.5) + tone(2500, in_rate, 0.5, amplitude=3000)
    whole = StreamResampler(in_rate, out_rate)
    one_shot = np.concatenate([whole.process(signal), whole.flush()])

    chunked = StreamResampler(in_rate, out_rate)
    chunk = in_rate * FRAME_MS // 1000
    parts = [chunked.process(signal[i : i + chunk]) for i in range(0, len(signal), chunk)]
    streamed = np.concatenate([*parts, chunked.flush()])

    assert len(streamed) == len(one_shot)
    # soxr dithers its int16 output, so chunk boundaries move the last bit or two; nothing more
    assert np.max(np.abs(streamed.astype(np.int32) - one_shot.astype(np.int32))) <= 2


@pytest.mark.parametrize("in_rate", [16000, 24000])
def test_resampled_tone_keeps_frequency_amplitude_and_length(in_rate: int) -> None:
    seconds, amplitude = 1.0, 10000.0
    resampler = StreamResampler(in_rate, SAMPLE_RATE)
    signal = tone(1000, in_rate, seconds, amplitude)
    chunk = in_rate * FRAME_MS // 1000
    out = np.concatenate([*(resampler.process(signal[i : i + chunk]) for i in range(0, len(signal), chunk))])
    out = np.concatenate([out, resampler.flush()])

    assert out.dtype == np.int16
    assert len(out) == int(seconds * SAMPLE_RATE)
    spectrum = np.abs(np.fft.rfft(out.astype(np.float64)))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / len(out)
    assert peak_hz == pytest.approx(1000, abs=1)
    steady = out[400:-400].astype(np.float64)  # skip the filter's edges
    assert np.sqrt(np.mean(steady**2)) * math.sqrt(2) == pytest.approx(amplitude, rel=0.01)


def test_resampler_starts_afresh_after_flush() -> None:
    resampler = StreamResampler(16000, SAMPLE_RATE)
    signal = tone(700, 16000, 0.2)
    first = np.concatenate([resampler.process(signal), resampler.flush()])
    second = np.concatenate([resampler.process(signal), resampler.flush()])
    assert len(first) == len(second) == 1600
    assert np.max(np.abs(first.astype(np.int32) - second.astype(np.int32))) <= 2  # dither only


def test_resampler_rejects_other_dtypes() -> None:
    with pytest.raises(TypeError, match="int16"):
        StreamResampler(16000, SAMPLE_RATE).process(np.zeros(320, dtype=np.float32))


def test_framer_cuts_arbitrary_chunks_into_whole_frames() -> None:
    data = bytes(i % 251 for i in range(1000))
    framer = Framer()
    frames: list[bytes] = []
    for size in (1, 7, 159, 160, 161, 300, 12):
        start = sum(len(f) for f in frames) + framer.pending
        frames += framer.push(data[start : start + size])
    assert all(len(f) == MULAW_FRAME_BYTES for f in frames)
    assert b"".join(frames) == data[: len(frames) * MULAW_FRAME_BYTES]
    assert framer.pending == 800 % MULAW_FRAME_BYTES


def test_framer_flush_pads_with_silence() -> None:
    framer = Framer()
    assert framer.push(b"\x01" * 170) == [b"\x01" * 160]
    assert framer.flush() == b"\x01" * 10 + b"\xff" * 150
    assert framer.flush() is None


def test_framer_flush_without_padding_returns_the_partial_frame() -> None:
    framer = Framer()
    framer.push(b"\x02" * 5)
    assert framer.flush(pad=False) == b"\x02" * 5
    assert framer.pending == 0


def test_framer_flush_after_exact_frames_is_none() -> None:
    framer = Framer()
    assert len(framer.push(b"\x03" * 320)) == 2
    assert framer.flush() is None
    assert framer.push(b"") == []


def test_silence_and_duration() -> None:
    assert silence(20) == b"\xff" * MULAW_FRAME_BYTES
    assert silence(0) == b""
    assert not mulaw_to_pcm16(silence(100)).any()
    assert frames_duration_ms(len(silence(1000))) == 1000.0
    assert frames_duration_ms(4) == 0.5
    with pytest.raises(ValueError, match="-5"):
        silence(-5)


def test_frame_levels_match_rms_dbfs_per_frame() -> None:
    rng = np.random.default_rng(7)
    loud = pcm16_to_mulaw(rng.integers(-20000, 20000, 480).astype(np.int16))
    quiet = pcm16_to_mulaw(rng.integers(-40, 40, 160).astype(np.int16))
    audio = loud[:160] + silence(20) + quiet + loud[160:] + b"\x00" * 7  # a part frame at the end
    levels = frame_levels_dbfs(audio, MULAW_FRAME_BYTES)
    expected = [rms_dbfs(mulaw_to_pcm16(audio[i : i + 160])) for i in range(0, 800, 160)]
    assert levels.shape == (5,)
    assert levels.tolist() == pytest.approx(expected, abs=1e-9)
    assert levels[1] == -math.inf
    assert levels[0] > -45.0 > levels[2]
    assert frame_levels_dbfs(b"\xff" * 100, MULAW_FRAME_BYTES).shape == (0,)


def test_rms_dbfs() -> None:
    assert rms_dbfs(np.zeros(160, dtype=np.int16)) == -math.inf
    assert rms_dbfs(np.zeros(0, dtype=np.int16)) == -math.inf
    assert rms_dbfs(mulaw_to_pcm16(silence(20))) == -math.inf
    square = np.tile(np.array([32767, -32767], dtype=np.int16), 80)
    assert rms_dbfs(square) == pytest.approx(0.0, abs=0.001)
    full = rms_dbfs(tone(1000, SAMPLE_RATE, 0.1, amplitude=32767))
    half = rms_dbfs(tone(1000, SAMPLE_RATE, 0.1, amplitude=16384))
    assert full == pytest.approx(-3.01, abs=0.01)
    assert full - half == pytest.approx(6.02, abs=0.01)
    assert rms_dbfs(np.array([1, -1], dtype=np.int16)) == pytest.approx(20 * math.log10(1 / 32768))
