"""Masking keys for the WebSocket frames our clients send, without a system call per frame.

RFC 6455 (section 5.3) has a client mask every frame with a fresh 32-bit key that scripts on the page
cannot predict. ``websockets`` draws each key with ``secrets.token_bytes(4)``: an ``os.urandom`` call,
so one ``getrandom`` system call per frame, and each call lets go of the interpreter lock. At 100 calls
the Deepgram listen sockets alone send 2,500 frames a second from the event loop's thread; in a profile
of the server under that load the key draws were 5.7% of the samples, most of it the loop waiting to get
the interpreter back from other threads.

:func:`install` makes ``websockets`` draw its keys here instead: from the same source, ``os.urandom``,
read 4 KiB at a time, so one system call per 1,024 frames. Every byte is still used once. The buffer is
per thread, and a forked child starts with an empty one, so no two threads or processes share a key.
"""

from __future__ import annotations

import os
import threading

import websockets.frames

BLOCK_BYTES = 4096
"""How much randomness one ``os.urandom`` call fetches."""


class _Buffer(threading.local):
    def __init__(self) -> None:
        self.data = b""
        self.offset = 0


_buffer = _Buffer()


def token_bytes(nbytes: int | None = None) -> bytes:
    """``secrets.token_bytes``, served from a per-thread buffer of ``os.urandom`` output."""
    wanted = 32 if nbytes is None else nbytes
    buffer = _buffer
    start = buffer.offset
    if start + wanted > len(buffer.data):
        buffer.data = os.urandom(max(BLOCK_BYTES, wanted))
        start = 0
    buffer.offset = start + wanted
    return buffer.data[start : start + wanted]


def _forget_in_child() -> None:
    global _buffer
    _buffer = _Buffer()


os.register_at_fork(after_in_child=_forget_in_child)


class _Secrets:
    """What ``websockets.frames`` uses of the ``secrets`` module."""

    token_bytes = staticmethod(token_bytes)


def install() -> None:
    """Make ``websockets`` mask frames with keys from :func:`token_bytes` (idempotent). Fails loudly if
    a release of ``websockets`` no longer draws its keys the way this replaces."""
    namespace = vars(websockets.frames)  # the module does not export the name it masks with
    current = namespace.get("secrets")
    if current is not _Secrets and getattr(current, "token_bytes", None) is None:
        raise RuntimeError("websockets.frames no longer masks with secrets.token_bytes; revisit ws_masking")
    namespace["secrets"] = _Secrets


__all__ = ["BLOCK_BYTES", "install", "token_bytes"]
