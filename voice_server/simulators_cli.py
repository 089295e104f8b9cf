"""`voicebook simulators`: the provider simulators as servers on loopback, for an offline demo of the
production stack and for load tests. Deepgram (live listen and speak; pocketsphinx hears, espeak-ng
speaks), OpenAI chat completions (the offline dialog plays the model) and Twilio's REST API. Each takes
the latency it is told to, so the demo feels like the real providers."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp

from booking.business import Business
from booking.ledger.repository import utc_now
from integrations.simulators.deepgram import DeepgramSimConfig, default_simulator
from integrations.simulators.dialog_policy import dialog_policy
from integrations.simulators.openai import OpenAISimConfig, create_openai_simulator
from integrations.simulators.twilio import TwilioState, create_twilio_simulator
from integrations.simulators.twilio_numbers import NumbersState


@dataclass(frozen=True, slots=True)
class SimulatorOptions:
    host: str = "127.0.0.1"
    deepgram_port: int = 8701
    openai_port: int = 8702
    twilio_port: int = 8703
    stt_final_ms: int = 150
    llm_first_token_ms: int = 250
    llm_tokens_per_second: float | None = 60.0
    tts_first_byte_ms: int = 100
    deepgram_key: str = "sim-deepgram-key"
    openai_key: str = "sk-sim-0123456789"
    twilio_account_sid: str = "AC" + "5" * 32
    twilio_auth_token: str | None = None
    twilio_messaging_service_sid: str = "MG" + "5" * 32
    """A Messaging Service the Twilio simulator knows, for `voicebook numbers configure --messaging-service`."""


def environment(options: SimulatorOptions, twilio_auth_token: str) -> dict[str, str]:
    """The variables that point a voicebook server at these simulators."""
    base = f"http://{options.host}"
    return {
        "DEEPGRAM_API_KEY": options.deepgram_key,
        "DEEPGRAM_BASE_URL": f"{base}:{options.deepgram_port}",
        "OPENAI_API_KEY": options.openai_key,
        "OPENAI_BASE_URL": f"{base}:{options.openai_port}/v1",
        "TWILIO_ACCOUNT_SID": options.twilio_account_sid,
        "TWILIO_AUTH_TOKEN": twilio_auth_token,
        "TWILIO_API_BASE_URL": f"{base}:{options.twilio_port}",
    }


def simulator_apps(options: SimulatorOptions, business: Business, twilio_auth_token: str) -> dict[int, ASGIApp]:
    deepgram = default_simulator(
        DeepgramSimConfig(
            api_key=options.deepgram_key,
            stt_final_delay_ms=options.stt_final_ms,
            tts_first_byte_ms=options.tts_first_byte_ms,
        )
    )
    openai = create_openai_simulator(
        OpenAISimConfig(
            api_key=options.openai_key,
            first_token_ms=options.llm_first_token_ms,
            tokens_per_second=options.llm_tokens_per_second,
        ),
        dialog_policy(business, utc_now),
    )
    numbers = NumbersState(options.twilio_account_sid, twilio_auth_token)  # the numbers to search and buy
    numbers.add_messaging_service(options.twilio_messaging_service_sid)
    twilio = create_twilio_simulator(TwilioState(options.twilio_account_sid, twilio_auth_token), numbers)
    return {options.deepgram_port: deepgram, options.openai_port: openai, options.twilio_port: twilio}


async def run_simulators(
    options: SimulatorOptions, business: Business, *, announce: Callable[[str], None] = print
) -> None:
    token = options.twilio_auth_token or secrets.token_hex(16)
    servers = [
        uvicorn.Server(uvicorn.Config(app, host=options.host, port=port, log_level="warning", lifespan="off"))
        for port, app in simulator_apps(options, business, token).items()
    ]
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    try:
        while not all(server.started for server in servers):
            for task in tasks:
                if task.done():
                    task.result()
            await asyncio.sleep(0.02)
        announce("simulators running; point a server at them with:")
        for name, value in environment(options, token).items():
            announce(f"export {name}={value}")
        await asyncio.gather(*tasks)
    finally:
        for server in servers:
            server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
