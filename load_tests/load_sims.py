"""The provider simulators of a local load test, in a process of their own (``run_load.py`` starts one or
two), so they take neither CPU nor event-loop time from the server being measured.

    python load_tests/load_sims.py --business FILE --utterances DIR --folder DIR --auth-token TOKEN
        [--only deepgram,openai,twilio,google_calendar] [--stt-final-ms 150] [--llm-first-token-ms 250]
        [--llm-tokens-per-second 60] [--tts-first-byte-ms 100] [--provider-ms 150] [--env-file PATH]

- Deepgram: live listen with ``ScriptRecogniser`` over the utterance folder (the callers' exact audio),
  speak with ``tone_voice`` (a tone as long as the text), both after the latencies given;
- OpenAI chat completions: the offline dialog plays the model (``dialog_policy`` on the server's business
  file and the real clock), first token after ``--llm-first-token-ms``;
- Twilio REST: call updates (hang-up; a call the server names is known, as Twilio placed it) and the
  Messages API with signed delivery receipts to the server's ``StatusCallback``;
- Google Calendar: one calendar per resource ``calendar_id`` of the business, a service account whose key
  file is written into ``--folder``.

Twilio Messages and Google Calendar answer after ``--provider-ms``. ``POST /_load/faults`` on the control
server changes that mid-run: ``{"provider": "google_calendar"|"twilio_messages", "mode": "slow"|"down"|"ok",
"latency_ms": 1000}`` ("down" answers 503 / 500 to every request); ``GET /_load/stats`` counts what the
simulators saw. Once serving, one line ``LOAD_SIMS_READY {"env": {...}, "control": URL}`` goes to stdout
(and the same JSON to ``--env-file``): ``env`` points a voicebook server at these simulators. SIGTERM or
SIGINT stops the process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import re
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import uvloop
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from booking.business import Business, load_business
from booking.ledger.repository import utc_now
from integrations.simulators.deepgram import DeepgramSimConfig, DeepgramSimState, create_deepgram_simulator
from integrations.simulators.dialog_policy import dialog_policy
from integrations.simulators.google_calendar import (
    CalendarState,
    create_google_calendar_simulator,
    new_private_key_pem,
    service_account_info,
)
from integrations.simulators.loopback import loopback_socket
from integrations.simulators.openai import ChatPolicy, OpenAISimConfig, create_openai_simulator
from integrations.simulators.scripted_speech import VAD_THRESHOLD_DBFS, ScriptRecogniser
from integrations.simulators.twilio import TwilioState, create_twilio_simulator
from integrations.simulators.twilio_messages import Fault, MessagesState, Outcome, add_message_routes
from voice_server.loop_watchdog import watching_for_stalls

sys.path.insert(0, str(Path(__file__).resolve().parent))  # load_tests/ is a folder of scripts, not a package
from bench_turns import tone_voice
from load_script import read_utterances

SERVICES = ("deepgram", "openai", "twilio", "google_calendar")
READY = "LOAD_SIMS_READY"
DEEPGRAM_KEY = "load-deepgram-key"
OPENAI_KEY = "sk-load-0123456789"
ACCOUNT_SID = "AC" + "6" * 32
MESSAGING_SERVICE_SID = "MG" + "6" * 32
SERVICE_ACCOUNT = "voicebook-load@voicebook-load.iam.gserviceaccount.com"
RECEIPT_DELAY_SECONDS = 1.0
"""Between a text's acceptance and each delivery receipt (sent, delivered) the simulator posts back."""
_CALL_PATH = re.compile(r"^/2010-04-01/Accounts/[^/]+/Calls/(?P<sid>[^/]+)\.json$")


@dataclass(frozen=True)
class SimOptions:
    business_file: Path
    utterances: Path
    folder: Path
    auth_token: str
    services: tuple[str, ...] = SERVICES
    stt_final_ms: int = 150
    llm_first_token_ms: int = 250
    llm_tokens_per_second: float | None = 60.0
    tts_first_byte_ms: int = 100
    provider_ms: int = 150
    env_file: Path | None = None


class Simulators:
    """The simulator apps this process serves, their state, and the environment that points a server at
    them once each has its URL."""

    def __init__(self, options: SimOptions, business: Business) -> None:
        self.options = options
        self.apps: dict[str, ASGIApp] = {}
        self.recogniser: ScriptRecogniser | None = None
        self.deepgram = DeepgramSimState()
        self.openai: OpenAISimConfig | None = None
        self.policy: ChatPolicy | None = None
        self.calendars = CalendarState()
        self.messages: MessagesState | None = None
        self._pem: str | None = None
        if "deepgram" in options.services:
            self.recogniser = ScriptRecogniser(read_utterances(options.utterances))
            config = DeepgramSimConfig(
                api_key=DEEPGRAM_KEY,
                stt_final_delay_ms=options.stt_final_ms,
                tts_first_byte_ms=options.tts_first_byte_ms,
                vad_threshold_dbfs=VAD_THRESHOLD_DBFS,
            )
            self.apps["deepgram"] = create_deepgram_simulator(
                config, transcribe=self.recogniser, synthesize=tone_voice, state=self.deepgram
            )
        if "openai" in options.services:
            self.openai = OpenAISimConfig(
                api_key=OPENAI_KEY,
                first_token_ms=options.llm_first_token_ms,
                tokens_per_second=options.llm_tokens_per_second,
            )
            self.policy = dialog_policy(business, utc_now)
            self.apps["openai"] = create_openai_simulator(self.openai, self.policy)
        if "twilio" in options.services:
            calls = TwilioState(ACCOUNT_SID, options.auth_token)
            twilio = create_twilio_simulator(calls)
            self.messages = MessagesState(
                ACCOUNT_SID,
                options.auth_token,
                latency=options.provider_ms / 1000,
                outcome=Outcome(statuses=("sent", "delivered"), delay=RECEIPT_DELAY_SECONDS),
            )
            add_message_routes(twilio, self.messages)
            self.apps["twilio"] = _calls_exist(twilio, calls)
        if "google_calendar" in options.services:
            self._pem = new_private_key_pem()
            self.calendars.add_service_account(SERVICE_ACCOUNT, self._pem)
            for resource in business.resources:
                if resource.calendar_id:
                    self.calendars.add_calendar(resource.calendar_id)
            self.calendars.faults.latency_ms = options.provider_ms
            self.apps["google_calendar"] = create_google_calendar_simulator(self.calendars)

    def environment(self, urls: dict[str, str]) -> dict[str, str]:
        """The server's variables for the simulators at ``urls`` (service -> base URL)."""
        env: dict[str, str] = {}
        if "deepgram" in urls:
            env |= {"DEEPGRAM_API_KEY": DEEPGRAM_KEY, "DEEPGRAM_BASE_URL": urls["deepgram"]}
            env |= {"VOICEBOOK_STT": "deepgram", "VOICEBOOK_TTS": "deepgram"}
        if "openai" in urls:
            env |= {
                "OPENAI_API_KEY": OPENAI_KEY,
                "OPENAI_BASE_URL": urls["openai"] + "/v1",
                "VOICEBOOK_AGENT": "openai",
            }
        if "twilio" in urls:
            env |= {
                "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
                "TWILIO_API_BASE_URL": urls["twilio"],
                "TWILIO_MESSAGING_SERVICE_SID": MESSAGING_SERVICE_SID,
            }
        if "google_calendar" in urls and self._pem is not None:
            key_file = self.options.folder / "service-account.json"
            key_file.write_text(json.dumps(service_account_info(urls["google_calendar"], self._pem, SERVICE_ACCOUNT)))
            env |= {
                "GOOGLE_SERVICE_ACCOUNT_FILE": str(key_file),
                "GOOGLE_CALENDAR_API_URL": urls["google_calendar"] + "/calendar/v3/",
            }
        return env

    def set_fault(self, provider: str, mode: str, latency_ms: int | None) -> dict[str, Any]:
        """Slow, down or back to normal; returns what the provider now does."""
        if mode not in ("slow", "down", "ok"):
            raise ValueError(f"mode must be slow, down or ok, not {mode!r}")
        latency = self.options.provider_ms if mode == "ok" or latency_ms is None else latency_ms
        if provider == "google_calendar" and "google_calendar" in self.apps:
            faults = self.calendars.faults
            faults.latency_ms = latency
            faults.fraction, faults.kinds = (1.0, ("503",)) if mode == "down" else (0.0, ("500",))
        elif provider == "twilio_messages" and self.messages is not None:
            self.messages.latency = latency / 1000
            self.messages.fail_fraction(Fault.SERVER_ERROR, 1.0 if mode == "down" else 0.0, seed=0)
        else:
            raise ValueError(f"no simulator {provider!r} in this process")
        return {"provider": provider, "mode": mode, "latency_ms": latency}

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        if self.recogniser is not None:
            stats["deepgram"] = {
                "listen_connections": self.deepgram.listen_connections,
                "speak_requests": self.deepgram.speak_requests,
                "unknown_utterances": self.recogniser.unknown,
            }
        if self.openai is not None:
            stats["openai"] = {"requests": len(self.openai.requests), "rejections": len(self.openai.rejections)}
        if self.messages is not None:
            refused = [c for c in self.messages.callbacks if c.status_code is None or c.status_code >= 400]
            stats["twilio_messages"] = {
                "texts": len(self.messages.messages),
                "receipts": len(self.messages.callbacks),
                "receipts_refused": len(refused),
            }
        if "google_calendar" in self.apps:
            events = sum(len(self.calendars.live_events(c)) for c in self.calendars.calendars)
            stats["google_calendar"] = {"events": events, "requests": len(self.calendars.requests)}
        return stats

    def control_app(self) -> Starlette:
        async def faults(request: Request) -> Response:
            body = await request.json()
            try:
                answer = self.set_fault(str(body.get("provider")), str(body.get("mode")), body.get("latency_ms"))
            except ValueError as error:
                return JSONResponse({"error": str(error)}, status_code=400)
            return JSONResponse(answer)

        async def stats(request: Request) -> Response:
            return JSONResponse(self.stats())

        return Starlette(
            routes=[Route("/_load/faults", faults, methods=["POST"]), Route("/_load/stats", stats, methods=["GET"])]
        )


def _calls_exist(app: ASGIApp, calls: TwilioState) -> ASGIApp:
    """Twilio knows every call it placed: a call the server updates (hang-up) exists in the simulator,
    whatever SID the load's callers made up."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            found = _CALL_PATH.match(scope["path"])
            if found is not None and found["sid"] not in calls.calls:
                calls.add_call(found["sid"])
        await app(scope, receive, send)

    return wrapped


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


SIM_STALL_SECONDS = 0.2


async def serve(options: SimOptions) -> None:
    business = load_business(options.business_file)
    simulators = Simulators(options, business)
    if simulators.policy is not None:
        # The dialog's first answer builds its parsers (over 100 ms): paid now, not by the first caller.
        warm = simulators.policy([{"role": "user", "content": "I would like to book a checkup tomorrow at ten"}], [])
        if inspect.isawaitable(warm):
            await warm
    receipts = httpx.AsyncClient(timeout=10.0)
    if simulators.messages is not None:
        simulators.messages.callback_client = receipts
    apps: dict[str, ASGIApp] = {**simulators.apps, "control": simulators.control_app()}
    servers: dict[str, tuple[uvicorn.Server, Any]] = {}
    for name, app in apps.items():
        # loopback_socket: TCP_NODELAY on accepted connections, or every answer waits for a delayed ACK.
        sock = loopback_socket()
        config = uvicorn.Config(
            app, log_config=None, lifespan="off", backlog=2048, ws="websockets-sansio", ws_per_message_deflate=False
        )
        servers[name] = (uvicorn.Server(config), sock)
    tasks = [asyncio.create_task(server.serve(sockets=[sock])) for server, sock in servers.values()]
    stop = asyncio.Event()
    # A simulator that stalls makes the server look slow (late transcripts, late first bytes of speech):
    # its own stalls are logged with the stack that held its loop, once a second at most.
    stalls = contextlib.AsyncExitStack()
    await stalls.enter_async_context(watching_for_stalls(SIM_STALL_SECONDS, cooldown=1.0))
    try:
        with _stop_on_signals(stop):
            while not all(server.started for server, _ in servers.values()):
                for task in tasks:
                    if task.done():
                        task.result()
                await asyncio.sleep(0.01)
            urls = {name: f"http://127.0.0.1:{sock.getsockname()[1]}" for name, (_, sock) in servers.items()}
            control = urls.pop("control")
            announcement = json.dumps({"env": simulators.environment(urls), "control": control})
            if options.env_file is not None:
                options.env_file.write_text(announcement)
            print(f"{READY} {announcement}", flush=True)
            await stop.wait()
    finally:
        for server, _ in servers.values():
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        if simulators.messages is not None:
            await simulators.messages.aclose()
        await receipts.aclose()
        for _, sock in servers.values():
            sock.close()
        await stalls.aclose()


def parse_args(argv: list[str] | None = None) -> SimOptions:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--business", type=Path, required=True, help="the server's business TOML")
    parser.add_argument("--utterances", type=Path, required=True, help="load_script.write_utterances's folder")
    parser.add_argument("--folder", type=Path, required=True, help="where the service-account key file goes")
    parser.add_argument("--auth-token", required=True, help="the Twilio auth token the server uses")
    parser.add_argument("--only", default=",".join(SERVICES), help="comma-separated simulators to run here")
    parser.add_argument("--stt-final-ms", type=int, default=150)
    parser.add_argument("--llm-first-token-ms", type=int, default=250)
    parser.add_argument("--llm-tokens-per-second", type=float, default=60.0, help="0: no limit")
    parser.add_argument("--tts-first-byte-ms", type=int, default=100)
    parser.add_argument("--provider-ms", type=int, default=150, help="Calendar and Messages answer time")
    parser.add_argument("--env-file", type=Path)
    args = parser.parse_args(argv)
    services = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = set(services) - set(SERVICES)
    if unknown or not services:
        parser.error(f"--only takes some of {', '.join(SERVICES)}")
    return SimOptions(
        business_file=args.business,
        utterances=args.utterances,
        folder=args.folder,
        auth_token=args.auth_token,
        services=services,
        stt_final_ms=args.stt_final_ms,
        llm_first_token_ms=args.llm_first_token_ms,
        llm_tokens_per_second=args.llm_tokens_per_second or None,
        tts_first_byte_ms=args.tts_first_byte_ms,
        provider_ms=args.provider_ms,
        env_file=args.env_file,
    )


def main() -> None:
    from voice_server.logging import configure_logging

    configure_logging("WARNING", "console")
    # uvloop, as under ``voicebook serve``: the simulators share the machine with the server they measure,
    # so their own loop overhead is CPU taken from it.
    uvloop.run(serve(parse_args()))


if __name__ == "__main__":
    main()
