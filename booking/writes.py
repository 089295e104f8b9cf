"""The booking writes a call makes, as values: a hold, the release of holds, a booking, a move, a cancellation.

A call's booking tool reads availability on its own loop but hands its writes to a *writer*: the booking
service in the same process, the booking lane's thread (``booking.lane``), or the booking process
(``booking.lane_process``). For the last one the write crosses a process boundary, so it cannot be a
closure: :class:`WriteOp` names a :class:`~booking.service.BookingService` method from a fixed set and
carries its arguments (plain data: strings, datetimes, :class:`~booking.service.BookRequest`), and is
applied to whichever service runs it. The typed constructors below give each operation its result type.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Literal, Protocol, TypeVar, cast

from booking.domain import Booking
from booking.service import BookingService, BookOutcome, BookRequest, HoldOutcome

T = TypeVar("T")

Operation = Literal["hold", "release_holds", "book", "reschedule", "cancel"]


async def _release_holds(service: BookingService, tokens: Collection[str]) -> int:
    released = 0
    for token in tokens:
        released += bool(await service.release_hold(token))
    return released


def _method(name: str) -> Callable[..., Awaitable[Any]]:
    async def call(service: BookingService, *args: Any, **kwargs: Any) -> Any:
        return await getattr(service, name)(*args, **kwargs)

    return call


_APPLY: Mapping[Operation, Callable[..., Awaitable[Any]]] = {
    "hold": _method("hold"),
    "release_holds": _release_holds,
    "book": _method("book"),
    "reschedule": _method("reschedule"),
    "cancel": _method("cancel"),
}


@dataclass(frozen=True)
class WriteOp(Generic[T]):
    """One write, applied to a service with :meth:`apply`. Build it with the constructors below."""

    operation: Operation
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.operation not in _APPLY:  # a peer's frame names only these
            raise ValueError(f"unknown booking write {self.operation!r}")

    async def apply(self, service: BookingService) -> T:
        return cast(T, await _APPLY[self.operation](service, *self.args, **self.kwargs))

    def describe(self) -> str:
        """For logs: the operation and, for a booking, its idempotency key (no personal data)."""
        if self.operation == "book" and self.args:
            return f"book {cast(BookRequest, self.args[0]).idempotency_key}"
        return self.operation


def hold(
    service_id: str,
    start: datetime,
    *,
    resource_id: str | None = None,
    owner: str | None = None,
    among: Collection[str] | None = None,
) -> WriteOp[HoldOutcome]:
    kwargs = {"resource_id": resource_id, "owner": owner, "among": None if among is None else tuple(among)}
    return WriteOp("hold", (service_id, start), kwargs)


def release_holds(tokens: Collection[str]) -> WriteOp[int]:
    """Give back the holds with these tokens; the result is how many were still held."""
    return WriteOp("release_holds", (tuple(tokens),))


def book(request: BookRequest) -> WriteOp[BookOutcome]:
    return WriteOp("book", (request,))


def reschedule(
    booking_id: str,
    new_start: datetime,
    *,
    resource_id: str | None = None,
    actor: str = "api",
    among: Collection[str] | None = None,
) -> WriteOp[BookOutcome]:
    kwargs = {"resource_id": resource_id, "actor": actor, "among": None if among is None else tuple(among)}
    return WriteOp("reschedule", (booking_id, new_start), kwargs)


def cancel(booking_id: str, *, reason: str | None = None, actor: str = "api") -> WriteOp[Booking]:
    return WriteOp("cancel", (booking_id,), {"reason": reason, "actor": actor})


class BookingWriter(Protocol):
    """Runs a call's booking writes somewhere other than the call's loop (a lane thread or process)."""

    async def write(self, op: WriteOp[T]) -> T: ...
