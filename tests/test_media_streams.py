"""Twilio Media Streams codec and tracker: every message, every refusal, and parse never raises."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from voice_server.media_streams import (
    Connected,
    Dtmf,
    FrameError,
    InboundMessage,
    Mark,
    Media,
    MediaStreamCodec,
    Rejected,
    Start,
    Stop,
    StreamState,
    StreamTracker,
)

STREAM = "MZ18ad3ab5a668481ce02b83e7395059f0"
CALL = "CA2d5ae1c7e0f2f5fbb0a8c1d4e3b2a190"
ACCOUNT = "AC25e16e9a716a4a1786a7c83f58e30482"
SILENCE = b"\xff" * 160  # 20 ms of mu-law silence


def connected_frame() -> dict[str, Any]:
    return {"event": "connected", "protocol": "Call", "version": "1.0.0"}


def start_frame(sequence: int = 1, stream: str = STREAM, **media_format: Any) -> dict[str, Any]:
    return {
        "event": "start",
        "sequenceNumber": str(sequence),
        "streamSid": stream,
        "start": {
            "streamSid": stream,
            "accountSid": ACCOUNT,
            "callSid": CALL,
            "tracks": ["inbound"],
            "customParameters": {"business": "acme-dental"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1, **media_format},
        },
    }


def media_frame(
    sequence: int, chunk: int, timestamp: int, payload: bytes = SILENCE, stream: str = STREAM
) -> dict[str, Any]:
    return {
        "event": "media",
        "sequenceNumber": str(sequence),
        "streamSid": stream,
        "media": {
            "track": "inbound",
            "chunk": str(chunk),
            "timestamp": str(timestamp),
            "payload": base64.b64encode(payload).decode(),
        },
    }


def dtmf_frame(sequence: int, digit: str = "1") -> dict[str, Any]:
    return {
        "event": "dtmf",
        "sequenceNumber": str(sequence),
        "streamSid": STREAM,
        "dtmf": {"track": "inbound_track", "digit": digit},
    }


def mark_frame(sequence: int, name: str = "reply-1") -> dict[str, Any]:
    return {"event": "mark", "sequenceNumber": str(sequence), "streamSid": STREAM, "mark": {"name": name}}


def stop_frame(sequence: int) -> dict[str, Any]:
    return {
        "event": "stop",
        "sequenceNumber": str(sequence),
        "streamSid": STREAM,
        "stop": {"accountSid": ACCOUNT, "callSid": CALL},
    }


def parse(frame: object) -> InboundMessage | Rejected:
    return MediaStreamCodec.parse(orjson.dumps(frame).decode())


def parsed(frame: object) -> InboundMessage:
    message = parse(frame)
    assert not isinstance(message, Rejected), message
    return message


def test_connected_is_parsed() -> None:
    assert parse(connected_frame()) == Connected(protocol="Call", version="1.0.0")


def test_start_is_parsed_with_format_tracks_and_custom_parameters() -> None:
    assert parse(start_frame()) == Start(
        sequence=1,
        stream_sid=STREAM,
        account_sid=ACCOUNT,
        call_sid=CALL,
        tracks=("inbound",),
        custom_parameters={"business": "acme-dental"},
        encoding="audio/x-mulaw",
        sample_rate=8000,
        channels=1,
    )


def test_media_is_parsed_with_payload_decoded() -> None:
    audio = bytes(range(160))
    assert parse(media_frame(2, 1, 5, audio)) == Media(
        sequence=2, stream_sid=STREAM, track="inbound", chunk=1, timestamp_ms=5, payload=audio
    )


def test_dtmf_mark_and_stop_are_parsed() -> None:
    assert parse(dtmf_frame(5, "#")) == Dtmf(sequence=5, stream_sid=STREAM, track="inbound_track", digit="#")
    assert parse(dtmf_frame(6, "D")) == Dtmf(sequence=6, stream_sid=STREAM, track="inbound_track", digit="D")
    assert parse(mark_frame(7)) == Mark(sequence=7, stream_sid=STREAM, name="reply-1")
    assert parse(stop_frame(8)) == Stop(sequence=8, stream_sid=STREAM, account_sid=ACCOUNT, call_sid=CALL)


def test_start_without_custom_parameters_has_none() -> None:
    frame = start_frame()
    del frame["start"]["customParameters"]
    message = parsed(frame)
    assert isinstance(message, Start)
    assert message.custom_parameters == {}


def without(frame: dict[str, Any], section: str, key: str) -> dict[str, Any]:
    del frame[section][key]
    return frame


def with_field(frame: dict[str, Any], section: str, key: str, value: object) -> dict[str, Any]:
    frame[section][key] = value
    return frame


@pytest.mark.parametrize(
    ("raw", "error", "detail"),
    [
        ('{"event": "media",', FrameError.MALFORMED_JSON, "not valid JSON"),
        ('"\ud800"', FrameError.MALFORMED_JSON, "not valid JSON"),
        ("[" * 2000 + "]" * 2000, FrameError.MALFORMED_JSON, "not valid JSON"),  # past orjson's depth limit
        (
            '{"event": "mark", "streamSid": "MZ1", "mark": {"name": "a"}, "sequenceNumber": 1' + "0" * 30 + "}",
            FrameError.BAD_FIELD,
            "sequenceNumber must be a string",
        ),
        (orjson.dumps([connected_frame()]).decode(), FrameError.NOT_AN_OBJECT, "list"),
        ('{"event": "transcript"}', FrameError.UNKNOWN_EVENT, "'transcript'"),
        ('{"protocol": "Call"}', FrameError.MISSING_FIELD, "event is missing"),
        ('{"event": 7}', FrameError.BAD_FIELD, "event must be a string"),
        ('{"event": "connected", "protocol": "Call", "version": ""}', FrameError.BAD_FIELD, "version"),
        (" " * (64 * 1024 + 1), FrameError.OVERSIZED, "65536"),
        ('{"event": "mark", "x": "' + "é" * 40_000 + '"}', FrameError.OVERSIZED, "65536"),
    ],
)
def test_a_bad_frame_is_rejected_with_its_error(raw: str, error: FrameError, detail: str) -> None:
    rejected = MediaStreamCodec.parse(raw)
    assert isinstance(rejected, Rejected)
    assert rejected.error is error
    assert detail in rejected.detail


@pytest.mark.parametrize(
    ("frame", "error", "detail"),
    [
        (without(media_frame(2, 1, 0), "media", "payload"), FrameError.MISSING_FIELD, "media.payload is missing"),
        (with_field(media_frame(2, 1, 0), "media", "payload", 12), FrameError.BAD_FIELD, "media.payload"),
        (with_field(media_frame(2, 1, 0), "media", "chunk", "one"), FrameError.BAD_FIELD, "media.chunk"),
        (with_field(media_frame(2, 1, 0), "media", "chunk", 1), FrameError.BAD_FIELD, "media.chunk"),
        (with_field(media_frame(2, 1, 0), "media", "timestamp", "-20"), FrameError.BAD_FIELD, "media.timestamp"),
        (with_field(media_frame(2, 1, 0), "media", "track", "both"), FrameError.BAD_FIELD, "media.track"),
        (with_field(media_frame(2, 1, 0), "media", "payload", "not base64!"), FrameError.BAD_BASE64, "payload"),
        (with_field(media_frame(2, 1, 0), "media", "payload", "//8"), FrameError.BAD_BASE64, "payload"),
        (with_field(media_frame(2, 1, 0), "media", "payload", "//8é"), FrameError.BAD_BASE64, "payload"),
        ({**media_frame(2, 1, 0), "sequenceNumber": "9" * 19}, FrameError.BAD_FIELD, "sequenceNumber"),
        ({**media_frame(2, 1, 0), "media": "abc"}, FrameError.BAD_FIELD, "media must be an object"),
        (with_field(dtmf_frame(3), "dtmf", "digit", "X"), FrameError.BAD_FIELD, "dtmf.digit"),
        (with_field(dtmf_frame(3), "dtmf", "digit", "12"), FrameError.BAD_FIELD, "dtmf.digit"),
        (without(mark_frame(4), "mark", "name"), FrameError.MISSING_FIELD, "mark.name"),
        (without(stop_frame(5), "stop", "callSid"), FrameError.MISSING_FIELD, "stop.callSid"),
        (with_field(start_frame(), "start", "tracks", "inbound"), FrameError.BAD_FIELD, "start.tracks"),
        (with_field(start_frame(), "start", "customParameters", {"a": 1}), FrameError.BAD_FIELD, "customParameters"),
        (with_field(start_frame(), "start", "streamSid", "MZother"), FrameError.WRONG_STREAM, "start.streamSid"),
        (start_frame(sampleRate=True), FrameError.BAD_FIELD, "start.mediaFormat.sampleRate"),
        (without(start_frame(), "start", "mediaFormat"), FrameError.MISSING_FIELD, "start.mediaFormat"),
    ],
)
def test_a_bad_field_is_rejected_and_named(frame: dict[str, Any], error: FrameError, detail: str) -> None:
    rejected = parse(frame)
    assert isinstance(rejected, Rejected)
    assert rejected.error is error
    assert detail in rejected.detail


def test_a_binary_frame_is_rejected_without_parsing() -> None:
    assert MediaStreamCodec.parse(orjson.dumps(connected_frame())) == Rejected(
        FrameError.BINARY_FRAME, "binary frame of 57 bytes; Twilio sends text"
    )


def test_the_detail_never_echoes_the_payload() -> None:
    frame = with_field(media_frame(2, 1, 0), "media", "payload", "SECRET-AUDIO" * 10)
    rejected = parse(frame)
    assert isinstance(rejected, Rejected)
    assert "SECRET" not in rejected.detail
    unknown = parse({"event": "x" * 1000})
    assert isinstance(unknown, Rejected)
    assert len(unknown.detail) < 60


def test_outbound_builders_produce_twilios_exact_shapes() -> None:
    assert orjson.loads(MediaStreamCodec.media(STREAM, b"\x00\xff")) == {
        "event": "media",
        "streamSid": STREAM,
        "media": {"payload": "AP8="},
    }
    assert orjson.loads(MediaStreamCodec.mark(STREAM, "reply-3")) == {
        "event": "mark",
        "streamSid": STREAM,
        "mark": {"name": "reply-3"},
    }
    assert orjson.loads(MediaStreamCodec.clear(STREAM)) == {"event": "clear", "streamSid": STREAM}


def test_an_echoed_outbound_mark_parses_back() -> None:
    echoed = orjson.loads(MediaStreamCodec.mark(STREAM, "reply-3")) | {"sequenceNumber": "9"}
    assert parse(echoed) == Mark(sequence=9, stream_sid=STREAM, name="reply-3")


def feed(tracker: StreamTracker, *frames: dict[str, Any]) -> list[Rejected | None]:
    return [tracker.accept(parse(frame)) for frame in frames]


def test_a_clean_call_is_accepted_in_order() -> None:
    tracker = StreamTracker()
    results = feed(
        tracker,
        connected_frame(),
        start_frame(1),
        media_frame(2, 1, 0),
        media_frame(3, 2, 20),
        dtmf_frame(4),
        mark_frame(5),
        stop_frame(6),
    )
    assert results == [None] * 7
    assert tracker.state is StreamState.STOPPED
    assert tracker.start is not None and tracker.start.call_sid == CALL
    gaps = (tracker.sequence_gaps, tracker.sequence_regressions, tracker.chunk_gaps, tracker.timestamp_gaps)
    assert gaps == (0, 0, 0, 0)
    assert tracker.media_frames == 2
    assert tracker.inbound_audio_ms == 40
    assert not tracker.rejected


def test_start_without_connected_is_accepted() -> None:
    tracker = StreamTracker()
    assert feed(tracker, start_frame(1), media_frame(2, 1, 0)) == [None, None]
    assert tracker.state is StreamState.STARTED


@pytest.mark.parametrize(
    ("frames", "error"),
    [
        ([media_frame(2, 1, 0)], FrameError.OUT_OF_ORDER),
        ([dtmf_frame(2)], FrameError.OUT_OF_ORDER),
        ([mark_frame(2)], FrameError.OUT_OF_ORDER),
        ([stop_frame(2)], FrameError.OUT_OF_ORDER),
        ([connected_frame(), connected_frame()], FrameError.OUT_OF_ORDER),
        ([start_frame(1), start_frame(2)], FrameError.OUT_OF_ORDER),
        ([start_frame(1), connected_frame()], FrameError.OUT_OF_ORDER),
        ([start_frame(1), stop_frame(2), media_frame(3, 1, 0)], FrameError.OUT_OF_ORDER),
        ([start_frame(1), stop_frame(2), start_frame(3)], FrameError.OUT_OF_ORDER),
        ([start_frame(1), media_frame(2, 1, 0, stream="MZother")], FrameError.WRONG_STREAM),
        ([start_frame(1, encoding="audio/l16")], FrameError.UNSUPPORTED_FORMAT),
        ([start_frame(1, sampleRate=16000)], FrameError.UNSUPPORTED_FORMAT),
        ([start_frame(1, channels=2)], FrameError.UNSUPPORTED_FORMAT),
    ],
)
def test_the_tracker_refuses_an_illegal_order(frames: list[dict[str, Any]], error: FrameError) -> None:
    tracker = StreamTracker()
    *before, last = feed(tracker, *frames)
    assert before == [None] * len(before)
    assert isinstance(last, Rejected)
    assert last.error is error
    assert tracker.rejected == {error: 1}


def test_media_after_an_unsupported_start_is_still_out_of_order() -> None:
    tracker = StreamTracker()
    feed(tracker, start_frame(1, sampleRate=16000), media_frame(2, 1, 0))
    assert tracker.rejected == {FrameError.UNSUPPORTED_FORMAT: 1, FrameError.OUT_OF_ORDER: 1}
    assert tracker.state is StreamState.NEW


def test_parse_rejections_are_counted_by_the_tracker() -> None:
    tracker = StreamTracker()
    rejected = tracker.accept(MediaStreamCodec.parse(b"\x00"))
    assert isinstance(rejected, Rejected) and rejected.error is FrameError.BINARY_FRAME
    tracker.accept(MediaStreamCodec.parse("nope"))
    assert tracker.rejected == {FrameError.BINARY_FRAME: 1, FrameError.MALFORMED_JSON: 1}


def test_sequence_gaps_count_missing_numbers_and_regressions_count_repeats() -> None:
    tracker = StreamTracker()
    results = feed(
        tracker,
        start_frame(1),
        media_frame(2, 1, 0),
        media_frame(5, 2, 20),  # 3 and 4 missing
        mark_frame(5),  # repeat
        mark_frame(4),  # backwards
        mark_frame(9),  # 6, 7, 8 missing
    )
    assert results == [None] * 6
    assert tracker.sequence_gaps == 5
    assert tracker.sequence_regressions == 2


def test_chunk_and_timestamp_gaps_are_counted() -> None:
    tracker = StreamTracker()
    feed(
        tracker,
        start_frame(1),
        media_frame(2, 1, 0),
        media_frame(3, 2, 40),  # one chunk on, 40 ms: within tolerance
        media_frame(4, 5, 100),  # chunks 3, 4 missing; 60 ms for 3 chunks: fine
        media_frame(5, 6, 200),  # one chunk, 100 ms: a timestamp gap
        media_frame(6, 6, 220),  # repeated chunk: neither gap
    )
    assert tracker.chunk_gaps == 2
    assert tracker.timestamp_gaps == 1
    assert tracker.sequence_gaps == 0
    assert tracker.media_frames == 5
    assert tracker.inbound_audio_ms == 100


def test_outbound_track_counts_frames_but_not_inbound_audio() -> None:
    tracker = StreamTracker()
    outbound = with_field(media_frame(2, 1, 0), "media", "track", "outbound")
    assert feed(tracker, start_frame(1), outbound) == [None, None]
    assert tracker.media_frames == 1
    assert tracker.inbound_audio_ms == 0


def json_values() -> st.SearchStrategy[object]:
    field_names = (
        "event sequenceNumber streamSid start media dtmf mark stop payload chunk timestamp track digit name tracks"
        " mediaFormat encoding sampleRate channels customParameters accountSid callSid protocol version"
    ).split()
    keys = st.sampled_from(field_names) | st.text(max_size=8)
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**63), max_value=2**63 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.sampled_from(["connected", "start", "media", "dtmf", "mark", "stop", "1", "inbound", "//8=", STREAM])
        | st.text(max_size=20)
    )
    return st.recursive(
        scalars,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=6),
        max_leaves=30,
    )


@given(st.text() | st.binary())
def test_parse_never_raises_on_arbitrary_frames(raw: str | bytes) -> None:
    assert isinstance(MediaStreamCodec.parse(raw), Connected | Start | Media | Dtmf | Mark | Stop | Rejected)


@given(json_values())
def test_parse_never_raises_on_arbitrary_json(value: object) -> None:
    result = parse(value)
    assert isinstance(result, Connected | Start | Media | Dtmf | Mark | Stop | Rejected)
    StreamTracker().accept(result)


@given(st.sampled_from([start_frame(), media_frame(2, 1, 0), dtmf_frame(3), mark_frame(4), stop_frame(5)]), st.data())
def test_parse_never_raises_when_one_field_is_replaced(frame: dict[str, Any], data: st.DataObject) -> None:
    section = data.draw(st.sampled_from(sorted(frame)))
    mutated = dict(frame)
    if isinstance(frame[section], dict):
        inner = dict(frame[section])
        inner[data.draw(st.sampled_from(sorted(inner)))] = data.draw(json_values())
        mutated[section] = inner
    else:
        mutated[section] = data.draw(json_values())
    result = parse(mutated)
    assert isinstance(result, Connected | Start | Media | Dtmf | Mark | Stop | Rejected)


@given(st.binary(max_size=2000), st.integers(min_value=0, max_value=10**9), st.integers(min_value=1, max_value=10**6))
def test_outbound_media_reshaped_as_inbound_round_trips_its_payload(audio: bytes, sequence: int, chunk: int) -> None:
    frame = orjson.loads(MediaStreamCodec.media(STREAM, audio))
    frame["sequenceNumber"] = str(sequence)
    frame["media"] |= {"track": "outbound", "chunk": str(chunk), "timestamp": str(chunk * 20)}
    message = parse(frame)
    assert isinstance(message, Media)
    assert message.payload == audio
    assert (message.sequence, message.chunk, message.timestamp_ms) == (sequence, chunk, chunk * 20)


@given(st.lists(st.sampled_from([connected_frame(), start_frame(1), media_frame(2, 1, 0), stop_frame(3)]), max_size=8))
def test_the_tracker_never_leaves_stopped(frames: list[dict[str, Any]]) -> None:
    tracker = StreamTracker()
    stopped = False
    for frame in frames:
        result = tracker.accept(parse(frame))
        if stopped:
            assert isinstance(result, Rejected) and result.error is FrameError.OUT_OF_ORDER
        stopped = tracker.state is StreamState.STOPPED
