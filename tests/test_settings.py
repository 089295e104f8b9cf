"""Settings from the environment: defaults, parsing, and one message naming every bad variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from booking.business import EXAMPLE_BUSINESS_FILE
from voice_server.settings import Settings, SettingsError


def test_defaults_are_the_embedded_stack() -> None:
    settings = Settings.from_env({})
    assert settings.redis_url is None and settings.database_url is None
    assert settings.effective_database_url.startswith("sqlite+aiosqlite:///")
    assert settings.effective_database_url.endswith("var/voicebook.db")
    assert settings.business_file == EXAMPLE_BUSINESS_FILE
    assert (settings.host, settings.port, settings.environment) == ("127.0.0.1", 8080, "development")


def test_values_are_parsed(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "VOICEBOOK_PORT": "9000",
            "REDIS_URL": "redis://cache:6379/2",
            "DATABASE_URL": "postgresql://db/vb",
            "VOICEBOOK_AUTO_MIGRATE": "off",
            "VOICEBOOK_LOG_LEVEL": "debug",
            "VOICEBOOK_DATA_DIR": str(tmp_path),
        }
    )
    assert settings.port == 9000 and settings.redis_url == "redis://cache:6379/2"
    assert settings.effective_database_url == "postgresql://db/vb"
    assert settings.auto_migrate is False and settings.log_level == "DEBUG"


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(
            {
                "VOICEBOOK_PORT": "70000",
                "VOICEBOOK_AUTO_MIGRATE": "maybe",
                "VOICEBOOK_LOG_FORMAT": "xml",
                "VOICEBOOK_ENV": "production",
            }
        )
    message = str(caught.value)
    for expected in (
        "VOICEBOOK_PORT: 70000 is outside 1..65535",
        "VOICEBOOK_AUTO_MIGRATE: 'maybe' is not a boolean",
        "VOICEBOOK_LOG_FORMAT: 'xml' is not one of json, console",
        "VOICEBOOK_ADMIN_TOKEN: required when VOICEBOOK_ENV=production",
    ):
        assert expected in message


def test_admin_token_from_a_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret-token-from-a-file\n")
    assert Settings.from_env({"VOICEBOOK_ADMIN_TOKEN_FILE": str(secret)}).admin_token == "s3cret-token-from-a-file"
    with pytest.raises(SettingsError, match="set either VOICEBOOK_ADMIN_TOKEN or VOICEBOOK_ADMIN_TOKEN_FILE"):
        Settings.from_env({"VOICEBOOK_ADMIN_TOKEN_FILE": str(secret), "VOICEBOOK_ADMIN_TOKEN": "x" * 20})
    with pytest.raises(SettingsError, match="at least 16 characters"):
        Settings.from_env({"VOICEBOOK_ADMIN_TOKEN": "short"})


def test_the_token_is_not_in_the_repr() -> None:
    settings = Settings.from_env({"VOICEBOOK_ADMIN_TOKEN": "do-not-print-this-token"})
    assert "do-not-print-this-token" not in repr(settings)


def test_recording_calls_needs_a_consent_notice() -> None:
    with pytest.raises(SettingsError, match="VOICEBOOK_RECORD_CALLS: callers must be told"):
        Settings.from_env({"VOICEBOOK_RECORD_CALLS": "true"})
    settings = Settings.from_env(
        {"VOICEBOOK_RECORD_CALLS": "true", "VOICEBOOK_CONSENT_NOTICE": "This call is recorded."}
    )
    assert settings.record_calls


def test_providers_default_to_offline_and_switch_on_with_their_keys(tmp_path: Path) -> None:
    offline = Settings.from_env({})
    assert (offline.stt, offline.tts, offline.agent) == ("sphinx", "espeak", "dialog")
    key_file = tmp_path / "dg"
    key_file.write_text("dg-secret\n")
    production = Settings.from_env(
        {"DEEPGRAM_API_KEY_FILE": str(key_file), "OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": "http://127.0.0.1:1/v1"}
    )
    assert (production.stt, production.tts, production.agent) == ("deepgram", "deepgram", "openai")
    assert production.deepgram_api_key == "dg-secret" and "dg-secret" not in repr(production)
    mixed = Settings.from_env({"DEEPGRAM_API_KEY": "k", "VOICEBOOK_TTS": "espeak"})
    assert (mixed.stt, mixed.tts, mixed.agent) == ("deepgram", "espeak", "dialog")


def test_a_chosen_provider_without_its_key_is_refused() -> None:
    with pytest.raises(SettingsError) as error:
        Settings.from_env({"VOICEBOOK_STT": "deepgram", "VOICEBOOK_AGENT": "openai", "VOICEBOOK_TTS": "piper"})
    message = str(error.value)
    assert "VOICEBOOK_STT: the chosen provider needs DEEPGRAM_API_KEY" in message
    assert "VOICEBOOK_AGENT: the chosen provider needs OPENAI_API_KEY" in message
    assert "VOICEBOOK_TTS: 'piper' is not one of auto, deepgram, espeak" in message


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        (None, "process"),
        ("process", "process"),
        ("thread", "thread"),
        ("off", "off"),
        ("TRUE", "process"),  # the variable was a boolean before: true meant a lane, false none
        ("false", "off"),
    ],
)
def test_where_the_booking_writes_run(value: str | None, mode: str) -> None:
    env = {} if value is None else {"VOICEBOOK_BOOKING_LANE": value}
    assert Settings.from_env(env).booking_lane == mode


def test_an_unknown_booking_lane_is_named() -> None:
    with pytest.raises(SettingsError, match="VOICEBOOK_BOOKING_LANE: 'fast' is not one of process, thread, off"):
        Settings.from_env({"VOICEBOOK_BOOKING_LANE": "fast"})


def test_the_deepgram_chunk_is_read_and_bounded() -> None:
    assert Settings.from_env({}).deepgram_chunk_ms == 100
    assert Settings.from_env({"DEEPGRAM_CHUNK_MS": "40"}).deepgram_chunk_ms == 40
    with pytest.raises(SettingsError, match=r"DEEPGRAM_CHUNK_MS: 10 is outside 20\.\.250"):
        Settings.from_env({"DEEPGRAM_CHUNK_MS": "10"})
