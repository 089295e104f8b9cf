"""Loopback sockets for the simulators, the tests and the load tests to serve on."""

from __future__ import annotations

import socket


def loopback_socket() -> socket.socket:
    """A TCP socket bound to a free port on 127.0.0.1, for ``uvicorn.Server.serve(sockets=[...])``.

    The protocol is spelled out: asyncio sets ``TCP_NODELAY`` on accepted connections only when the
    listening socket's protocol says TCP, and a plain ``socket.socket()`` says 0. Without it every answer
    on a kept-alive connection waits for the client's delayed ACK (about 40 ms on Linux)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    return sock
