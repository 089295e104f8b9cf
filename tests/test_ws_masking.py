"""Masking keys from buffered randomness (``integrations.ws_masking``): frames still mask and unmask as
RFC 6455 says, keys are not repeated across frames, threads or a fork, and ``os.urandom`` is called
once per block rather than once per frame."""

from __future__ import annotations

import os
import threading

import pytest
import websockets.frames
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from integrations import ws_masking


def _masking_key(frame_bytes: bytes) -> bytes:
    """The 4-byte key of a masked client frame whose payload is under 126 bytes."""
    assert frame_bytes[1] & 0x80, "the frame is masked"
    return frame_bytes[2:6]


def _parse(data: bytes) -> Frame:
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=True)
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
        return frame
    raise AssertionError("the frame did not parse from its own bytes")


def test_installed_frames_round_trip_with_distinct_keys() -> None:
    ws_masking.install()
    ws_masking.install()  # idempotent
    assert vars(websockets.frames)["secrets"].token_bytes is ws_masking.token_bytes
    payload = b"\x7f" * 80  # one 10 ms chunk of mu-law silence
    keys = set()
    for _ in range(3000):
        data = Frame(Opcode.BINARY, payload).serialize(mask=True)
        keys.add(_masking_key(data))
        assert _parse(data).data == payload
    # 3,000 draws from 2^32 keys: a repeat is possible by chance (p ~ 0.001), a reused buffer is not.
    assert len(keys) >= 2995


def test_one_system_call_per_block(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.urandom

    def counting(size: int) -> bytes:
        calls.append(size)
        return real(size)

    monkeypatch.setattr(os, "urandom", counting)
    monkeypatch.setattr(ws_masking, "_buffer", ws_masking._Buffer())  # start from an empty buffer
    frames = 10 * ws_masking.BLOCK_BYTES // 4
    for _ in range(frames):
        ws_masking.token_bytes(4)
    assert calls == [ws_masking.BLOCK_BYTES] * 10
    assert len(ws_masking.token_bytes(5000)) == 5000  # more than a block at once is served whole


def test_threads_draw_different_keys() -> None:
    ws_masking.install()
    drawn: dict[str, list[bytes]] = {}

    def draw(name: str) -> None:
        drawn[name] = [vars(websockets.frames)["secrets"].token_bytes(4) for _ in range(500)]

    threads = [threading.Thread(target=draw, args=(f"t{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [key for keys in drawn.values() for key in keys]
    assert len(set(every)) >= len(every) - 5


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_reuse_the_parents_buffer() -> None:
    ws_masking.token_bytes(4)  # the parent's buffer now holds unused bytes the child must not see
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send its next 64 keys and leave without running pytest's teardown
        os.close(read_end)
        os.write(write_end, b"".join(ws_masking.token_bytes(4) for _ in range(64)))
        os._exit(0)
    os.close(write_end)
    child = b""
    while chunk := os.read(read_end, 4096):
        child += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    parent = b"".join(ws_masking.token_bytes(4) for _ in range(64))
    assert len(child) == 256
    assert child != parent


def test_install_refuses_a_websockets_that_masks_another_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(websockets.frames, "secrets", object())
    with pytest.raises(RuntimeError, match="ws_masking"):
        ws_masking.install()
