"""Concurrent Twilio callers against the real Media Streams endpoint and call session, with scripted
speech and agent providers (tests/voice_fakes.py), to measure what the transport and session cost.

    python load_tests/bench_media.py [--calls 25,50,100,200,300] [--seconds 10]

Each step starts a fresh server process on loopback (embedded redis-server, SQLite), then N callers each
stream 20 ms mu-law frames in real time, talk for 1.2 s every 4 s and play the agent's audio back with
marks, as Twilio does. The server samples its own event-loop lag (a 5 ms timer's lateness) and CPU time
and reports them when stopped. Printed per step: loop lag p50/p99, server CPU per inbound frame, server
CPU share, and calls per core. The run stops at the first step whose lag p99 reaches 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the scripted providers and the Twilio caller live with the tests

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
LAG_TARGET_MS = 10.0


async def serve(port: int, data_dir: str, report: str) -> None:
    import uvicorn

    from tests.voice_fakes import scripted_ports
    from voice_server.app import create_app
    from voice_server.settings import Settings

    script = ["I would like a checkup"] * 1000
    settings = Settings(
        data_dir=Path(data_dir),
        port=port,
        public_url=f"http://127.0.0.1:{port}",
        twilio_auth_token=AUTH_TOKEN,
        admin_token="bench-admin-token-0123456789",
        log_level="WARNING",
        silence_seconds=60.0,
    )
    app = create_app(settings, voice=scripted_ports(script))

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[no-untyped-def]  # ours below: report, then exit 0
            yield

    server = Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_config=None,
            ws=os.environ.get("BENCH_WS", "websockets-sansio"),
            ws_per_message_deflate=False,
            lifespan="on",
        )
    )
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: setattr(server, "should_exit", True))
    lags: list[float] = []
    marks = {"cpu": 0.0, "wall": 0.0}

    async def monitor() -> None:
        # Measure from the moment the server is up: start-up (migrations, index rebuild) is not per call.
        while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
            await asyncio.sleep(0.01)
        marks["cpu"], marks["wall"] = time.process_time(), time.monotonic()
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            await asyncio.sleep(0.005)
            lags.append((loop.time() - began - 0.005) * 1000)

    watcher = asyncio.create_task(monitor())
    try:
        await server.serve()
    finally:
        watcher.cancel()
        # The server has stopped: nothing else runs on this loop, so a blocking write is harmless here.
        Path(report).write_text(  # noqa: ASYNC240
            json.dumps(
                {
                    "lags_ms": lags[20:],
                    "cpu_s": time.process_time() - marks["cpu"],
                    "wall_s": time.monotonic() - marks["wall"],
                }
            )
        )


async def callers(port: int, count: int, seconds: float) -> tuple[int, int]:
    from twilio.request_validator import RequestValidator
    from websockets.asyncio.client import connect

    from tests.twilio_caller import LOUD, QUIET, TwilioCaller

    url = f"ws://127.0.0.1:{port}/twilio/media"
    headers = {"X-Twilio-Signature": RequestValidator(AUTH_TOKEN).compute_signature(url, {})}
    frames = 0
    late = 0

    async def one(number: int) -> None:
        nonlocal frames, late
        async with (
            connect(url, additional_headers=headers) as ws,
            TwilioCaller(ws, call_sid=f"CA{number:032d}") as caller,
        ):
            await caller.connect()
            loop = asyncio.get_running_loop()
            start = loop.time() + (number % 50) * 0.02 / 50  # spread frame phases
            deadline = start + seconds
            tick = 0
            while loop.time() < deadline:
                speaking = (tick % 200) < 60  # 1.2 s of speech every 4 s
                await caller.frame(LOUD if speaking else QUIET)
                frames += 1
                tick += 1
                delay = start + tick * 0.02 - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    late += 1
            await caller.stop()

    await asyncio.gather(*(one(n) for n in range(count)))
    return frames, late


def step(count: int, seconds: float) -> dict[str, float]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="voicebook-bench-media-") as folder:
        report = os.path.join(folder, "report.json")
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(port), "--data-dir", folder, "--report", report]
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.1)
            frames, late = asyncio.run(callers(port, count, seconds))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
        data = json.loads(Path(report).read_text())
    lags = data["lags_ms"]
    cuts = statistics.quantiles(lags, n=100, method="inclusive")
    share = data["cpu_s"] / data["wall_s"]
    return {
        "calls": count,
        "lag_p50": cuts[49],
        "lag_p99": cuts[98],
        "cpu_us_per_frame": data["cpu_s"] / frames * 1e6,
        "cpu_share": share,
        "calls_per_core": count / share if share else float("inf"),
        "client_late_frames": late / max(frames, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", default="25,50,100,200,300")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args.serve, args.data_dir, args.report))
        return
    seconds = min(args.seconds, 60.0)
    for count in (int(n) for n in args.calls.split(",")):
        r = step(count, seconds)
        print(
            f"{r['calls']:>4} calls: loop lag p50={r['lag_p50']:5.2f} ms p99={r['lag_p99']:6.2f} ms  "
            f"server CPU {r['cpu_us_per_frame']:6.1f} us/frame, {r['cpu_share'] * 100:5.1f}% of a core "
            f"-> {r['calls_per_core']:6.0f} calls/core  (client frames late: {r['client_late_frames'] * 100:.1f}%)",
            flush=True,
        )
        if r["lag_p99"] >= LAG_TARGET_MS:
            print(f"stopped: loop lag p99 reached {LAG_TARGET_MS} ms at {count} calls")
            break


if __name__ == "__main__":
    main()
