"""`voicebook serve` exports its traces: a server process started with ``OTEL_EXPORTER_OTLP_ENDPOINT``
answers a signed Twilio voice webhook, is stopped with SIGTERM, and by the time it has exited the span of
that webhook has reached an OTLP/HTTP receiver on loopback, under the configured service name."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.test_server import free_port
from tests.tracing_support import otlp_receiver
from tests.twilio_caller import inbound_call, ring
from voice_server.settings import Settings

# A fresh interpreter importing every client, then a graceful stop: longer than the suite's default.
pytestmark = pytest.mark.timeout(120)

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
SERVICE_NAME = "voicebook-serve-test"
CALL = inbound_call("CA" + "5" * 32)


async def wait_until_ready(base: str, process: asyncio.subprocess.Process, log: Path) -> None:
    async with httpx.AsyncClient(timeout=1) as client, asyncio.timeout(60):
        while True:
            if process.returncode is not None:
                raise AssertionError("the server exited:\n" + await asyncio.to_thread(log.read_text))
            try:
                if (await client.get(f"{base}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)


async def test_voicebook_serve_exports_the_webhook_span_on_sigterm(app_settings: Settings, tmp_path: Path) -> None:
    assert app_settings.database_url is not None and app_settings.redis_url is not None
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with otlp_receiver() as (endpoint, received):
        env = {key: value for key, value in os.environ.items() if not key.startswith(("VOICEBOOK_", "OTEL_"))}
        env.update(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint.removesuffix("/v1/traces"),
                "OTEL_SERVICE_NAME": SERVICE_NAME,
                # No scheduled export while the test runs: what arrives was flushed by the shutdown.
                "OTEL_BSP_SCHEDULE_DELAY": "600000",
                "REDIS_URL": app_settings.redis_url,
                "DATABASE_URL": app_settings.database_url,
                "VOICEBOOK_REDIS_PREFIX": app_settings.redis_prefix,
                "VOICEBOOK_DATA_DIR": str(tmp_path / "data"),
                "VOICEBOOK_PORT": str(port),
                "VOICEBOOK_PUBLIC_URL": base,
                "VOICEBOOK_LOG_FORMAT": "json",
                "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            }
        )
        log = tmp_path / "server.log"
        with log.open("wb") as output:
            process = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).parent / "voicebook"), "serve", env=env, stdout=output, stderr=output
            )
        try:
            await wait_until_ready(base, process, log)
            async with httpx.AsyncClient(timeout=10) as client:
                answer = await ring(client, base, CALL, auth_token=AUTH_TOKEN)
            assert answer.status_code == 200, answer.text
            assert received == [], "nothing is exported before the batch is due or the server stops"
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            # The receiver is served on this loop: wait without blocking it while the server flushes.
            exit_code = await asyncio.wait_for(process.wait(), 30)
    # uvicorn stops gracefully, then re-raises the signal so the exit status tells what stopped it.
    assert exit_code in (0, -signal.SIGTERM), await asyncio.to_thread(log.read_text)

    spans: list[tuple[dict[str, str], Span]] = []
    for _, request in received:
        for resource_spans in request.resource_spans:
            resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
            spans.extend((resource, span) for scope in resource_spans.scope_spans for span in scope.spans)
    webhooks = [(resource, span) for resource, span in spans if span.name == "POST /twilio/voice"]
    assert len(webhooks) == 1, [span.name for _, span in spans]
    resource, webhook = webhooks[0]
    assert resource["service.name"] == SERVICE_NAME
    attributes = {kv.key: kv.value for kv in webhook.attributes}
    assert attributes["voicebook.call_sid"].string_value == CALL["CallSid"]
    assert attributes["http.response.status_code"].int_value == 200
