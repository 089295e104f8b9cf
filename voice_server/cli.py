"""The ``voicebook`` command: ``serve``, ``migrate``, ``check-config``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import secrets
import sys
from collections.abc import Sequence

import structlog

from booking.business import load_business
from booking.errors import ConfigurationError
from booking.ledger.database import Database, LedgerConfigurationError, head_revision, migrate
from voice_server.logging import configure_logging
from voice_server.settings import Settings, SettingsError

log = structlog.get_logger("voicebook.cli")


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise SystemExit(f"voicebook: {exc}") from None


def _development_admin_token(settings: Settings) -> Settings:
    """In development with no admin token set, make one and keep it in ``data_dir/admin-token`` (0600), so
    the admin API is usable locally without ever running open."""
    if settings.admin_token is not None or settings.environment != "development":
        return settings
    path = settings.data_dir / "admin-token"
    if path.is_file():
        token = path.read_text(encoding="utf-8").strip()
    else:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(token + "\n")
    log.info("development_admin_token", path=str(path), hint="Authorization: Bearer $(cat <path>)")
    return dataclasses.replace(settings, admin_token=token)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from voice_server.app import create_app
    from voice_server.server import DrainingServer

    settings = _settings()
    configure_logging(settings.log_level, settings.log_format)
    # Fail before the server starts, with the exact problem, rather than as a lifespan traceback.
    load_business(settings.business_file)
    settings = _development_admin_token(settings)
    host = args.host or settings.host
    port = args.port or settings.port
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        # Twilio's media frames are small JSON; compressing them costs CPU on every frame for nothing.
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        log_config=None,
        lifespan="on",
        proxy_headers=True,
        forwarded_allow_ips=args.forwarded_allow_ips,
    )
    DrainingServer(config, app, drain_seconds=settings.drain_seconds).run()
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voicebook", description="voicebook voice agent server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the HTTP/WebSocket server")
    serve_parser.add_argument("--host", help="bind address (default VOICEBOOK_HOST)")
    serve_parser.add_argument("--port", type=int, help="port (default VOICEBOOK_PORT)")
    serve_parser.add_argument(
        "--forwarded-allow-ips", default="127.0.0.1", help="proxies trusted for X-Forwarded-* headers"
    )
    serve_parser.set_defaults(handler=serve)
    migrate_parser = commands.add_parser("migrate", help="upgrade the ledger's schema")
    migrate_parser.add_argument("revision", nargs="?", default="head")
    migrate_parser.set_defaults(handler=migrate_command)
    check_parser = commands.add_parser("check-config", help="validate settings and the business file")
    check_parser.set_defaults(handler=check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.handler(args)
    except ConfigurationError as exc:
        print(f"voicebook: {exc.detail}", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    raise SystemExit(main())
