"""``voicebook serve --processes N``: real supervisors started as subprocesses on loopback, with the
embedded defaults (the supervisor's own Redis, the SQLite ledger in a temporary data directory), except
where a test says why it uses the test's Redis and ledger.

Each test starts the supervisor in a session of its own (its server processes and its Redis stay in that
session, whatever their process groups) and kills every process of that session when it ends, whatever
happened."""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import os
import re
import resource
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import connect

from tests.test_server import free_port
from tests.twilio_caller import TwilioCaller, inbound_call, ring
from voice_server.settings import Settings

# Every server process is a fresh interpreter importing every client; two or three start per test.
pytestmark = pytest.mark.timeout(180)

VOICEBOOK = Path(sys.executable).parent / "voicebook"
DRAIN_SECONDS = 1
STOP_MARGIN_SECONDS = 15  # past the drain: uvicorn's shutdown, the lifespan's, the embedded Redis's
# The variables that would point a run at the test environment's services or metrics folder.
INHERITED = ("REDIS_URL", "DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")
AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
CALL = inbound_call("CA" + "6" * 32)


@dataclass
class Run:
    """A started ``voicebook`` command: its process, where it answers, and its captured output."""

    process: asyncio.subprocess.Process
    base: str
    data_dir: Path
    stdout: Path
    stderr: Path

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def events(self) -> list[dict[str, object]]:
        """The JSON log lines of the supervisor and its processes, in order."""
        found = []
        for line in self.output().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    found.append(event)
        return found


def session_members(session: int) -> list[int]:
    """The live processes of ``session`` (a supervisor started in a new session: its pid), from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        state, _ppid, _group, member_of = stat.rsplit(")", 1)[1].split()[:4]
        if int(member_of) == session and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def serve_env(data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    """The test's environment without anything of voicebook's, then the embedded defaults on ``port``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("VOICEBOOK_", "OTEL_")) and key not in INHERITED
    }
    env.update(
        {
            "VOICEBOOK_DATA_DIR": str(data_dir),
            "VOICEBOOK_HOST": "127.0.0.1",
            "VOICEBOOK_PORT": str(port),
            "VOICEBOOK_DRAIN_SECONDS": str(DRAIN_SECONDS),
            "VOICEBOOK_LOG_FORMAT": "json",
        }
    )
    env.update(extra)
    return env


@contextlib.asynccontextmanager
async def voicebook(
    tmp_path: Path, *args: str, port: int | None = None, env: dict[str, str] | None = None
) -> AsyncIterator[Run]:
    """``voicebook <args>`` in a new session; on the way out every process of its group is killed."""
    port = free_port() if port is None else port
    data_dir = tmp_path / "data"
    stdout_path, stderr_path = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            str(VOICEBOOK),
            *args,
            env=serve_env(data_dir, port, **(env or {})),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    run = Run(process, f"http://127.0.0.1:{port}", data_dir, stdout_path, stderr_path)
    try:
        yield run
    finally:
        # The server processes have process groups of their own, but stay in the supervisor's session.
        for pid in session_members(run.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(run.process.wait(), 10)


async def wait_until_ready(run: Run, seconds: float = 60) -> None:
    async with httpx.AsyncClient(timeout=1) as client, asyncio.timeout(seconds):
        while True:
            if run.process.returncode is not None:
                raise AssertionError(f"voicebook exited with {run.process.returncode}:\n{run.output()}")
            try:
                if (await client.get(f"{run.base}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)


async def answering_pids(base: str, connections: int) -> Counter[int]:
    """The pid in ``/healthz`` over ``connections`` new TCP connections (no keep-alive: the kernel picks
    a listening process per connection, not per request). A connection that fails is not counted."""
    pids: Counter[int] = Counter()
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=5, limits=limits, headers={"Connection": "close"}) as client:
        for _ in range(connections):
            try:
                answer = await client.get(f"{base}/healthz")
            except httpx.TransportError:
                continue
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["status"] == "ok"
            pids[int(body["pid"])] += 1
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_two_processes_share_the_port_and_stop_on_sigterm(tmp_path: Path) -> None:
    async with voicebook(tmp_path, "serve", "--processes", "2") as run:
        supervisor = run.process.pid
        await wait_until_ready(run)

        pids = await answering_pids(run.base, 40)
        assert sum(pids.values()) == 40, "every connection is answered"
        assert len(pids) == 2, pids
        assert supervisor not in pids, "the supervisor serves nothing itself"

        metrics_dir = run.data_dir / f"metrics-{supervisor}"
        async with httpx.AsyncClient(timeout=10) as client:
            metrics = await client.get(f"{run.base}/metrics")
        assert metrics.status_code == 200
        assert "voicebook_event_loop_lag_seconds_count" in metrics.text
        # Both processes write their values into the one folder the supervisor made, so either adds up both.
        written = {path.name for path in metrics_dir.iterdir()}
        for pid in pids:
            assert any(name.endswith(f"_{pid}.db") for name in written), (pid, written)

        run.process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.wait_for(run.process.wait(), DRAIN_SECONDS + STOP_MARGIN_SECONDS)
        assert exit_code == 0, run.output()
        for pid in pids:
            assert not alive(pid), f"server process {pid} outlived the supervisor"
        assert session_members(supervisor) == [], "nothing is left: no server process, no Redis"
        assert not metrics_dir.exists()
        assert "supervisor_stopped" in [event.get("event") for event in run.events()]


async def test_a_killed_process_is_replaced(tmp_path: Path) -> None:
    async with voicebook(tmp_path, "serve", "--processes", "2") as run:
        await wait_until_ready(run)
        first = await answering_pids(run.base, 30)
        assert len(first) == 2, first
        killed, survivor = sorted(first)

        os.kill(killed, signal.SIGKILL)
        # The restart waits a second, then a fresh interpreter imports everything: allow for a busy host.
        async with asyncio.timeout(30):
            while True:
                now = await answering_pids(run.base, 20)
                if len(now) == 2 and survivor in now:
                    break
                await asyncio.sleep(0.2)
        replacement = (set(now) - {survivor}).pop()
        assert replacement not in (killed, run.process.pid)
        assert not alive(killed)
        assert alive(survivor) and alive(replacement)

        events = run.events()
        died = [event for event in events if event.get("event") == "server_process_died"]
        restarted = [event for event in events if event.get("event") == "server_process_restarted"]
        assert [(event["pid"], event["exit_code"]) for event in died] == [(killed, -signal.SIGKILL)]
        assert [event["pid"] for event in restarted] == [replacement]
        assert died[0]["process"] == restarted[0]["process"]

        run.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(run.process.wait(), DRAIN_SECONDS + STOP_MARGIN_SECONDS) == 0, run.output()


async def test_a_port_taken_by_another_listener_fails_at_once(tmp_path: Path) -> None:
    with socket.socket() as taken:  # a plain listener, without SO_REUSEPORT: nobody may share its port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with voicebook(tmp_path, "serve", "--processes", "2", port=port) as run:
            exit_code = await asyncio.wait_for(run.process.wait(), 30)
            stderr = run.stderr.read_text()
    assert exit_code == 1, run.output()
    assert f"cannot listen on 127.0.0.1:{port}" in stderr
    assert "Traceback" not in run.output()
    assert not list(run.data_dir.glob("metrics-*")), "nothing was started"
    assert not (run.data_dir / "redis").exists()


@pytest.mark.parametrize(
    ("args", "env", "exit_code", "message"),
    [
        (["--processes", "0"], {}, 2, "argument --processes: 0 is outside 1..64"),
        (["--processes", "65"], {}, 2, "argument --processes: 65 is outside 1..64"),
        (["--processes", "two"], {}, 2, "argument --processes: 'two' is not a whole number"),
        ([], {"VOICEBOOK_PROCESSES": "0"}, 1, "VOICEBOOK_PROCESSES: 0 is outside 1..64"),
    ],
)
async def test_a_process_count_out_of_range_is_refused(
    tmp_path: Path, args: list[str], env: dict[str, str], exit_code: int, message: str
) -> None:
    # Refused before anything starts: a count that were ignored instead would leave a server running here.
    async with voicebook(tmp_path, "serve", *args, env=env) as run:
        code = await asyncio.wait_for(run.process.wait(), 30)
    assert code == exit_code, run.output()
    assert message in run.stderr.read_text()
    assert "Traceback" not in run.output()


async def test_a_signal_to_the_whole_group_drains_calls_once(app_settings: Settings, tmp_path: Path) -> None:
    """Ctrl-C in a terminal sends SIGINT to every process of the foreground group. The server processes,
    in groups of their own, hear it once, from the supervisor, and drain their calls; had they heard it
    from the terminal too, the supervisor's SIGTERM would count as a second signal and cut the call off."""
    assert app_settings.redis_url is not None and app_settings.database_url is not None
    drain_seconds = 3
    env = {
        # The test's Redis rather than an embedded one: this is about the server processes' signals.
        "REDIS_URL": app_settings.redis_url,
        "DATABASE_URL": app_settings.database_url,
        "VOICEBOOK_REDIS_PREFIX": app_settings.redis_prefix,
        "VOICEBOOK_DRAIN_SECONDS": str(drain_seconds),
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
    }
    async with voicebook(tmp_path, "serve", "--processes", "2", env=env) as run:
        await wait_until_ready(run)
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await ring(client, run.base, CALL, auth_token=AUTH_TOKEN)
        assert answer.status_code == 200, answer.text
        stream = re.search(r'<Stream url="([^"]+)"', answer.text)
        assert stream is not None, answer.text
        stream_url = html.unescape(stream.group(1))
        upgrade = {"X-Twilio-Signature": RequestValidator(AUTH_TOKEN).compute_signature(stream_url, {})}
        async with (
            connect(stream_url, additional_headers=upgrade) as ws,
            TwilioCaller(ws, call_sid=CALL["CallSid"]) as caller,
        ):
            await caller.connect()
            await caller.wait_for(lambda: caller.media_frames_received > 0, within=20)  # the greeting

            os.killpg(run.process.pid, signal.SIGINT)
            signalled = time.monotonic()
            exit_code = await asyncio.wait_for(run.process.wait(), drain_seconds + STOP_MARGIN_SECONDS)
            stopped_after = time.monotonic() - signalled

    assert exit_code == 0, run.output()
    events = [event.get("event") for event in run.events()]
    assert events.count("supervisor_stopping") == 1
    assert "ending_calls_for_shutdown" in events, "the drain ran its course: the caller heard the goodbye"
    assert stopped_after >= drain_seconds - 0.5, stopped_after


def command_line(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def booking_processes(session: int) -> list[int]:
    return [pid for pid in session_members(session) if "booking-process" in command_line(pid)]


async def test_one_server_process_runs_beside_a_booking_process_that_is_replaced_and_stopped_last(
    tmp_path: Path,
) -> None:
    """The default: one server process, and the booking process beside it (``booking.lane_process``).
    With ``VOICEBOOK_REALTIME_PRIORITY`` (where this user may set it) every process of the group runs
    under ``SCHED_RR``: the supervisor, the server, the embedded Redis and the other children the supervisor
    starts, and both booking processes."""
    realtime = os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_RTPRIO)[0] >= 3
    policy = [os.SCHED_RR, 3] if realtime else [os.SCHED_OTHER, 0]

    def policies(pids: list[int]) -> list[list[int]]:
        return [[os.sched_getscheduler(pid), os.sched_getparam(pid).sched_priority] for pid in pids]

    async with voicebook(tmp_path, "serve", env={"VOICEBOOK_REALTIME_PRIORITY": "3"}) as run:
        supervisor = run.process.pid
        await wait_until_ready(run)
        servers = await answering_pids(run.base, 5)
        assert len(servers) == 1 and supervisor not in servers
        [booking] = booking_processes(supervisor)
        assert booking not in servers
        members = session_members(supervisor)  # with Redis and the local provider simulators
        assert {supervisor, booking, *servers} < set(members)
        assert policies(members) == [policy] * len(members)

        os.kill(booking, signal.SIGKILL)
        async with asyncio.timeout(30):
            while not (replacement := booking_processes(supervisor)) or replacement == [booking]:  # noqa: ASYNC110  # /proc has no event
                await asyncio.sleep(0.2)
        events = run.events()
        died = [event for event in events if event.get("event") == "booking_process_died"]
        assert [(event["pid"], event["exit_code"]) for event in died] == [(booking, -signal.SIGKILL)]
        async with asyncio.timeout(30):  # the replacement has started and listens (a fresh interpreter: allow time)
            while [event.get("event") for event in run.events()].count("booking_process_listening") < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        assert "booking_process_restarted" in [event.get("event") for event in run.events()]
        assert policies(booking_processes(supervisor)) == [policy]
        expected = "realtime_priority" if realtime else "realtime_priority_refused"
        roles = [event.get("role") for event in run.events() if event.get("event") == expected]
        assert roles.count("booking-process") == 2 and roles.count("server") == 2  # the supervisor is a server too

        run.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(run.process.wait(), DRAIN_SECONDS + STOP_MARGIN_SECONDS) == 0, run.output()
        assert session_members(supervisor) == []
        order = [event.get("event") for event in run.events()]
        # The server process drained and stopped before the booking process was told to stop.
        assert order.index("voicebook_stopping") < order.index("booking_process_stopped") < order.index(
            "supervisor_stopped"
        )
