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
- ``numbers compliance [NUMBER ...] [--a2p STATUS] [--toll-free STATUS] [--refresh]``: where each number
  (all registered ones by default) stands on A2P 10DLC registration and toll-free verification. The flags
  record a status; ``--refresh`` reads them from Twilio and records them; neither shows what is recorded;
- ``numbers release NUMBER --yes [--force]``: give the number back to Twilio and drop it from the
  registry; without ``--yes`` only say what would happen. The business's own phone needs ``--force``;
- ``numbers assign NUMBER [RESOURCE ...]``: what calls to the number book (no resources: the whole
  business);
- ``numbers list``: the registry, with when each number was last verified and what it serves.

Resource ids (``assign``, ``--serves``) must be the business file's, checked before anything is sent.
``list``, ``assign`` and ``compliance`` without ``--refresh`` read and write only the registry, so they
need no Twilio credentials; the rest talk to Twilio.

Exit status: 0 done (verify: nothing wrong; compliance without a flag: every texting number cleared to
text), 1 Twilio refused, verify found a mismatch, compliance found a texting number not cleared, or the
number is not registered, 2 unusable input or configuration (an invalid number, an unknown resource, no
Twilio credentials, no public URL, release without ``--yes`` or of the business's phone).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import TextIO

from booking.business import Business, load_business
from booking.errors import ConfigurationError, InvalidRequest
from booking.ledger.numbers_repository import (
    A2PStatus,
    Mismatch,
    NumberRegistry,
    NumberType,
    RegisteredNumber,
    TollFreeVerification,
    cleared_to_text,
)
from booking.ledger.repository import Clock, utc_now
from booking.phone import normalise_phone, region_of
from integrations.egress import Allowlist
from integrations.twilio_numbers import (
    MESSAGING_HOSTS,
    Compliance,
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

MISMATCH = NOT_FOUND  # exit 1: verify or compliance found something wrong, or Twilio refused


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


async def run(
    settings: Settings, args: argparse.Namespace, out: TextIO, err: TextIO | None = None, *, clock: Clock = utc_now
) -> int:
    """``clock`` says what "upcoming" means (``release`` counts the bookings that still text from it)."""
    err = err or sys.stderr
    try:
        numbers = _numbers(args)
        if getattr(args, "serves", None):
            check_resources(_business(settings), args.serves)
        if args.action in ("list", "assign") or (args.action == "compliance" and not args.refresh):
            # The registry alone: no Twilio credentials needed.
            async with open_ledger(settings) as database:
                registry = NumberRegistry(database, clock=clock)
                if args.action == "assign":
                    return await _assign(registry, numbers[0], args.serves, out)
                if args.action == "compliance":
                    return await _compliance(None, registry, numbers, args, out)
                return await _list(registry, out)
        client = numbers_client(settings)
        if args.action == "search":
            return await _search(client, args, out)
        if args.action == "configure" and not settings.public_url:
            raise Unusable("configuring a number needs VOICEBOOK_PUBLIC_URL: the https:// base Twilio reaches us at")
        if args.action == "release" and not args.force and numbers[0] == _business_phone(settings):
            raise Unusable(
                f"{numbers[0]} is the business's own phone (phone in {settings.business_file}): callers and "
                "texts use it; release it with --force if that is really meant"
            )
        async with open_ledger(settings) as database:
            registry = NumberRegistry(database, clock=clock)
            if args.action == "buy":
                return await _buy(client, registry, numbers[0], args.serves, out)
            if args.action == "configure":
                return await _configure(client, registry, settings, numbers[0], args, out)
            if args.action == "verify":
                return await _verify(client, registry, settings, numbers, args.voice_only, out)
            if args.action == "compliance":
                return await _compliance(client, registry, numbers, args, out)
            return await _release(client, registry, numbers[0], args.yes, out)
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


def _business(settings: Settings) -> Business:
    try:
        return load_business(settings.business_file)
    except ConfigurationError as exc:
        raise Unusable(exc.detail) from None


def _business_phone(settings: Settings) -> str | None:
    """The business file's phone in E.164 (as given when it does not parse), None when it has none."""
    phone = _business(settings).phone
    if not phone:
        return None
    try:
        return normalise_phone(phone, default_region=region_of(phone))
    except InvalidRequest:
        return phone


def check_resources(business: Business, resources: Sequence[str]) -> None:
    """:class:`Unusable` naming every id in ``resources`` that is not one of ``business``'s resources,
    with the ones it has: a typo would otherwise make a line that books nobody."""
    known = [resource.id for resource in business.resources]
    unknown = sorted({resource for resource in resources if resource not in known})
    if unknown:
        raise Unusable(
            f"unknown resource{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"the business's resources are {', '.join(known)}"
        )


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


async def _targets(registry: NumberRegistry, numbers: Sequence[str], out: TextIO) -> list[str]:
    """The numbers named, or every registered one; empty (said on ``out``) when there are none."""
    targets = list(numbers) or [known.number for known in await registry.list()]
    if not targets:
        print("no numbers registered (voicebook numbers buy, or configure a number already on the account)", file=out)
    return targets


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
    targets = await _targets(registry, numbers, out)
    if not targets:
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


def _standing(number: str, sms: bool, compliance: Compliance) -> tuple[str, bool]:
    """One line for ``number``'s carrier registrations, and whether it blocks texting."""
    statuses = f"{number}: a2p={compliance.a2p_status.value} toll_free={compliance.toll_free_verification.value}"
    if not sms:
        return f"{statuses}  does not text", False
    if cleared_to_text(compliance.a2p_status, compliance.toll_free_verification):
        return f"{statuses}  cleared to text", False
    note = f" ({compliance.note})" if compliance.note else ""
    return f"{statuses}  not cleared to text{note}", True


async def _compliance(
    client: TwilioNumbers | None,
    registry: NumberRegistry,
    numbers: Sequence[str],
    args: argparse.Namespace,
    out: TextIO,
) -> int:
    a2p = A2PStatus(args.a2p) if args.a2p else None
    verification = TollFreeVerification(args.toll_free) if args.toll_free else None
    recording = a2p is not None or verification is not None
    if recording and args.refresh:
        raise Unusable("--refresh reads the statuses from Twilio: give it or --a2p/--toll-free, not both")
    if recording and not numbers:
        raise Unusable("name the number whose status to record")
    targets = await _targets(registry, numbers, out)
    if not targets:
        return MISMATCH
    worst = OK
    for number in targets:
        known = await registry.get(number)
        if known is None:
            print(f"{number}: not in voicebook's registry: voicebook numbers configure {number}", file=out)
            worst = MISMATCH
            continue
        sms = known.sms
        if recording:
            await registry.set_compliance(number, a2p_status=a2p, toll_free_verification=verification)
            standing = Compliance(a2p or known.a2p_status, verification or known.toll_free_verification)
        elif args.refresh:
            assert client is not None  # run() builds one for --refresh
            current = await client.find(number)
            if current is None:
                print(f"{number}: the number is not on this Twilio account", file=out)
                worst = MISMATCH
                continue
            await registry.upsert(current.facts())  # Twilio may have changed its capabilities
            standing = await client.compliance(current, known.messaging_service_sid)
            await registry.set_compliance(
                number, a2p_status=standing.a2p_status, toll_free_verification=standing.toll_free_verification
            )
            sms = current.sms
        else:
            standing = Compliance(known.a2p_status, known.toll_free_verification)
        line, blocked = _standing(number, sms, standing)
        print(line, file=out)
        if blocked and not recording:  # recording succeeded; only reading gates a deploy
            worst = MISMATCH
    return worst


async def _release(client: TwilioNumbers, registry: NumberRegistry, number: str, yes: bool, out: TextIO) -> int:
    current = await client.find(number)
    known = await registry.get(number)
    if current is None and known is None:
        print(f"{number} is not on this Twilio account and not in voicebook's registry", file=out)
        return MISMATCH
    upcoming = await registry.upcoming_bookings(number)
    if upcoming:
        # Their texts would go from a number that is no longer ours: they fall back to the configured sender.
        print(
            f"{upcoming} upcoming booking{'s were' if upcoming > 1 else ' was'} made on {number}: "
            f"{'their' if upcoming > 1 else 'its'} texts will come from the configured sender "
            "(TWILIO_SMS_FROM or TWILIO_MESSAGING_SERVICE_SID) once it is released",
            file=out,
        )
    if not yes:
        if current is not None:
            print(
                f"would release {number} ({current.sid}) at Twilio: calls and texts to it stop, and Twilio may "
                "sell it to someone else",
                file=out,
            )
        else:
            print(f"{number} is not on this Twilio account", file=out)
        if known is not None:
            print(f"would remove {number} from voicebook's registry", file=out)
        print("nothing done: run again with --yes to do it", file=out)
        return CONFIGURATION
    if current is not None:
        await client.release(current)
        print(f"released {number} ({current.sid}) at Twilio", file=out)
    else:
        print(f"{number} is not on this Twilio account", file=out)
    if await registry.remove(number):
        print(f"removed {number} from voicebook's registry", file=out)
    return OK


async def _assign(registry: NumberRegistry, number: str, serves: Sequence[str], out: TextIO) -> int:
    if not await registry.assign(number, serves):
        print(f"{number} is not in voicebook's registry (voicebook numbers buy, or configure it)", file=out)
        return MISMATCH
    print(f"{number} serves {', '.join(sorted(set(serves))) or 'the whole business'}", file=out)
    return OK


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
    compliance = actions.add_parser(
        "compliance",
        help="A2P 10DLC registration and toll-free verification: record them, read them from Twilio, or show them",
        description="Without --a2p, --toll-free or --refresh: the recorded statuses. Exit status 1 when a "
        "number that texts is not cleared to text (not when recording a status).",
    )
    compliance.add_argument("numbers", nargs="*", metavar="NUMBER", help="default: every registered number")
    compliance.add_argument("--a2p", choices=[status.value for status in A2PStatus], help="record this A2P status")
    compliance.add_argument(
        "--toll-free",
        choices=[status.value for status in TollFreeVerification],
        help="record this toll-free verification status",
    )
    compliance.add_argument("--refresh", action="store_true", help="read each number's statuses from Twilio")
    release = actions.add_parser("release", help="give a number back to Twilio and drop it from the registry")
    release.add_argument("number")
    release.add_argument("--yes", action="store_true", help="do it (without: say what would happen, exit 2)")
    release.add_argument("--force", action="store_true", help="even when it is the business's own phone")
    assign = actions.add_parser("assign", help="what calls to a registered number book")
    assign.add_argument("number")
    assign.add_argument("serves", nargs="*", metavar="RESOURCE", help="a resource id (none: the whole business)")
    actions.add_parser("list", help="the registered numbers, with when each was last verified")


__all__ = ["add_parser", "check_resources", "numbers_client", "numbers_command", "run"]
