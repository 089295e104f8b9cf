"""Who produced a report field: a maintained library at its installed version, or one of our rule sets."""

from __future__ import annotations

from functools import cache
from importlib import metadata

from booking.reports.schema import Provenance

RULES_REVISION = 1
"""Bumped whenever a rule set of this package changes what it produces, so two reports built by the
same voicebook version with different rules stay distinguishable."""


@cache
def library(distribution: str) -> Provenance:
    """A third-party analyser, named by its distribution and installed version."""
    return Provenance(component=distribution, version=metadata.version(distribution))


@cache
def rules(name: str) -> Provenance:
    """One of our rule sets (``outcome``, ``intents``, ...) at this voicebook's version."""
    return Provenance(component=f"voicebook.{name}", version=f"{_voicebook_version()}+rules.{RULES_REVISION}")


@cache
def _voicebook_version() -> str:
    try:
        return metadata.version("voicebook")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def hosted_model(provider: str, model: str, served: str) -> Provenance:
    """A model behind a provider's API: ``provider:model`` as requested, and as version the exact snapshot
    that answered (``gpt-4o-mini-2024-07-18``), since the provider may move an alias to a new one at any time."""
    return Provenance(component=f"{provider}:{model}", version=served)


def operator(actor: str) -> Provenance:
    """A person who corrected the field (an edit through the API), at the voicebook version they used."""
    return Provenance(component=f"operator:{actor}", version=_voicebook_version())
