"""The local call-recording spool is sealed at rest: no word the caller said and no number in the file,
every line bound to its call, place and count; files from before sealing still read; the report
pipeline archives the opened lines (sealed to their object key, as before)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from sqlalchemy import select

from booking.business import Business
from booking.ledger import pii
from booking.ledger import schema as t
from booking.ledger.database import Database
from booking.ledger.pii import FieldCipher, new_key
from booking.reports.pipeline import (
    ReportPipeline,
    SpoolError,
    open_archived,
    open_spool,
    recording_key,
    reseal_spool,
)
from integrations.storage import LocalFolderStorage, ObjectNotFound
from tests.conftest import TEST_PII_INDEX_KEY, FrozenClock
from tests.test_call_reports_flow import CALL, CALLER, hang_up, ring
from voice_server.recording import CallRecording, RecordingError, load_recording, read_call

OTHER_CALL = "CA" + "8" * 32
SAID = "my number is 646 555 0199 and I have asthma"


def start_message(call_sid: str) -> str:
    body = {"callSid": call_sid, "streamSid": "MZ" + "1" * 32, "customParameters": {"From": CALLER}}
    return orjson.dumps({"event": "start", "start": body}).decode()


def recording_of(path: Path, call_sid: str) -> CallRecording:
    ticks = iter(range(100))
    recording = CallRecording(path, clock=lambda: float(next(ticks)))
    recording.inbound(start_message(call_sid))
    recording.outbound('{"event": "media", "media": {"payload": "AAAA"}}')
    recording.inbound(b"\x00\x01")
    recording.event("turn", role="caller", text=SAID, truncated=False, tool=None)
    recording.event("end", reason="stop")
    return recording


async def saved(folder: Path, call_sid: str) -> Path:
    return await recording_of(folder / f"{call_sid}.jsonl", call_sid).save()


async def test_a_saved_recording_holds_no_words_or_number_and_reads_back(tmp_path: Path) -> None:
    path = await saved(tmp_path, CALL)
    data = path.read_bytes()
    for plain in (b"asthma", b"646 555 0199", CALLER.encode(), CALLER[1:].encode(), b"start", b"media"):
        assert plain not in data
    header = orjson.loads(data.splitlines()[0])
    assert (header["call_sid"], header["lines"]) == (CALL, 5)  # the call sid labels the file; it is Twilio's id
    call = read_call(path)
    assert call.call_sid == CALL and call.start["customParameters"]["From"] == CALLER
    assert [turn.text for turn in call.turns] == [SAID] and call.end_reason == "stop"
    assert [message.direction for message in call.messages] == ["in", "out", "in"]
    assert call.messages[2].binary == 2 and call.duration == 5.0
    assert load_recording(path)[3]["text"] == SAID


async def test_a_plain_recording_from_before_sealing_still_reads(tmp_path: Path) -> None:
    sealed = await saved(tmp_path / "sealed", CALL)
    plain = tmp_path / f"{CALL}.jsonl"
    plain.write_bytes(b"".join(line + b"\n" for line in open_spool(sealed.read_bytes())[1]))
    assert plain.read_bytes().startswith(b'{"dir":"in"') and b"asthma" in plain.read_bytes()
    assert read_call(plain) == read_call(sealed)


async def test_a_line_moved_from_another_calls_file_does_not_open(tmp_path: Path) -> None:
    ours = await saved(tmp_path, CALL)
    theirs = await saved(tmp_path, OTHER_CALL)
    lines = ours.read_bytes().splitlines()
    lines[4] = theirs.read_bytes().splitlines()[4]  # same place, same count, another call
    ours.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(RecordingError, match="line 5"):
        read_call(ours)


async def test_a_reordered_cut_short_or_relabelled_spool_does_not_open(tmp_path: Path) -> None:
    path = await saved(tmp_path, CALL)
    header, *lines = path.read_bytes().splitlines()
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_bytes(b"\n".join([header, lines[1], lines[0], *lines[2:]]))
    with pytest.raises(RecordingError, match="line 2"):
        read_call(swapped)
    short = tmp_path / "short.jsonl"  # the last lines dropped and the count edited to match
    edited = orjson.loads(header) | {"lines": 3}
    short.write_bytes(b"\n".join([orjson.dumps(edited), *lines[:3]]))
    with pytest.raises(RecordingError, match="line 2"):
        read_call(short)
    relabelled = tmp_path / "relabelled.jsonl"
    relabelled.write_bytes(b"\n".join([orjson.dumps(orjson.loads(header) | {"call_sid": OTHER_CALL}), *lines]))
    with pytest.raises(RecordingError):
        read_call(relabelled)
    with pytest.raises(SpoolError, match=f"belongs to call {CALL}"):
        open_spool(path.read_bytes(), call_sid=OTHER_CALL)  # the pipeline asks for the call it archives


async def test_the_report_pipeline_archives_the_opened_recording(
    database: Database, business: Business, clock: FrozenClock, tmp_path: Path
) -> None:
    calls = await ring(database, clock)
    await hang_up(calls, clock)
    recordings = tmp_path / "recordings"
    spooled = read_call(await saved(recordings, CALL))
    archive = LocalFolderStorage(tmp_path / "archive")
    pipeline = ReportPipeline(database, business, archive=archive, recordings_dir=recordings, clock=clock)
    await pipeline.build(CALL)
    key = recording_key(await calls.require_call(CALL))
    stored = await archive.get(key)
    assert b"asthma" not in stored
    archived = tmp_path / "archived.jsonl"
    archived.write_bytes(open_archived(key, stored))
    assert archived.read_bytes().startswith(b'{"dir":"in"')  # the privacy export reads the lines as they are
    assert read_call(archived) == spooled


async def test_a_spool_that_does_not_open_is_not_archived_and_the_report_still_is(
    database: Database, business: Business, clock: FrozenClock, tmp_path: Path
) -> None:
    calls = await ring(database, clock)
    await hang_up(calls, clock)
    recordings = tmp_path / "recordings"
    path = await saved(recordings, CALL)
    theirs = await saved(recordings, OTHER_CALL)
    path.write_bytes(theirs.read_bytes())  # another call's spool under this call's name
    archive = LocalFolderStorage(tmp_path / "archive")
    pipeline = ReportPipeline(database, business, archive=archive, recordings_dir=recordings, clock=clock)
    built = await pipeline.build(CALL)
    assert built.new
    with pytest.raises(ObjectNotFound):
        await archive.get(recording_key(await calls.require_call(CALL)))


async def test_the_replay_command_renders_a_sealed_recording(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``voicebook replay --wav`` opens the spool with the configured keys (here the tests' own, which the
    environment carries), as every other command reading personal data does."""
    from voice_server.cli import main

    monkeypatch.setenv("VOICEBOOK_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    path = await saved(tmp_path / "recordings", CALL)
    out = tmp_path / "call.wav"
    # Opening it is a read of a recording: refused while no ledger can take the audit entry.
    assert await asyncio.to_thread(main, ["replay", str(path), "--wav", str(out)]) == 2
    assert "audit" in capsys.readouterr().err and not out.exists()
    assert await asyncio.to_thread(main, ["migrate"]) == 0
    assert await asyncio.to_thread(main, ["replay", str(path), "--wav", str(out)]) == 0
    assert out.stat().st_size > 44 and CALL in capsys.readouterr().out
    database = Database.connect(f"sqlite:///{tmp_path / 'voicebook.db'}")
    try:
        query = select(t.audit_events.c.details).where(t.audit_events.c.subject_id == CALL)
        async with database.reader.connect() as conn:
            details = [row.details for row in await conn.execute(query)]
    finally:
        await database.dispose()
    assert details == [{"what": "recording", "via": "replay"}]


async def test_rotation_reseals_spools_so_the_old_key_can_go(tmp_path: Path) -> None:
    """``voicebook keys rotate`` re-seals each spool under the new key (plain old files too); afterwards
    the spool opens with the new key alone."""
    old = pii.cipher()
    sealed = await saved(tmp_path, CALL)
    plain = tmp_path / f"{OTHER_CALL}.jsonl"
    plain.write_bytes(
        b"".join(line + b"\n" for line in open_spool((await saved(tmp_path / "p", OTHER_CALL)).read_bytes())[1])
    )
    new = FieldCipher.parse(f"k-new={new_key()}", TEST_PII_INDEX_KEY).keys["k-new"]
    pii.install(FieldCipher({"k-new": new, **old.keys}, "k-new", old.index_key))
    assert [reseal_spool(path) for path in (sealed, plain)] == [True, True]
    assert reseal_spool(sealed) is False  # nothing left under another key
    pii.install(FieldCipher({"k-new": new}, "k-new", old.index_key))  # the old key removed
    assert [turn.text for turn in read_call(sealed).turns] == [SAID]
    assert read_call(plain).call_sid == OTHER_CALL and b"asthma" not in plain.read_bytes()
