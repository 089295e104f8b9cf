"""The product as a newcomer starts it: `voicebook serve` with no configuration at all (embedded
redis-server, SQLite ledger), driven over real HTTP, then stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import httpx
import pytest

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("VOICEBOOK_") and key not in ("REDIS_URL", "DATABASE_URL")
    }
    env.update(
        # A relative data directory, as `make run` uses (VOICEBOOK_DATA_DIR defaults to "var").
        {"VOICEBOOK_DATA_DIR": "data", "VOICEBOOK_PORT": str(port), "VOICEBOOK_LOG_FORMAT": "json"}
    )
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen(
        [str(VENV_BIN / "voicebook"), "serve"], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 40
    try:
        while True:
            if process.poll() is not None:
                raise AssertionError(f"server exited: {(tmp_path / 'server.log').read_text()}")
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready: {(tmp_path / 'server.log').read_text()}")
            time.sleep(0.1)
        yield base, tmp_path / "data", process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)
        log.close()


def test_embedded_defaults_serve_bookings_and_shut_down_cleanly(
    server: tuple[str, Path, subprocess.Popen[bytes]],
) -> None:
    base, data_dir, process = server
    ready = httpx.get(f"{base}/readyz").json()
    assert ready["checks"]["database"]["dialect"] == "sqlite"
    token = (data_dir / "admin-token").read_text().strip()
    assert oct((data_dir / "admin-token").stat().st_mode & 0o777) == "0o600"
    headers = {"Authorization": f"Bearer {token}"}
    day = date.today() + timedelta(days=7)
    while day.weekday() != 1:  # a Tuesday: Dr. Lee works all day
        day += timedelta(days=1)
    slots = httpx.get(
        f"{base}/api/availability", params={"service": "checkup", "date": day.isoformat()}, headers=headers
    ).json()["slots"]
    assert slots
    created = httpx.post(
        f"{base}/api/bookings",
        headers={**headers, "Idempotency-Key": "smoke-1"},
        json={
            "service": "checkup",
            "resource": slots[0]["resource"],
            "start": slots[0]["start"],
            "customer": {"phone": "+12125550142", "name": "Smoke Test"},
        },
    )
    assert created.status_code == 201, created.text
    fetched = httpx.get(f"{base}{created.headers['location']}", headers=headers)
    assert fetched.json()["status"] == "confirmed"
    assert (data_dir / "voicebook.db").is_file()

    process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells what stopped it.
    assert process.wait(timeout=20) in (0, -signal.SIGTERM)
    assert '"event": "voicebook_stopped"' in (data_dir.parent / "server.log").read_text()
    redis_socket = data_dir / "redis" / "redis.sock"
    assert not redis_socket.exists() or _no_listener(redis_socket), "the embedded redis-server must stop with us"


def _no_listener(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return True
    return False
