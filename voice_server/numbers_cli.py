"""``voicebook numbers ...``: the business's phone numbers as code, instead of clicks in Twilio's console.

- ``numbers search [--country US] [--type local|mobile|toll-free] [--area-code 212] [--contains 555]
  [--voice] [--sms] [--mms] [--limit N]``: numbers on offer, with their capabilities;
- ``numbers buy NUMBER [--serves RESOURCE ...]``: buy one and record it in the ledger's registry;
- ``numbers configure NUMBER [--messaging-service MG...] [--serves RESOURCE ...]``: point its calls
  (``/twilio/voice``), call status callbacks (``/twilio/call-status``) and texts (``/twilio/sms``, or the
  Messaging Service's sender pool) at ``VOICEBOOK_PUBLIC_URL``. Sends only what differs, so a second run
  changes nothing;
- ``numbers verify [NUMBER ...] [--voice-only]``: read each number (all registered ones by default) back
  from Twilio and report every mismatch; the result and its time are kept in the registry;
- ``numbers list``: the registry, with when each number was last verified and what it serves.

Exit status: 0 done (verify: nothing wrong), 1 Twilio refused or verify found a mismatch, 2 unusable
input or configuration (an invalid number, no Twilio credentials, no public URL).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import TextIO

from booking.errors import InvalidRequest
from booking.ledger.numbers_repository import Mismatch, NumberRegistry, NumberType, RegisteredNumber
from booking.phone import normalise_phone
from integrations.egress import Allowlist
from integrations.twilio_numbers import (
    MESSAGING_HOSTS,
    IncomingNumber,
    NumbersError,
    TwilioNumbers,
    Webhooks,
    changes_needed,
    mismatches,
)
from voice_server import egress_policy
from voice_server.dlq_cli import CONFIGURATION, NOT_FOUND, OK, Unusable, open_ledger
from voice_server.settings import Settings

MISMATCH = NOT_FOUND  # exit 1: verify found something wrong, or Twilio refused


def numbers_client(settings: Settings) -> TwilioNumbers:
    """twilio's client for the account in ``settings``, behind the egress gate; :class:`Unusable` without
    credentials."""
    missing = [
        name
        for name, value in (
            ("TWILIO_ACCOUNT_SID", settings.twilio_account_sid),
            ("TWILIO_AUTH_TOKEN", settings.twilio_auth_token),
        )
        if not value
    ]
    if missing:
        raise Unusable(
            f"managing numbers needs Twilio credentials: set {' and '.join(missing)} "
            "(the account SID and auth token from Twilio's console)"
        )
    assert settings.twilio_account_sid is not None and settings.twilio_auth_token is not None
    allowed = egress_policy.twilio(settings)
    if settings.twilio_api_base_url is None:
        allowed = allowed | Allowlist.of(MESSAGING_HOSTS)
    return TwilioNumbers(
        settings.twilio_account_sid,
        settings.twilio_auth_token,
        api_base_url=settings.twilio_api_base_url,
        egress=allowed,
    )


def numbers_command(settings: Settings, args: argparse.Namespace, out: TextIO | None = None) -> int:
    """The entry point of ``voicebook numbers``: runs :func:`run` on a fresh event loop."""
    return asyncio.run(run(settings, args, out or sys.stdout))


async def run(settings: Settings, args: argparse.Namespace, out: TextIO, err: TextIO | None = None) -> int:
    err = err or sys.stderr
    try:
        numbers = _numbers(args)
        client = numbers_client(settings)
        if args.action == "search":
            return await _search(client, args, out)
        if args.action == "configure" and not settings.public_url:
            raise Unusable("configuring a number needs VOICEBOOK_PUBLIC_URL: the https:// base Twilio reaches us at")
        async with open_ledger(settings) as database:
            registry = NumberRegistry(database)
            if args.action == "buy":
                return await _buy(client, registry, numbers[0], args.serves, out)
            if args.action == "configure":
                return await _configure(client, registry, settings, numbers[0], args, out)
            if args.action == "verify":
                return await _verify(client, registry, settings, numbers, args.voice_only, out)
            return await _list(registry, out)
    except Unusable as exc:
        print(f"voicebook: {exc}", file=err)
        return CONFIGURATION
    except NumbersError as exc:
        print(f"voicebook: {exc}", file=err)
        return MISMATCH


def _numbers(args: argparse.Namespace) -> list[str]:
    """The numbers named on the command line, in E.164; :class:`Unusable` for one that is not a number."""
    given = getattr(args, "numbers", None) or ([args.number] if getattr(args, "number", None) else [])
    try:
        return [normalise_phone(raw) for raw in given]
    except InvalidRequest as exc:
        raise Unusable(f"{exc.detail} (give it in E.164, e.g. +12125550123)") from None


def _abilities(voice: bool, sms: bool, mms: bool) -> str:
    return ",".join(name for name, on in (("voice", voice), ("sms", sms), ("mms", mms)) if on) or "-"


async def _search(client: TwilioNumbers, args: argparse.Namespace, out: TextIO) -> int:
    found = await client.search(
        args.country,
        NumberType(args.type),
        area_code=args.area_code,
        contains=args.contains,
        voice=True if args.voice else None,
        sms=True if args.sms else None,
        mms=True if args.mms else None,
        limit=args.limit,
    )
    for offer in found:
        abilities = _abilities(offer.voice, offer.sms, offer.mms)
        place = ", ".join(part for part in (offer.locality, offer.region) if part)
        print(f"{offer.phone_number:<16} {offer.country:<3} {abilities:<14} {place}".rstrip(), file=out)
    if not found:
        print("no numbers on offer match", file=out)
    return OK


async def _buy(client: TwilioNumbers, registry: NumberRegistry, number: str, serves: list[str], out: TextIO) -> int:
    bought = await client.buy(number)
    await registry.upsert(bought.facts())
    if serves:
        await registry.assign(number, serves)
    print(f"bought {bought.phone_number} ({bought.sid}); next: voicebook numbers configure {number}", file=out)
    return OK


async def _configure(
    client: TwilioNumbers,
    registry: NumberRegistry,
    settings: Settings,
    number: str,
    args: argparse.Namespace,
    out: TextIO,
) -> int:
    chosen = args.messaging_service
    if chosen is not None and not (chosen.startswith("MG") and len(chosen) == 34):
        raise Unusable(f"{chosen!r} is not a Messaging Service SID (MG followed by 32 characters)")
    current = await client.find(number)
    if current is None:
        print(f"{number} is not on this Twilio account (buy it first: voicebook numbers buy {number})", file=out)
        return MISMATCH
    known = await registry.get(number)
    service = args.messaging_service or (known.messaging_service_sid if known else None)
    wanted = Webhooks.for_base(settings.effective_public_url, messaging_service_sid=service)
    changes = changes_needed(current, wanted)
    if changes:
        current = await client.update(current, changes)
        for name, value in changes.items():
            print(f"{number}: {name} -> {value}", file=out)
    if service is not None and current.sms and not await client.in_service(service, current):
        await client.add_to_service(service, current)
        changes["messaging_service"] = service
        print(f"{number}: added to Messaging Service {service}", file=out)
    if not current.sms:
        print(f"{number}: cannot receive texts, so no SMS URL or Messaging Service was set", file=out)
    await registry.upsert(current.facts())
    if service is not None:
        await registry.set_messaging_service(number, service)
    if args.serves:
        await registry.assign(number, args.serves)
    if not changes:
        print(f"{number}: nothing to change", file=out)
    return OK


async def _verify(
    client: TwilioNumbers,
    registry: NumberRegistry,
    settings: Settings,
    numbers: Sequence[str],
    voice_only: bool,
    out: TextIO,
) -> int:
    if not settings.public_url:
        raise Unusable("verifying needs VOICEBOOK_PUBLIC_URL: the https:// base Twilio must reach us at")
    targets = list(numbers) or [known.number for known in await registry.list()]
    if not targets:
        print("no numbers registered (voicebook numbers buy, or configure a number already on the account)", file=out)
        return MISMATCH
    worst = OK
    for number in targets:
        known = await registry.get(number)
        service = known.messaging_service_sid if known else None
        wanted = Webhooks.for_base(settings.effective_public_url, messaging_service_sid=service)
        current: IncomingNumber | None = await client.find(number)
        in_service = await client.in_service(service, current) if service and current and current.sms else None
        found: list[Mismatch] = mismatches(current, wanted, in_service=in_service, require_sms=not voice_only)
        if known is None:
            # Nothing to keep the result in; configure registers a number the account already has.
            found.append(
                Mismatch("not_registered", f"not in voicebook's registry: voicebook numbers configure {number}")
            )
        else:
            if current is not None:
                await registry.upsert(current.facts())  # Twilio may have changed its capabilities
            await registry.mark_verified(number, found)
        for mismatch in found:
            detail = f" (expected {mismatch.expected}, found {mismatch.actual})" if mismatch.actual else ""
            print(f"{number}: {mismatch.message}{detail}", file=out)
        if found:
            worst = MISMATCH
        else:
            print(f"{number}: ok", file=out)
    return worst


def _row(known: RegisteredNumber) -> str:
    abilities = _abilities(known.voice, known.sms, known.mms)
    if known.last_verified_at is None:
        verified = "never verified"
    else:
        problems = len(known.last_verification or ())
        outcome = "ok" if not problems else f"{problems} mismatch{'es' if problems > 1 else ''}"
        verified = f"verified {known.last_verified_at.isoformat(timespec='seconds')} {outcome}"
    serves = ",".join(known.resources) or "all"
    return (
        f"{known.number:<16} {known.country:<3} {known.type.value:<10} {abilities:<14} serves={serves}  "
        f"service={known.messaging_service_sid or '-'}  a2p={known.a2p_status.value}  "
        f"toll_free={known.toll_free_verification.value}  {verified}"
    )


async def _list(registry: NumberRegistry, out: TextIO) -> int:
    registered = await registry.list()
    for known in registered:
        print(_row(known), file=out)
    if not registered:
        print("no numbers registered", file=out)
    return OK


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    numbers = commands.add_parser(
        "numbers",
        help="search, buy, configure and verify the business's Twilio numbers",
        description="Exit status: 0 done, 1 Twilio refused or verify found a mismatch, 2 unusable input.",
    )
    actions = numbers.add_subparsers(dest="action", required=True)
    search = actions.add_parser("search", help="numbers on offer")
    search.add_argument("--country", default="US", type=str.upper, help="ISO country code (default US)")
    search.add_argument("--type", choices=[kind.value for kind in NumberType], default=NumberType.LOCAL.value)
    search.add_argument("--area-code", help="US and Canada: the area code, e.g. 212")
    search.add_argument("--contains", help="digits the number contains; * matches any one digit")
    for capability in ("voice", "sms", "mms"):
        search.add_argument(f"--{capability}", action="store_true", help=f"only numbers with {capability.upper()}")
    search.add_argument("--limit", type=int, default=20)
    buy = actions.add_parser("buy", help="buy a number on offer and record it in the registry")
    buy.add_argument("number")
    configure = actions.add_parser(
        "configure", help="point the number's calls and texts at VOICEBOOK_PUBLIC_URL (changes only what differs)"
    )
    configure.add_argument("number")
    configure.add_argument(
        "--messaging-service", help="texts go through this Messaging Service (MG...) instead of the SMS URL"
    )
    for action in (buy, configure):
        action.add_argument(
            "--serves",
            action="append",
            default=[],
            metavar="RESOURCE",
            help="a resource id calls to this number book (repeat; default: the whole business)",
        )
    verify = actions.add_parser("verify", help="read numbers back from Twilio and report every mismatch")
    verify.add_argument("numbers", nargs="*", help="default: every registered number")
    verify.add_argument("--voice-only", action="store_true", help="a number that cannot text is not a mismatch")
    actions.add_parser("list", help="the registered numbers, with when each was last verified")


__all__ = ["add_parser", "numbers_client", "numbers_command", "run"]
