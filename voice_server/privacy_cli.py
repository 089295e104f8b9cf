"""``voicebook keys ...`` and ``voicebook privacy ...``: the keys of personal data, and a person's rights.

- ``voicebook keys new``: a fresh key line and index key to paste into the configuration.
- ``voicebook keys status``: the configured key ids, which one encrypts, and how many values each
  column still holds under any other key.
- ``voicebook keys rotate``: re-seal every value under the active key (no downtime; see
  booking/ledger/pii_rotation.py); in development it first adds a new key to ``data_dir/pii-keys`` and
  makes it active.
- ``voicebook privacy export PHONE [--out FILE]``: everything held about a person, as JSON.
- ``voicebook privacy erase PHONE --yes``: remove or anonymise it (booking/privacy.py).

Exit status: 0 done, 1 nothing found, 2 unusable configuration or input.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import select

from booking.business import load_business
from booking.errors import ConfigurationError, InvalidRequest
from booking.ledger import pii
from booking.ledger.pii import PiiKeyError, new_key
from booking.ledger.pii_rotation import SEALED_COLUMNS, rotate_keys
from booking.phone import normalise_phone, region_of
from booking.privacy import dumps, erase_person, export_person
from booking.reports.pipeline import reseal_spool
from voice_server.dlq_cli import CONFIGURATION, NOT_FOUND, OK, Unusable, open_ledger
from voice_server.privacy_keys import install_pii_cipher, read_key_file, write_key_file
from voice_server.settings import Settings

ACTOR = "cli"


def keys_command(settings: Settings, args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout  # read now: a test's captured stream replaces it after import
    if args.action == "new":
        print(f"VOICEBOOK_PII_KEYS={args.id}={new_key()}", file=out)
        print(f"VOICEBOOK_PII_INDEX_KEY={new_key()}", file=out)
        print("# add the new key in front of the old ones; keep the index key you already have", file=out)
        return OK
    try:
        if args.action == "rotate" and not settings.pii_keys and settings.environment == "development":
            _add_development_key(settings)
        cipher = install_pii_cipher(settings)
    except PiiKeyError as exc:
        print(f"voicebook: {exc}", file=sys.stderr)
        return CONFIGURATION
    try:
        return asyncio.run(_keys(settings, args, cipher.active, out))
    except Unusable as exc:
        print(f"voicebook: {exc}", file=sys.stderr)
        return CONFIGURATION


def _reseal_spools(folder: Path) -> int:
    """Every call recording spool in ``folder`` under the active key (see booking/reports/pipeline.py)."""
    return sum(1 for path in sorted(folder.glob("*.jsonl")) if reseal_spool(path)) if folder.is_dir() else 0


def _add_development_key(settings: Settings) -> None:
    stored = read_key_file(settings)
    ids = [item.partition("=")[0] for item in stored["keys"].split(",") if item]
    number = 1 + max((int(i[1:]) for i in ids if i[1:].isdigit()), default=0)
    key_id = f"k{number}"
    stored["keys"] = f"{key_id}={new_key()}," + stored["keys"]
    stored["active"] = key_id
    write_key_file(settings, stored)


async def _keys(settings: Settings, args: argparse.Namespace, active: str, out: TextIO) -> int:
    async with open_ledger(settings) as database:
        if args.action == "rotate":
            report = await rotate_keys(database, batch=args.batch, actor=ACTOR)
            for column, count in sorted(report.resealed.items()):
                print(f"{column}: {count} re-sealed under {report.active}", file=out)
            spools = await asyncio.to_thread(_reseal_spools, settings.data_dir / "recordings")
            if spools:
                print(f"recording spools: {spools} re-sealed under {report.active}", file=out)
            print(f"{report.total} values re-sealed; every value is now under key {report.active}", file=out)
            return OK
        cipher = pii.cipher()
        print(f"keys: {', '.join(sorted(cipher.keys))}; active: {active}", file=out)
        for spec in SEALED_COLUMNS:
            counts: Counter[str] = Counter()
            async with database.reader.connect() as conn:
                for (value,) in await conn.execute(select(spec.table.c[spec.column])):
                    if value is not None and cipher.needs_rotation(value):
                        counts["stale"] += 1
            if counts:
                print(f"{spec.name}: {counts['stale']} values not under {active}", file=out)
        return OK


def person_number(settings: Settings, raw_phone: str) -> str:
    """The number an operator typed, in E.164. Without a country code it is read in the business's
    country (its phone's), as callers and the booking API read it: ``020 7946 0958`` is a London number to
    a London business. The business file is read only then."""
    if raw_phone.strip().startswith(("+", "00")):
        return normalise_phone(raw_phone)
    return normalise_phone(raw_phone, default_region=region_of(load_business(settings.business_file).phone))


def for_person(
    settings: Settings, raw_phone: str, refusal: str | None, run: Callable[[str], Coroutine[Any, Any, int]]
) -> int:
    """The shape of every command about one person (``privacy``, ``consent``): the number in E.164
    (:func:`person_number`), then ``run`` with it; exit 2 when the number is not one, when ``refusal``
    says why the command may not run, or when the configuration is unusable."""
    try:
        phone = person_number(settings, raw_phone)
    except (InvalidRequest, ConfigurationError) as exc:
        print(f"voicebook: {exc}", file=sys.stderr)
        return CONFIGURATION
    if refusal is not None:
        print(f"voicebook: {refusal}", file=sys.stderr)
        return CONFIGURATION
    try:
        return asyncio.run(run(phone))
    except Unusable as exc:
        print(f"voicebook: {exc}", file=sys.stderr)
        return CONFIGURATION


def privacy_command(settings: Settings, args: argparse.Namespace, out: TextIO | None = None) -> int:
    stream = out or sys.stdout
    unconfirmed = args.action == "erase" and not args.yes
    refusal = "erasure cannot be undone: add --yes to go ahead" if unconfirmed else None
    return for_person(settings, args.phone, refusal, lambda phone: _privacy(settings, args, phone, stream))


async def _privacy(settings: Settings, args: argparse.Namespace, phone: str, out: TextIO) -> int:
    from integrations.storage import build_storage

    archive = build_storage(settings.storage_url, settings.data_dir)
    try:
        async with open_ledger(settings) as database:
            if args.action == "export":
                document = await export_person(database, phone, archive=archive, actor=ACTOR)
                found = document["customer"] is not None or document["calls"] or document["messages"]
                data = dumps(document)
                if args.out:
                    await asyncio.to_thread(Path(args.out).write_bytes, data)
                else:
                    out.write(data.decode() + "\n")
                return OK if found else NOT_FOUND
            erasure = await erase_person(
                database,
                phone,
                archive=archive,
                crm=settings.crm_enabled,
                actor=ACTOR,
                recordings_dir=settings.data_dir / "recordings",
            )
            out.write(dumps(erasure.as_dict()).decode() + "\n")
            return OK if erasure.customers or erasure.calls or erasure.messages else NOT_FOUND
    finally:
        await archive.close()


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="the keys that encrypt personal data: new, status, rotate")
    actions = keys.add_subparsers(dest="action", required=True)
    new = actions.add_parser("new", help="print a fresh key and index key for the configuration")
    new.add_argument("--id", default="k1", help="the new key's id (letters, digits, - and _)")
    actions.add_parser("status", help="key ids, the active one, and values still under another key")
    rotate = actions.add_parser("rotate", help="re-encrypt every value under the active key (no downtime)")
    rotate.add_argument("--batch", type=int, default=500, help="rows per transaction")
    privacy = commands.add_parser("privacy", help="a person's data: export it, or erase it")
    privacy_actions = privacy.add_subparsers(dest="action", required=True)
    export = privacy_actions.add_parser("export", help="everything held about a phone number, as JSON")
    export.add_argument("phone")
    export.add_argument("--out", help="write the JSON here instead of standard output")
    erase = privacy_actions.add_parser("erase", help="remove or anonymise everything about a phone number")
    erase.add_argument("phone")
    erase.add_argument("--yes", action="store_true", help="confirm: erasure cannot be undone")


__all__ = ["add_parsers", "for_person", "keys_command", "privacy_command"]
