"""One shallow error hierarchy for the booking package.

Expected outcomes (a slot that is taken) are return values, not exceptions; these errors are for requests
that cannot be served as asked. Each carries a stable machine ``code`` that the HTTP layer maps to a
status, and a human ``detail`` that names the problem exactly.
"""

from __future__ import annotations

from typing import Any


class BookingError(Exception):
    """Base class. ``code`` is stable and machine-readable; ``context`` holds ids for logs."""

    code = "booking_error"

    def __init__(self, detail: str, *, code: str | None = None, **context: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.context = context

    def __str__(self) -> str:
        if not self.context:
            return self.detail
        ids = ", ".join(f"{key}={value}" for key, value in sorted(self.context.items()))
        return f"{self.detail} ({ids})"


class InvalidRequest(BookingError):
    """The request can never succeed as written: unknown service, outside hours, a local time that
    does not exist, a time in the past, a malformed recurrence rule."""

    code = "invalid_request"


class NotFound(BookingError):
    code = "not_found"


class IdempotencyKeyReused(BookingError):
    """The idempotency key was already used with different parameters."""

    code = "idempotency_key_reused"


class RequestInProgress(BookingError):
    """A request with the same idempotency key is being processed right now."""

    code = "request_in_progress"


class InvalidTransition(BookingError):
    """A lifecycle change that the state machine does not allow (cancelling a cancelled booking)."""

    code = "invalid_transition"


class VersionConflict(BookingError):
    """The booking changed since the caller read it (optimistic concurrency)."""

    code = "version_conflict"


class ConfigurationError(BookingError):
    """The business configuration is invalid; ``detail`` names every problem with its location."""

    code = "invalid_configuration"


class EffectFailed(BookingError):
    """An effect (calendar event, SMS, CRM row) could not be carried out this time. Adapters translate
    their provider's answer into this: ``permanent`` means retrying cannot help (a 400, an opted-out
    recipient, a missing calendar) and the effect goes to the dead letters; otherwise it is retried with
    backoff, no sooner than ``retry_after`` seconds when the provider said so."""

    code = "effect_failed"

    def __init__(
        self, detail: str, *, permanent: bool, retry_after: float | None = None, code: str | None = None, **context: Any
    ) -> None:
        super().__init__(detail, code=code, **context)
        self.permanent = permanent
        self.retry_after = retry_after
