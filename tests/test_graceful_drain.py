"""Shutting down with callers on the line: new calls are turned away, calls in progress finish, and
the ones still going when the drain ends hear a goodbye and are filed."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import connect

from booking.calls import CallRecord, CallTurn
from booking.ledger.calls_repository import CallLedger
from booking.ledger.database import Database
from integrations.simulators.loopback import loopback_socket
from tests.conftest import FrozenClock
from tests.twilio_caller import TwilioCaller
from tests.voice_fakes import scripted_ports
from voice_server.app import create_app
from voice_server.components import Components
from voice_server.server import SHUTDOWN_GOODBYE, DrainingServer
from voice_server.settings import Settings

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
CALL_SID = "CA" + "d" * 32


@dataclass
class Running:
    server: DrainingServer
    task: asyncio.Task[None]
    base: str
    components: Components
    database_url: str

    async def filed(self, call_sid: str) -> tuple[list[CallTurn], CallRecord]:
        """What the ledger holds for the call, read with a connection of our own: the server's engines
        are disposed once it has stopped."""
        database = Database.connect(self.database_url)
        try:
            ledger = CallLedger(database)
            return await ledger.transcript(call_sid), await ledger.require_call(call_sid)
        finally:
            await database.dispose()


@pytest.fixture
def drain_seconds() -> float:
    return 10.0


@pytest.fixture
async def running(app_settings: Settings, clock: FrozenClock, drain_seconds: float) -> AsyncIterator[Running]:
    sock = loopback_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = dataclasses.replace(app_settings, public_url=base, twilio_auth_token=AUTH_TOKEN, silence_seconds=30.0)
    app = create_app(settings, clock=clock, voice=scripted_ports(["I would like a checkup"]))
    config = uvicorn.Config(app, log_config=None, lifespan="on", ws="websockets-sansio")
    server = DrainingServer(config, app, drain_seconds=drain_seconds)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield Running(server, task, base, app.state.components, settings.effective_database_url)
    finally:
        if not task.done():
            server.should_exit = True
        await asyncio.wait_for(task, 20)
        sock.close()


def signed_headers(url: str, params: dict[str, str] | None = None) -> dict[str, str]:
    return {"X-Twilio-Signature": RequestValidator(AUTH_TOKEN).compute_signature(url, params or {})}


async def new_call_twiml(base: str) -> str:
    params = {
        "CallSid": "CA" + "e" * 32,
        "AccountSid": "AC" + "0" * 32,
        "From": "+16465550111",
        "To": "+12125550100",
        "CallStatus": "ringing",
    }
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{base}/twilio/voice", data=params, headers=signed_headers(f"{base}/twilio/voice", params)
        )
    return response.text


@contextlib.asynccontextmanager
async def on_the_line(running: Running) -> AsyncIterator[TwilioCaller]:
    """A caller connected to the server who has heard the greeting."""
    media = running.base.replace("http://", "ws://") + "/twilio/media"
    async with (
        connect(media, additional_headers=signed_headers(media)) as ws,
        TwilioCaller(ws, call_sid=CALL_SID) as caller,
    ):
        await caller.connect()
        await caller.wait_for(lambda: len(caller.marks_echoed) >= 2)  # the greeting was heard
        yield caller


async def test_calls_in_progress_finish_while_new_ones_are_turned_away(running: Running) -> None:
    async with on_the_line(running) as caller:
        running.server.handle_exit(signal.SIGTERM, None)
        await asyncio.sleep(0.1)
        assert "call back in a few minutes" in await new_call_twiml(running.base)
        await caller.say()  # the call in progress carries on as usual
        await caller.wait_for(lambda: len(caller.marks_echoed) >= 4)
        assert not running.task.done(), "the server waits for the call"
        await caller.stop()
    await asyncio.wait_for(running.task, 10)  # the last call ended: the server stops by itself
    turns, _ = await running.filed(CALL_SID)
    assert [t.role for t in turns] == ["agent", "caller", "agent"]
    assert SHUTDOWN_GOODBYE not in [t.text for t in turns]


@pytest.mark.parametrize("drain_seconds", [0.5])
async def test_calls_still_going_at_the_end_of_the_drain_hear_a_goodbye(running: Running) -> None:
    async with on_the_line(running):  # the caller stays silent
        running.server.handle_exit(signal.SIGTERM, None)
        await asyncio.wait_for(running.task, 15)
    turns, call = await running.filed(CALL_SID)
    assert turns[-1].text == SHUTDOWN_GOODBYE
    assert call.end_reason == "server_shutdown"
