"""Which hosts each outbound client may reach, from configuration (see :mod:`integrations.egress`).

Each provider's client gets its own list, not one list for all: the Deepgram client has no business
talking to Airtable. A provider's list is its configured base URL's host when one is set (a simulator,
a compatible server, a regional endpoint), else the provider's own API hosts. Google's token endpoints
come from the credential files, so a service account or OAuth client pointed elsewhere still refreshes.

The S3 archive's list is not here: it is the storage URL's ``endpoint_url`` host, or AWS's S3 hosts for
the bucket and the region boto3 resolved (which may come from boto3's own configuration, known only to
the client), so ``integrations.storage.S3Storage`` derives it when it builds its client.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from booking.business import Business
from integrations import egress
from integrations.egress import Allowlist
from voice_server.settings import Settings


def _configured_or(url: str | None, defaults: Iterable[str]) -> Allowlist:
    return Allowlist.of([url] if url else defaults)


def twilio(settings: Settings) -> Allowlist:
    return _configured_or(settings.twilio_api_base_url, egress.TWILIO_HOSTS)


def deepgram(settings: Settings) -> Allowlist:
    return _configured_or(settings.deepgram_base_url, egress.DEEPGRAM_HOSTS)


def openai(settings: Settings) -> Allowlist:
    return _configured_or(settings.openai_base_url, egress.OPENAI_HOSTS)


def airtable(settings: Settings) -> Allowlist:
    return _configured_or(settings.airtable_api_url, egress.AIRTABLE_HOSTS)


def google(settings: Settings) -> Allowlist:
    """The Calendar API and the token endpoint named in the configured credential file."""
    token_uris: list[str] = []
    for path, section in (
        (settings.google_service_account_file, None),
        (settings.google_oauth_client_file, ("installed", "web")),
    ):
        if path is not None:
            token_uris.extend(_token_uris(path, section))
    return _configured_or(settings.google_calendar_api_url, egress.GOOGLE_HOSTS) | Allowlist.of(token_uris)


def google_connect(settings: Settings, client_file: Path) -> Allowlist:
    """The token exchange of ``voicebook google connect``: Google's hosts and the ``token_uri`` of the
    OAuth client file being connected (which need not be the configured one)."""
    return google(settings) | Allowlist.of(_token_uris(client_file, ("installed", "web")))


def otlp(settings: Settings) -> Allowlist:
    """The trace exporter's collector: the configured traces endpoint's host (nothing without one)."""
    endpoint = settings.otel_traces_endpoint
    return Allowlist.of([endpoint] if endpoint else [])


def webhooks(business: Business) -> Allowlist:
    """The receivers the business's triggers name: the only hosts an outbound webhook may reach."""
    return Allowlist.of(rule.webhook_url for rule in business.crm.triggers if rule.webhook_url)


def _token_uris(path: Path, sections: tuple[str, ...] | None) -> list[str]:
    """``token_uri`` of a service-account key (``sections`` None) or of an OAuth client's section. The
    settings checked the file at start-up; one unreadable now adds nothing (the client will fail on it)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(document, dict):
        return []
    places = [document] if sections is None else [document.get(name) for name in sections]
    return [str(place["token_uri"]) for place in places if isinstance(place, dict) and place.get("token_uri")]
