"""Secrets: every secret setting read from ``NAME`` or ``NAME_FILE``, malformed ones refused at start-up
naming the variable and never the value, and a running app (lifespan on) that logs a bad signature, a
wrong admin token and a settings error without any configured secret reaching a line or a repr."""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
from pathlib import Path
from typing import Any

import pytest
from twilio.request_validator import RequestValidator

from tests.conftest import FrozenClock, running_app
from tests.test_logging import Captured, captured  # noqa: F401  # the fixture, as the server logs
from voice_server.logging import register_settings_secrets
from voice_server.settings import SECRET_VARIABLES, Settings, SettingsError

PUBLIC = "https://voice.example.test"


def test_every_secret_setting_is_declared_secret_and_read_from_a_file_too(tmp_path: Path) -> None:
    undeclared = {spec.name for spec in dataclasses.fields(Settings) if not spec.repr}
    assert set(SECRET_VARIABLES) <= undeclared  # each is hidden from repr and registered with the redactor
    env: dict[str, str] = {}
    expected: dict[str, str] = {}
    for name, variable in SECRET_VARIABLES.items():
        value = secrets.token_hex(16) if "twilio" in name else "sk-" + secrets.token_hex(20)
        path = tmp_path / variable.lower()
        path.write_text(value + "\n", encoding="utf-8")  # a trailing newline, as editors leave it
        env[f"{variable}_FILE"] = str(path)
        expected[name] = value
    env["AIRTABLE_BASE_ID"] = "app" + "A" * 14
    settings = Settings.from_env(env)
    for name, value in expected.items():
        got = getattr(settings, name)
        assert (got[0] if isinstance(got, tuple) else got) == value, name


def problems_of(env: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as error:
        Settings.from_env(env)
    return str(error.value)


@pytest.mark.parametrize("variable", sorted(set(SECRET_VARIABLES.values())))
def test_a_secret_with_a_line_break_or_quotes_is_refused_without_showing_it(variable: str) -> None:
    value = "distinctive-" + secrets.token_hex(12)
    env = {variable: f"{value}\nsecond-line-{value}"}
    if variable == "AIRTABLE_API_KEY":
        env["AIRTABLE_BASE_ID"] = "app" + "A" * 14
    message = problems_of(env)
    assert f"{variable}: contains whitespace, a quote or a control character" in message
    assert value not in message
    quoted = problems_of({**env, variable: f'"{value}"'})
    assert variable in quoted and value not in quoted


def test_the_secondary_twilio_token_needs_a_different_primary() -> None:
    token = secrets.token_hex(16)
    assert "TWILIO_AUTH_TOKEN_SECONDARY: set only during a rotation" in problems_of(
        {"TWILIO_AUTH_TOKEN_SECONDARY": token}
    )
    same = problems_of({"TWILIO_AUTH_TOKEN": token, "TWILIO_AUTH_TOKEN_SECONDARY": token})
    assert "TWILIO_AUTH_TOKEN_SECONDARY: is the same as TWILIO_AUTH_TOKEN" in same and token not in same
    other = secrets.token_hex(16)
    rotating = Settings.from_env({"TWILIO_AUTH_TOKEN": token, "TWILIO_AUTH_TOKEN_SECONDARY": other})
    assert (rotating.twilio_auth_token, rotating.twilio_auth_token_secondary) == (token, other)


def test_production_refuses_secrets_of_the_wrong_shape_naming_only_the_variable() -> None:
    wrong = "not-a-twilio-token-" + secrets.token_hex(8)
    env = {
        "VOICEBOOK_ENV": "production",
        "VOICEBOOK_ADMIN_TOKEN": secrets.token_urlsafe(24),
        "TWILIO_AUTH_TOKEN": wrong,
        "OPENAI_API_KEY": "key-" + wrong,
        "AIRTABLE_API_KEY": "key" + wrong,
        "AIRTABLE_BASE_ID": "app" + "A" * 14,
    }
    message = problems_of(env)
    assert "TWILIO_AUTH_TOKEN: is not a Twilio auth token (32 lower-case hexadecimal characters)" in message
    assert "OPENAI_API_KEY: is not an OpenAI API key" in message
    assert "AIRTABLE_API_KEY: is not an Airtable personal access token" in message
    assert wrong not in message
    # A compatible server of another kind takes other keys: its base URL lifts the shape check.
    lifted = {**env, "TWILIO_AUTH_TOKEN": secrets.token_hex(16), "OPENAI_BASE_URL": "http://127.0.0.1:1/v1"}
    lifted["AIRTABLE_API_URL"] = "http://127.0.0.1:2"
    try:  # other production requirements (other work's) may still be unmet: only these variables matter
        remaining = str(Settings.from_env(lifted).environment)
    except SettingsError as error:
        remaining = str(error)
    assert not any(f"{name}:" in remaining for name in ("TWILIO_AUTH_TOKEN", "OPENAI_API_KEY", "AIRTABLE_API_KEY"))


def test_google_credential_files_are_checked_at_start_up_without_quoting_them(tmp_path: Path) -> None:
    key = "-----BEGIN PRIVATE KEY-----" + secrets.token_hex(20)
    broken = tmp_path / "broken.json"
    broken.write_text('{"private_key": "' + key, encoding="utf-8")
    message = problems_of({"GOOGLE_SERVICE_ACCOUNT_FILE": str(broken)})
    assert f"GOOGLE_SERVICE_ACCOUNT_FILE: {broken} is not JSON" in message and key not in message
    client = tmp_path / "client.json"
    client.write_text(json.dumps({"installed": {"client_id": "x", "client_secret": key}}), encoding="utf-8")
    wrong_kind = problems_of({"GOOGLE_SERVICE_ACCOUNT_FILE": str(client)})
    assert "is not a service account key as Google issues it" in wrong_kind and key not in wrong_kind
    assert Settings.from_env({"GOOGLE_OAUTH_CLIENT_FILE": str(client)}).google_oauth_client_file == client
    account = tmp_path / "sa.json"
    account.write_text(json.dumps({"type": "service_account", "client_email": "a@b.c"}), encoding="utf-8")
    assert "GOOGLE_SERVICE_ACCOUNT_FILE" in problems_of({"GOOGLE_SERVICE_ACCOUNT_FILE": str(account)})


async def test_a_running_app_never_logs_a_configured_secret(
    captured: Captured,  # noqa: F811  # the fixture imported above
    app_settings: Settings,
    clock: FrozenClock,
    tmp_path: Path,
) -> None:
    stdlib = logging.getLogger("voicebook.test.secrets")
    values: dict[str, Any] = {
        "admin_token": "admin-" + secrets.token_hex(16),
        "twilio_auth_token": secrets.token_hex(16),
        "twilio_auth_token_secondary": secrets.token_hex(16),
        "deepgram_api_key": "dg-" + secrets.token_hex(20),
        "openai_api_key": "sk-" + secrets.token_hex(24),
        "airtable_api_key": "pat" + secrets.token_hex(12) + "." + secrets.token_hex(20),
    }
    webhook_keys = ("whsec-" + secrets.token_hex(16), "whsec-" + secrets.token_hex(16))
    fernet = "kQ8m1zJvHn2Kp0cW6Q2yX9m5m3b1q7rM5c2d4e6f8gA="
    otlp = ("authorization", "Bearer-" + secrets.token_hex(16))
    settings = dataclasses.replace(
        app_settings,
        public_url=PUBLIC,
        webhook_secrets=webhook_keys,
        secret_keys=(fernet,),
        otel_headers=(otlp,),
        # Deepgram and OpenAI keys set, the offline providers still chosen: no provider is called.
        stt_provider="sphinx",
        tts_provider="espeak",
        agent_provider="dialog",
        airtable_base_id="app" + "A" * 14,
        airtable_api_url="http://127.0.0.1:1",
        **values,
    )
    everything = [*values.values(), *webhook_keys, fernet, otlp[1]]
    assert not any(value in repr(settings) for value in everything)
    register_settings_secrets(settings)
    async with running_app(settings, clock) as (_, client):
        # A webhook signed with a wrong token, one signed with the token itself as the "signature".
        call = {"CallSid": "CA" + "8" * 32, "From": "+16465550199", "To": "+12125550100"}
        wrong = RequestValidator("9" * 32).compute_signature(PUBLIC + "/twilio/voice", call)
        for signature in (wrong, values["twilio_auth_token"]):
            response = await client.post("/twilio/voice", data=call, headers={"X-Twilio-Signature": signature})
            assert response.status_code == 403
        # Admin requests with a wrong token, and with a secret of another kind as the token.
        for token in ("wrong-" + secrets.token_hex(16), values["openai_api_key"]):
            response = await client.get("/api/bookings", headers={"Authorization": f"Bearer {token}"})
            assert response.status_code in (401, 403)
        # Code that carelessly logs a secret, ours and a library's.
        for value in everything:
            stdlib.error("provider refused key %s", value)
    # A settings error from the environment, logged as the CLI would.
    try:
        Settings.from_env({"TWILIO_AUTH_TOKEN": values["twilio_auth_token"] + " trailing"})
    except SettingsError as error:
        stdlib.error("configuration refused: %s", error)
    text = captured.text
    assert "provider refused key [redacted]" in text and "configuration refused" in text
    assert "twilio_webhook_refused" in text
    for value in everything:
        assert value not in text, "a configured secret reached a log line"
