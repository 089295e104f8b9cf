"""``voicebook consent ...``: a person's consent history, and an operator recording what they asked for.

- ``voicebook consent show PHONE``: every decision (kind, decision, channel, time, call, wording version).
- ``voicebook consent revoke PHONE [--kind recording|transcription|sms|all]``: the person withdrew
  (by letter, by email, at the desk); honoured from then on: their next calls are not recorded or
  transcribed where consent is required (booking/consent.py), and they are not texted.
- ``voicebook consent grant PHONE --kind K --wording TEXT``: the person agreed elsewhere (a signed
  form); the words they agreed to are kept with the decision.

Each change is audited. Exit status: 0 done, 1 nothing recorded for the number (show), 2 unusable input.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from booking.consent import Channel, ConsentKind, Decision, wording_version
from booking.ledger.consent_repository import ConsentLedger, NewConsent
from booking.ledger.sms_repository import SmsLedger, SuppressionSource
from voice_server.dlq_cli import NOT_FOUND, OK, open_ledger
from voice_server.privacy_cli import for_person
from voice_server.settings import Settings

ACTOR = "cli"
ALL_KINDS = "all"


def consent_command(settings: Settings, args: argparse.Namespace, out: TextIO | None = None) -> int:
    stream = out or sys.stdout  # read now: a test's captured stream replaces it after import
    unfinished = args.action == "grant" and (args.kind == ALL_KINDS or not args.wording.strip())
    refusal = "a grant names one kind and the words the person agreed to (--wording)" if unfinished else None
    return for_person(settings, args.phone, refusal, lambda phone: _consent(settings, args, phone, stream))


async def _consent(settings: Settings, args: argparse.Namespace, phone: str, out: TextIO) -> int:
    async with open_ledger(settings) as database:
        ledger = ConsentLedger(database)
        if args.action == "show":
            history = await ledger.for_person(phone)
            for d in history:
                print(
                    f"{d.at.isoformat()}  {d.kind.value:<13} {d.decision.value:<8} {d.channel.value:<13} "
                    f"call={d.call_sid or '-'}  wording={d.wording_version}",
                    file=out,
                )
            return OK if history else NOT_FOUND
        kinds = list(ConsentKind) if args.kind == ALL_KINDS else [ConsentKind(args.kind)]
        decision = Decision.REVOKED if args.action == "revoke" else Decision.GRANTED
        wording = args.wording.strip() if args.action == "grant" else None
        call_kinds = [kind for kind in kinds if kind is not ConsentKind.SMS]
        if call_kinds:
            version = wording_version(wording) if wording else "operator"
            await ledger.record(
                phone,
                [NewConsent(kind, decision, Channel.OPERATOR, version, wording=wording) for kind in call_kinds],
                actor=ACTOR,
            )
        if ConsentKind.SMS in kinds:
            # Texts are governed by the opt-out list every send consults; it records the decision too.
            await SmsLedger(database).set_opted_out(
                phone,
                decision is Decision.REVOKED,
                keyword=None,
                source=SuppressionSource.OPERATOR,
                wording=wording,
                actor=ACTOR,
            )
        print(f"{decision.value}: {', '.join(kind.value for kind in kinds)}", file=out)
        return OK


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    consent = commands.add_parser("consent", help="a person's consent history; record a withdrawal or a grant")
    actions = consent.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="every consent decision recorded for a phone number")
    show.add_argument("phone")
    kinds = [kind.value for kind in ConsentKind]
    revoke = actions.add_parser("revoke", help="the person withdrew consent: honoured from now on")
    revoke.add_argument("phone")
    revoke.add_argument("--kind", choices=[*kinds, ALL_KINDS], default=ALL_KINDS)
    grant = actions.add_parser("grant", help="the person agreed elsewhere (a signed form)")
    grant.add_argument("phone")
    grant.add_argument("--kind", choices=kinds, required=True)
    grant.add_argument("--wording", required=True, help="the exact words the person agreed to")


__all__ = ["add_parser", "consent_command"]
