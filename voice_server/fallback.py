"""Speech that survives its provider: a primary speech provider (Deepgram) with a fallback (the offline
engines) behind the same ports, so a provider outage changes the voice or the ear, never the call.

``FallbackTTS`` speaks each sentence with the primary; when the primary fails before its first byte the
fallback speaks the same sentence (the caller hears another voice, not silence). When it fails after
some audio went out, the rest of that sentence is dropped: speaking it again from the start would repeat
words the caller has heard, and where the audio stopped is not known in words.

``FallbackSTT`` opens the primary for each call (or the fallback when that fails); when the primary's
stream fails mid-call, the same ``events()`` iteration carries on with a fallback stream that gets the
last ``Expectation`` and the audio the primary had not yet finalised. A call that has switched stays on
the fallback until it ends: switching back mid-call could lose or repeat words for little gain.

Both share a ``CircuitBreaker`` per provider role. It opens after ``failure_threshold`` consecutive
primary failures (3 by default), not after one: opening it moves every call of the process onto the
offline engines, which run in-process and cost far more CPU than a remote provider, so one slow answer
under load must not do it (a slower loop makes more timeouts, which would open it again: a storm). A
success while it is closed starts the count again. Once open, every new sentence (or call) goes straight
to the fallback for ``cooldown_s``, so a provider that is down does not cost each sentence its own timeout
and retries; then one attempt at a time probes the primary, and its first byte (or a successful open)
closes the breaker, while a failed probe opens it again at once. The breakers are per instance and the
instances are built once per process, so one call's failures spare the others the wait. A failure below
the threshold still hands that sentence (or call) to the fallback: the caller never hears silence.

A first-byte deadline that runs out while this process's own event loop is overloaded is not the
provider's fault: the request may not even have left (each hop of an HTTP request waits for the loop), and
giving up then would hand the sentence to the offline voice, which costs the overloaded process more CPU
than waiting. So when the loop was late by ``OVERLOADED_LAG_S`` or more (the deadline's own timer, or the
lag monitor's samples since the sentence began), the deadline is extended once by its own length and the
breaker is not told; ``voicebook_speech_deadline_extended_total{role}`` counts these. A provider that still
has not answered at the extended deadline has failed as usual.

Metrics: ``voicebook_speech_fallbacks_total{role, reason}`` counts the sentences (``tts``) and calls
(``stt``) handed to the fallback, because the primary failed on them (``failed``) or because the breaker
was open (``breaker_open``); ``voicebook_speech_breaker_open{role}`` is 1 while a breaker is open. With
``provider`` given, a first-byte timeout of ``FallbackTTS`` also counts as a ``timeout`` error of that
provider: the deadline cancels the SDK's request, and a cancelled request is not counted by the adapter.

Only ``Exception`` counts as a failure: cancellation (a barge-in, a hang-up) goes straight through, and
every iterator of a provider is closed when its consumer stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Final, Literal, TypeVar, get_args

import structlog
from prometheus_client import Counter, Gauge

from integrations.metrics import Provider, provider_stream_failed
from voice_server.audio import SAMPLE_RATE
from voice_server.ports import (
    CallInfo,
    Expectation,
    SpeechEvent,
    SpeechToText,
    SpeechToTextStream,
    TextToSpeech,
    Transcript,
    closing,
)

log = structlog.get_logger("voicebook.fallback")

T = TypeVar("T")
Clock = Callable[[], float]
Role = Literal["tts", "stt"]
FallbackReason = Literal["failed", "breaker_open"]
LoopLag = Callable[[float], float]
"""The worst event-loop lag (seconds) the process has measured since a loop time."""

OVERLOADED_LAG_S: Final = 0.1
"""An event loop this late (ten times the lag target) is overloaded: a deadline it misses is its own."""

# Here rather than in voice_server/metrics.py: they are this module's own account of itself, and a module
# that only builds the fallbacks (a worker, a test) registers them by importing it.
SPEECH_FALLBACKS = Counter(
    "voicebook_speech_fallbacks_total",
    "Sentences (role tts) and calls (role stt) handed to the offline fallback, by reason: failed (the "
    "primary provider failed on it) or breaker_open (the breaker kept the primary out of the way).",
    ["role", "reason"],
)
SPEECH_DEADLINE_EXTENDED = Counter(
    "voicebook_speech_deadline_extended_total",
    "First-byte deadlines extended because this process's event loop was overloaded when they ran out "
    "(the provider was not blamed), by role.",
    ["role"],
)
SPEECH_BREAKER_OPEN = Gauge(
    "voicebook_speech_breaker_open",
    "1 while the speech provider's circuit breaker is open (new sentences or calls go to the fallback), "
    "0 while it is closed, by role (tts, stt).",
    ["role"],
    multiprocess_mode="livemax",  # a host shows 1 while any of its processes has the breaker open
)


class Route(enum.Enum):
    """Where one attempt goes."""

    PRIMARY = "primary"  # the breaker is closed
    PROBE = "probe"  # the breaker is open but cooled down: this attempt tests the primary
    FALLBACK = "fallback"  # the breaker is open (or another attempt is probing)


class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures of the primary, keeps it out of the way for
    ``cooldown_s``, then lets a single attempt probe it while the others stay on the fallback (see the
    module doc). Not thread-safe: one event loop. It owns its role's gauge, so build one per role and
    process. ``provider`` only names the provider in the log lines."""

    def __init__(
        self,
        role: Role,
        *,
        cooldown_s: float,
        clock: Clock,
        failure_threshold: int = 3,
        provider: Provider | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, got {failure_threshold}")
        self.role: Role = role
        self.cooldown_s = cooldown_s
        self.failure_threshold = failure_threshold
        self.provider = provider
        self._clock = clock
        self._open_until: float | None = None
        self._probing = False
        self._failures = 0  # consecutive primary failures while closed
        # Every series exists from the start, so a dashboard shows 0 rather than nothing before a failure.
        SPEECH_BREAKER_OPEN.labels(role).set(0)
        for reason in get_args(FallbackReason):
            SPEECH_FALLBACKS.labels(role, reason)

    @property
    def failures(self) -> int:
        """Consecutive primary failures counted while closed (0 once it opens or a success comes)."""
        return self._failures

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    def route(self) -> Route:
        if self._open_until is None:
            return Route.PRIMARY
        if self._probing or self._clock() < self._open_until:
            return Route.FALLBACK
        self._probing = True
        return Route.PROBE

    def succeeded(self, route: Route) -> None:
        if route is Route.PROBE:
            self._probing = False
            self._open_until = None
            self._failures = 0
            SPEECH_BREAKER_OPEN.labels(self.role).set(0)
            log.info("speech_provider_restored", role=self.role, provider=self.provider)
        elif not self.is_open:
            # Only failures in a row open the breaker. (An attempt that began before it opened and
            # answers after proves little: the probe decides when it closes.)
            self._failures = 0

    def failed(self, route: Route, error: BaseException, **context: object) -> None:
        """The primary failed (whatever the route). While closed the failure is counted, and the
        ``failure_threshold``-th in a row opens the breaker; while open (a failed probe, or an attempt that
        began before it opened) the cooldown starts again at once."""
        if route is Route.PROBE:
            self._probing = False
        fields = {"role": self.role, "provider": self.provider, "error": repr(error), **context}
        if self.is_open:
            self._open_until = self._clock() + self.cooldown_s
            log.warning("speech_provider_still_down", cooldown_s=self.cooldown_s, **fields)
            return
        self._failures += 1
        if self._failures < self.failure_threshold:
            log.warning(
                "speech_provider_failed", failures=self._failures, failure_threshold=self.failure_threshold, **fields
            )
            return
        self._open_until = self._clock() + self.cooldown_s
        self._failures = 0
        SPEECH_BREAKER_OPEN.labels(self.role).set(1)
        log.warning("speech_provider_down", cooldown_s=self.cooldown_s, failures=self.failure_threshold, **fields)

    def abandoned(self, route: Route) -> None:
        """The attempt ended without telling anything (cancelled, closed early): let another probe."""
        if route is Route.PROBE:
            self._probing = False


class _Done:
    """The iterator ended."""


_DONE: Final = _Done()


class DeadlineExceeded(TimeoutError):
    """Our own deadline for an item fired and cancelled the provider's request: unlike a timeout the
    provider (or its SDK) raised, no adapter has counted it."""


class _Deadline:
    """``_pull``'s deadline: at ``timeout_s`` it expires ``scope``, unless the loop was overloaded then (the
    wait is then extended once by ``timeout_s``). A class rather than a closure: a closure that schedules
    itself refers to itself, a cycle left to the collector on every sentence spoken (its passes pause the
    event loop), and :meth:`cancel` also lets go of the timer, which refers back to the deadline."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, scope: asyncio.Timeout, timeout_s: float, loop_lag: LoopLag | None
    ) -> None:
        self._loop = loop
        self._scope = scope
        self._timeout_s = timeout_s
        self._loop_lag = loop_lag
        self.began = loop.time()
        self._extended = False
        due = self.began + timeout_s
        self._timer: asyncio.TimerHandle | None = loop.call_at(due, self._expire, due)

    def _expire(self, due: float) -> None:
        now = self._loop.time()
        lag = max(now - due, self._loop_lag(self.began) if self._loop_lag is not None else 0.0)
        if not self._extended and lag >= OVERLOADED_LAG_S:
            self._extended = True
            SPEECH_DEADLINE_EXTENDED.labels("tts").inc()
            log.warning(
                "speech_deadline_extended", role="tts", loop_lag_ms=round(lag * 1000, 1), timeout_s=self._timeout_s
            )
            self._timer = self._loop.call_at(now + self._timeout_s, self._expire, now + self._timeout_s)
            return
        self._timer = None
        self._scope.reschedule(now)  # cancels the wait at once: the deadline has expired

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def _pull(
    iterator: AsyncIterator[T], timeout_s: float | None = None, *, loop_lag: LoopLag | None = None
) -> T | _Done | Exception:
    """The next item, ``_DONE`` at the end, or the provider's failure as a value, so a ``yield`` is
    never inside the ``try`` (an exception thrown into the consumer's generator is not the provider's).
    When ``timeout_s`` runs out the failure is a ``DeadlineExceeded``, unless the event loop was overloaded
    then (see the module doc): the wait is then extended once by ``timeout_s``."""
    loop = asyncio.get_running_loop()
    scope = asyncio.timeout(None)
    deadline = _Deadline(loop, scope, timeout_s, loop_lag) if timeout_s is not None else None
    try:
        async with scope:
            return await anext(iterator)
    except StopAsyncIteration:
        return _DONE
    except Exception as error:  # any failure of the provider, its own TimeoutError included
        if deadline is not None and scope.expired():
            expired = DeadlineExceeded(f"nothing within {loop.time() - deadline.began:.1f} s")
            expired.__cause__ = error
            return expired
        return error
    finally:
        if deadline is not None:
            deadline.cancel()


# -- text to speech ------------------------------------------------------------------------------


class FallbackTTS:
    """``TextToSpeech`` that speaks with ``primary`` and falls back to ``fallback`` (see module doc).

    ``first_byte_timeout_s`` (optional) counts a primary that has not started speaking in that time as
    failed, so a hung provider costs the caller at most that much silence; the primary's own timeouts
    and retries apply otherwise. ``provider`` (optional) names the primary's provider, whose
    ``voicebook_provider_errors_total{kind="timeout"}`` such a timeout then counts. ``loop_lag`` (optional) is
    the process's lag monitor (``voice_server.metrics.RECENT_LOOP_LAG.worst_since``): with it a deadline that
    runs out while the loop is overloaded is extended (module doc); without it only the deadline's own timer
    firing late tells. When the fallback fails too, the sentence ends without audio and the failure is
    logged: the session carries on (listens, speaks the next sentence) rather than dying."""

    def __init__(
        self,
        primary: TextToSpeech,
        fallback: TextToSpeech,
        *,
        cooldown_s: float = 30.0,
        clock: Clock = time.monotonic,
        first_byte_timeout_s: float | None = None,
        failure_threshold: int = 3,
        provider: Provider | None = None,
        loop_lag: LoopLag | None = None,
    ) -> None:
        self._primary = primary
        self._fallback = fallback
        self._loop_lag = loop_lag
        self.breaker = CircuitBreaker(
            "tts", cooldown_s=cooldown_s, clock=clock, failure_threshold=failure_threshold, provider=provider
        )
        self.first_byte_timeout_s = first_byte_timeout_s

    async def synthesize(self, text: str) -> AsyncGenerator[bytes, None]:
        route = self.breaker.route()
        if route is Route.FALLBACK:
            SPEECH_FALLBACKS.labels("tts", "breaker_open").inc()
            async with contextlib.aclosing(self._speak_fallback(text)) as audio:
                async for chunk in audio:
                    yield chunk
            return
        settled = False  # the breaker has been told how this attempt went
        started = False  # some of the primary's audio has been yielded
        failure: Exception | None = None
        try:
            async with closing(self._primary.synthesize(text)) as audio:
                while True:
                    item = await _pull(audio, None if started else self.first_byte_timeout_s, loop_lag=self._loop_lag)
                    if isinstance(item, _Done):
                        break
                    if isinstance(item, Exception):
                        failure = item
                        break
                    if not item:
                        continue
                    if not started:
                        started = settled = True
                        self.breaker.succeeded(route)
                    yield item
            if failure is None and not settled:  # finished without audio (nothing to say): it answered
                settled = True
                self.breaker.succeeded(route)
        finally:
            if failure is None and not settled:  # cancelled or closed before the first byte
                self.breaker.abandoned(route)
        if failure is None:
            return
        provider = self.breaker.provider
        if isinstance(failure, DeadlineExceeded) and provider is not None:
            provider_stream_failed(provider, "timeout")
        self.breaker.failed(route, failure, text_chars=len(text), mid_sentence=started)
        if started:
            # Where the audio stopped is not known in words, so the fallback cannot say just the rest.
            log.warning("tts_sentence_cut", error=repr(failure), text_chars=len(text))
            return
        log.warning("tts_fallback", error=repr(failure), text_chars=len(text))
        SPEECH_FALLBACKS.labels("tts", "failed").inc()
        async with contextlib.aclosing(self._speak_fallback(text)) as audio:
            async for chunk in audio:
                yield chunk

    async def _speak_fallback(self, text: str) -> AsyncGenerator[bytes, None]:
        async with closing(self._fallback.synthesize(text)) as audio:
            while True:
                item = await _pull(audio)
                if isinstance(item, _Done):
                    return
                if isinstance(item, Exception):
                    # Nothing is left to speak with; the session must carry on listening all the same.
                    log.error("tts_fallback_failed", error=repr(item), text_chars=len(text))
                    return
                if item:
                    yield item


# -- speech to text ------------------------------------------------------------------------------


class _End:
    """The end of ``FallbackSTTStream.events()``."""


_END: Final = _End()


class FallbackSTT:
    """``SpeechToText`` that opens ``primary`` and falls back to ``fallback`` (see module doc).

    ``replay_limit_s``: how much of the audio the primary has not finalised is kept to replay into the
    fallback on a switch (the newest is kept). ``close_timeout_s`` bounds the wait for a stream to close.
    ``provider`` (optional) names the primary's provider in the breaker's log lines; no provider error is
    counted here, as this class sets no deadline of its own on the primary: every failure it sees was
    raised, and counted, by the adapter."""

    def __init__(
        self,
        primary: SpeechToText,
        fallback: SpeechToText,
        *,
        cooldown_s: float = 30.0,
        clock: Clock = time.monotonic,
        replay_limit_s: float = 10.0,
        close_timeout_s: float = 5.0,
        failure_threshold: int = 3,
        provider: Provider | None = None,
    ) -> None:
        self._primary = primary
        self.fallback = fallback
        self.breaker = CircuitBreaker(
            "stt", cooldown_s=cooldown_s, clock=clock, failure_threshold=failure_threshold, provider=provider
        )
        self.replay_limit_bytes = int(replay_limit_s * SAMPLE_RATE)  # mu-law: a byte per sample
        self.close_timeout_s = close_timeout_s

    async def open(self, call: CallInfo) -> FallbackSTTStream:
        route = self.breaker.route()
        if route is not Route.FALLBACK:
            try:
                stream = await self._primary.open(call)
            except Exception as error:
                self.breaker.failed(route, error, call_sid=call.call_sid)
                log.warning("stt_open_fallback", call_sid=call.call_sid, error=repr(error))
                SPEECH_FALLBACKS.labels("stt", "failed").inc()
            except BaseException:
                self.breaker.abandoned(route)
                raise
            else:
                self.breaker.succeeded(route)
                return FallbackSTTStream(self, call, stream, on_fallback=False)
        else:
            SPEECH_FALLBACKS.labels("stt", "breaker_open").inc()
        return FallbackSTTStream(self, call, await self.fallback.open(call), on_fallback=True)


class FallbackSTTStream:
    """One call's recognition: the active stream's events forwarded by a task the stream owns (so a
    failure is noticed and handled even while nobody is reading), through one queue to ``events()``.

    ``_unconfirmed`` holds the audio sent since the primary's last final transcript (what it may not
    have recognised yet, including whatever it kept to itself while reconnecting) and, during a switch,
    the audio that arrives meanwhile; all of it is replayed into the fallback, in order. Audio sent in
    the few milliseconds between a final and its arrival here is dropped from it: in practice the
    silence that made the recogniser finalise."""

    def __init__(self, owner: FallbackSTT, call: CallInfo, stream: SpeechToTextStream, *, on_fallback: bool) -> None:
        self.call = call
        self.on_fallback = on_fallback  # no further stream to switch to
        self._owner = owner
        self._active = stream
        self._expectation: Expectation | None = None
        self._unconfirmed = bytearray()
        self._switching = False  # audio is held in _unconfirmed, not sent
        self._opening = False  # the fallback is being opened: _active is the dead primary
        self._send_failure: Exception | None = None
        self._closing = False
        self._closed = asyncio.Event()
        self._retiring: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[SpeechEvent | Exception | _End] = asyncio.Queue()
        self._forwarder = asyncio.create_task(self._forward_all(), name=f"stt-fallback-{call.call_sid}")

    # -- the port ---------------------------------------------------------------------------------

    async def send(self, mulaw: bytes) -> None:
        if self._closing:
            return
        if not self.on_fallback:
            self._unconfirmed += mulaw
            excess = len(self._unconfirmed) - self._owner.replay_limit_bytes
            if excess > 0:
                del self._unconfirmed[:excess]
        if self._switching:
            return
        try:
            await self._active.send(mulaw)
        except Exception as error:
            if self.on_fallback:
                log.error("stt_fallback_send_failed", call_sid=self.call.call_sid, error=repr(error))
                return
            # Hold the audio from now on and close the primary: its events() ends and the forwarder
            # switches, with this chunk (already in _unconfirmed) replayed.
            self._send_failure = error
            self._switching = self._opening = True
            self._retire(self._active)

    def expect(self, expectation: Expectation) -> None:
        self._expectation = expectation
        if self._opening:
            return  # applied to the fallback once it is open
        try:
            self._active.expect(expectation)
        except Exception as error:  # a hint is not worth a reply
            log.warning("stt_expect_failed", call_sid=self.call.call_sid, error=repr(error))

    async def events(self) -> AsyncIterator[SpeechEvent]:
        while True:
            item = await self._queue.get()
            if isinstance(item, _End):
                self._queue.put_nowait(item)  # a later iteration ends at once too
                return
            if isinstance(item, Exception):
                raise item  # the fallback failed too: nothing is left to listen with
            yield item

    async def close(self) -> None:
        """Close whichever stream is open (the forwarder then ends ``events()``); idempotent."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            if not self._opening:  # while the fallback opens, the forwarder closes what it opened
                await self._close_quietly(self._active)
            try:
                async with asyncio.timeout(self._owner.close_timeout_s):
                    await asyncio.shield(self._forwarder)
            except TimeoutError:
                log.warning("stt_close_timeout", call_sid=self.call.call_sid)
        finally:
            self._forwarder.cancel()
            pending = [self._forwarder] if self._retiring is None else [self._forwarder, self._retiring]
            await asyncio.gather(*pending, return_exceptions=True)
            self._closed.set()

    # -- forwarding and switching -----------------------------------------------------------------

    async def _forward_all(self) -> None:
        try:
            while True:
                stream = self._active
                error = await self._forward(stream)
                if self._closing:
                    return
                if self.on_fallback:
                    if error is None:  # ended unasked; nothing to switch to
                        log.error("stt_fallback_ended", call_sid=self.call.call_sid)
                    else:
                        log.error("stt_fallback_failed", call_sid=self.call.call_sid, error=repr(error))
                        self._queue.put_nowait(error)
                    return
                cause = error or self._send_failure or RuntimeError("the stream ended unasked")
                if not await self._switch(stream, cause):
                    return
        finally:
            self._queue.put_nowait(_END)

    async def _forward(self, stream: SpeechToTextStream) -> Exception | None:
        """Forward ``stream``'s events until they end (None) or fail (the error)."""
        primary = not self.on_fallback
        try:
            async with closing(stream.events()) as events:
                async for event in events:
                    if primary and isinstance(event, Transcript) and event.is_final:
                        self._unconfirmed.clear()  # recognised: never replayed
                    self._queue.put_nowait(event)
        except Exception as error:
            return error
        return None

    async def _switch(self, dead: SpeechToTextStream, cause: BaseException) -> bool:
        """Open the fallback for this call, give it the expectation and the held audio, make it active.
        False when there is nothing more to forward."""
        self._switching = self._opening = True
        self._owner.breaker.failed(Route.PRIMARY, cause, call_sid=self.call.call_sid)
        log.warning("stt_fallback", call_sid=self.call.call_sid, error=repr(cause), replay_bytes=len(self._unconfirmed))
        SPEECH_FALLBACKS.labels("stt", "failed").inc()
        self._retire(dead)
        try:
            fallback = await self._owner.fallback.open(self.call)
        except Exception as error:
            log.error("stt_fallback_open_failed", call_sid=self.call.call_sid, error=repr(error))
            self._queue.put_nowait(error)
            return False
        if self._closing:
            await self._close_quietly(fallback)
            return False
        self._active = fallback
        self._opening = False
        if self._expectation is not None:
            self.expect(self._expectation)
        while self._unconfirmed:  # audio keeps arriving while the replay is awaited: send it all, in order
            held = bytes(self._unconfirmed)
            self._unconfirmed.clear()
            try:
                await fallback.send(held)
            except Exception as error:
                log.error("stt_fallback_send_failed", call_sid=self.call.call_sid, error=repr(error))
        self.on_fallback = True
        self._switching = False
        return True

    def _retire(self, stream: SpeechToTextStream) -> None:
        """Close the failed primary in a task of its own (``close()`` awaits it)."""
        if self._retiring is None:
            self._retiring = asyncio.create_task(self._close_quietly(stream))

    async def _close_quietly(self, stream: SpeechToTextStream) -> None:
        try:
            async with asyncio.timeout(self._owner.close_timeout_s):
                await stream.close()
        except Exception as error:  # closing anyway: the call has moved on
            log.warning("stt_close_failed", call_sid=self.call.call_sid, error=repr(error))
