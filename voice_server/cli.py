"""The ``voicebook`` command: ``serve``, ``migrate``, ``check-config``, ``replay``, ``simulators``, ``call``,
``dlq``, ``worker``, ``reconcile``, ``google``, ``report``, ``crm``, ``audit``, ``tokens``, ``keys``,
``privacy``, ``consent``, ``numbers``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import secrets
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from booking.business import load_business
from booking.errors import ConfigurationError
from booking.ledger.audit import AuditAction, append_audit
from booking.ledger.database import Database, LedgerConfigurationError, head_revision, migrate
from voice_server.logging import configure_logging, register_settings_secrets
from voice_server.privacy_keys import install_pii_cipher
from voice_server.realtime import apply_realtime_priority
from voice_server.settings import Settings, SettingsError, development_file
from voice_server.supervisor import (
    CHILD_VARIABLE,
    Supervisor,
    SupervisorError,
    booking_process_argv,
    child_command,
    reuse_port_socket,
)

if TYPE_CHECKING:
    from integrations.google_oauth import GrantStatus

log = structlog.get_logger("voicebook.cli")


def _settings() -> Settings:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        raise SystemExit(f"voicebook: {exc}") from None
    register_settings_secrets(settings, os.environ)  # the S3 credentials too: boto3 reads them from there
    install_pii_cipher(settings)  # every command that reads the ledger reads personal data through it
    return settings


def _development_secret(settings: Settings, name: str) -> str:
    """A secret for local use, made once and kept in ``data_dir/<name>`` (0600)."""
    return development_file(settings.data_dir, name, lambda: secrets.token_urlsafe(24) + "\n").strip()


def _development_admin_token(settings: Settings) -> Settings:
    """In development with no admin token set, make one and keep it in ``data_dir/admin-token`` (0600), so
    the admin API is usable locally without ever running open. Likewise a Twilio auth token in
    ``data_dir/twilio-auth-token`` when none is set, so local test calls are signed and checked like
    Twilio's (`voicebook call` signs with the same file)."""
    if settings.environment != "development":
        return settings
    if settings.admin_token is None:
        settings = dataclasses.replace(settings, admin_token=_development_secret(settings, "admin-token"))
        log.info("development_admin_token", path=str(settings.data_dir / "admin-token"))
    if settings.twilio_auth_token is None and not settings.skip_twilio_signature:
        settings = dataclasses.replace(settings, twilio_auth_token=_development_secret(settings, "twilio-auth-token"))
        log.info("development_twilio_auth_token", path=str(settings.data_dir / "twilio-auth-token"))
    return settings


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from voice_server.app import create_app
    from voice_server.request_limits import MEDIA_WS_MAX_BYTES
    from voice_server.server import DrainingServer

    settings = _settings()
    configure_logging(settings.log_level, settings.log_format)
    # Before any thread or child starts, so all of them inherit it (a supervisor's processes and Redis too).
    apply_realtime_priority(settings.realtime_priority, "server")
    # Fail before the server starts, with the exact problem, rather than as a lifespan traceback.
    load_business(settings.business_file)
    settings = _development_admin_token(settings)
    host = args.host or settings.host
    port = args.port or settings.port
    processes = args.processes or settings.processes
    child = os.environ.get(CHILD_VARIABLE) == "1"  # one of a supervisor's processes: the port is shared
    if not child and (processes > 1 or settings.booking_lane == "process"):
        # The supervisor also runs the booking process beside the server processes (booking.lane_process).
        return _supervise(settings, host, port, processes, args.forwarded_allow_ips)
    sockets = [reuse_port_socket(host, port)] if child else None
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        # Twilio's media frames are small JSON; compressing them costs CPU on every frame for nothing.
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        ws_max_size=MEDIA_WS_MAX_BYTES,  # a Twilio media message is under 1 KB; uvicorn's default is 16 MiB
        log_config=None,
        lifespan="on",
        proxy_headers=True,
        forwarded_allow_ips=args.forwarded_allow_ips,
    )
    DrainingServer(config, app, drain_seconds=settings.drain_seconds).run(sockets=sockets)
    return 0


def _supervise(settings: Settings, host: str, port: int, processes: int, forwarded_allow_ips: str | None) -> int:
    supervisor = Supervisor(
        settings,
        host=host,
        port=port,
        processes=processes,
        argv=child_command(host, port, forwarded_allow_ips),
        booking_argv=booking_process_argv() if settings.booking_lane == "process" else None,
    )
    try:
        return asyncio.run(supervisor.run())
    except SupervisorError as exc:
        print(f"voicebook: {exc}", file=sys.stderr)
        return 1


def booking_process_command(args: argparse.Namespace) -> int:
    from voice_server.booking_process import BookingProcessError, run_booking_process

    settings = _settings()
    configure_logging(settings.log_level, settings.log_format)
    apply_realtime_priority(settings.realtime_priority, "booking-process")
    try:
        asyncio.run(run_booking_process(settings, Path(args.socket)))
    except BookingProcessError as exc:
        print(f"voicebook: {exc}", file=sys.stderr)
        return 1
    return 0


def migrate_command(args: argparse.Namespace) -> int:
    settings = _settings()
    configure_logging(settings.log_level, settings.log_format)

    async def run() -> str | None:
        database = Database.connect(settings.effective_database_url)
        try:
            await migrate(database, args.revision)
            return await database.schema_revision()
        finally:
            await database.dispose()

    try:
        revision = asyncio.run(run())
    except LedgerConfigurationError as exc:
        raise SystemExit(f"voicebook: {exc}") from None
    print(f"ledger at revision {revision} (head {head_revision()})")
    return 0


def check_config(args: argparse.Namespace) -> int:
    settings = _settings()
    try:
        business = load_business(settings.business_file)
    except ConfigurationError as exc:
        print(f"voicebook: {exc.detail}", file=sys.stderr)
        return 1
    print(
        f"settings ok; business {business.name!r} in {business.timezone}: "
        f"{len(business.resources)} resources, {len(business.services)} services, "
        f"{len(business.closures)} closures"
    )
    return 0


async def _audit_recording_read(settings: Settings, path: Path, call_sid: str) -> None:
    """A sealed recording (a call's spool: the caller's words and number) opened from the command line is
    a read of a recording, audited like one read through the API; a plain file (from before spools were
    sealed, or a committed test fixture) carries no keys' protection to account for."""
    from booking.reports.pipeline import open_spool
    from voice_server.dlq_cli import open_ledger

    sealed_to, _ = await asyncio.to_thread(lambda: open_spool(path.read_bytes()))
    if sealed_to is None:
        return
    now = datetime.now(UTC)
    async with open_ledger(settings) as database:
        await database.write(
            lambda conn: append_audit(
                conn,
                at=now,
                actor="cli",
                action=AuditAction.READ,
                subject_kind="call",
                subject_id=call_sid,
                details={"what": "recording", "via": "replay"},
            )
        )


def replay_command(args: argparse.Namespace) -> int:
    """Replay a recorded call against a running server: 0 when it behaved as recorded, 1 when it did not,
    2 when the replay could not run. ``--wav`` renders the recording's two legs (no server needed)."""
    from voice_server.recording import RecordingError, read_call
    from voice_server.replay import ReplayError, ReplayOptions, replay
    from voice_server.wav import write_wav

    configure_logging(args.log_level, "console")
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"voicebook replay: {exc}", file=sys.stderr)
        return 2
    install_pii_cipher(settings)  # a recording's lines are sealed with the ledger's keys
    try:
        call = read_call(Path(args.file))
        call_sid = call.call_sid  # a recording without a start message cannot be replayed or rendered
    except RecordingError as exc:
        print(f"voicebook replay: {exc}", file=sys.stderr)
        return 2
    from voice_server.dlq_cli import Unusable

    try:
        asyncio.run(_audit_recording_read(settings, Path(args.file), call_sid))
    except Unusable as exc:
        print(f"voicebook replay: a sealed recording is opened only with an audit entry: {exc}", file=sys.stderr)
        return 2
    if args.wav:
        frames = write_wav(call, Path(args.wav))
        print(f"{args.wav}: {frames / 8000:.2f} s of {call_sid}, caller left, agent right")
    if args.url is None:
        if args.wav:
            return 0
        print("voicebook replay: give --url to replay the call (or --wav to render it)", file=sys.stderr)
        return 2
    database_url = args.database_url or settings.effective_database_url
    options = ReplayOptions(
        url=args.url,
        public_url=args.public_url,
        auth_token=args.auth_token or os.environ.get("TWILIO_AUTH_TOKEN") or None,
        speed=args.speed,
    )
    try:
        report = asyncio.run(replay(call, options, database_url))
    except ReplayError as exc:
        print(f"voicebook replay: {exc}", file=sys.stderr)
        return 2
    print(report.render())
    return 1 if report.differences else 0


def simulators_command(args: argparse.Namespace) -> int:
    from voice_server.simulators_cli import SimulatorOptions, run_simulators

    settings = _settings()
    options = SimulatorOptions(
        host=args.host,
        deepgram_port=args.deepgram_port,
        openai_port=args.openai_port,
        twilio_port=args.twilio_port,
        stt_final_ms=args.stt_final_ms,
        llm_first_token_ms=args.llm_first_token_ms,
        tts_first_byte_ms=args.tts_first_byte_ms,
        twilio_auth_token=settings.twilio_auth_token,
    )
    try:
        asyncio.run(run_simulators(options, load_business(settings.business_file)))
    except KeyboardInterrupt:
        pass
    return 0


def call_command(args: argparse.Namespace) -> int:
    from integrations.espeak import Espeak
    from voice_server.softphone import CallRefused
    from voice_server.terminal_call import CallOptions, place_call

    settings = _development_admin_token(_settings())
    business = load_business(settings.business_file)
    options = CallOptions(
        url=args.url or f"http://{settings.host}:{settings.port}",
        auth_token=None if settings.skip_twilio_signature else settings.twilio_auth_token,
        admin_token=settings.admin_token,
        caller=args.caller,
        called=args.to or business.phone or "",
        public_url=settings.public_url,
    )
    script = [line for text in args.say for line in text.split("\n")] if args.say else None
    try:
        asyncio.run(place_call(options, synthesize=Espeak().synthesize_mulaw, script=script))
    except CallRefused as exc:
        print(f"voicebook call: the server refused the call: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"voicebook call: cannot reach {options.url}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def _dlq_settings() -> Settings | None:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"voicebook: {exc}", file=sys.stderr)
        return None
    register_settings_secrets(settings, os.environ)
    install_pii_cipher(settings)
    return settings


def dlq_command(args: argparse.Namespace) -> int:
    from voice_server import dlq_cli

    settings = _dlq_settings()
    if settings is None:
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if args.action == "list":
        return asyncio.run(dlq_cli.dlq_list(settings, limit=args.limit))
    if args.action == "show":
        return asyncio.run(dlq_cli.dlq_show(settings, args.id))
    if args.action == "retry":
        return asyncio.run(dlq_cli.dlq_retry(settings, args.id))
    return asyncio.run(dlq_cli.dlq_discard(settings, args.id, args.note))


def worker_command(args: argparse.Namespace) -> int:
    from voice_server import dlq_cli
    from voice_server.tracing import tracing_enabled

    settings = _dlq_settings()
    if settings is None:
        return 2
    configure_logging(settings.log_level, settings.log_format)
    apply_realtime_priority(settings.realtime_priority, "worker")
    concurrency = settings.worker_concurrency if args.concurrency is None else args.concurrency
    with contextlib.ExitStack() as stack:
        if args.metrics_port is not None:
            stack.enter_context(_metrics_listener(args.metrics_host, args.metrics_port))
        stack.enter_context(tracing_enabled(settings))  # a span per effect attempt, flushed when the worker stops
        return asyncio.run(dlq_cli.run_worker(settings, concurrency=concurrency))


@contextlib.contextmanager
def _metrics_listener(host: str, port: int) -> Iterator[None]:
    """``GET /metrics`` of a worker process on its own port (prometheus_client's server, on a thread), so a
    worker on a host without a server can be scraped."""
    from prometheus_client import start_http_server

    from voice_server.api.metrics import scrape_registry

    server, thread = start_http_server(port, addr=host, registry=scrape_registry())
    log.info("worker_metrics_listening", host=host, port=server.server_port)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def report_command(args: argparse.Namespace) -> int:
    from voice_server import report_cli

    settings = _dlq_settings()
    if settings is None:
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if args.action == "show":
        return asyncio.run(report_cli.report_show(settings, args.call_sid, version=args.version))
    if args.action == "audit":
        return asyncio.run(report_cli.report_audit(settings, args.call_sid))
    return asyncio.run(report_cli.report_regenerate(settings, args.call_sid))


def crm_command(args: argparse.Namespace) -> int:
    from voice_server import report_cli

    settings = _dlq_settings()
    if settings is None:
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if args.action == "conflicts":
        return asyncio.run(report_cli.crm_conflicts(settings, every=args.all))
    return asyncio.run(report_cli.crm_check(settings, create=args.action == "create"))


def audit_command(args: argparse.Namespace) -> int:
    """``voicebook audit verify``: 0 the chain holds, 1 broken (printed), 2 unusable configuration."""
    from voice_server import audit_cli

    settings = _dlq_settings()
    if settings is None:
        return 2
    configure_logging(settings.log_level, settings.log_format)
    return asyncio.run(audit_cli.audit_verify(settings))


def tokens_command(args: argparse.Namespace) -> int:
    from booking.ledger.api_token_repository import Role
    from voice_server import audit_cli

    settings = _dlq_settings()
    if settings is None:
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if args.action == "create":
        return asyncio.run(audit_cli.tokens_create(settings, args.name, Role(args.role), tenant=args.tenant))
    if args.action == "list":
        return asyncio.run(audit_cli.tokens_list(settings))
    if args.action == "set-role":
        return asyncio.run(audit_cli.tokens_set_role(settings, args.id, Role(args.role)))
    return asyncio.run(audit_cli.tokens_revoke(settings, args.id))


def reconcile_command(args: argparse.Namespace) -> int:
    from voice_server import dlq_cli

    settings = _dlq_settings()
    if settings is None:
        return 2
    configure_logging(settings.log_level, settings.log_format)
    return asyncio.run(dlq_cli.reconcile(settings))


def google_command(args: argparse.Namespace) -> int:
    """``voicebook google connect|status``: 0 done, 1 the connection failed, 2 unusable configuration."""
    from voice_server.google_setup import ConnectOptions, GoogleSetupError, connect_account, grant_statuses

    settings = _dlq_settings()
    if settings is None:
        return 2

    async def run() -> int:
        database = Database.connect(settings.effective_database_url)
        try:
            if args.action == "connect" and settings.auto_migrate:
                await migrate(database)
            elif await database.schema_revision() != head_revision():
                print("voicebook: the ledger's schema is not current: run `voicebook migrate` first", file=sys.stderr)
                return 2
            if args.action == "status":
                return _print_google_status(await grant_statuses(settings, database), settings.google_oauth_account)
            client_file = args.client_file or settings.google_oauth_client_file
            if client_file is None:
                print("voicebook: give --client-file (or set GOOGLE_OAUTH_CLIENT_FILE)", file=sys.stderr)
                return 2
            options = ConnectOptions(
                client_file=Path(client_file),
                account=args.account or settings.google_oauth_account,
                redirect_uri=args.redirect_uri,
                code=args.code,
                timeout=args.timeout,
            )
            email = await connect_account(settings, database, options)
            if options.code is not None or options.redirect_uri is None:
                print(f"connected Google account {options.account!r}" + (f" ({email})" if email else ""))
            return 0
        finally:
            await database.dispose()

    try:
        return asyncio.run(run())
    except (GoogleSetupError, LedgerConfigurationError) as exc:
        print(f"voicebook: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, GoogleSetupError) and args.action == "connect" else 2


def _print_google_status(statuses: Sequence[GrantStatus], configured: str) -> int:
    """One block per connected account, never a token. Exit 1 when the configured one is unusable."""
    if not statuses:
        print("no Google account is connected (voicebook google connect --client-file CLIENT.json)")
        return 1
    usable = False
    for status in statuses:
        marker = " (GOOGLE_OAUTH_ACCOUNT)" if status.account == configured else ""
        expiry = status.access_expires_at.isoformat() if status.access_expires_at else "none held"
        state = f"revoked {status.revoked_at.isoformat()}: connect again" if status.revoked_at else "connected"
        if status.key == "unknown":
            state = "cannot be decrypted with VOICEBOOK_SECRET_KEY"
        print(f"account {status.account}{marker}: {state}")
        print(f"  google account: {status.subject or 'not reported'}")
        print(f"  client: {status.client_id}")
        print(f"  scopes: {' '.join(status.scopes)}")
        print(f"  access token expires: {expiry}")
        print(f"  connected {status.connected_at.isoformat()}, updated {status.updated_at.isoformat()}")
        print(f"  encrypted with: {'the first key' if status.key == 'current' else status.key + ' key'}")
        if status.account == configured and status.revoked_at is None and status.key != "unknown":
            usable = True
    return 0 if usable else 1


def _process_count(text: str) -> int:
    """``--processes``: a whole number from 1 to 64 (as ``VOICEBOOK_PROCESSES``); 0 is refused, not ignored."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"{value} is outside 1..64")
    return value


def _speed(text: str) -> float:
    value = float(text)
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"{text} is not a speed between 0 and 100")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voicebook", description="voicebook voice agent server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the HTTP/WebSocket server")
    serve_parser.add_argument("--host", help="bind address (default VOICEBOOK_HOST)")
    serve_parser.add_argument("--port", type=int, help="port (default VOICEBOOK_PORT)")
    serve_parser.add_argument(
        "--forwarded-allow-ips", default="127.0.0.1", help="proxies trusted for X-Forwarded-* headers"
    )
    serve_parser.add_argument(
        "--processes",
        type=_process_count,
        help="server processes sharing the port, each on its own core (default VOICEBOOK_PROCESSES, 1)",
    )
    serve_parser.set_defaults(handler=serve)
    booking_parser = commands.add_parser(
        "booking-process", help="the calls' booking writes on a Unix socket (voicebook serve starts it)"
    )
    booking_parser.add_argument("--socket", required=True, help="the Unix socket to listen on")
    booking_parser.set_defaults(handler=booking_process_command)
    migrate_parser = commands.add_parser("migrate", help="upgrade the ledger's schema")
    migrate_parser.add_argument("revision", nargs="?", default="head")
    migrate_parser.set_defaults(handler=migrate_command)
    check_parser = commands.add_parser("check-config", help="validate settings and the business file")
    check_parser.set_defaults(handler=check_config)
    replay_parser = commands.add_parser(
        "replay",
        help="replay a recorded call against a running server and print what it did differently",
        description="Exit status: 0 no differences, 1 differences, 2 the replay could not run.",
    )
    replay_parser.add_argument("file", help="a call recording (data_dir/recordings/<CallSid>.jsonl)")
    replay_parser.add_argument("--url", help="the server's Media Streams WebSocket, ws://HOST:PORT/twilio/media")
    replay_parser.add_argument(
        "--public-url",
        help="the stream URL Twilio is given, which the server checks signatures against (default --url)",
    )
    replay_parser.add_argument("--speed", type=_speed, default=1.0, help="how much faster the caller acts (default 1)")
    replay_parser.add_argument("--auth-token", help="sign the upgrade like Twilio (default TWILIO_AUTH_TOKEN)")
    replay_parser.add_argument(
        "--database-url", help="the server's ledger, where the replayed call is filed (default from the environment)"
    )
    replay_parser.add_argument("--wav", help="also write the recording's two legs as a stereo WAV here")
    replay_parser.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    replay_parser.set_defaults(handler=replay_command)
    _add_simulators_and_call(commands)
    _add_dlq_and_worker(commands)
    _add_google(commands)
    _add_reports(commands)
    _add_audit_and_tokens(commands)
    _add_privacy(commands)
    return parser


def _add_privacy(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from voice_server import privacy_cli

    privacy_cli.add_parsers(commands)
    commands.choices["keys"].set_defaults(handler=lambda args: privacy_cli.keys_command(_settings(), args))
    commands.choices["privacy"].set_defaults(handler=lambda args: privacy_cli.privacy_command(_settings(), args))
    from voice_server import consent_cli

    consent_cli.add_parser(commands)
    commands.choices["consent"].set_defaults(handler=lambda args: consent_cli.consent_command(_settings(), args))
    from voice_server import numbers_cli

    numbers_cli.add_parser(commands)
    commands.choices["numbers"].set_defaults(handler=lambda args: numbers_cli.numbers_command(_settings(), args))


def _add_simulators_and_call(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sims = commands.add_parser("simulators", help="run the Deepgram, OpenAI and Twilio simulators on loopback")
    sims.add_argument("--host", default="127.0.0.1")
    sims.add_argument("--deepgram-port", type=int, default=8701)
    sims.add_argument("--openai-port", type=int, default=8702)
    sims.add_argument("--twilio-port", type=int, default=8703)
    sims.add_argument("--stt-final-ms", type=int, default=150, help="final transcript delay after speech ends")
    sims.add_argument("--llm-first-token-ms", type=int, default=250, help="time to the model's first token")
    sims.add_argument("--tts-first-byte-ms", type=int, default=100, help="time to the first byte of speech")
    sims.set_defaults(handler=simulators_command)
    call = commands.add_parser(
        "call",
        help="place a test call to a running server: type what the caller says",
        description="Each line you type is spoken into the call; `press 1` sends a key; an empty line hangs up.",
    )
    call.add_argument("--url", help="the server's base URL (default http://VOICEBOOK_HOST:VOICEBOOK_PORT)")
    call.add_argument("--from", dest="caller", default="+16465550199", help="the caller's number")
    call.add_argument("--to", help="the number called (default: the business's)")
    call.add_argument("--say", action="append", help="a line to say instead of reading the terminal (repeatable)")
    call.set_defaults(handler=call_command)


def _add_dlq_and_worker(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dlq = commands.add_parser("dlq", help="inspect, retry or discard dead effects (failed calendar events, texts)")
    actions = dlq.add_subparsers(dest="action", required=True)
    dlq_list = actions.add_parser("list", help="dead effects, most recent first")
    dlq_list.add_argument("--limit", type=int, default=50)
    actions.add_parser("show", help="one effect as JSON (phone masked)").add_argument("id", type=int)
    actions.add_parser("retry", help="send a dead effect back to the queue").add_argument("id", type=int)
    discard = actions.add_parser("discard", help="give up on a dead effect, saying why")
    discard.add_argument("id", type=int)
    discard.add_argument("--note", required=True, help="why it is discarded (kept with the effect)")
    dlq.set_defaults(handler=dlq_command)
    worker = commands.add_parser(
        "worker",
        help="run the outbox's effect workers on their own (needs REDIS_URL)",
        description="Runs effects until SIGINT/SIGTERM. Needs a shared Redis (REDIS_URL); run the server "
        "with VOICEBOOK_RUN_WORKERS=false alongside it.",
    )
    worker.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="effects run at once per integration (default: VOICEBOOK_WORKER_CONCURRENCY)",
    )
    worker.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve GET /metrics for Prometheus on this port (0: any free port; default: no listener)",
    )
    worker.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics listener")
    worker.set_defaults(handler=worker_command)
    reconcile = commands.add_parser(
        "reconcile",
        help="enqueue the effects active bookings are missing and report stuck ones, once (prints JSON)",
    )
    reconcile.set_defaults(handler=reconcile_command)


def _add_reports(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = commands.add_parser("report", help="a call's end-of-call report (every read is audited)")
    actions = report.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="the report as JSON (the newest version unless --version)")
    show.add_argument("call_sid")
    show.add_argument("--version", type=int, help="an older version")
    actions.add_parser("audit", help="who generated, edited, exported, read or deleted what").add_argument("call_sid")
    actions.add_parser("regenerate", help="build a new version from the ledger as it is now").add_argument("call_sid")
    report.set_defaults(handler=report_command)
    crm = commands.add_parser("crm", help="the Airtable base: check its tables and fields, or create them")
    crm_actions = crm.add_subparsers(dest="action", required=True)
    crm_actions.add_parser("check", help="report the tables and fields the base lacks (exit 1 if any)")
    crm_actions.add_parser("create", help="create the missing tables and fields (wrong types are only reported)")
    conflicts = crm_actions.add_parser("conflicts", help="where the two-way sync and Airtable disagreed (JSON)")
    conflicts.add_argument("--all", action="store_true", help="resolved ones too")
    crm.set_defaults(handler=crm_command)


def _add_audit_and_tokens(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = commands.add_parser("audit", help="the audit log of access and changes (a hash chain)")
    audit_actions = audit.add_subparsers(dest="action", required=True)
    audit_actions.add_parser(
        "verify",
        help="check every entry's hash and link; exit 1 and say where if one was edited, removed or reordered",
    )
    audit.set_defaults(handler=audit_command)
    tokens = commands.add_parser("tokens", help="the admin API's bearer tokens and their roles")
    actions = tokens.add_subparsers(dest="action", required=True)
    roles = ("viewer", "operator", "admin")
    create = actions.add_parser("create", help="make a token (printed once; only its hash is kept)")
    create.add_argument("--name", required=True, help="who or what it is for")
    create.add_argument("--role", required=True, choices=roles)
    create.add_argument(
        "--tenant",
        help="the only tenant whose servers accept it (VOICEBOOK_TENANT, or the business name's slug); "
        "without it every server does",
    )
    actions.add_parser("list", help="every token: id, name, role, tenant, last use, revoked or live")
    set_role = actions.add_parser("set-role", help="give a live token another role")
    set_role.add_argument("id", type=int)
    set_role.add_argument("role", choices=roles)
    actions.add_parser("revoke", help="revoke a token (servers drop it within 30 s)").add_argument("id", type=int)
    tokens.set_defaults(handler=tokens_command)


def _add_google(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    google = commands.add_parser("google", help="connect a Google account for the calendar, or show it")
    actions = google.add_subparsers(dest="action", required=True)
    connect = actions.add_parser(
        "connect",
        help="consent in a browser and keep the grant in the ledger, encrypted",
        description="Prints Google's consent URL and waits on 127.0.0.1 for the browser to come back. On a "
        "machine without a browser: run it with --redirect-uri http://127.0.0.1:1/ (the URL the browser will "
        "fail to open), consent elsewhere, then run it again with --code and the URL the browser showed.",
    )
    connect.add_argument("--client-file", help="the OAuth client JSON (default GOOGLE_OAUTH_CLIENT_FILE)")
    connect.add_argument("--account", help="the name to keep the grant under (default GOOGLE_OAUTH_ACCOUNT)")
    connect.add_argument("--redirect-uri", help="headless: the redirect to consent with; no local listener")
    connect.add_argument("--code", help="headless, second run: the code, or the whole URL the browser was sent to")
    connect.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the browser")
    actions.add_parser("status", help="connected accounts, scopes and expiry (never a token)")
    google.set_defaults(handler=google_command)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.handler(args)
    except ConfigurationError as exc:
        print(f"voicebook: {exc.detail}", file=sys.stderr)
        return 1
    finally:
        from voice_server.metrics import mark_process_dead

        mark_process_dead()  # with PROMETHEUS_MULTIPROC_DIR: this process's live gauges leave the aggregate
    return result


if __name__ == "__main__":
    raise SystemExit(main())
