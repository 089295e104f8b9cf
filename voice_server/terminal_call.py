"""`voicebook call`: place a test call to a running server from the terminal, as Twilio would.

What you type is spoken into the call (synthesised with espeak-ng, sent as 20 ms mu-law frames in real
time), so the server hears real audio and its own speech recogniser does the listening. What the agent
says is read from the server's live transcript (the calls API), which holds exactly what the caller
heard. ``press 1`` sends a DTMF digit; an empty line or end of input hangs up.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx

from voice_server.softphone import Softphone

PRESS = re.compile(r"^\s*press\s+([0-9*#])\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class CallOptions:
    url: str
    auth_token: str | None
    admin_token: str | None
    caller: str
    called: str
    public_url: str | None = None
    reply_seconds: float = 20.0


async def _typed_lines() -> AsyncIterator[str]:
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            return
        yield line.rstrip("\n")


async def _lines(script: Iterable[str] | None) -> AsyncIterator[str]:
    if script is None:
        async for line in _typed_lines():
            yield line
        return
    for line in script:
        yield line


class _Transcript:
    """Prints the call's new turns as the server files them (agent, tool and caller lines)."""

    def __init__(self, http: httpx.AsyncClient, call_sid: str, admin_token: str | None, out: Callable[[str], None]):
        self._http = http
        self._call_sid = call_sid
        self.headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
        self._printed = 0
        self._out = out
        self.turns: list[dict[str, Any]] = []

    async def refresh(self) -> None:
        response = await self._http.get(f"/api/calls/{self._call_sid}", headers=self.headers)
        if response.status_code != 200:
            return
        self.turns = response.json()["transcript"]
        for turn in self.turns[self._printed :]:
            role = turn["role"]
            if role == "agent":
                self._out(f"agent: {turn['text']}" + (" [interrupted]" if turn["truncated"] else ""))
            elif role == "caller":
                self._out(f"  (heard you say: {turn['text']})")
            elif role == "tool":
                self._out(f"  [tool {turn['tool']}]")
        self._printed = len(self.turns)


async def place_call(
    options: CallOptions,
    *,
    synthesize: Callable[[str], bytes],
    script: Iterable[str] | None = None,
    out: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run one call; returns the transcript the server filed for it."""
    async with httpx.AsyncClient(base_url=options.url, timeout=10.0) as http:
        async with Softphone.dial(
            options.url,
            auth_token=options.auth_token,
            caller=options.caller,
            called=options.called,
            public_url=options.public_url,
            http=http,
        ) as phone:
            transcript = _Transcript(http, phone.call_sid, options.admin_token, out)
            out(f"calling {options.called} from {options.caller} (call {phone.call_sid}); type what you say")
            await _settle(phone, transcript, options.reply_seconds)
            async for line in _lines(script):
                if not line.strip() or phone.closed.is_set():
                    break
                pressed = PRESS.match(line)
                if pressed:
                    await phone.press(pressed.group(1))
                else:
                    await phone.say(await asyncio.to_thread(synthesize, line))
                await _settle(phone, transcript, options.reply_seconds)
            if not phone.closed.is_set():
                await phone.hang_up()
        for _ in range(50):  # the server files the call (its ending and transcript) a moment after the stream stops
            response = await http.get(f"/api/calls/{phone.call_sid}", headers=transcript.headers)
            if response.status_code == 200 and response.json()["end_reason"] is not None:
                break
            await asyncio.sleep(0.1)
        await transcript.refresh()
        out("call ended")
        return transcript.turns


async def _settle(phone: Softphone, transcript: _Transcript, within: float) -> None:
    """Wait for the agent's answer to finish playing, then print what it said."""
    try:
        await phone.wait_for_reply(within=within)
    except (TimeoutError, ConnectionError):
        pass
    await transcript.refresh()
