"""The keys that encrypt personal data in the ledger, from configuration, installed at start-up.

``VOICEBOOK_PII_KEYS`` and ``VOICEBOOK_PII_INDEX_KEY`` (or their ``_FILE`` forms) in production. In
development without them, keys are made once into ``data_dir/pii-keys`` (0600) and kept, so a local
ledger stays readable from one run to the next, as with the development secret key.
"""

from __future__ import annotations

import os

import orjson

from booking.ledger import pii
from booking.ledger.pii import FieldCipher, PiiKeyError, new_key
from voice_server.settings import Settings, development_file

KEY_FILE = "pii-keys"


def pii_cipher(settings: Settings) -> FieldCipher:
    """The cipher ``settings`` configure (see the module doc)."""
    if settings.pii_keys and settings.pii_index_key:
        return FieldCipher.parse(settings.pii_keys, settings.pii_index_key, settings.pii_active_key)
    if settings.environment != "development":
        raise PiiKeyError("VOICEBOOK_PII_KEYS and VOICEBOOK_PII_INDEX_KEY are required outside development")
    stored = read_key_file(settings)
    return FieldCipher.parse(stored["keys"], stored["index_key"], settings.pii_active_key or stored.get("active"))


def read_key_file(settings: Settings) -> dict[str, str]:
    """The development key file, made on first use (another process making it first wins)."""
    def make() -> str:
        return orjson.dumps({"keys": f"k1={new_key()}", "index_key": new_key()}).decode()

    stored: dict[str, str] = orjson.loads(development_file(settings.data_dir, KEY_FILE, make))
    return stored


def write_key_file(settings: Settings, stored: dict[str, str]) -> None:
    """Replace the development key file atomically (``voicebook keys add`` in development)."""
    path = settings.data_dir / KEY_FILE
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(orjson.dumps(stored))
    os.replace(temporary, path)


def install_pii_cipher(settings: Settings) -> FieldCipher:
    """Build the configured cipher and make it this process's (every entry point calls this once)."""
    value = pii_cipher(settings)
    pii.install(value)
    return value


__all__ = ["KEY_FILE", "install_pii_cipher", "pii_cipher", "read_key_file", "write_key_file"]
