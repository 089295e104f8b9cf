"""Offline speech round trips: espeak speaks a phrase as 8 kHz mu-law (exactly what a phone line
carries), pocketsphinx recognises it under the grammar the dialog would expect, and the words must come
back. Accuracy per kind is printed (``pytest -s``) and held to a floor measured on this pairing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping

import numpy as np
import pytest

from integrations.espeak import Espeak
from integrations.jsgf import build_grammar, normalize_words
from integrations.sphinx import (
    EndpointSettings,
    SphinxRecognizer,
    SphinxStream,
    SphinxSTT,
    StreamState,
    trim_silence,
)
from voice_server.audio import MULAW_FRAME_BYTES, mulaw_to_pcm16, silence
from voice_server.ports import CallInfo, Expectation, SpeechEvent, SpeechStarted, Transcript

SERVICES = ("General check-up", "New patient consultation", "Vaccination", "Blood test")
STAFF = ("Dr. Amelia Lee", "Dr. Rohan Patel", "Nurse Grace Kim")
CALLER_NAMES = ("Alice Smith", "Lee", "Patel", "Kim")

# kind -> (what the dialog expects, what the caller says)
ROUND_TRIPS: Mapping[str, tuple[Expectation, tuple[str, ...]]] = {
    "service": (
        Expectation(("service",), {"service": (*SERVICES, "checkup", "consultation")}),
        ("checkup", "a consultation", "vaccination", "blood test", "new patient consultation", "general check up"),
    ),
    "name": (
        Expectation(("name",), {"name": CALLER_NAMES}),
        ("my name is alice smith", "alice smith", "it's lee", "patel", "my name is kim"),
    ),
    "day": (
        Expectation(("day",)),
        (
            "tomorrow",
            "today",
            "next monday",
            "on friday",
            "thursday",
            "december third",
            "monday the first",
            "the twenty first",
            "on the fifth of may",
        ),
    ),
    "time": (
        Expectation(("time",)),
        (
            "ten",
            "ten thirty",
            "ten fifteen a.m.",
            "two p.m.",
            "noon",
            "half past two",
            "in the morning",
            "in the afternoon",
            "four forty five",
            "nine o'clock",
        ),
    ),
    "yes_no": (
        Expectation(("yes_no",)),
        ("yes", "yeah", "correct", "that's right", "sure", "no", "nope", "not really"),
    ),
    "digits": (
        Expectation(("digits",)),
        ("one two three", "five five five one two three four", "nine oh two one zero", "eight six seven five"),
    ),
    "intent": (
        Expectation(("intent",)),
        (
            "i'd like to book an appointment",
            "make an appointment",
            "reschedule my appointment",
            "cancel my appointment",
            "when are you open",
            "what's available",
            "i want to speak to a person",
            "can i talk to the receptionist",
            "that's all",
            "goodbye",
        ),
    ),
    "combined": (
        Expectation(("day", "time", "service"), {"service": SERVICES, "resource": STAFF}),
        (
            "tuesday at ten with doctor lee",
            "tomorrow at two p.m.",
            "a blood test on friday morning",
            "next monday at half past nine",
        ),
    ),
}

# The share of phrases that must come back word for word, per kind. Set from measurement, a little
# below what this espeak voice and the packaged model reached (see the module docstring of
# integrations/sphinx.py): formant-synthesised speech through the phone band is a hard case for a
# model trained on recorded 16 kHz speech, so these floors guard against regressions rather than
# promise real-world accuracy.
ACCURACY_FLOOR = {
    "service": 0.8,
    "name": 0.4,
    "day": 0.5,
    "time": 0.7,
    "yes_no": 0.6,
    "digits": 0.25,
    "intent": 0.8,
    "combined": 0.25,
}
OVERALL_FLOOR = 0.7

CALL = CallInfo(call_sid="CA0", stream_sid="MZ0", caller="+15551230000", called="+12125550100")


@pytest.fixture(scope="module")
def espeak() -> Espeak:
    return Espeak()


@pytest.fixture(scope="module")
def recognizer() -> SphinxRecognizer:
    return SphinxRecognizer()


def on_the_phone(espeak: Espeak, text: str, pad_ms: int = 300) -> bytes:
    """``text`` as a caller's line carries it: mu-law with silence either side."""
    return silence(pad_ms) + espeak.synthesize_mulaw(text) + silence(pad_ms)


# -- espeak --------------------------------------------------------------------------------------


def test_espeak_renders_speech_at_its_native_rate_and_8khz_mulaw(espeak: Espeak) -> None:
    pcm, rate = espeak.synthesize_pcm("Your appointment is booked for Tuesday at ten.")
    mulaw = espeak.synthesize_mulaw("Your appointment is booked for Tuesday at ten.")
    assert rate == 22050 and pcm.dtype == np.int16
    assert np.abs(pcm).max() > 5000  # audible speech, not silence
    # The same speech at 8 kHz: one mu-law byte per sample, the duration preserved.
    assert abs(len(mulaw) / 8000 - len(pcm) / rate) < 0.05
    assert np.abs(mulaw_to_pcm16(mulaw).astype(np.int32)).max() > 5000


def test_espeak_speaks_nothing_for_empty_text_and_copes_with_non_ascii(espeak: Espeak) -> None:
    assert espeak.synthesize_mulaw("") == b""
    assert espeak.synthesize_mulaw("   ") == b""
    assert len(espeak.synthesize_pcm("")[0]) == 0
    assert len(espeak.synthesize_mulaw("Grüße, José! Ça va? 東京")) > 8000 * 0.5


def test_espeak_rate_changes_the_duration() -> None:
    text = "We are open from nine in the morning until five in the afternoon."
    slow = Espeak(wpm=120).synthesize_mulaw(text)
    fast = Espeak(wpm=240).synthesize_mulaw(text)
    assert len(slow) > 1.5 * len(fast)


async def test_espeak_is_safe_to_use_from_several_threads(espeak: Espeak) -> None:
    texts = ["Yes.", "Your booking is confirmed for Tuesday.", "We are open from nine until five, Monday to Friday."]
    texts = texts * 3
    alone = [len(espeak.synthesize_mulaw(text)) for text in texts]
    together = await asyncio.gather(*(asyncio.to_thread(espeak.synthesize_mulaw, text) for text in texts))
    # Each text comes back whole and alone: an interleaved synthesis would cut or merge them. (Lengths
    # are compared within 2%: espeak's output varies by a few samples from one run to the next.)
    for mine, reference in zip(together, alone, strict=True):
        assert abs(len(mine) - reference) <= 0.02 * reference


# -- grammar ---------------------------------------------------------------------------------------


def test_grammar_covers_the_expected_kinds_and_drops_unpronounceable_choices() -> None:
    grammar = build_grammar(
        Expectation(("service", "name"), {"service": ("Blood test", "Zxqvbl wash"), "name": ("Xyzzyq Smith",)})
    )
    assert "blood test" in grammar and "wash" in grammar
    assert "zxqvbl" not in grammar and "xyzzyq" not in grammar and "smith" in grammar
    assert "<day>" not in grammar and "<yes_no>" not in grammar
    broad = build_grammar(None)
    for kind in ("intent", "service", "day", "time", "yes_no", "digits", "name"):
        assert f"<{kind}>" in broad
    # Choices that are all unpronounceable fall back to the generic words of their kind.
    assert "checkup" in build_grammar(Expectation(("service",), {"service": ("Zxqvbl",)}))
    assert "mary" in build_grammar(Expectation(("name",), {"name": ("Xyzzyq",)}))
    assert "<yes_no>" in build_grammar(Expectation(("no-such-kind",)))


def test_normalize_words_spells_what_a_grammar_spells() -> None:
    expected = ["doctor", "lee", "at", "ten", "thirty", "a.m.", "check", "up"]
    assert normalize_words("Dr. Lee at 10:30 AM, check-up!") == expected
    assert normalize_words("It's 2 p.m.") == ["it's", "two", "p.m."]


def test_unknown_words_in_choices_do_not_break_recognition(espeak: Espeak, recognizer: SphinxRecognizer) -> None:
    expectation = Expectation(("service",), {"service": ("Zxqvbl facial", "Vaccination")})
    assert recognizer.recognize(on_the_phone(espeak, "vaccination"), expectation) == "vaccination"


# -- recognition round trips ---------------------------------------------------------------------


def test_round_trips_per_kind(espeak: Espeak, recognizer: SphinxRecognizer) -> None:
    accuracy: dict[str, float] = {}
    misses: list[str] = []
    audio_seconds = decode_seconds = 0.0
    for kind, (expectation, phrases) in ROUND_TRIPS.items():
        right = 0
        for n, phrase in enumerate(phrases):
            mulaw = on_the_phone(espeak, phrase)
            started = time.perf_counter()
            heard = recognizer.recognize(mulaw, expectation)
            if n:  # the first phrase of a kind also compiles its grammar: not part of the real-time factor
                decode_seconds += time.perf_counter() - started
                audio_seconds += len(mulaw) / 8000
            if normalize_words(heard) == normalize_words(phrase):
                right += 1
            else:
                misses.append(f"{kind}: {phrase!r} -> {heard!r}")
        accuracy[kind] = right / len(phrases)
    total = sum(len(phrases) for _, phrases in ROUND_TRIPS.values())
    overall = sum(accuracy[kind] * len(ROUND_TRIPS[kind][1]) for kind in ROUND_TRIPS) / total
    print("\nrecognition accuracy per kind:", {kind: f"{share:.0%}" for kind, share in accuracy.items()})
    print(f"overall {overall:.0%} of {total} phrases; real-time factor {decode_seconds / audio_seconds:.3f}")
    print("misses:\n  " + "\n  ".join(misses))
    below = {kind: share for kind, share in accuracy.items() if share < ACCURACY_FLOOR[kind]}
    assert not below, f"accuracy under the floor: {below}; misses: {misses}"
    assert overall >= OVERALL_FLOOR


def test_silence_and_empty_audio_recognise_as_nothing(recognizer: SphinxRecognizer) -> None:
    recognizer.warm_up(2)
    assert recognizer.recognize(b"") == ""
    assert recognizer.recognize(silence(1000), Expectation(("yes_no",))) == ""
    assert trim_silence(mulaw_to_pcm16(silence(500))).size == 0


def test_the_grammar_decides_what_can_be_heard(espeak: Espeak, recognizer: SphinxRecognizer) -> None:
    mulaw = on_the_phone(espeak, "vaccination")
    assert recognizer.recognize(mulaw, Expectation(("service",), {"service": SERVICES})) == "vaccination"
    # The same sound under a yes/no grammar cannot come back as a service.
    assert "vaccination" not in recognizer.recognize(mulaw, Expectation(("yes_no",)))


async def test_concurrent_recognitions_share_the_decoder_pool(espeak: Espeak, recognizer: SphinxRecognizer) -> None:
    mulaw = on_the_phone(espeak, "blood test")
    expectation = Expectation(("service",), {"service": SERVICES})
    alone = recognizer.recognize(mulaw, expectation)
    together = await asyncio.gather(*(asyncio.to_thread(recognizer.recognize, mulaw, expectation) for _ in range(6)))
    assert together == [alone] * 6


# -- streaming -------------------------------------------------------------------------------------


async def feed(stream: SphinxStream, mulaw: bytes) -> None:
    """Send ``mulaw`` as Twilio does: one 20 ms frame per message."""
    for offset in range(0, len(mulaw), MULAW_FRAME_BYTES):
        await stream.send(mulaw[offset : offset + MULAW_FRAME_BYTES])


async def next_events(events: AsyncIterator[SpeechEvent], count: int) -> list[SpeechEvent]:
    return [await asyncio.wait_for(anext(events), 10) for _ in range(count)]


@pytest.fixture(scope="module")
def stt(recognizer: SphinxRecognizer) -> SphinxSTT:
    return SphinxSTT(recognizer, EndpointSettings(silence_ms=500))


async def test_stream_reports_speech_start_then_a_final_end_of_turn_transcript(espeak: Espeak, stt: SphinxSTT) -> None:
    stream = await stt.open(CALL)
    stream.expect(Expectation(("day", "time"), {"resource": STAFF}))
    events = stream.events()
    started = time.perf_counter()
    speech = espeak.synthesize_mulaw("friday at ten thirty")
    await feed(stream, silence(600) + speech + silence(800))
    first, second = await next_events(events, 2)
    elapsed = time.perf_counter() - started
    assert first == SpeechStarted()
    assert isinstance(second, Transcript) and second.is_final and second.end_of_turn
    assert normalize_words(second.text) == ["friday", "at", "ten", "thirty"]
    print(f"\nstreamed {len(speech) / 8000:.2f} s of speech, recognised in {elapsed:.3f} s of wall time")
    await stream.close()
    assert [event async for event in events] == []
    assert stream.state is StreamState.CLOSED


async def test_stream_expect_switches_the_grammar_for_the_next_utterance(espeak: Espeak, stt: SphinxSTT) -> None:
    stream = await stt.open(CALL)
    events = stream.events()
    stream.expect(Expectation(("yes_no",)))
    await feed(stream, silence(300) + espeak.synthesize_mulaw("that's right") + silence(700))
    stream.expect(Expectation(("service",), {"service": SERVICES}))
    await feed(stream, espeak.synthesize_mulaw("vaccination") + silence(700))
    got = await next_events(events, 4)
    await stream.close()
    # Audio fed faster than real time may start the second utterance before the first is decoded.
    assert got[0] == SpeechStarted() and got.count(SpeechStarted()) == 2
    assert [event.text for event in got if isinstance(event, Transcript)] == ["that's right", "vaccination"]


async def test_stream_emits_nothing_for_silence_and_close_ends_events(stt: SphinxSTT) -> None:
    stream = await stt.open(CALL)
    collected: list[SpeechEvent] = []

    async def collect() -> None:
        async for event in stream.events():
            collected.append(event)

    collector = asyncio.create_task(collect())
    await feed(stream, silence(2000))
    await stream.close()
    await asyncio.wait_for(collector, 5)
    assert collected == []
    await stream.send(silence(20))  # audio after a hang-up is dropped, not an error
    await stream.close()  # closing twice is harmless


async def test_close_recognises_what_the_caller_was_still_saying(espeak: Espeak, stt: SphinxSTT) -> None:
    stream = await stt.open(CALL)
    stream.expect(Expectation(("yes_no",)))
    await feed(stream, silence(300) + espeak.synthesize_mulaw("not really"))
    await stream.close()
    assert [event async for event in stream.events()] == [SpeechStarted(), Transcript("not really", True, True)]
