"""The load test's callers: their scripts (``load_tests/load_script.py``), the utterance folder, and the
locust users (``load_tests/locustfile.py``) run for real in a subprocess against the app.

Locust monkey-patches the process with gevent when imported, so the locustfile is never imported here:
the last test runs the ``locust`` command against a real server on loopback (the production providers'
SDKs against the simulators, a recogniser that knows the script) and reads what the callers recorded
and what the ledger holds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from booking.business import Business, load_business
from integrations.espeak import Espeak
from integrations.simulators.deepgram import DeepgramSimConfig, create_deepgram_simulator
from integrations.simulators.dialog_policy import dialog_policy
from integrations.simulators.loopback import loopback_socket
from integrations.simulators.openai import OpenAISimConfig, create_openai_simulator
from integrations.simulators.scripted_speech import ScriptRecogniser, trim_to_voice
from integrations.simulators.twilio import TwilioState, create_twilio_simulator
from tests.conftest import FrozenClock, serving
from voice_server.app import create_app
from voice_server.settings import Settings
from voice_server.understanding import Understanding

LOAD_TESTS = Path(__file__).resolve().parent.parent / "load_tests"
sys.path.insert(0, str(LOAD_TESTS))  # a folder of scripts, not a package
import load_script as script  # noqa: E402  # after the path above
from load_stack import business_toml  # noqa: E402  # the load business the runner serves

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
ACCOUNT = "AC" + "5" * 32
BUSINESS_NUMBER = "+12125550100"
MONDAY = date(2026, 11, 30)


@pytest.fixture(scope="module")
def load_business_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("load-business") / "business.toml"
    path.write_text(business_toml(3))
    return path


def every_conversation(calls: int = 400) -> Iterator[script.Conversation]:
    for scenario in script.SCENARIOS:
        for number in range(calls):
            yield script.conversation(scenario, number)
            for task in ("book", "cancel", "reschedule"):
                yield script.conversation("mixed", number, task)  # type: ignore[arg-type]  # a Task literal


# -- the scripts -------------------------------------------------------------------------------------------


def test_scripts_are_deterministic_and_steady_callers_ask_for_times_of_their_own() -> None:
    for scenario in script.SCENARIOS:
        assert [script.conversation(scenario, n) for n in range(50)] == [
            script.conversation(scenario, n) for n in range(50)
        ]
    distinct = len(script.DAYS) * len(script.HOURS)
    asked = [script.conversation("steady", n).lines[1].text for n in range(distinct)]
    assert len(set(asked)) == distinct
    assert script.conversation("steady", distinct).lines[1].text == asked[0]  # then they wrap around
    assert {script.conversation("burst", n).lines[1].text for n in range(30)} == {script.BURST_WHEN}


def test_all_lines_hold_every_line_of_every_scenario_once() -> None:
    lines = script.all_lines()
    assert len(lines) == len(set(lines))
    said = {line.text for convo in every_conversation() for line in convo.lines}
    assert said <= set(lines)
    assert said == set(lines)  # and nothing nobody says


def test_each_conversation_confirms_once_and_ends_with_goodbye() -> None:
    for convo in every_conversation(60):
        assert [line.books for line in convo.lines].count(True) == 1
        assert convo.lines[-1].text == script.BYE


def test_mixed_is_seventy_fifteen_fifteen() -> None:
    tasks = [script.mixed_task(n) for n in range(200)]
    assert (tasks.count("book"), tasks.count("cancel"), tasks.count("reschedule")) == (140, 30, 30)
    assert tasks[:3] != ["book", "book", "book"] or tasks[3:6] != ["book", "book", "book"]  # interleaved


@pytest.fixture(scope="module", params=[3, 50])
def words(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Understanding:
    """How the agent hears callers in the load business with 3 doctors and with 50 (the runner's default
    for 500 users)."""
    path = tmp_path_factory.mktemp("load-business") / "business.toml"
    path.write_text(business_toml(request.param))
    return Understanding(load_business(path))


def test_the_dialog_hears_each_line_as_meant(words: Understanding) -> None:
    """The deterministic agent (``voice_server.understanding``) on the load business reads every time as a
    day and a clock and nothing else: no service, and no doctor (a doctor named by a number would take
    "at five p m" for "Doctor 5")."""
    for n in range(len(script.DAYS) * len(script.HOURS)):
        heard = words.hear(script.when_for(n), today=MONDAY)
        assert heard.day is not None and heard.day.day is not None and heard.clock is not None, script.when_for(n)
        assert heard.resource is None and heard.service is None, script.when_for(n)
    assert words.hear(script.INTENT, today=MONDAY).intent == "book"
    assert words.hear(script.INTENT, today=MONDAY).service == "checkup"
    assert words.hear(script.CANCEL, today=MONDAY).intent == "cancel"
    assert words.hear(script.RESCHEDULE, today=MONDAY).intent == "reschedule"
    assert words.hear(script.BYE, today=MONDAY).intent == "goodbye"
    assert words.hear(script.YES, today=MONDAY).answer is True
    repick = words.hear(script.REPICK, today=MONDAY)
    assert (repick.ordinal, repick.answer, repick.name, repick.intent, repick.resource) == (1, None, None, None, None)
    for n in range(len(script.NAMES)):
        for position, ordinal in enumerate(script.ORDINALS, start=1):
            pick = words.hear(f"the {ordinal} one {script.name_for(n)}", today=MONDAY, expecting_name=True)
            assert (pick.ordinal, pick.name, pick.resource) == (position, script.NAMES[n].title(), None)
        assert words.hear(script.name_for(n), today=MONDAY, expecting_name=True).name == script.NAMES[n].title()


def test_a_caller_s_pause_is_read_as_low_and_high_milliseconds() -> None:
    assert script.think_seconds("") == (0.3, 1.2)  # the default: a person answering, not a script in step
    assert script.think_seconds("0,0") == (0.0, 0.0)
    assert script.think_seconds(" 250, 800 ") == (0.25, 0.8)
    for wrong in ("300", "1200,300", "-1,5", "a,b", "1,2,3", "0,20000"):
        with pytest.raises(ValueError, match="think time"):
            script.think_seconds(wrong)


def test_caller_pool_cancels_only_from_a_number_with_one_booking() -> None:
    pool = script.CallerPool(3)
    first, task = pool.take("cancel")
    assert task == "book"  # nothing to cancel yet: a booking instead
    second, _ = pool.take("book")
    assert second != first  # busy numbers are not handed out twice
    pool.release(first, "book", done=True)
    pool.release(second, "book", done=False)  # never got to "yes"
    assert pool.take("reschedule") == (first, "reschedule")
    assert pool.take("cancel")[1] == "book"  # the only booked number is in a call
    pool.release(first, "reschedule", done=True)
    assert pool.bookings[first] == 1
    assert pool.take("cancel") == (first, "cancel")
    pool.release(first, "cancel", done=True)
    assert pool.bookings[first] == 0
    with pytest.raises(ValueError, match="numbers 0 to 9999"):
        script.CallerPool(10, offset=9995)
    assert script.CallerPool(2, offset=40).take("book")[0] == script.caller_number(40)


def test_utterance_folder_round_trips_espeak_speech(tmp_path: Path) -> None:
    voice = Espeak(wpm=190)
    lines = [script.INTENT, script.YES, script.when_for(7)]
    index = script.write_utterances(tmp_path / "utterances", voice.synthesize_mulaw, lines)
    assert set(index) == set(lines)
    assert json.loads((tmp_path / "utterances" / script.INDEX).read_text()) == index
    assert index[script.YES] == script.utterance_file(script.YES) and index[script.YES].endswith(".ulaw")
    read = script.read_utterances(tmp_path / "utterances")
    for text in lines:
        assert read[text] == (tmp_path / "utterances" / index[text]).read_bytes()
        assert read[text] and len(read[text]) % 160 == 0
        assert trim_to_voice(read[text]) == read[text]  # trimmed to the voice already
    assert len(read[script.YES]) < len(read[script.INTENT])


# -- the locust users against the real app ------------------------------------------------------------------


def read_samples(prefix: Path) -> list[dict[str, Any]]:
    """What the locust processes appended to ``<prefix>.<pid>``."""
    paths = prefix.parent.glob(prefix.name + ".*")
    return [json.loads(line) for path in paths for line in path.read_text().splitlines()]


def tone_voice(text: str) -> bytes:
    """The agent's speech as a tone, 10 ms per character: the replies' words do not matter here."""
    return bytes([0x30]) * (len(text) * 80)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_locust_callers_book_through_the_phone_path(
    app_settings: Settings, clock: FrozenClock, load_business_file: Path, tmp_path: Path
) -> None:
    """``locust --headless`` with two callers (steady) and the API and callback users for 20 s: turns are
    measured, a call's "yes" booked a slot in the ledger, and the forged callback came back 403. (Locust's
    CSV leaves out what ended during ``--stop-timeout``; the samples file has every call.)"""
    locust = Path(sys.executable).parent / "locust"
    if not locust.exists():
        pytest.skip("locust is not installed: pip install -e '.[load]'")
    business: Business = load_business(load_business_file)
    folder = tmp_path / "utterances"
    await asyncio.to_thread(script.write_utterances, folder, Espeak(wpm=190).synthesize_mulaw)
    deepgram = create_deepgram_simulator(
        DeepgramSimConfig(api_key="dg-test-key"),
        transcribe=ScriptRecogniser(script.read_utterances(folder)),
        synthesize=tone_voice,
    )
    openai = create_openai_simulator(OpenAISimConfig(api_key="sk-test-key"), dialog_policy(business, clock))
    twilio = create_twilio_simulator(TwilioState(ACCOUNT, AUTH_TOKEN))
    sock = loopback_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with (
        serving(deepgram, lifespan="off", ws="websockets-sansio") as deepgram_url,
        serving(openai, lifespan="off") as openai_url,
        serving(twilio, lifespan="off") as twilio_url,
    ):
        settings = dataclasses.replace(
            app_settings,
            business_file=load_business_file,
            public_url=base,
            twilio_auth_token=AUTH_TOKEN,
            twilio_account_sid=ACCOUNT,
            twilio_api_base_url=twilio_url,
            deepgram_api_key="dg-test-key",
            deepgram_base_url=deepgram_url,
            openai_api_key="sk-test-key",
            openai_base_url=openai_url + "/v1",
        )
        app = create_app(settings, clock=clock)
        async with serving(app, sock, lifespan="on", ws="websockets-sansio"):
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith(("LOAD_", "VOICEBOOK_"))},
                "LOAD_SCENARIO": "steady",
                "LOAD_AUTH_TOKEN": AUTH_TOKEN,
                "LOAD_PUBLIC_URL": base,
                "LOAD_UTTERANCES_DIR": str(folder),
                "LOAD_ADMIN_TOKEN": settings.admin_token or "",
                "LOAD_SAMPLES": str(tmp_path / "samples.jsonl"),
                "LOAD_BUSINESS_NUMBER": BUSINESS_NUMBER,
                "LOAD_CALLER_POOL": "10",
                "LOAD_API_WEIGHT": "5",  # with the callers' 10 and 4 users: 2 callers, 1 API user, 1 callback user
                "LOAD_CALLBACK_WEIGHT": "5",
            }
            argv = [str(locust), "-f", str(LOAD_TESTS / "locustfile.py"), "--headless", "--only-summary"]
            argv += ["-u", "4", "-r", "4", "-t", "20s", "--stop-timeout", "30", "--host", base]
            argv += ["--csv", str(tmp_path / "locust"), "--loglevel", "WARNING"]
            process = await asyncio.create_subprocess_exec(
                *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
            output, _ = await asyncio.wait_for(process.communicate(), 90)
            log = output.decode(errors="replace")
            bookings = [
                booking
                for n in range(10)
                for booking in await app.state.components.bookings.find_bookings(
                    script.caller_number(n), upcoming_only=False
                )
            ]
    assert process.returncode in (0, 1), log  # 1: some request failed, which the stats below show
    samples = read_samples(tmp_path / "samples.jsonl")
    turns = [s for s in samples if s["kind"] == "turn" and "error" not in s]
    assert {s["name"] for s in turns} >= {"intent", "when", "name", "confirm"}, log
    assert all(0 < s["ms"] < 20_000 and s["scenario"] == "steady" for s in turns)
    assert [s for s in samples if s["kind"] == "booking" and "error" not in s], log
    assert bookings and all(b.service_id == "checkup" for b in bookings), log
    calls = [s for s in samples if s["kind"] == "call"]
    assert calls and not [s for s in calls if "error" in s], (calls, log)
    stats = (tmp_path / "locust_stats.csv").read_text()
    assert "POST /twilio/call-status (bad signature)" in stats and "/api/availability" in stats, stats
    failures = (tmp_path / "locust_failures.csv").read_text()
    assert "bad signature" not in failures and "POST /twilio/voice" not in failures, failures
