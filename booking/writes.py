"""The ledger writes a call makes, as values: a hold, the release of holds, a booking, a move, a
cancellation, and the call's own records (the call offered, its status callbacks, its transcript at
hang-up, its texts' delivery receipts).

A call's booking tool reads availability on its own loop but hands its writes to a *writer*: the booking
service in the same process, the booking lane's thread (``booking.lane``), or the booking process
(``booking.lane_process``). For the last one the write crosses a process boundary, so it cannot be a
closure: :class:`WriteOp` names a method from a fixed set and carries its arguments (plain data: strings,
datetimes, :class:`~booking.service.BookRequest`, :class:`~booking.calls.StatusUpdate`), and is applied
to whichever :class:`Writers` run it. The typed constructors below give each operation its result type.

Why the call records go there too: with SQLite one transaction at a time holds the database's write
lock, across processes. A server process's own transactions hold it for as long as its writer thread
waits, between statements, for the interpreter lock its busy call loop holds (up to 12 ms under 100
calls), and a booking in the booking process waits behind them. Sent to the booking process, whose loop
is quiet, they hold it for their statements only. The call and SMS records are written there only when
the server talks to a booking process (``CallLedger``/``SmsLedger`` built with ``via``); everywhere else
they are written where they are made, as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar, cast

from booking.domain import Booking
from booking.service import BookingService, BookOutcome, BookRequest, HoldOutcome

if TYPE_CHECKING:  # the ledgers build these ops themselves (their ``via``), so they import this module
    from booking.calls import CallRecord, CallTurn, StatusUpdate
    from booking.ledger.calls_repository import CallLedger
    from booking.ledger.sms_repository import SmsLedger, SmsMessage

T = TypeVar("T")

Operation = Literal[
    "hold",
    "release_holds",
    "book",
    "reschedule",
    "cancel",
    "record_call",
    "apply_call_status",
    "finish_call",
    "apply_sms_status",
]


@dataclass(frozen=True)
class Writers:
    """What writes are applied to: the booking service, and the call and SMS records on its database
    (None where a writer takes booking writes only: the booking lane's thread, a call's own tools)."""

    service: BookingService
    calls: CallLedger | None = None
    sms: SmsLedger | None = None

    def call_ledger(self) -> CallLedger:
        if self.calls is None:
            raise RuntimeError("this writer takes booking writes only, not call records")
        return self.calls

    def sms_ledger(self) -> SmsLedger:
        if self.sms is None:
            raise RuntimeError("this writer takes booking writes only, not SMS records")
        return self.sms


async def _release_holds(writers: Writers, tokens: Collection[str]) -> int:
    released = 0
    for token in tokens:
        released += bool(await writers.service.release_hold(token))
    return released


def _on_service(name: str) -> Callable[..., Awaitable[Any]]:
    async def call(writers: Writers, *args: Any, **kwargs: Any) -> Any:
        return await getattr(writers.service, name)(*args, **kwargs)

    return call


def _on_calls(name: str) -> Callable[..., Awaitable[Any]]:
    async def call(writers: Writers, *args: Any, **kwargs: Any) -> Any:
        return await getattr(writers.call_ledger(), name)(*args, **kwargs)

    return call


async def _apply_sms_status(writers: Writers, **kwargs: Any) -> Any:
    return await writers.sms_ledger().apply_status(**kwargs)


_APPLY: Mapping[Operation, Callable[..., Awaitable[Any]]] = {
    "hold": _on_service("hold"),
    "release_holds": _release_holds,
    "book": _on_service("book"),
    "reschedule": _on_service("reschedule"),
    "cancel": _on_service("cancel"),
    "record_call": _on_calls("record_call"),
    "apply_call_status": _on_calls("apply_status"),
    "finish_call": _on_calls("finish_call"),
    "apply_sms_status": _apply_sms_status,
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

    async def apply(self, writers: Writers) -> T:
        return cast(T, await _APPLY[self.operation](writers, *self.args, **self.kwargs))

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


# -- the call's own records (applied to a ledger built without ``via``) --------------------------------


def record_call(**fields: Any) -> WriteOp[CallRecord]:
    """``CallLedger.record_call`` with these keyword arguments."""
    return WriteOp("record_call", (), fields)


def apply_call_status(update: StatusUpdate, **fields: Any) -> WriteOp[tuple[CallRecord, bool]]:
    """``CallLedger.apply_status`` of ``update`` with these keyword arguments."""
    return WriteOp("apply_call_status", (update,), fields)


def finish_call(
    call_sid: str,
    *,
    stream_sid: str,
    end_reason: str,
    turns: Sequence[CallTurn],
    latencies: Sequence[Mapping[str, Any]],
) -> WriteOp[None]:
    fields = {"stream_sid": stream_sid, "end_reason": end_reason, "turns": tuple(turns), "latencies": tuple(latencies)}
    return WriteOp("finish_call", (call_sid,), fields)


def apply_sms_status(**fields: Any) -> WriteOp[tuple[SmsMessage, bool]]:
    """``SmsLedger.apply_status`` with these keyword arguments."""
    return WriteOp("apply_sms_status", (), fields)


class BookingWriter(Protocol):
    """Runs a call's ledger writes somewhere other than the call's loop (a lane thread or process)."""

    async def write(self, op: WriteOp[T]) -> T: ...
