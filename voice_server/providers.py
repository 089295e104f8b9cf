"""Which speech, agent and telephony providers a server uses, built once from settings.

Each production provider switches on when its credentials are configured (or when chosen explicitly);
its module is imported only then, so a server on Deepgram never loads pocketsphinx and the reverse;
without them the offline defaults answer: pocketsphinx listening with per-question grammars, espeak-ng
speaking, and the deterministic booking dialog. Clients are opened here and closed by the lifespan's
exit stack.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING

import httpx
import structlog

from booking.business import Business
from booking.errors import BookingError
from booking.service import BookingService
from booking.writes import BookingWriter
from integrations.egress import Allowlist, httpx2_client, httpx_transport
from integrations.http_pool import ShardedTransport
from integrations.twilio_rest import TwilioCallControl
from voice_server import egress_policy
from voice_server.agent_prompt import BookingView, CallerContext, build_system_prompt
from voice_server.dialog import DialogAgent
from voice_server.fallback import FallbackSTT, FallbackTTS
from voice_server.metrics import RECENT_LOOP_LAG
from voice_server.ports import (
    Agent,
    CallControl,
    CallInfo,
    SpeechToText,
    SpeechToTextStream,
    TextToSpeech,
    VoicePorts,
)
from voice_server.settings import Settings
from voice_server.tools import BookingTools

if TYPE_CHECKING:
    from integrations.espeak_process import EspeakProcessTTS

log = structlog.get_logger("voicebook.providers")

DEEPGRAM_HTTP_LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=500, keepalive_expiry=30.0)
"""Speech synthesis requests of every call in flight at once: idle connections are kept for all of them."""


def deepgram_http_client(egress: Allowlist | None = None) -> httpx.AsyncClient:
    """The HTTP client of Deepgram's REST calls (speech synthesis). Every call speaks through its pool at
    once, and httpx keeps only 20 idle connections by default: under load most sentences then opened a
    fresh connection, which is a TLS handshake to Deepgram before the first byte of speech (measured in a
    40-call load test: 454 new connections a minute with the default, 90 with these limits). The pool is
    split into shards (:mod:`integrations.http_pool`), since httpcore's pool work grows with the square
    of its connections. With ``egress`` it sends only to those hosts and refuses redirects
    (:mod:`integrations.egress`)."""
    timeout = httpx.Timeout(10.0, connect=5.0)
    pools = ShardedTransport(limits=DEEPGRAM_HTTP_LIMITS)
    if egress is None:
        return httpx.AsyncClient(timeout=timeout, transport=pools)
    return httpx.AsyncClient(timeout=timeout, transport=httpx_transport(egress, pools), follow_redirects=False)


def caller_context_lookup(
    service: BookingService, clock: Callable[[], datetime]
) -> Callable[[CallInfo], Awaitable[CallerContext]]:
    """What the ledger knows about a caller: their name and upcoming bookings, found by their number."""

    async def lookup(info: CallInfo) -> CallerContext:
        try:
            bookings = await service.find_bookings(info.caller)
        except BookingError:  # a withheld or malformed number: an unknown caller
            bookings = []
        business = service.business
        name = next((b.customer.name for b in reversed(bookings) if b.customer.name), None)
        zone = next((b.customer.time_zone for b in bookings if b.customer.time_zone), None)
        upcoming = [
            BookingView(
                booking_id=b.id,
                service_name=getattr(business.service(b.service_id), "name", b.service_id),
                start=b.start,
                resource_name=getattr(business.resource(b.resource_id), "name", None),
            )
            for b in sorted(bookings, key=lambda b: b.start)[:5]
        ]
        return CallerContext(name=name, upcoming=upcoming, timezone=zone, phone=info.caller or None)

    return lookup


@functools.cache
def _shared_sphinx(pid: int) -> SpeechToText:
    """One offline ear per server process (keyed by process id, so a forked child builds its own): its
    decoder processes serve every call of every app in the process."""
    from integrations.sphinx import SphinxSTT
    from integrations.sphinx_process import SphinxProcessRecognizer

    return SphinxSTT(SphinxProcessRecognizer())


class _LazySphinx:
    """pocketsphinx in worker processes, started on the first call that needs it (the model takes a
    moment and memory), or at once with :meth:`warm_up`."""

    def __init__(self) -> None:
        self._stt: SpeechToText | None = None

    def _load(self) -> SpeechToText:
        if self._stt is None:
            self._stt = _shared_sphinx(os.getpid())
        return self._stt

    async def warm_up(self) -> None:
        """Start the decoder processes and build their decoders now, so the first caller does not wait."""
        from integrations.sphinx import SphinxSTT
        from integrations.sphinx_process import SphinxProcessRecognizer

        stt = self._load()
        assert isinstance(stt, SphinxSTT) and isinstance(stt.recognizer, SphinxProcessRecognizer)
        await stt.recognizer.start()

    async def open(self, call: CallInfo) -> SpeechToTextStream:
        return await self._load().open(call)


class _LazyEspeak:
    """libespeak-ng in a worker process (``integrations.espeak_process``), started on the first sentence
    that needs it, or at once with :meth:`warm_up`."""

    def __init__(self) -> None:
        self._tts: EspeakProcessTTS | None = None

    def _load(self) -> EspeakProcessTTS:
        if self._tts is None:
            from integrations.espeak_process import EspeakProcessTTS

            self._tts = EspeakProcessTTS()
        return self._tts

    async def warm_up(self) -> None:
        await self._load().start()

    def synthesize(self, text: str) -> AsyncIterator[bytes]:
        return self._load().synthesize(text)

    async def aclose(self) -> None:
        if self._tts is not None:
            await self._tts.aclose()


async def build_voice(
    settings: Settings,
    business: Business,
    service: BookingService,
    stack: contextlib.AsyncExitStack,
    *,
    clock: Callable[[], datetime],
    lane: BookingWriter | None = None,
) -> VoicePorts:
    tools = BookingTools(service, clock=clock, lane=lane)
    deepgram = None
    if settings.stt == "deepgram" or settings.tts == "deepgram":
        from integrations.deepgram_stt import deepgram_client

        assert settings.deepgram_api_key is not None  # settings refuse the choice without a key
        http = deepgram_http_client(egress_policy.deepgram(settings))
        stack.push_async_callback(http.aclose)
        deepgram = deepgram_client(settings.deepgram_api_key, base_url=settings.deepgram_base_url, http=http)
    # The offline engines are also the production providers' fallbacks: a call whose Deepgram socket
    # cannot be brought back, or whose Aura request fails, carries on in the offline voice and ear
    # instead of going deaf or silent. Built lazily: a server whose providers never fail never loads them.
    stt: SpeechToText
    if settings.stt == "deepgram" and deepgram is not None:
        from integrations.deepgram_stt import DeepgramSTT

        stt = FallbackSTT(
            DeepgramSTT(
                deepgram,
                model=settings.deepgram_stt_model,
                endpointing_ms=settings.deepgram_endpointing_ms,
                utterance_end_ms=settings.deepgram_utterance_end_ms,
                chunk_ms=settings.deepgram_chunk_ms,
            ),
            _LazySphinx(),
            provider="deepgram",
        )
    else:
        offline = _LazySphinx()
        await offline.warm_up()
        stt = offline
    tts: TextToSpeech
    offline_voice = _LazyEspeak()
    stack.push_async_callback(offline_voice.aclose)
    if settings.tts == "deepgram" and deepgram is not None:
        from integrations.deepgram_tts import DeepgramTTS

        tts = FallbackTTS(
            DeepgramTTS(deepgram, model=settings.deepgram_tts_model),
            offline_voice,
            first_byte_timeout_s=2.5,
            provider="deepgram",
            loop_lag=RECENT_LOOP_LAG.worst_since,
        )
    else:
        await offline_voice.warm_up()  # every call's greeting needs it: start the worker before the first
        tts = offline_voice
    agent: Agent
    if settings.agent == "openai":
        from openai import DEFAULT_CONNECTION_LIMITS, AsyncOpenAI

        from integrations.openai_agent import OpenAIAgent

        client = AsyncOpenAI(
            api_key=settings.openai_api_key,
            base_url=settings.openai_base_url,
            # The SDK's own pool size, behind the egress gate (its default client follows redirects).
            http_client=httpx2_client(egress_policy.openai(settings), limits=DEFAULT_CONNECTION_LIMITS),
        )
        stack.push_async_callback(client.close)
        context = caller_context_lookup(service, clock)

        async def system_prompt(info: CallInfo) -> str:
            # A line that serves part of the business presents only that part (voice_server/lines.py).
            line = business.serving(info.serves) if info.serves else business
            return build_system_prompt(line, await context(info), clock())

        agent = OpenAIAgent(
            client,
            model=settings.openai_model,
            tools=tools.specs,
            system_prompt=system_prompt,
            request_timeout=settings.openai_timeout_seconds,
        )
    else:
        agent = DialogAgent(business, clock=clock)
    control: CallControl | None = None
    if settings.twilio_account_sid and settings.twilio_auth_token:
        control = TwilioCallControl(
            settings.twilio_account_sid,
            settings.twilio_auth_token,
            api_base_url=settings.twilio_api_base_url,
            egress=egress_policy.twilio(settings),
        )
    log.info(
        "voice_providers",
        stt=settings.stt,
        tts=settings.tts,
        agent=settings.agent,
        call_control="twilio" if control is not None else "none",
    )
    return VoicePorts(stt=stt, agent=agent, tts=tts, tools=tools, control=control)
