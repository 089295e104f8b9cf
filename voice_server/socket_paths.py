"""Folders for the Unix sockets voicebook listens on (the embedded Redis, the booking process).

A Unix socket's path is limited to 107 bytes on Linux (``sun_path`` less its terminating NUL), and a deep
data folder or ``TMPDIR`` (a CI runner's, pytest-xdist's per-worker folders) passes that: ``bind`` then
fails with "AF_UNIX path too long" and the process cannot start. Paths are kept a little under it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

MAX_SOCKET_PATH = 100


def fits(path: Path) -> bool:
    """Whether ``path`` can name a Unix socket."""
    return len(os.fsencode(path)) <= MAX_SOCKET_PATH


def socket_folder(prefix: str, name: str) -> Path:
    """A new folder of its own (mode 0700) for the socket ``name``: in the temporary folder, or in /tmp
    when ``TMPDIR`` is so deep that the socket's path would not fit."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    if not fits(folder / name):
        folder.rmdir()
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    return folder
