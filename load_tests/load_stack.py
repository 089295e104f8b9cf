"""The processes of a local load test (``run_load.py``): a temporary folder, the utterances, the load
business, Redis, the ledger, the provider simulators (``load_sims.py``), ``voicebook migrate``,
``voicebook serve``, optionally ``voicebook worker``, and locust, started in order and stopped in reverse
(SIGTERM, then SIGKILL after a grace period), also when starting fails half-way, on Ctrl-C or on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # load_tests/ is a folder of scripts, not a package

from booking.ledger import pii
from booking.ledger.database import Database
from booking.ledger.pii import FieldCipher, new_key

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
BUSINESS_NUMBER = "+12125550100"
SIMULATORS = {"sims-deepgram": ("deepgram",), "sims-rest": ("openai", "twilio", "google_calendar")}
"""Deepgram's 20 ms audio frames from every call are most of the simulators' work: a process of its own."""
_SERVER_VARIABLES = (
    *("VOICEBOOK_", "TWILIO_", "DEEPGRAM_", "OPENAI_", "GOOGLE_", "AIRTABLE_", "LOAD_", "OTEL_"),
    *("PROMETHEUS_MULTIPROC_DIR", "REDIS_URL", "DATABASE_URL"),
)
"""What the shell may hold for another voicebook: never passed to the processes of a load test."""


@dataclass(frozen=True)
class StackOptions:
    scenario: str
    database_url: str | None = None
    redis_url: str | None = None
    separate_workers: bool = False
    processes: int = 1
    resources: int = 3
    stt_final_ms: int = 150
    llm_first_token_ms: int = 250
    llm_tokens_per_second: float = 60.0
    tts_first_byte_ms: int = 100
    provider_ms: int = 150
    sms_per_minute: int = 6000
    backoff_percent: int = 100
    locustfile: Path = HERE / "locustfile.py"
    keep: bool = False
    realtime_priority: int = 0  # VOICEBOOK_REALTIME_PRIORITY of the server, the booking process and the worker


_SURNAMES = (
    "Adams", "Baker", "Clark", "Dalton", "Ellis", "Foster", "Grant", "Hughes", "Irving", "Jensen", "Keller",
    "Lowell", "Morgan", "Nolan", "Osborne", "Porter", "Quinn", "Reyes", "Sutton", "Turner",
)  # fmt: skip


def _surname(n: int) -> str:
    """A distinct word name per doctor: Adams .. Turner, then Adams Baker, Adams Clark, ..."""
    first, rest = divmod(n, len(_SURNAMES))
    return _SURNAMES[rest] if first == 0 else f"{_SURNAMES[first - 1]} {_SURNAMES[rest]}"


def business_toml(resources: int) -> str:
    """The load business: the example clinic's services on ``resources`` doctors who work every day
    07:00-19:00, each with a Google calendar, bookable at once and for 60 days."""
    hours = "\n".join(f'{day} = ["07:00-19:00"]' for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun"))
    ids = [f"dr-{n}" for n in range(1, resources + 1)]
    # Word names: a doctor called "Doctor 5" would be what a caller saying "five p m" asked for.
    people = "".join(
        f'\n[[resources]]\nid = "{rid}"\nname = "Doctor {_surname(n)}"\nkind = "staff"\n'
        f'calendar_id = "{rid}@load.example"\n[resources.hours]\n{hours}\n'
        for n, rid in enumerate(ids)
    )
    return (
        f'[business]\nname = "Load Test Clinic"\ntimezone = "America/New_York"\nphone = "{BUSINESS_NUMBER}"\n\n'
        "[booking]\nmin_notice_minutes = 0\nhorizon_days = 60\nslot_step_minutes = 15\nhold_ttl_seconds = 120\n"
        + people
        + f"""
[[services]]
id = "checkup"
name = "General check-up"
duration_minutes = 30
buffer_after_minutes = 10
resources = {json.dumps(ids)}
aliases = ["physical", "annual exam", "check up"]

[[services]]
id = "consultation"
name = "New patient consultation"
duration_minutes = 45
buffer_after_minutes = 10
resources = {json.dumps(ids)}
aliases = ["new patient", "first visit"]
"""
    )


def clean_environment() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith(_SERVER_VARIABLES)}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class StackError(RuntimeError):
    """A part of the stack did not start; the message holds the end of its log."""


class LoadStack:
    """Everything a run needs, started in order on entry and stopped in reverse on exit (also when
    entering fails half-way): a temporary folder, utterances, the business file, Redis, the ledger, the
    simulators, the migrated server and its workers."""

    def __init__(self, options: StackOptions) -> None:
        self.options = options
        self.folder = Path(tempfile.mkdtemp(prefix="voicebook-load-"))
        self.samples_prefix = self.folder / "samples.jsonl"
        self.problems: list[str] = []
        self.auth_token, self.admin_token = secrets.token_hex(16), secrets.token_urlsafe(24)
        # The run's keys for personal data: the server's processes seal with them, the runner reads with them.
        self.pii_keys, self.pii_index_key = f"load={new_key()}", new_key()
        self.base = f"http://127.0.0.1:{free_port()}"
        self.database_url = ""
        self._processes: dict[str, asyncio.subprocess.Process] = {}
        self._controls: dict[str, str] = {}
        self._database: Database | None = None
        self._exits = contextlib.AsyncExitStack()
        self._http = httpx.AsyncClient(timeout=10.0, headers={"Authorization": f"Bearer {self.admin_token}"})

    async def __aenter__(self) -> LoadStack:
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self._stop()

    async def _stop(self) -> None:
        try:
            await self._exits.aclose()
        finally:
            await self._http.aclose()
            if self.options.keep:
                print(f"run_load: kept {self.folder}", file=sys.stderr)
            else:
                shutil.rmtree(self.folder, ignore_errors=True)

    async def _start(self) -> None:
        from common import drop_keys, scratch_postgres  # load_tests/common.py
        from load_script import write_utterances

        from integrations.espeak import Espeak
        from voice_server.embedded_redis import EmbeddedRedis

        (self.folder / "logs").mkdir()
        utterances = self.folder / "utterances"
        await asyncio.to_thread(write_utterances, utterances, Espeak(wpm=190).synthesize_mulaw)
        business = self.folder / "business.toml"
        business.write_text(business_toml(self.options.resources))
        prefix = f"load{uuid.uuid4().hex[:8]}"
        redis_url = self.options.redis_url
        if redis_url is None:
            embedded = EmbeddedRedis(self.folder / "redis")
            await embedded.start()
            self._exits.push_async_callback(embedded.stop)
            redis_url = embedded.url
            if self.options.realtime_priority and embedded.pid is not None:
                # Started here to be shared by the server and the worker, it stands for the embedded Redis
                # the supervisor would start, which inherits the server's policy.
                try:
                    os.sched_setscheduler(embedded.pid, os.SCHED_RR, os.sched_param(self.options.realtime_priority))
                except PermissionError as refused:
                    self.problems.append(f"the run's Redis runs at the default policy: {refused}")
        else:
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(redis_url)
            self._exits.push_async_callback(client.aclose)
            self._exits.push_async_callback(drop_keys, client, prefix)
        if self.options.database_url is None:
            self.database_url = f"sqlite:///{self.folder / 'ledger.db'}"
        else:
            self.database_url = await scratch_postgres(self.options.database_url, self._exits)
        env = clean_environment() | {
            "VOICEBOOK_ENV": "development",
            "VOICEBOOK_HOST": "127.0.0.1",
            "VOICEBOOK_PORT": str(urlsplit(self.base).port),
            "VOICEBOOK_PUBLIC_URL": self.base,
            "VOICEBOOK_DATA_DIR": str(self.folder / "data"),
            "VOICEBOOK_BUSINESS_FILE": str(business),
            "VOICEBOOK_LOG_LEVEL": "WARNING",
            "VOICEBOOK_ADMIN_TOKEN": self.admin_token,
            "VOICEBOOK_PII_KEYS": self.pii_keys,
            "VOICEBOOK_PII_INDEX_KEY": self.pii_index_key,
            "TWILIO_AUTH_TOKEN": self.auth_token,
            "REDIS_URL": redis_url,
            "DATABASE_URL": self.database_url,
            "VOICEBOOK_REDIS_PREFIX": prefix,
            "VOICEBOOK_DB_POOL_SIZE": "20",
            "VOICEBOOK_SMS_PER_MINUTE": str(min(self.options.sms_per_minute, 60_000)),
            "VOICEBOOK_SMS_BURST": "100",
            "VOICEBOOK_EFFECT_BACKOFF_PERCENT": str(self.options.backoff_percent),
            "VOICEBOOK_DRAIN_SECONDS": "5",
            "VOICEBOOK_RUN_WORKERS": "false" if self.options.separate_workers else "true",
            "VOICEBOOK_PROCESSES": str(self.options.processes),
            "VOICEBOOK_REALTIME_PRIORITY": str(self.options.realtime_priority),
        }
        if self.options.separate_workers or self.options.processes > 1:  # /metrics adds up every process
            env["PROMETHEUS_MULTIPROC_DIR"] = str(self.folder / "prometheus")
            (self.folder / "prometheus").mkdir()
        for name, services in SIMULATORS.items():
            env |= await self._start_simulators(name, services, business, utterances)
        migrate = await self._spawn("migrate", [str(BIN / "voicebook"), "migrate"], env)
        if await asyncio.wait_for(migrate.wait(), 120) != 0:
            raise StackError(f"voicebook migrate failed:\n{self.log_tail('migrate')}")
        await self._spawn("server", [str(BIN / "voicebook"), "serve"], env, grace=30.0)
        if self.options.separate_workers:
            await self._spawn("worker", [str(BIN / "voicebook"), "worker"], env, grace=30.0)
        await self._wait_ready()

    async def _spawn(
        self, name: str, argv: list[str], env: dict[str, str], *, grace: float = 10.0
    ) -> asyncio.subprocess.Process:
        """A child in a session of its own (a Ctrl-C reaches only the runner, which stops it in order)."""
        with (self.folder / "logs" / f"{name}.log").open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *argv, env=env, stdout=log, stderr=log, start_new_session=True, cwd=HERE.parent
            )
        self._processes[name] = process
        self._exits.push_async_callback(self._terminate, process, grace)
        return process

    @staticmethod
    async def _terminate(process: asyncio.subprocess.Process, grace: float) -> None:
        """SIGTERM, then SIGKILL if it has not ended within ``grace`` seconds."""
        if process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def _start_simulators(
        self, name: str, services: tuple[str, ...], business: Path, utterances: Path
    ) -> dict[str, str]:
        o, ready = self.options, self.folder / f"{name}.json"
        argv = [
            *(sys.executable, str(HERE / "load_sims.py"), "--only", ",".join(services)),
            *("--business", str(business), "--utterances", str(utterances), "--folder", str(self.folder)),
            *("--auth-token", self.auth_token, "--env-file", str(ready)),
            *("--stt-final-ms", str(o.stt_final_ms), "--llm-first-token-ms", str(o.llm_first_token_ms)),
            *("--llm-tokens-per-second", str(o.llm_tokens_per_second)),
            *("--tts-first-byte-ms", str(o.tts_first_byte_ms), "--provider-ms", str(o.provider_ms)),
        ]
        process = await self._spawn(name, argv, clean_environment())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.returncode is None:
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                announced = json.loads(ready.read_text())
                self._controls[name] = announced["control"]
                return dict(announced["env"])
            await asyncio.sleep(0.1)
        raise StackError(f"the simulators ({name}) did not start:\n{self.log_tail(name)}")

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            for name in ("server", "worker"):
                process = self._processes.get(name)
                if process is not None and process.returncode is not None:
                    raise StackError(f"voicebook {name} exited with {process.returncode}:\n{self.log_tail(name)}")
            with contextlib.suppress(httpx.HTTPError):
                if (await self._http.get(f"{self.base}/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.25)
        raise StackError(f"the server was not ready within 90 s:\n{self.log_tail('server')}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.folder / "logs" / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def pids(self) -> dict[str, int]:
        """The processes whose CPU and memory are sampled: server, worker, simulators, locust."""
        watched = ("server", "worker", *SIMULATORS)
        running = {n: p for n, p in self._processes.items() if p.returncode is None}
        return {n: p.pid for n, p in running.items() if n in watched or n.startswith("locust-")}

    def simulator_names(self) -> list[str]:
        return list(SIMULATORS)

    def database(self) -> Database:
        """The run's ledger, read by the runner (opened once; closed before the ledger is removed)."""
        if self._database is None:
            pii.install(FieldCipher.parse(self.pii_keys, self.pii_index_key))
            self._database = Database.connect(self.database_url, pool_size=2)
            self._exits.push_async_callback(self._database.dispose)
        return self._database

    async def metrics_text(self) -> str:
        response = await self._http.get(f"{self.base}/metrics")
        response.raise_for_status()
        return response.text

    async def set_fault(self, provider: str, mode: str, latency_ms: int | None) -> None:
        body: dict[str, Any] = {"provider": provider, "mode": mode, "latency_ms": latency_ms}
        (await self._http.post(f"{self._controls['sims-rest']}/_load/faults", json=body)).raise_for_status()

    async def run_locust(
        self, *, users: int, spawn_rate: float, seconds: int, stop_timeout: int, env: dict[str, str], label: str
    ) -> int | None:
        """Locust headless against the server; returns its failure count (None without its CSV)."""
        locust = BIN / "locust"
        if not locust.exists():
            raise StackError("locust is not installed here: pip install -e '.[load]'")
        csv_prefix = self.folder / f"locust-{label}"
        argv = [
            *(str(locust), "-f", str(self.options.locustfile), "--headless", "--only-summary"),
            *("-u", str(users), "-r", f"{spawn_rate:g}", "-t", f"{seconds}s", "--stop-timeout", str(stop_timeout)),
            *("--host", self.base, "--csv", str(csv_prefix), "--loglevel", "WARNING"),
        ]
        contract = {
            "LOAD_AUTH_TOKEN": self.auth_token,
            "LOAD_PUBLIC_URL": self.base,
            "LOAD_UTTERANCES_DIR": str(self.folder / "utterances"),
            "LOAD_ADMIN_TOKEN": self.admin_token,
            "LOAD_SAMPLES": str(self.samples_prefix),
            "LOAD_BUSINESS_NUMBER": BUSINESS_NUMBER,
        }
        process = await self._spawn(process_name(label), argv, clean_environment() | contract | env)
        try:
            await asyncio.wait_for(process.wait(), seconds + stop_timeout + 60)
        except TimeoutError:
            self.problems.append(f"locust ({label}) did not stop in time and was stopped")
            await self._terminate(process, 10.0)
        if process.returncode not in (0, 1):  # 1: some requests failed, which the summary counts
            self.problems.append(
                f"locust ({label}) exited with {process.returncode}: {self.log_tail(process_name(label), 5)}"
            )
        return locust_failures(csv_prefix.with_name(csv_prefix.name + "_stats.csv"))


def process_name(label: str) -> str:
    return f"locust-{label}"


def locust_failures(stats_csv: Path) -> int | None:
    """The "Failure Count" of locust's Aggregated row."""
    if not stats_csv.exists():
        return None
    with stats_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("Name") == "Aggregated":
                return int(row.get("Failure Count") or 0)
    return None
