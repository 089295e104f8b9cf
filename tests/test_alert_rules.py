"""The alert rules through Prometheus's own tool: `promtool check rules` and the rule unit tests in
deploy/prometheus/alerts_test.yml (series fed in minute by minute, alerts expected to fire or stay quiet).

promtool is a Go binary outside Python's reach: `.ci/run` unpacks it from Debian's prometheus package into
`.venv/tools/`. Elsewhere set VOICEBOOK_PROMTOOL or put promtool on PATH; without it these tests skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus"


def promtool() -> str | None:
    candidates = [os.environ.get("VOICEBOOK_PROMTOOL"), str(ROOT / ".venv" / "tools" / "usr" / "bin" / "promtool")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("promtool")


needs_promtool = pytest.mark.skipif(promtool() is None, reason="promtool not found (.ci/run provides it)")


def run(*arguments: str) -> subprocess.CompletedProcess[str]:
    tool = promtool()
    assert tool is not None
    return subprocess.run([tool, *arguments], cwd=RULES, capture_output=True, text=True, timeout=60)


@needs_promtool
def test_rules_and_scrape_config_are_valid_for_prometheus() -> None:
    rules = run("check", "rules", "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS" in rules.stdout
    config = run("check", "config", "--syntax-only", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


@needs_promtool
def test_alerts_fire_and_stay_quiet_as_their_unit_tests_say() -> None:
    result = run("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_a_broken_rule_is_refused(tmp_path: Path) -> None:
    # The check can fail: an expression with a syntax error is reported, not passed.
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "groups:\n- name: x\n  rules:\n  - alert: Broken\n    expr: rate(voicebook_calls_total[5m] > 1\n"
    )
    result = run("check", "rules", str(broken))
    assert result.returncode != 0
