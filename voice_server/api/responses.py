"""JSON responses through orjson, and RFC 9457 problem details."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from booking.errors import (
    BookingError,
    IdempotencyKeyReused,
    InvalidRequest,
    InvalidTransition,
    NotFound,
    RequestInProgress,
    VersionConflict,
)

PROBLEM_TYPE_PREFIX = "urn:voicebook:problem:"


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


class ProblemResponse(JSONResponse):
    media_type = "application/problem+json"


def problem(status: int, code: str, title: str, detail: str, **extra: Any) -> ProblemResponse:
    """An RFC 9457 problem document; ``code`` becomes the ``type`` URN and a ``code`` member."""
    body = {
        "type": PROBLEM_TYPE_PREFIX + code.replace("_", "-"),
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }
    return ProblemResponse(body, status_code=status)


_STATUS_FOR: tuple[tuple[type[BookingError], int, str], ...] = (
    (NotFound, 404, "Not found"),
    (IdempotencyKeyReused, 422, "Idempotency key reused"),
    (RequestInProgress, 409, "Request in progress"),
    (InvalidTransition, 409, "Invalid state change"),
    (VersionConflict, 412, "Booking changed"),
    (InvalidRequest, 422, "Invalid request"),
)


def problem_for(error: BookingError) -> ProblemResponse:
    for kind, status, title in _STATUS_FOR:
        if isinstance(error, kind):
            return problem(status, error.code, title, error.detail)
    return problem(400, error.code, "Bad request", error.detail)
