"""Speech to text with Deepgram's live WebSocket, through the deepgram SDK (``SpeechToText`` port).

One stream per call. Caller audio goes out in 100 ms chunks (``chunk_ms``); Deepgram's events come back
as port events: ``SpeechStarted`` as is, interim and final ``Results`` as ``Transcript``
(``end_of_turn`` = ``speech_final``, or a ``Finalize`` answer), and ``UtteranceEnd`` as an empty
end-of-turn ``Transcript`` when words are waiting without a ``speech_final`` (endpointing missed the end
in background noise).

A socket that drops mid-call is reopened (exponential backoff, bounded attempts per outage) and the audio
since the last final result is sent again from a bounded ring buffer, so the words of an utterance cut
in two still arrive as one transcript, and ``events()`` carries on as if nothing happened. Deepgram times
each connection from zero; the stream keeps the offset of each connection to map them back.

Each handshake is one provider request (``provider_connect``); a connection that breaks after it (a
drop, a close Deepgram was not asked for, an ``Error`` message) is counted and logged once as a provider
error of its own (``provider_stream_failed``); the clean close that answers ``CloseStream`` at the end of
a call is not.

Egress (:mod:`integrations.egress`): :func:`deepgram_client` puts the client behind its allowlist. Every
REST request's base URL and every live socket's URL is checked before the SDK sends or dials, so a
host outside the list is refused without a connection; the SDK's REST client is built gated when none
is given, and its sockets refuse a redirect answer to the handshake (the SDK's websockets client would
follow it, with the API key, to any host). A refusal ends the stream as a permanent
``SpeechProviderError``: retrying cannot change the answer.

Chunks: Twilio's 20 ms frames are gathered into ``chunk_ms`` of audio per WebSocket message. Each
message is a socket write, and under load the writes, not the bytes, are the cost: at 100 calls with
40 ms chunks, the listen sockets' writes were a fifth of the server's event-loop time. 100 ms is in the
range Deepgram recommends (20 to 250 ms); the price is that the audio ending a turn reaches Deepgram up
to one chunk later. ``finalize()`` and ``close()`` send what is gathered at once.

Keyterms: nova-3 takes ``keyterm`` query parameters at connect time and a ``Configure`` message mid-stream
(deepgram-sdk 7.17's ``ListenV1Configure``); ``expect()`` sends the expected choices (names, services)
as keyterms that way. Other models ignore ``expect()``.
"""

from __future__ import annotations

import asyncio
import enum
import random
import sys
import warnings
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import httpx
import structlog
from websockets.exceptions import ConnectionClosed, WebSocketException

from integrations import ws_masking
from integrations.egress import DEEPGRAM_HOSTS, Allowlist, EgressRefused, RedirectRefusingConnect, httpx_client
from integrations.metrics import ErrorKind, provider_connect, provider_stream_failed
from voice_server.audio import SAMPLE_RATE
from voice_server.ports import CallInfo, Expectation, SpeechEvent, SpeechStarted, Transcript

with warnings.catch_warnings():
    # deepgram-sdk 7.17 imports websockets.legacy and websockets.exceptions.InvalidStatusCode, both
    # deprecated since websockets 14; the SDK's own modules are imported here, once, so the warning
    # never fires later from inside a call.
    warnings.simplefilter("ignore", DeprecationWarning)
    import deepgram.listen.v1.client
    import deepgram.speak.v1.client  # noqa: F401 - the same, used by deepgram_tts
    from deepgram import AsyncDeepgramClient, DeepgramClientEnvironment
    from deepgram.core.api_error import ApiError
    from deepgram.listen.v1.socket_client import AsyncV1SocketClient
    from deepgram.listen.v1.types import (
        ListenV1Configure,
        ListenV1ConfigureFailure,
        ListenV1ConfigureSuccess,
        ListenV1Error,
        ListenV1Metadata,
        ListenV1Results,
        ListenV1SpeechStarted,
        ListenV1UtteranceEnd,
    )
    from websockets.legacy.client import Connect as LegacyConnect  # what the SDK dials with

log = structlog.get_logger("voicebook.deepgram")

TRANSIENT_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504})
_BYTES_PER_S: Final = SAMPLE_RATE  # mu-law: one byte per sample
HEALTHY_CONNECTION_S: Final = 10.0  # a connection that lasted this long (or answered) ends an outage
DATA_ERROR_CLOSE: Final = 1008  # Deepgram's close code for DATA-0000: what we sent could not be decoded


class SpeechProviderError(RuntimeError):
    """Deepgram refused, failed or could not be reached. ``transient`` says whether trying again later
    may help (429, 5xx, timeouts, dropped sockets), so the session can fall back or carry on."""

    def __init__(
        self, message: str, *, transient: bool, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status
        self.retry_after = retry_after  # seconds Deepgram asked us to wait, when it said


def api_failure(error: ApiError, what: str, *, retry_after: float | None = None) -> SpeechProviderError:
    """Our error for an SDK ``ApiError``: the status decides ``transient``; Deepgram's ``err_msg`` is kept."""
    status = error.status_code
    body = error.body if isinstance(error.body, dict) else {"err_msg": error.body}
    detail = body.get("err_msg") or body.get("err_code") or "no detail"
    return SpeechProviderError(
        f"Deepgram {what} failed with HTTP {status}: {detail}",
        transient=status in TRANSIENT_STATUSES,
        status=status,
        retry_after=retry_after,
    )


def dropped_stream_kind(close_code: int | None) -> ErrorKind:
    """The error kind of a stream that ended without being asked to: ``rejected`` when Deepgram closed it
    over what we sent (1008, DATA-0000), else ``unavailable`` (1011 for NET-0000 and NET-0001, a reset
    without a close frame, a clean close in the middle of a call)."""
    return "rejected" if close_code == DATA_ERROR_CLOSE else "unavailable"


def error_message_kind(variant: str) -> ErrorKind:
    """The error kind of an ``Error`` message: ``SchemaError`` means Deepgram could not parse a text
    message we sent (``rejected``); any other variant is a failure on Deepgram's side (``unavailable``)."""
    return "rejected" if variant == "SchemaError" else "unavailable"


def loopback_environment(base_url: str) -> DeepgramClientEnvironment:
    """Point the SDK at a Deepgram-compatible server (the simulator): ``base`` serves REST, ``production``
    the WebSockets."""
    base = base_url.rstrip("/")
    sockets = "ws" + base.removeprefix("http") if base.startswith("http") else base
    return DeepgramClientEnvironment(base=base, production=sockets, agent=sockets, agent_rest=base)


SDK_SOCKET_MODULES: Final = (
    "deepgram.listen.v1.client",
    "deepgram.listen.v1.raw_client",
    "deepgram.speak.v1.client",
    "deepgram.speak.v1.raw_client",
)
"""The SDK modules that dial a WebSocket (each imports websockets' ``connect`` under its own name)."""


def deepgram_client(
    api_key: str,
    *,
    base_url: str | None = None,
    http: httpx.AsyncClient | None = None,
    egress: Allowlist | None = None,
) -> AsyncDeepgramClient:
    """The SDK client, built once at start-up. Retries are the adapters' (the SDK's own retry loop does
    not cover streamed responses), so the SDK's are turned off. The live sockets mask their frames with
    buffered randomness (:mod:`integrations.ws_masking`).

    ``egress`` (default: ``base_url``'s host, else Deepgram's) is where the client may send (module doc).
    ``http`` should come from :func:`integrations.egress.httpx_client` so REST answers are never
    followed as redirects; without one the client builds such a client itself (the SDK's own would
    follow them)."""
    ws_masking.install()
    refuse_socket_redirects()
    allow = egress if egress is not None else Allowlist.of([base_url] if base_url else DEEPGRAM_HOSTS)
    environment = DeepgramClientEnvironment.PRODUCTION if base_url is None else loopback_environment(base_url)
    if http is None:
        http = httpx_client(allow, timeout=60.0)  # the SDK's own default timeout
    client = AsyncDeepgramClient(api_key=api_key, environment=environment, httpx_client=http, max_retries=0)
    _fix_request_headers(client)
    _check_hosts(client, allow)
    return client


def refuse_socket_redirects() -> None:
    """Make the SDK's sockets refuse redirects (idempotent). Fails loudly if a release of the SDK no
    longer dials with websockets' legacy client, since the refusal would silently stop applying."""
    for name in SDK_SOCKET_MODULES:
        namespace = vars(sys.modules[name])
        current = namespace.get("websockets_client_connect")
        if current is RedirectRefusingConnect:
            continue
        if current is not LegacyConnect:
            raise RuntimeError(f"{name} no longer dials with websockets.legacy.client.connect; revisit egress")
        namespace["websockets_client_connect"] = RedirectRefusingConnect


def _check_hosts(client: AsyncDeepgramClient, allow: Allowlist) -> None:
    """Check each REST request's base URL and each live socket's URL against ``allow`` before the SDK
    uses it. Every REST request of the SDK asks its HTTP wrapper for the base URL first, and the socket's
    URL is the environment's ``production`` one: both are replaced on the instance, as
    :func:`_fix_request_headers` does."""
    wrapper = client._client_wrapper
    rest = wrapper.httpx_client
    base_url_of = rest.get_base_url

    def checked_base_url(maybe_base_url: str | None) -> str:
        url = base_url_of(maybe_base_url)
        allow.check(url)
        return url

    rest.get_base_url = checked_base_url  # type: ignore[method-assign]
    listen = client.listen.v1
    connect = listen.connect

    def checked_connect(**options: Any) -> Any:
        allow.check(wrapper.get_environment().production + "/v1/listen")
        return connect(**options)

    listen.connect = checked_connect


def _fix_request_headers(client: AsyncDeepgramClient) -> None:
    """Compute the SDK's request headers once. The SDK builds them again for every request and socket,
    and each time reads its own version from the installed package's metadata (``importlib.metadata``
    walks site-packages): 0.4 ms on a quiet machine, but on the event loop under 100 calls the loop
    watchdog caught it stalling the loop for 260 ms, every file it reads giving up the interpreter to
    other threads. The headers depend only on the client's settings. Replaced on the instance, as the
    SDK's own bearer-token override does."""
    wrapper = client._client_wrapper
    fixed = wrapper.get_headers()

    def headers() -> dict[str, str]:
        return dict(fixed)

    wrapper.get_headers = headers  # type: ignore[method-assign]
    wrapper.httpx_client.base_headers = headers


@dataclass(frozen=True, slots=True)
class ListenSettings:
    model: str = "nova-3"
    endpointing_ms: int | None = 300  # None: endpointing=false (turns end at UtteranceEnd)
    utterance_end_ms: int = 1000
    smart_format: bool = True
    chunk_ms: int = 100  # audio sent per WebSocket message (module doc)
    keepalive_s: float = 4.0  # Deepgram closes a stream after 10 s without audio or a message
    reconnect_attempts: int = 4  # per outage
    reconnect_backoff_s: float = 0.2  # doubled per attempt, with jitter
    replay_limit_s: float = 30.0  # audio kept for replay after a drop
    close_timeout_s: float = 5.0  # wait for the last results and Metadata after CloseStream


class DeepgramSTT:
    """``SpeechToText`` on Deepgram. ``client`` comes from ``deepgram_client`` (one per process)."""

    def __init__(
        self,
        client: AsyncDeepgramClient,
        *,
        model: str = "nova-3",
        endpointing_ms: int | None = 300,
        utterance_end_ms: int = 1000,
        **settings: Any,
    ) -> None:
        self._client = client
        self.settings = ListenSettings(
            model=model, endpointing_ms=endpointing_ms, utterance_end_ms=utterance_end_ms, **settings
        )

    async def open(self, call: CallInfo) -> DeepgramSTTStream:
        stream = DeepgramSTTStream(self._client, self.settings, call)
        await stream.start()
        return stream


class StreamState(enum.StrEnum):
    CONNECTING = "connecting"
    OPEN = "open"
    RECONNECTING = "reconnecting"
    CLOSING = "closing"
    CLOSED = "closed"


_LEGAL: Final = {
    StreamState.CONNECTING: {StreamState.OPEN, StreamState.RECONNECTING, StreamState.CLOSING, StreamState.CLOSED},
    StreamState.OPEN: {StreamState.RECONNECTING, StreamState.CLOSING, StreamState.CLOSED},
    StreamState.RECONNECTING: {StreamState.OPEN, StreamState.RECONNECTING, StreamState.CLOSING, StreamState.CLOSED},
    StreamState.CLOSING: {StreamState.CLOSED},
    StreamState.CLOSED: set[StreamState](),
}


class _End:
    """Marks the end of ``events()``."""


_END: Final = _End()


class DeepgramSTTStream:
    """One call's live transcription. Audio positions are absolute byte offsets in the call's audio
    (8000 per second); ``_ring`` holds the audio from ``_ring_start`` not yet covered by a final result."""

    def __init__(self, client: AsyncDeepgramClient, settings: ListenSettings, call: CallInfo) -> None:
        self._client = client
        self.settings = settings
        self.call = call
        self.state = StreamState.CONNECTING
        self.reconnects = 0
        self.malformed_messages = 0
        self.metadata: ListenV1Metadata | None = None  # Deepgram's summary, after close()
        self._events: asyncio.Queue[SpeechEvent | SpeechProviderError | _End] = asyncio.Queue()
        self._socket: AsyncV1SocketClient | None = None
        self._send_lock = asyncio.Lock()
        self._ring = bytearray()
        self._ring_start = 0
        self._total = 0
        self._sent = 0  # position sent on the current socket
        self._offset = 0  # position of the current connection's time zero
        self._last_activity = 0.0  # loop time of the last audio or KeepAlive sent
        self._pending_words = False  # final words not yet closed by an end of turn
        self._last_speech_started = -1.0  # seconds, call timeline
        self._keyterms: tuple[str, ...] = ()
        self._keyterms_sent: tuple[str, ...] = ()
        self._closing = False
        self._heard = False  # the current connection has delivered a message
        self._connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._runner: asyncio.Task[None] | None = None

    # -- the port ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the first connection (retrying transient refusals); raises ``SpeechProviderError``."""
        self._runner = asyncio.create_task(self._run(), name=f"deepgram-listen-{self.call.call_sid}")
        try:
            await asyncio.shield(self._connected)
        except BaseException:
            await self.close()
            raise

    async def send(self, mulaw: bytes) -> None:
        if self._closing:
            return
        self._ring += mulaw
        self._total += len(mulaw)
        excess = len(self._ring) - int(self.settings.replay_limit_s * _BYTES_PER_S)
        if excess > 0:
            del self._ring[:excess]
            self._ring_start += excess
        if self._keyterms != self._keyterms_sent:
            await self._configure()
        if self._total - self._sent >= self.settings.chunk_ms * _BYTES_PER_S // 1000:
            await self._flush()

    def expect(self, expectation: Expectation) -> None:
        """The expected choices become nova-3 keyterms, sent with the next audio (see module doc)."""
        if not self.settings.model.startswith("nova-3"):
            return
        terms = {choice.strip() for choices in expectation.choices.values() for choice in choices if choice.strip()}
        self._keyterms = tuple(sorted(terms))[:100]

    async def events(self) -> AsyncIterator[SpeechEvent]:
        while True:
            item = await self._events.get()
            if isinstance(item, _End):
                self._events.put_nowait(item)  # a second iteration ends at once too
                return
            if isinstance(item, SpeechProviderError):
                raise item
            yield item

    async def finalize(self) -> None:
        """Ask Deepgram for the words of the audio sent so far now, without waiting for endpointing;
        they come back as a final ``Transcript`` with ``end_of_turn``."""
        await self._flush()
        socket = self._socket
        if socket is not None:
            try:
                await socket.send_finalize()
            except WebSocketException:
                pass  # the reconnect replays the audio; its results will come anyway

    async def close(self) -> None:
        """CloseStream, wait for the last results and Metadata (bounded), close; idempotent."""
        if self._closing:
            if self._runner is not None:
                await asyncio.gather(self._runner, return_exceptions=True)
            return
        self._closing = True
        if self.state is not StreamState.CLOSED:
            self._move(StreamState.CLOSING)
        socket = self._socket
        if socket is not None and self._runner is not None:
            await self._flush()
            try:
                await socket.send_close_stream()
                await asyncio.wait_for(asyncio.shield(self._runner), self.settings.close_timeout_s)
            except (WebSocketException, TimeoutError, SpeechProviderError):
                pass  # closing anyway: a drop or a slow server changes nothing now
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)

    # -- the connection ---------------------------------------------------------------------------

    def _connect_options(self) -> dict[str, Any]:
        s = self.settings
        return {
            "model": s.model,
            "encoding": "mulaw",
            "sample_rate": SAMPLE_RATE,
            "channels": 1,
            "interim_results": "true",
            "endpointing": "false" if s.endpointing_ms is None else s.endpointing_ms,
            "utterance_end_ms": s.utterance_end_ms,
            "vad_events": "true",
            "smart_format": "true" if s.smart_format else "false",
            "keyterm": list(self._keyterms) or None,
        }

    async def _run(self) -> None:
        attempt = 0
        try:
            loop = asyncio.get_running_loop()
            while True:
                opened: float | None = None
                self._heard = False
                try:
                    keyterms = self._keyterms
                    # One provider request per connection (never per audio frame): the handshake.
                    connection = self._client.listen.v1.connect(**self._connect_options())
                    async with provider_connect("deepgram", "listen", connection) as socket:
                        self._keyterms_sent = keyterms
                        opened = loop.time()
                        await self._serve(socket)
                    if self._closing:
                        return
                    cause = SpeechProviderError("Deepgram closed the stream unasked", transient=True)
                    self._stream_failed(None)
                except ApiError as error:
                    cause = api_failure(error, "live transcription")
                    if not cause.transient:
                        raise cause from error
                except EgressRefused as error:
                    raise SpeechProviderError(f"Deepgram stream refused: {error}", transient=False) from error
                except (OSError, TimeoutError, WebSocketException) as error:
                    cause = SpeechProviderError(f"Deepgram stream lost: {error!r}", transient=True)
                    if opened is not None:  # else the handshake failed, and provider_connect counted it
                        self._stream_failed(error)
                if self._closing:
                    return
                # A connection that answered or lasted ends an outage: the attempts count afresh.
                healthy = opened is not None and (self._heard or loop.time() - opened >= HEALTHY_CONNECTION_S)
                attempt = 1 if healthy else attempt + 1
                if attempt > self.settings.reconnect_attempts:
                    raise cause
                self._move(StreamState.RECONNECTING)
                self.reconnects += 1
                delay = self.settings.reconnect_backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
                log.warning("deepgram_reconnect", call_sid=self.call.call_sid, attempt=attempt, cause=str(cause))
                await asyncio.sleep(delay)
        except SpeechProviderError as failure:
            log.error("deepgram_stream_failed", call_sid=self.call.call_sid, error=str(failure))
            if not self._connected.done():
                self._connected.set_exception(failure)
            else:
                self._events.put_nowait(failure)
        finally:
            self._socket = None
            if not self._connected.done():
                self._connected.set_exception(SpeechProviderError("Deepgram stream closed", transient=True))
            self._move(StreamState.CLOSED)
            self._events.put_nowait(_END)

    def _stream_failed(self, error: BaseException | None) -> None:
        """Count and log a connection that broke after its handshake; ``error`` is None when Deepgram
        closed it cleanly without being asked."""
        close = error.rcvd if isinstance(error, ConnectionClosed) else None
        kind = dropped_stream_kind(close.code if close is not None else None)
        provider_stream_failed("deepgram", kind)
        log.warning(
            "deepgram_stream_dropped",
            call_sid=self.call.call_sid,
            stream_sid=self.call.stream_sid,
            kind=kind,
            close_code=close.code if close is not None else None,
            close_reason=close.reason if close is not None else None,
            error=repr(error) if error is not None else "closed unasked",
            reconnects=self.reconnects,
        )

    async def _serve(self, socket: AsyncV1SocketClient) -> None:
        """Run one connection until it ends (``_heard`` tells whether Deepgram said anything)."""
        async with self._send_lock:
            self._offset = self._sent = self._ring_start  # replay everything not yet final
            self._socket = socket
        if not self._closing:
            self._move(StreamState.OPEN)
        if not self._connected.done():
            self._connected.set_result(None)
        self._last_activity = asyncio.get_running_loop().time()
        keepalive = asyncio.create_task(self._keep_alive(socket))
        try:
            await self._flush()
            async for message in socket:
                self._heard = True
                self._on_message(message)
        finally:
            self._socket = None
            keepalive.cancel()
            await asyncio.gather(keepalive, return_exceptions=True)

    async def _flush(self) -> None:
        """Send the audio not yet sent on this socket."""
        async with self._send_lock:
            socket = self._socket
            start = max(self._sent, self._ring_start)
            if socket is None or start >= self._total:
                return
            end = self._total
            data = bytes(self._ring[start - self._ring_start : end - self._ring_start])
            try:
                await socket.send_media(data)
            except WebSocketException:
                return  # the reader sees the drop and reconnects; the audio stays in the ring
            self._sent = end
            self._last_activity = asyncio.get_running_loop().time()

    async def _keep_alive(self, socket: AsyncV1SocketClient) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wait = self._last_activity + self.settings.keepalive_s - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            async with self._send_lock:
                await socket.send_keep_alive()
                self._last_activity = loop.time()

    async def _configure(self) -> None:
        socket, keyterms = self._socket, self._keyterms
        if socket is None:
            return  # the next connection sends them as query parameters
        async with self._send_lock:
            try:
                await socket.send_configure(ListenV1Configure(type="Configure", keyterms=list(keyterms)))
            except WebSocketException:
                return
        self._keyterms_sent = keyterms

    # -- Deepgram's messages ----------------------------------------------------------------------

    def _on_message(self, message: object) -> None:
        try:
            if isinstance(message, ListenV1Results):
                self._on_results(message)
            elif isinstance(message, ListenV1SpeechStarted):
                at = self._offset / _BYTES_PER_S + float(message.timestamp)
                if at > self._last_speech_started + 0.001:  # not the replay of a start already reported
                    self._last_speech_started = at
                    self._events.put_nowait(SpeechStarted())
            elif isinstance(message, ListenV1UtteranceEnd):
                if self._pending_words:
                    self._pending_words = False
                    self._events.put_nowait(Transcript("", is_final=True, end_of_turn=True))
            elif isinstance(message, ListenV1Metadata):
                self.metadata = message
            elif isinstance(message, ListenV1Error):
                kind = error_message_kind(str(message.variant))
                provider_stream_failed("deepgram", kind)
                log.warning(
                    "deepgram_error",
                    call_sid=self.call.call_sid,
                    stream_sid=self.call.stream_sid,
                    kind=kind,
                    variant=message.variant,
                    description=message.description,
                )
            elif isinstance(message, ListenV1ConfigureFailure):
                log.warning("deepgram_configure_failed", call_sid=self.call.call_sid, code=message.code)
            elif not isinstance(message, ListenV1ConfigureSuccess):
                raise TypeError(f"unexpected message {type(message).__name__}")
        except (AttributeError, IndexError, TypeError, ValueError) as error:
            # The SDK builds its models without validation, so a malformed message shows up here.
            self.malformed_messages += 1
            log.warning("deepgram_malformed_message", call_sid=self.call.call_sid, error=str(error))

    def _on_results(self, message: ListenV1Results) -> None:
        alternatives: Sequence[Any] = message.channel.alternatives
        text = str(alternatives[0].transcript).strip() if alternatives else ""
        if not message.is_final:
            if text:
                self._events.put_nowait(Transcript(text, is_final=False))
            return
        covered = self._offset + round((float(message.start) + float(message.duration)) * _BYTES_PER_S)
        self._forget_before(covered)
        end_of_turn = bool(message.speech_final) or bool(message.from_finalize)
        if end_of_turn:
            if text or self._pending_words:
                self._events.put_nowait(Transcript(text, is_final=True, end_of_turn=True))
            self._pending_words = False
        elif text:
            self._pending_words = True
            self._events.put_nowait(Transcript(text, is_final=True))

    def _forget_before(self, position: int) -> None:
        """Audio before ``position`` has its final result: it is never replayed."""
        drop = min(position, self._sent) - self._ring_start
        if drop > 0:
            del self._ring[:drop]
            self._ring_start += drop

    def _move(self, to: StreamState) -> None:
        if to is self.state:
            return
        if to not in _LEGAL[self.state]:
            raise RuntimeError(f"Deepgram stream cannot go from {self.state} to {to}")
        self.state = to
