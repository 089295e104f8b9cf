"""A ``voicebook worker`` process serves its own ``/metrics`` (``--metrics-port``), so a worker on a host
without a server can be scraped; the listener goes away when the worker stops."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import httpx

from voice_server.settings import Settings


async def test_a_worker_process_serves_its_metrics_on_its_own_port(app_settings: Settings, tmp_path: Path) -> None:
    assert app_settings.database_url is not None and app_settings.redis_url is not None
    env = {
        **os.environ,
        "REDIS_URL": app_settings.redis_url,
        "DATABASE_URL": app_settings.database_url,
        "VOICEBOOK_REDIS_PREFIX": app_settings.redis_prefix,
        "VOICEBOOK_DATA_DIR": str(tmp_path),
        "VOICEBOOK_LOG_FORMAT": "json",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "voice_server.cli",
        "worker",
        "--concurrency",
        "3",
        "--metrics-port",
        "0",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    lines: list[str] = []
    port: int | None = None
    started = False
    try:
        async with asyncio.timeout(60):  # a fresh interpreter importing every client takes a while
            while port is None or not started:
                raw = await process.stdout.readline()
                assert raw, "the worker exited:\n" + "\n".join(lines)
                lines.append(raw.decode(errors="replace").rstrip())
                try:
                    record = json.loads(lines[-1])
                except ValueError:
                    continue
                if record.get("event") == "worker_metrics_listening":
                    port = int(record["port"])
                started = started or record.get("event") == "worker_started"
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(f"http://127.0.0.1:{port}/metrics")
        assert response.status_code == 200
        # The worker's own instruments: its per-integration concurrency bound, set as it started.
        assert 'voicebook_effects_concurrency_limit{integration="calendar"} 3.0' in response.text
        assert "process_resident_memory_bytes" in response.text
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        rest, _ = await process.communicate()
    assert process.returncode == 0, "\n".join(lines) + rest.decode(errors="replace")
    async with httpx.AsyncClient(timeout=5) as client:
        try:
            await client.get(f"http://127.0.0.1:{port}/metrics")
        except httpx.ConnectError:
            pass
        else:
            raise AssertionError("the metrics listener outlived the worker")
