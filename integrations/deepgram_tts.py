"""Text to speech with Deepgram Aura over REST, through the deepgram SDK (``TextToSpeech`` port).

Asks for raw mu-law at 8 kHz (``container=none``: no WAV header to click on the line, no transcoding)
and yields the audio as it arrives, re-cut into whole 20 ms frames (160 bytes) except possibly the last
piece. Closing the iterator (a barge-in cancels the reply) leaves the SDK's ``async with`` and so closes
the HTTP response: Deepgram stops synthesising.

A transient failure before the first byte (429, 5xx, timeout, connection error) is retried once, after
``Retry-After`` when the answer gives one (up to ``max_retry_after_s``; longer waits are not worth a
caller's silence) or a short backoff otherwise. Once audio has been yielded nothing is retried: a
replay would repeat words. Failures raise ``SpeechProviderError`` with ``transient`` set, so the session
can fall back to another voice. A request refused by the client's egress allowlist
(:func:`integrations.deepgram_stt.deepgram_client`) fails at once, not transient, before anything is sent.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
from deepgram import AsyncDeepgramClient
from deepgram.core.api_error import ApiError

from integrations.deepgram_stt import SpeechProviderError, api_failure
from integrations.egress import EgressRefused
from integrations.http_headers import retry_after
from integrations.metrics import provider_connect
from voice_server.audio import MULAW_FRAME_BYTES, SAMPLE_RATE

Sleep = Callable[[float], Awaitable[None]]


class DeepgramTTS:
    def __init__(
        self,
        client: AsyncDeepgramClient,
        *,
        model: str = "aura-2-thalia-en",
        timeout_s: float = 10.0,
        backoff_s: float = 0.25,
        max_retry_after_s: float = 3.0,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._client = client
        self.model = model
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.max_retry_after_s = max_retry_after_s
        self._sleep = sleep  # injected so tests can see the waits without waiting

    async def synthesize(self, text: str) -> AsyncIterator[bytes]:
        failure: SpeechProviderError | None = None
        for attempt in range(2):
            if failure is not None:
                await self._sleep(self._retry_delay(failure, attempt))
            started = False
            try:
                request = self._client.speak.v1.audio.with_raw_response.generate(
                    text=text,
                    model=self.model,
                    encoding="mulaw",
                    sample_rate=SAMPLE_RATE,
                    container="none",
                    request_options={"timeout": self.timeout_s},
                )
                # The request is the synthesis answering (its headers), not the audio streaming after.
                async with provider_connect("deepgram", "speak", request) as response:
                    pending = bytearray()
                    async for chunk in response.data:
                        pending += chunk
                        whole = len(pending) - len(pending) % MULAW_FRAME_BYTES
                        if whole:
                            started = True
                            yield bytes(pending[:whole])
                            del pending[:whole]
                    if pending:
                        yield bytes(pending)
                    return
            except ApiError as error:
                failure = api_failure(error, "speech synthesis", retry_after=retry_after(error.headers))
            except httpx.TimeoutException as error:
                failure = SpeechProviderError(f"Deepgram speech synthesis timed out: {error!r}", transient=True)
            except httpx.TransportError as error:
                failure = SpeechProviderError(f"Deepgram speech synthesis unreachable: {error!r}", transient=True)
            except EgressRefused as error:
                raise SpeechProviderError(f"Deepgram speech synthesis refused: {error}", transient=False) from error
            if started or attempt == 1 or not self._may_retry(failure):
                raise failure

    def _may_retry(self, failure: SpeechProviderError) -> bool:
        wait = failure.retry_after
        return failure.transient and (wait is None or wait <= self.max_retry_after_s)

    def _retry_delay(self, failure: SpeechProviderError, attempt: int) -> float:
        if failure.retry_after is not None:
            return failure.retry_after
        return self.backoff_s * attempt * random.uniform(0.5, 1.0)
