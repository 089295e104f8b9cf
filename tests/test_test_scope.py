"""``VOICEBOOK_TEST_SCOPE=backend``: which tests CI's services run keeps. A test dropped by mistake would
run against the embedded backend only, so the rule is checked on real test files, collected by a real
pytest in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = ("tests/test_audit_chain.py", "tests/test_audio.py", "tests/test_booking_service.py")


def collected(scope: str) -> set[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env["VOICEBOOK_TEST_SCOPE"] = scope
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *FILES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {line for line in result.stdout.splitlines() if "::" in line}


def test_the_backend_scope_keeps_what_reaches_the_backend_and_only_that() -> None:
    everything, kept = collected("all"), collected("backend")
    assert kept < everything
    by_file = {name: {test for test in kept if test.startswith(name)} for name in FILES}
    assert not by_file["tests/test_audio.py"], "audio tests reach neither Redis nor the ledger"
    # Every booking service test takes the ``service`` fixture, built on the ledger and the index.
    assert by_file["tests/test_booking_service.py"] == {
        test for test in everything if test.startswith("tests/test_booking_service.py")
    }
    audit = by_file["tests/test_audit_chain.py"]
    # Marked ``backend``: it makes its own database by VOICEBOOK_TEST_BACKEND, without a fixture.
    assert "tests/test_audit_chain.py::test_the_migration_renumbers_and_chains_existing_entries" in audit
    # Works on a SQLite file in tmp_path whatever the backend.
    assert "tests/test_audit_chain.py::test_cli_verify_exits_2_on_an_unmigrated_ledger" not in audit


def test_an_unknown_scope_is_refused() -> None:
    with pytest.raises(AssertionError, match="VOICEBOOK_TEST_SCOPE must be 'all' or 'backend'"):
        collected("some")
