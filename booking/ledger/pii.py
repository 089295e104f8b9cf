"""Personal data at rest: authenticated encryption per field, and keyed hashes for lookups.

Every phone number, name, email, transcript turn, report body and effect payload the ledger keeps is
stored as ``v1:<key id>:<base64url(nonce + AES-256-GCM ciphertext and tag)>``. The associated data binds
each value to its table, its column and its row (``customers.phone`` of the row whose blind index is X),
so a ciphertext copied into another row or column fails to decrypt instead of reading as someone else's
data. The key id says which key decrypts it, so several keys can be live at once: one encrypts (the
active key), all decrypt, and ``voicebook keys rotate`` re-encrypts what an older key still holds.

Lookups by phone never compare plaintext: the ledger keeps a blind index, HMAC-SHA256 of the E.164
number under a key of its own (``index_key``), and queries by that. The index key is not rotated with the
encryption keys (every index would have to be recomputed from decrypted values at once); a new one is a
re-index, which ``voicebook keys rotate --reindex`` performs.

The process's cipher is installed once at start-up (:func:`install`), by the server, the workers and the
commands, from configuration (``pii_cipher`` in voice_server/privacy_keys.py); the ledger's repositories
read it with :func:`cipher`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "v1"
KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,16}$")
_NONCE_BYTES = 12
ENCRYPTED_JSON_KEY = "$pii"
"""A JSON column's encrypted document is ``{"$pii": "v1:..."}``."""


class PiiKeyError(ValueError):
    """The keys are malformed, or a value names a key this process does not have."""


class PiiDecryptError(ValueError):
    """A value failed authentication: wrong row or column, edited, or not ours."""


def new_key() -> str:
    """A fresh 256-bit key, url-safe base64 (for ``VOICEBOOK_PII_KEYS``)."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def decode_key(text: str, what: str) -> bytes:
    try:
        key = base64.urlsafe_b64decode(text.strip().encode())
    except (ValueError, binascii.Error):
        key = b""
    if len(key) != 32:
        raise PiiKeyError(f"{what} is not a 256-bit key (32 bytes, url-safe base64)")
    return key


@dataclass(frozen=True)
class FieldCipher:
    """``keys`` (key id -> 32-byte key) decrypt; ``active`` names the one that encrypts."""

    keys: Mapping[str, bytes]
    active: str
    index_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if self.active not in self.keys:
            raise PiiKeyError(f"the active key {self.active!r} is not among the keys")
        for key_id, key in self.keys.items():
            if not KEY_ID.match(key_id):
                raise PiiKeyError(f"key id {key_id!r}: use 1 to 16 letters, digits, '-' or '_'")
            if len(key) != 32:
                raise PiiKeyError(f"key {key_id!r} is not 256 bits")
        if len(self.index_key) != 32:
            raise PiiKeyError("the blind index key is not 256 bits")
        # Per key, not per value: the AES key schedule and the HMAC's keyed pads are derived once here;
        # each value then costs a nonce and one pass of the cipher (measured: building the HMAC per
        # lookup was a third of a blind index's time).
        object.__setattr__(self, "_aeads", {key_id: AESGCM(key) for key_id, key in self.keys.items()})
        object.__setattr__(self, "_index_mac", hmac.new(self.index_key, digestmod=hashlib.sha256))

    def __repr__(self) -> str:
        return f"FieldCipher(keys={sorted(self.keys)}, active={self.active!r})"

    @classmethod
    def parse(cls, keys: str, index_key: str, active: str | None = None) -> FieldCipher:
        """From configuration: ``keys`` is ``id=key,id=key`` (the first is active unless ``active`` names
        another), ``index_key`` one key."""
        ring: dict[str, bytes] = {}
        for position, item in enumerate((part.strip() for part in keys.split(",") if part.strip()), start=1):
            key_id, separator, text = item.partition("=")
            if not separator:
                raise PiiKeyError(f"key {position} has no id: write it as id=key")
            if key_id.strip() in ring:
                raise PiiKeyError(f"key id {key_id.strip()!r} appears twice")
            ring[key_id.strip()] = decode_key(text, f"key {key_id.strip()!r}")
        if not ring:
            raise PiiKeyError("no keys given")
        return cls(ring, active or next(iter(ring)), decode_key(index_key, "the blind index key"))

    # -- values ----------------------------------------------------------------------------------
    def encrypt(self, value: str | None, *, table: str, column: str, row: str) -> str | None:
        """``value`` sealed to (table, column, row); None stays None."""
        if value is None:
            return None
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead(self.active).encrypt(nonce, value.encode(), _associated(table, column, row))
        return f"{PREFIX}:{self.active}:{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def decrypt(self, stored: str | None, *, table: str, column: str, row: str) -> str | None:
        if stored is None:
            return None
        key_id, blob = _split(stored)
        aead = self._aead(key_id)  # an unknown key is a configuration problem, not a forgery
        try:
            raw = base64.urlsafe_b64decode(blob.encode())
            plain = aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], _associated(table, column, row))
        except (InvalidTag, ValueError, binascii.Error):
            raise PiiDecryptError(f"{table}.{column} of {row!r} failed authentication") from None
        return plain.decode()

    def encrypt_json(self, document: Mapping[str, Any], *, table: str, column: str, row: str) -> dict[str, str]:
        """A JSON column's whole document, sealed: ``{"$pii": "v1:..."}``."""
        text = orjson.dumps(document).decode()
        sealed = self.encrypt(text, table=table, column=column, row=row)
        assert sealed is not None
        return {ENCRYPTED_JSON_KEY: sealed}

    def decrypt_json(self, stored: Mapping[str, Any], *, table: str, column: str, row: str) -> dict[str, Any]:
        """The document back; a document that was never sealed (written before encryption) as it is."""
        sealed = stored.get(ENCRYPTED_JSON_KEY) if len(stored) == 1 else None
        if not isinstance(sealed, str):
            return dict(stored)
        plain = self.decrypt(sealed, table=table, column=column, row=row)
        assert plain is not None
        document: dict[str, Any] = orjson.loads(plain)
        return document

    def needs_rotation(self, stored: str | Mapping[str, Any] | None) -> bool:
        """Whether ``stored`` is plaintext or sealed under a key other than the active one."""
        if stored is None:
            return False
        if not isinstance(stored, str):
            sealed = stored.get(ENCRYPTED_JSON_KEY) if len(stored) == 1 else None
            if not isinstance(sealed, str):
                return True
            stored = sealed
        if not is_sealed(stored):
            return True
        return _split(stored)[0] != self.active

    # -- lookups ---------------------------------------------------------------------------------
    def blind_index(self, value: str, *, kind: str = "phone") -> str:
        """The keyed hash the ledger looks ``value`` up by (hex); equal inputs give equal indexes."""
        mac = self.__dict__["_index_mac"].copy()
        mac.update(f"{kind}\x1f{value}".encode())
        digest: str = mac.hexdigest()
        return digest

    def _aead(self, key_id: str) -> AESGCM:
        aeads: dict[str, AESGCM] = self.__dict__["_aeads"]
        try:
            return aeads[key_id]
        except KeyError:
            raise PiiKeyError(
                f"a value is sealed with key {key_id!r}, which is not configured (VOICEBOOK_PII_KEYS)"
            ) from None


def is_sealed(stored: str) -> bool:
    return stored.startswith(PREFIX + ":") and stored.count(":") >= 2


def _split(stored: str) -> tuple[str, str]:
    if not is_sealed(stored):
        raise PiiDecryptError("the value is not sealed (plaintext where ciphertext belongs)")
    _, key_id, blob = stored.split(":", 2)
    return key_id, blob


def _associated(table: str, column: str, row: str) -> bytes:
    return f"{table}\x1f{column}\x1f{row}".encode()


# -- the process's cipher --------------------------------------------------------------------------

_installed: FieldCipher | None = None


def install(value: FieldCipher) -> None:
    """Make ``value`` the cipher the ledger uses in this process (start-up, and tests)."""
    global _installed
    _installed = value


def cipher() -> FieldCipher:
    if _installed is None:
        raise PiiKeyError("no PII keys installed in this process (booking.ledger.pii.install at start-up)")
    return _installed


__all__ = [
    "ENCRYPTED_JSON_KEY",
    "FieldCipher",
    "PiiDecryptError",
    "PiiKeyError",
    "cipher",
    "decode_key",
    "install",
    "is_sealed",
    "new_key",
]
