"""Structured logs: one JSON object per line (or readable console lines in development), redacted.

Every line, ours and the libraries' (stdlib loggers go through the same formatter), passes the
``Redactor`` just before it is rendered, after tracebacks have been turned into text:

- values under keys that name secrets (``token``, ``api_key``, ``authorization``, ``password``,
  ``signature``, ``cookie``, ``credentials``, ``private_key``, ... in any case, nested too) become
  ``[redacted]``;
- the secret values of the configuration (every ``Settings`` field declared ``repr=False``, the S3
  credentials from the environment), registered at start-up with ``register_settings_secrets``, are
  masked wherever they appear in a string: messages, exception text, tracebacks. So are private-key
  PEM blocks, JWTs, ``Bearer``/``Basic`` credentials, URL passwords and secret query parameters;
- phone numbers keep only their last two digits (``+1 (415) 555-0142`` -> ``+* (***) ***-**42``): enough
  to tell two callers apart, not to call anyone. E.164 (also ``%2B``-encoded) and formatted national
  numbers are found anywhere; a bare run of digits only when it is 10 or 11 long (so a bare 10-digit
  epoch second is masked too: we log instants as ISO text);
- e-mail addresses become ``[email]``;
- what callers said or wrote (``transcript``, ``text``, ``said``, ``utterance``, ``heard``, ``name``,
  ``notes``, ``body``, ...) becomes ``[N chars #hash]``: the length and a keyed hash that matches equal
  texts within one process, never the words.

Identifiers are left alone: call and stream SIDs, booking ids (hex), effect ids, correlation ids,
ISO timestamps and durations. There is deliberately no switch to log PII in development: what a
caller said is in the call's transcript (``voicebook replay``, the calls API), not in logs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import secrets
import sys
import urllib.parse
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import structlog

from voice_server.settings import Settings
from voice_server.tracing import add_trace_context

REDACTED = "[redacted]"
EMAIL = "[email]"
MIN_SECRET_LENGTH = 8
"""Shorter configured values are not masked inside text: they would mask ordinary words and numbers."""
MAX_DEPTH = 12
"""Containers nested deeper than this are logged as ``[too deep]``."""
_MASK = "*"  # not a digit (a masked number is never found again) and plain ASCII in JSON

# Keys are compared lower-cased with ``-`` and spaces as ``_`` (``X-Twilio-Signature`` -> x_twilio_signature).
_SECRET_KEY = re.compile(
    r"(?:^|_)(?:token|secrets?|client_secret|password|passwd|passphrase|signature|authorization|auth|cookies?"
    r"|credentials?|private_key|api_?keys?|apikey|access_keys?|secret_keys?|secret_access_key|bearer|dsn)$"
)
_NOT_SECRET_KEYS = frozenset({"twilio_idempotency_token", "i_twilio_idempotency_token", "idempotency_token"})
_TEXT_KEYS = frozenset(
    {
        "transcript", "transcripts", "text", "said", "utterance", "utterances", "heard", "speech", "words",
        "caller_text", "partial", "reply", "content", "summary", "caller_name", "customer_name", "first_name",
        "last_name", "full_name", "name", "note", "notes", "body", "message_body", "sms_body", "comment",
        "comments", "address",
    }
)  # fmt: skip
_PHONE_KEYS = frozenset(
    {
        "phone", "phone_number", "caller", "called", "from", "to", "from_number", "to_number", "caller_number",
        "customer_phone", "recipient", "caller_id", "number", "msisdn", "forwarded_from",
    }
)  # fmt: skip
# Never scanned: what structlog adds and what the correlation middleware checked already. Other ids (call
# SIDs, booking ids) are scanned like any value: cheap, and a booking id an agent passes is free text.
_ID_KEYS = frozenset({"timestamp", "level", "logger", "correlation_id", "twilio_idempotency_token", "method"})
_NORMAL, _SECRET, _TEXT, _PHONE, _ID = range(5)

_PHONE_SHAPED = re.compile(r"[+\d\s().%Bb*•-]{7,40}")  # • : voice_server.effects.masked_phone's mask
_NANP_DOTTED = re.compile(r"\(?\d{3}\)?\.\d{3}\.\d{4}")
_SECRET_QUERY_NAMES = r"token|access_token|refresh_token|api_?key|key|signature|sig|password|secret|auth|code"
# Found anywhere in a string, in one pass (after the configured secret values were masked).
_GENERIC = (
    r"(?P<pem>-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z))"
    r"|(?P<scheme>\b(?i:bearer|basic)\s+(?=[A-Za-z0-9._~+/=-]*[0-9+/=])[A-Za-z0-9._~+/=-]{8,})"
    r"|(?P<userinfo>://[^/\s:@]*:[^/\s@]+@)"
    r"|(?P<jwt>\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*)"
    rf"|(?P<query>[?&](?i:{_SECRET_QUERY_NAMES})=[^&\s#\"']+)"
    r"|(?P<email>(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})"
    r"|(?P<intl>(?:\+|%2[Bb])\d(?:[ .()-]{0,2}\d){6,14})(?![\w:]|[.-]\d)"
    r"|(?P<national>(?<![\w+./-])\(?\d(?:[ .()-]{0,2}\d){8,14})(?![\w:]|[.-]\d)"
)


_FINDINGS = re.compile(_GENERIC)
_WORD = re.compile(r"\w+")  # a hex id, a SID, an event name: only a bare 10- or 11-digit number can match
_MAY_MATCH = re.compile(r"[\d@=]|://|eyJ|-----|(?i:bearer|basic)")  # what every finding needs one of


def mask_phone(text: str) -> str:
    """Every digit but the last two becomes ``*``; the shape (``+``, spaces, dashes) is kept."""
    prefix = ""
    if text[:3].upper() == "%2B":  # a URL-encoded "+"
        prefix, text = text[:3], text[3:]
    total = sum(ch.isdigit() for ch in text)
    seen = 0
    out: list[str] = [prefix]
    for ch in text:
        if ch.isdigit():
            seen += 1
            out.append(ch if seen > total - 2 else _MASK)
        elif ch == "•":  # masked already (voice_server.effects.masked_phone): one mask character for all
            out.append(_MASK)
        else:
            out.append(ch)
    return "".join(out)


def _phone_shaped(text: str) -> bool:
    """A whole value that is a phone number (masked already or not), under a key that holds one."""
    return _PHONE_SHAPED.fullmatch(text) is not None and sum(ch.isdigit() or ch in "*•" for ch in text) >= 7


def _digit_groups(text: str) -> int:
    return len(re.findall(r"\d+", text))


def _replace(match: re.Match[str]) -> str:
    kind = match.lastgroup
    text = match.group()
    if kind == "scheme":
        return text.split(None, 1)[0] + " " + REDACTED
    if kind == "userinfo":
        user = text[3 : text.index(":", 3)]
        return f"://{user}:{REDACTED}@"
    if kind == "query":
        return text[: text.index("=") + 1] + REDACTED
    if kind == "email":
        return EMAIL
    if kind == "intl":
        return mask_phone(text) if _digit_groups(text) <= 6 else text
    if kind == "national":
        groups = _digit_groups(text)
        if groups > 5 or ("." in text and _NANP_DOTTED.fullmatch(text) is None):
            return text  # a version, an address, a list of numbers
        if groups == 1 and len(text) not in (10, 11):
            return text  # a bare count or millisecond timestamp, not a national number
        return mask_phone(text)
    return REDACTED  # a private key, a JWT


class Redactor:
    """The structlog processor that removes secrets and personal data from a log line (see the module's
    docstring for the rules). One instance, ``REDACTOR``, serves the whole process; ``add_secrets`` may be
    called at any time (an atomic swap of the compiled pattern, safe from any thread)."""

    def __init__(self) -> None:
        self._secrets: frozenset[str] = frozenset()
        self._secret_values: re.Pattern[str] | None = None
        self._keys: dict[str, tuple[int, str]] = {}
        self._hash_key = secrets.token_bytes(16)

    def add_secrets(self, values: Iterable[str]) -> None:
        """Mask these values wherever they appear (their URL-encoded forms too). Values shorter than
        ``MIN_SECRET_LENGTH`` are ignored."""
        found = set(self._secrets)
        for value in values:
            value = value.strip()
            if len(value) >= MIN_SECRET_LENGTH:
                found.update({value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value, safe="")})
        if found == self._secrets:
            return
        literals = "|".join(re.escape(value) for value in sorted(found, key=len, reverse=True))
        self._secret_values = re.compile(literals)
        self._secrets = frozenset(found)
        self._keys = {}  # a key may contain a secret now

    def scrub(self, text: str) -> str:
        """``text`` with secrets, phone numbers and e-mail addresses masked."""
        if self._secret_values is not None:
            text = self._secret_values.sub(REDACTED, text)
        # Most values are ids and names with nothing to find: two cheap checks spare them the full scan.
        if _WORD.fullmatch(text) is not None and not (text.isdigit() and len(text) in (10, 11)):
            return text
        if _MAY_MATCH.search(text) is None:
            return text
        return _FINDINGS.sub(_replace, text)

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        try:
            renamed = False
            for key, value in event_dict.items():
                kind, shown = self._key(key)
                if kind != _ID or not isinstance(value, str):
                    event_dict[key] = self._value(value, kind, 0)  # same key: no resize while iterating
                renamed = renamed or shown != key
            if renamed:
                return {self._key(key)[1]: value for key, value in event_dict.items()}
            return event_dict
        except Exception as error:
            # Never let the line through unredacted, nor raise: logging would print the raw record to stderr.
            kept = {key: event_dict.get(key) for key in ("timestamp", "level", "logger") if key in event_dict}
            return {**kept, "event": "log_line_dropped", "redaction_error": type(error).__name__}

    def _key(self, key: object) -> tuple[int, str]:
        if not isinstance(key, str):
            return _NORMAL, str(key)
        cached = self._keys.get(key)
        if cached is not None:
            return cached
        normal = key.lower().replace("-", "_").replace(" ", "_")
        if normal in _NOT_SECRET_KEYS or normal in _ID_KEYS:
            kind = _ID
        elif _SECRET_KEY.search(normal):
            kind = _SECRET
        elif normal in _TEXT_KEYS:
            kind = _TEXT
        elif normal in _PHONE_KEYS:
            kind = _PHONE
        else:
            kind = _NORMAL
        entry = (kind, self.scrub(key))
        if len(self._keys) > 4096:  # keys of nested payloads are open-ended: keep the cache bounded
            self._keys = {}
        self._keys[key] = entry
        return entry

    def _value(self, value: Any, kind: int, depth: int) -> Any:
        if isinstance(value, str):
            if kind == _SECRET:
                return REDACTED
            if kind == _TEXT:
                return self._marker(value) if value else value
            if kind == _PHONE and _phone_shaped(value):
                return mask_phone(value)
            return self.scrub(value)
        if value is None or isinstance(value, bool):
            return value
        if kind == _SECRET:
            return REDACTED
        if isinstance(value, int | float):
            return value
        if depth >= MAX_DEPTH:
            return "[too deep]"  # also ends a structure that contains itself
        if isinstance(value, Mapping):
            out: dict[str, Any] = {}
            for key, item in value.items():
                item_kind, shown = self._key(key)
                if kind == _TEXT:
                    item_kind = _SECRET if item_kind == _SECRET else _TEXT
                keep = item_kind == _ID and isinstance(item, str)
                out[shown] = item if keep else self._value(item, item_kind, depth + 1)
            return out
        if isinstance(value, list | tuple | set | frozenset):
            return [self._value(item, kind, depth + 1) for item in value]
        # What the JSON renderer would print (repr), checked like any other text.
        return self._value(repr(value), kind, depth)

    def _marker(self, text: str) -> str:
        digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=4, key=self._hash_key).hexdigest()
        return f"[{len(text)} chars #{digest}]"


REDACTOR = Redactor()


def register_secrets(values: Iterable[str]) -> None:
    """Mask these values in every log line from now on (e.g. a token read from a store at run time)."""
    REDACTOR.add_secrets(values)


# The S3 credentials boto3 reads for archive storage (credentials never go in VOICEBOOK_STORAGE_URL).
STORAGE_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def register_settings_secrets(settings: Settings, environ: Mapping[str, str] | None = None) -> None:
    """Register every secret of the configuration: each ``Settings`` field declared ``repr=False`` (so a
    new secret setting is covered by being declared like the others) and, from ``environ`` when given,
    the storage credentials named in ``STORAGE_SECRET_VARIABLES``."""
    values: list[str] = []
    for spec in dataclasses.fields(settings):
        if not spec.repr:
            values.extend(_secret_strings(getattr(settings, spec.name)))
    if environ is not None:
        values.extend(value for name in STORAGE_SECRET_VARIABLES if (value := environ.get(name)))
    REDACTOR.add_secrets(values)


def _secret_strings(value: object) -> list[str]:
    """The strings of a secret setting: itself, each of a tuple's keys, or the values of (name, value)
    pairs (the OTLP headers, whose names are not secret)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, tuple):
        out: list[str] = []
        for item in value:
            out.extend(_secret_strings(item[1] if isinstance(item, tuple) and len(item) == 2 else item))
        return out
    return []


_PROCESSORS: list[structlog.typing.Processor] = []


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_trace_context,  # trace_id and span_id of the current span, when traces are exported
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # One list, refilled on every call: a logger cached on its first use holds the list itself, so it
    # follows a later configuration (and ``capture_logs``, which edits the list in place) instead of
    # keeping the processors of the moment it was first used.
    _PROCESSORS[:] = [*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter]
    structlog.configure(
        processors=_PROCESSORS,
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    # Both our lines and foreign (stdlib) records end in these processors, so both are redacted; the
    # redactor runs after tracebacks became text and right before rendering, when nothing is added any more.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            REDACTOR,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's access log duplicates what our middleware would say; keep its errors.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # twilio's client logs every request at INFO with its parameters: recipients' phone numbers included.
    logging.getLogger("twilio.http_client").setLevel(logging.WARNING)
