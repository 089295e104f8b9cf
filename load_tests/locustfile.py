"""Locust users for the load test (``run_load.py`` runs this headless; never import it in pytest: locust
monkey-patches the process with gevent at import).

- :class:`MediaStreamsCaller`: a phone call as Twilio makes one. Signed ``POST /twilio/voice``, the TwiML's
  ``<Stream url>`` opened with a signed upgrade, ``connected`` and ``start``, then 20 ms mu-law frames in real
  time from one sender greenlet on an absolute schedule (speech when the caller talks, silence otherwise).
  The agent's audio is "played" on a playout clock (160 bytes = 20 ms), marks are echoed when the clock
  reaches them, ``clear`` drops what was still to play. A reply ends when its audio has played and none
  came for 0.6 s (as ``voice_server.softphone``); then the caller pauses (``LOAD_THINK_MS``) and says its
  next line (``load_script``).
  At the end: ``stop``, close, and the signed ``CallStatus=completed`` callback.
- :class:`BookingApiUser`: the booking API (availability, create, read, cancel) with the admin token.
- :class:`TwilioCallbackUser`: signed message-status and call-status callbacks for SIDs nobody made, and
  one with a bad signature that must come back 403.

Custom events (``events.request``): ``turn`` named by the line's kind (intent, when, name, pick, repick,
confirm, bye, cancel, reschedule), the ms from the last frame of the caller's speech to the first frame of the
agent's answer; ``booking`` named by the task (book, cancel, reschedule), the same for the "yes" that makes
the agent run the booking tool; ``call`` named by scenario and task, the whole call (failed when the
webhook refused it, the agent did not answer within 20 s, or the socket closed early; its sample also
holds ``late_ms``, the sender's worst lateness against its 20 ms schedule). In ``mixed`` each call ends
with ``GET /api/bookings?phone=`` (admin token) so the caller pool knows which numbers hold one booking. With
``LOAD_SAMPLES`` set every one is also appended as a JSON line to ``<LOAD_SAMPLES>.<pid>``:
``{"kind", "name", "ms", "t" (epoch s), "caller", "scenario", "task", "error" (failures only)}``.

Environment (the runner's contract): ``LOAD_SCENARIO`` steady|burst|mixed, ``LOAD_AUTH_TOKEN`` (Twilio auth
token), ``LOAD_PUBLIC_URL`` (what the server signs against; default the host), ``LOAD_UTTERANCES_DIR``,
``LOAD_ADMIN_TOKEN``, ``LOAD_SAMPLES``, ``LOAD_BUSINESS_NUMBER``, ``LOAD_CALLER_POOL``, ``LOAD_API_WEIGHT`` and
``LOAD_CALLBACK_WEIGHT`` (0 disables the class; the caller's weight is 10), ``LOAD_SERVICE`` (default
checkup), ``LOAD_THINK_MS`` (the caller's pause before each line, ``LOW,HIGH`` ms; default 300,1200). Only
loopback hosts are accepted.
"""

from __future__ import annotations

import base64
import itertools
import os
import random
import secrets
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode, urlsplit

import gevent
import orjson
from locust import FastHttpUser, between, events, task
from locust.env import Environment
from locust.runners import WorkerRunner
from twilio.request_validator import RequestValidator
from websockets.exceptions import WebSocketException
from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent))  # load_tests/ is a folder of scripts, not a package
from load_script import (
    SCENARIOS,
    CallerPool,
    Conversation,
    Scenario,
    conversation,
    mixed_task,
    read_utterances,
    think_seconds,
)
from media_stream import FRAME_BYTES, CallFailed, MediaStream

from integrations import ws_masking
from voice_server.softphone import parse_answer

ws_masking.install()  # each caller masks 50 frames a second; keys from buffered randomness, as the server's

CALLER_WEIGHT = 10
ACCOUNT_SID = "AC" + "0" * 32
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


class LoadConfigError(RuntimeError):
    """A LOAD_ variable is missing or malformed; the message names it."""


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    if not raw.isdigit():
        raise LoadConfigError(f"{name}={raw!r} is not a whole number")
    return int(raw)


def _required(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise LoadConfigError(f"{name} is required")
    return value


def require_loopback(url: str | None) -> str:
    """``url`` if its host is loopback; a load test never leaves this machine."""
    host = urlsplit(url or "").hostname
    if host not in LOOPBACK:
        raise LoadConfigError(f"refusing to load {url!r}: only 127.0.0.1, ::1 or localhost are allowed")
    return (url or "").rstrip("/")


SCENARIO: Scenario = os.environ.get("LOAD_SCENARIO", "steady")  # type: ignore[assignment]  # checked at init
API_WEIGHT = _int_env("LOAD_API_WEIGHT", 0)
CALLBACK_WEIGHT = _int_env("LOAD_CALLBACK_WEIGHT", 0)


# -- samples ------------------------------------------------------------------------------------------


class Samples:
    """JSON lines for the runner's exact percentiles, one file per locust process."""

    def __init__(self, prefix: str | None) -> None:
        self._file: IO[str] | None = (
            open(f"{prefix}.{os.getpid()}", "a", buffering=1) if prefix else None
        )  # open for the run, closed at quit

    def add(self, **sample: Any) -> None:
        if self._file is not None:
            self._file.write(orjson.dumps({**sample, "t": time.time()}).decode() + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class Shared:
    """What every caller of this process shares, set up once at ``init``."""

    scenario: Scenario
    auth_token: str
    business_number: str
    public_url: str | None
    utterances: dict[str, list[str]]  # text -> base64 payloads of its 20 ms frames
    pool: CallerPool
    samples: Samples
    admin_token: str | None
    think: tuple[float, float] = (0.0, 0.0)  # the caller's pause before each line, seconds (low, high)
    calls: itertools.count[int] = field(default_factory=itertools.count)
    call_offset: int = 0


SHARED: Shared | None = None


def frames_b64(mulaw: bytes) -> list[str]:
    return [
        base64.b64encode(mulaw[i : i + FRAME_BYTES].ljust(FRAME_BYTES, b"\xff")).decode()
        for i in range(0, len(mulaw), FRAME_BYTES)
    ]


@events.init.add_listener  # type: ignore[untyped-decorator]  # locust's hooks are untyped
def _on_init(environment: Environment, **_: Any) -> None:
    """Checks the contract before any user starts: a wrong setting stops locust with status 2."""
    global SHARED
    try:
        SHARED = _shared(environment)
    except (LoadConfigError, OSError, ValueError) as problem:
        print(f"locustfile: {problem}", file=sys.stderr)
        raise SystemExit(2) from None


def _shared(environment: Environment) -> Shared:
    require_loopback(environment.host)
    if SCENARIO not in SCENARIOS:
        raise LoadConfigError(f"LOAD_SCENARIO={SCENARIO!r}: one of {', '.join(SCENARIOS)}")
    worker = environment.runner.worker_index if isinstance(environment.runner, WorkerRunner) else 0
    pool_size = _int_env("LOAD_CALLER_POOL", 100)
    folder = Path(_required("LOAD_UTTERANCES_DIR"))
    return Shared(
        scenario=SCENARIO,
        auth_token=_required("LOAD_AUTH_TOKEN"),
        business_number=os.environ.get("LOAD_BUSINESS_NUMBER", "+12125550100"),
        public_url=os.environ.get("LOAD_PUBLIC_URL") or None,
        utterances={text: frames_b64(audio) for text, audio in read_utterances(folder).items()},
        pool=CallerPool(pool_size, offset=worker * pool_size),
        samples=Samples(os.environ.get("LOAD_SAMPLES") or None),
        admin_token=os.environ.get("LOAD_ADMIN_TOKEN") or None,
        think=think_seconds(os.environ.get("LOAD_THINK_MS", "")),
        call_offset=worker * 10_007,
    )


@events.quitting.add_listener  # type: ignore[untyped-decorator]
def _on_quit(environment: Environment, **_: Any) -> None:
    if SHARED is not None:
        SHARED.samples.close()


def shared() -> Shared:
    if SHARED is None:
        raise LoadConfigError("the locustfile was not initialised (events.init)")
    return SHARED


def signature(auth_token: str, url: str, params: dict[str, str]) -> str:
    return str(RequestValidator(auth_token).compute_signature(url, params))


# -- the users -------------------------------------------------------------------------------------


class MediaStreamsCaller(FastHttpUser):
    """One task = one phone call of the scenario."""

    weight = CALLER_WEIGHT
    wait_time = between(0.5, 1.5)

    def on_start(self) -> None:
        self.base = require_loopback(self.host)

    def _fire(
        self, kind: str, name: str, ms: float, convo: Conversation, caller: str, error: str | None, **extra: Any
    ) -> None:
        self.environment.events.request.fire(
            request_type=kind,
            name=name,
            response_time=ms,
            response_length=0,
            response=None,
            context={"caller": caller},
            exception=CallFailed(error) if error else None,
        )
        sample: dict[str, Any] = {"kind": kind, "name": name, "ms": round(ms, 1), "caller": caller}
        sample |= {"scenario": convo.scenario, "task": convo.task, **extra}
        if error:
            sample["error"] = error
        shared().samples.add(**sample)

    def _post_signed(self, path: str, form: dict[str, str], name: str) -> Any:
        config = shared()
        url = (config.public_url or self.base).rstrip("/") + path
        headers = {
            "X-Twilio-Signature": signature(config.auth_token, url, form),
            "Content-Type": "application/x-www-form-urlencoded",
        }
        return self.client.post(path, data=urlencode(form), headers=headers, name=name, catch_response=True)

    @task
    def call(self) -> None:
        config = shared()
        number = next(config.calls) + config.call_offset
        wanted = mixed_task(number) if config.scenario == "mixed" else "book"
        caller, chosen = config.pool.take(wanted)
        convo = conversation(config.scenario, number, chosen)
        confirmed, found = False, None
        try:
            confirmed = self._converse(convo, caller)
            if config.scenario == "mixed" and config.admin_token:
                found = self._bookings_of(caller)
        finally:  # also when locust stops the user mid-call
            config.pool.release(caller, chosen, done=confirmed, found=found)

    def _converse(self, convo: Conversation, caller: str) -> bool:
        """One call from ``caller`` saying ``convo``; True when the agent answered the confirming "yes"."""
        config = shared()
        call_sid = "CA" + uuid.uuid4().hex
        began = time.monotonic()
        confirmed, error, stream = False, None, None
        try:
            stream = self._dial(call_sid, caller)
            stream.wait_reply()  # the greeting
            for index, line in enumerate(convo.lines):
                pause = random.uniform(*config.think)
                if pause > 0:
                    gevent.sleep(pause)  # the microphone greenlet sends silence meanwhile
                stream.say(config.utterances[line.text])
                reply = stream.wait_reply()
                turn_error = None if reply.latency is not None else "the answer began before the caller finished"
                ms = (reply.latency or 0.0) * 1000
                self._fire("turn", line.kind, ms, convo, caller, turn_error)
                if line.books:
                    self._fire("booking", convo.task, ms, convo, caller, turn_error)
                    confirmed = True
                if stream.closed.is_set() and index < len(convo.lines) - 1:
                    raise CallFailed(f"the socket closed after {line.kind!r}")
        except CallFailed as failure:
            error = str(failure)
        except (OSError, WebSocketException, TimeoutError) as failure:
            error = f"{type(failure).__name__}: {failure}"
        finally:
            if stream is not None:
                stream.hang_up(ACCOUNT_SID)
        seconds = time.monotonic() - began
        if stream is not None:
            self._status_callback(call_sid, caller, seconds)
        late_ms = round(stream.late_max * 1000, 1) if stream is not None else 0.0
        self._fire("call", f"{convo.scenario}:{convo.task}", seconds * 1000, convo, caller, error, late_ms=late_ms)
        return confirmed

    def _dial(self, call_sid: str, caller: str) -> MediaStream:
        config = shared()
        form = {
            "CallSid": call_sid,
            "AccountSid": ACCOUNT_SID,
            "From": caller,
            "To": config.business_number,
            "CallStatus": "ringing",
            "Direction": "inbound",
            "ApiVersion": "2010-04-01",
        }
        with self._post_signed("/twilio/voice", form, "POST /twilio/voice") as response:
            if response.status_code != 200:
                response.failure(f"voice webhook answered {response.status_code}")
                raise CallFailed(f"the voice webhook answered {response.status_code}")
            try:
                answer = parse_answer(response.text or "")
            except Exception as refused:  # CallRefused, or TwiML that does not parse
                response.failure(f"no stream: {refused}")
                raise CallFailed(f"the call was refused: {refused}") from None
        path = urlsplit(answer.stream_url).path
        ws_url = self.base.replace("http://", "ws://").replace("https://", "wss://") + path
        upgrade = {"X-Twilio-Signature": signature(config.auth_token, answer.stream_url, {})}
        ws = connect(ws_url, additional_headers=upgrade, open_timeout=10, compression=None, max_size=2**20)
        stream = MediaStream(ws, call_sid, dict(answer.parameters))
        stream.begin(ACCOUNT_SID)
        return stream

    def _bookings_of(self, caller: str) -> int | None:
        """How many upcoming bookings the server holds for ``caller`` (None when it cannot tell), so a later
        cancellation or reschedule calls from a number that has exactly one."""
        headers = {"Authorization": f"Bearer {shared().admin_token}"}
        path = "/api/bookings?" + urlencode({"phone": caller})
        with self.client.get(path, headers=headers, name="/api/bookings?phone=", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"bookings of the caller answered {response.status_code}")
                return None
            return len(orjson.loads(response.content or b"{}").get("bookings", []))

    def _status_callback(self, call_sid: str, caller: str, seconds: float) -> None:
        form = {
            "CallSid": call_sid,
            "AccountSid": ACCOUNT_SID,
            "From": caller,
            "To": shared().business_number,
            "CallStatus": "completed",
            "CallDuration": str(round(seconds)),
            "Direction": "inbound",
            "ApiVersion": "2010-04-01",
            "SequenceNumber": "3",
        }
        with self._post_signed("/twilio/call-status", form, "POST /twilio/call-status") as response:
            if not 200 <= response.status_code < 300:
                response.failure(f"call-status answered {response.status_code}")


class BookingApiUser(FastHttpUser):
    """The booking API as a front-desk integration uses it, on days the callers do not ask for."""

    weight = max(API_WEIGHT, 1)
    abstract = API_WEIGHT == 0
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        require_loopback(self.host)
        self.auth = {"Authorization": f"Bearer {_required('LOAD_ADMIN_TOKEN')}"}
        self.service = os.environ.get("LOAD_SERVICE", "checkup")
        self.mine: list[str] = []

    def _slots(self) -> list[dict[str, Any]]:
        day = date.today() + timedelta(days=random.randint(15, 28))
        query = urlencode({"service": self.service, "date": day.isoformat(), "limit": 20})
        with self.client.get(
            f"/api/availability?{query}", headers=self.auth, name="/api/availability", catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"availability answered {response.status_code}")
                return []
            slots: list[dict[str, Any]] = orjson.loads(response.content or b"{}").get("slots", [])
            return slots

    @task(3)
    def availability(self) -> None:
        self._slots()

    @task(2)
    def book(self) -> None:
        slots = self._slots()
        if not slots:
            return
        slot = random.choice(slots)
        body = {
            "service": self.service,
            "start": slot["start"],
            "resource": slot["resource"],
            "customer": {"phone": f"+1917555{random.randint(0, 9999):04d}", "name": "Load Api"},
        }
        headers = {**self.auth, "Idempotency-Key": secrets.token_hex(8)}
        with self.client.post(
            "/api/bookings", json=body, headers=headers, name="/api/bookings", catch_response=True
        ) as response:
            if response.status_code == 201:
                self.mine.append(orjson.loads(response.content or b"{}")["id"])
            elif response.status_code == 409:
                response.success()  # taken meanwhile: an expected answer
            else:
                response.failure(f"booking answered {response.status_code}")

    @task(2)
    def read(self) -> None:
        if self.mine:
            self.client.get(f"/api/bookings/{random.choice(self.mine)}", headers=self.auth, name="/api/bookings/{id}")

    @task(1)
    def cancel(self) -> None:
        if self.mine:
            booking_id = self.mine.pop(random.randrange(len(self.mine)))
            self.client.delete(f"/api/bookings/{booking_id}", headers=self.auth, name="DELETE /api/bookings/{id}")


class TwilioCallbackUser(FastHttpUser):
    """Twilio's status callbacks for messages and calls this server never made, and a forged one."""

    weight = max(CALLBACK_WEIGHT, 1)
    abstract = CALLBACK_WEIGHT == 0
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        self.base = require_loopback(self.host)
        # Every callback user sends one forged callback first, so even a short run shows the 403 (as a
        # weighted task alone it was missing from one run in twenty of the load script's test).
        self.forged()

    def _post(
        self, path: str, form: dict[str, str], name: str, *, expect: int | None = None, forged: bool = False
    ) -> None:
        config = shared()
        url = (config.public_url or self.base).rstrip("/") + path
        sign = "forged" + secrets.token_hex(8) if forged else signature(config.auth_token, url, form)
        headers = {"X-Twilio-Signature": sign, "Content-Type": "application/x-www-form-urlencoded"}
        with self.client.post(path, data=urlencode(form), headers=headers, name=name, catch_response=True) as response:
            ok = response.status_code == expect if expect is not None else 200 <= response.status_code < 300
            if ok:
                response.success()
            else:
                response.failure(f"{name} answered {response.status_code}")

    @task(3)
    def message_status(self) -> None:
        form = {
            "MessageSid": "SM" + uuid.uuid4().hex,
            "AccountSid": ACCOUNT_SID,
            "MessageStatus": random.choice(("sent", "delivered", "undelivered", "failed")),
            "To": f"+1646555{random.randint(0, 9999):04d}",
            "ApiVersion": "2010-04-01",
        }
        if form["MessageStatus"] in ("undelivered", "failed"):
            form["ErrorCode"] = "30003"
        self._post("/twilio/message-status", form, "POST /twilio/message-status")

    @task(2)
    def call_status(self) -> None:
        form = {
            "CallSid": "CA" + uuid.uuid4().hex,
            "AccountSid": ACCOUNT_SID,
            "From": f"+1646555{random.randint(0, 9999):04d}",
            "To": shared().business_number,
            "CallStatus": random.choice(("completed", "no-answer", "busy", "failed")),
            "Direction": "inbound",
            "ApiVersion": "2010-04-01",
        }
        self._post("/twilio/call-status", form, "POST /twilio/call-status (unknown call)")

    @task(1)
    def forged(self) -> None:
        form = {"CallSid": "CA" + uuid.uuid4().hex, "AccountSid": ACCOUNT_SID, "CallStatus": "completed"}
        self._post("/twilio/call-status", form, "POST /twilio/call-status (bad signature)", expect=403, forged=True)
