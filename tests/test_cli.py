"""The `voicebook` command's configuration checks and migrations."""

from __future__ import annotations

from pathlib import Path

import pytest

from booking.ledger.database import head_revision
from voice_server.cli import main


def test_migrate_creates_the_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    assert main(["migrate"]) == 0
    assert f"ledger at revision {head_revision()}" in capsys.readouterr().out
    assert main(["migrate"]) == 0, "migrating twice is harmless"


def test_check_config_names_every_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "business.toml"
    broken.write_text("""
[business]
name = "Broken"
timezone = "America/Nowhere"

[[resources]]
id = "a"
name = "A"
[resources.hours]
mon = ["17:00-09:00"]

[[services]]
id = "cut"
name = "Cut"
duration_minutes = 30
resources = ["b"]
""")
    monkeypatch.setenv("VOICEBOOK_BUSINESS_FILE", str(broken))
    assert main(["check-config"]) == 1
    err = capsys.readouterr().err
    assert "timezone: 'America/Nowhere' is not an IANA time zone" in err
    assert "resources[0].hours.mon: '17:00-09:00' ends before it starts" in err


def test_check_config_accepts_the_example(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VOICEBOOK_BUSINESS_FILE", raising=False)
    assert main(["check-config"]) == 0
    assert "Riverside Family Clinic" in capsys.readouterr().out


def test_bad_environment_stops_with_the_variable_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICEBOOK_PORT", "eighty")
    monkeypatch.setenv("DATABASE_URL", "mysql://db/voicebook")
    with pytest.raises(SystemExit) as stopped:
        main(["check-config"])
    message = str(stopped.value)
    assert "VOICEBOOK_PORT: 'eighty' is not a whole number" in message
    assert "DATABASE_URL: URL scheme must be one of" in message


def test_serve_refuses_an_invalid_business_before_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "business.toml"
    broken.write_text('[business]\nname = "Nameless"\ntimezone = "UTC"\n')
    monkeypatch.setenv("VOICEBOOK_BUSINESS_FILE", str(broken))
    monkeypatch.setenv("VOICEBOOK_DATA_DIR", str(tmp_path / "data"))
    assert main(["serve", "--port", "1"]) == 1
    err = capsys.readouterr().err
    assert "resources: Field required" in err and "services: Field required" in err
    assert not (tmp_path / "data" / "admin-token").exists(), "nothing is started or written"
