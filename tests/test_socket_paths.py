"""Socket folders under a deep ``TMPDIR`` (voice_server/socket_paths.py), with real folders and a real bind."""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from voice_server.socket_paths import fits, socket_folder


def bind(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))


def test_a_deep_tmpdir_gets_a_folder_in_tmp_whose_socket_binds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    with pytest.raises(OSError, match="too long"):  # what the booking process hit before
        bind(deep / "x" / "booking.sock")
    monkeypatch.setattr(tempfile, "tempdir", str(deep))  # TMPDIR, as tempfile reads it once
    folder = socket_folder("voicebook-booking-", "booking.sock")
    try:
        assert folder.parent == Path("/tmp") and fits(folder / "booking.sock")
        assert folder.stat().st_mode & 0o777 == 0o700
        bind(folder / "booking.sock")
        assert list(deep.iterdir()) == []  # the folder it tried first is gone
    finally:
        shutil.rmtree(folder)


def test_a_short_tmpdir_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    short = Path(tempfile.mkdtemp(prefix="s-", dir="/tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(short))
    try:
        folder = socket_folder("voicebook-booking-", "booking.sock")
        assert folder.parent == short
        bind(folder / "booking.sock")
    finally:
        shutil.rmtree(short)
