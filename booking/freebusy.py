"""The Redis free/busy index: busy time per resource and UTC day, and short-lived holds taken atomically.

Redis is a cache here; the SQL ledger is the system of record. After a restart or a flush the index
answers :class:`IndexNotReady` until :meth:`FreeBusyIndex.rebuild` has loaded the ledger's bookings again.
Every check-and-write runs as one Lua script (EVALSHA), so a hold is one round trip and two callers can
never both hold the same time. The scripts live in ``booking/lua``; ``_common.lua`` is prepended to each.

Key layout. All keys of one resource share the hash tag ``{r:<resource_id>}`` so the scripts also run
on Redis Cluster (a script may only touch keys of one slot)::

    <prefix>:{r:<id>}:meta                  HASH  built_at (ms), first_day, last_day, day:<YYYY-MM-DD> (ms)
    <prefix>:{r:<id>}:busy:<YYYY-MM-DD>     ZSET  bookings and holds touching that UTC day, score = start ms
    <prefix>:{r:<id>}:ext:<YYYY-MM-DD>      ZSET  external busy time clipped to that day, PEXPIRE = external TTL
    <prefix>:{r:<id>}:ext-at:<YYYY-MM-DD>   STR   when the external day was fetched (ms), same TTL
    <prefix>:{r:<id>}:hold:<token>          HASH  o = owner, x = expires (ms), b = "start:end,..."; PX = ttl

Members are ``b|<booking id>|<start>|<end>``, ``h|<token>|<start>|<end>|<expires>|<owner>`` and
``x|<start>|<end>``; an interval crossing UTC midnight is stored in every day it touches. A hold member
whose expiry has passed counts for nothing and is removed by the next script that meets it.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import cache
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from booking.domain import Interval, ensure_utc

DAY_MS = 86_400_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_DAY = date(1970, 1, 1)
_MS = timedelta(milliseconds=1)


@dataclass(frozen=True, slots=True)
class ResourceKeys:
    """Names of the Redis keys of one resource (see the module docstring for what each holds)."""

    prefix: str
    resource_id: str

    @property
    def tag(self) -> str:
        """Common start of every key of the resource; ``{r:<id>}`` is the cluster hash tag."""
        return f"{self.prefix}:{{r:{self.resource_id}}}"

    @property
    def meta(self) -> str:
        """HASH marking which days were rebuilt from the ledger; gone after a flush or restart."""
        return f"{self.tag}:meta"

    def busy(self, day: date) -> str:
        """ZSET of booking and hold entries touching the UTC ``day``."""
        return f"{self.tag}:busy:{day.isoformat()}"

    def external(self, day: date) -> str:
        """ZSET of external busy intervals of ``day``; expires with the external TTL."""
        return f"{self.tag}:ext:{day.isoformat()}"

    def external_fetched_at(self, day: date) -> str:
        """STRING: epoch ms when the external data of ``day`` was fetched; its presence means "known"."""
        return f"{self.tag}:ext-at:{day.isoformat()}"

    def hold(self, token: str) -> str:
        """HASH describing one hold, expiring with it."""
        return f"{self.tag}:hold:{token}"


@dataclass(frozen=True, slots=True)
class HoldGranted:
    """The time is held for ``token`` until ``expires_at``; ``blocks`` lists every held block (``block``
    is the first one; a series held with :meth:`FreeBusyIndex.hold_many` has several).

    ``external_overlaps`` are the external busy intervals (clipped to UTC days) the blocks overlap; only
    a hold taken with ``refuse_external=False`` can have any. ``external_fetched_at`` is when the oldest
    external data of the held days was fetched, None when a day has none (never fetched, or expired)."""

    token: str
    resource_id: str
    block: Interval
    expires_at: datetime
    blocks: tuple[Interval, ...] = ()
    external_overlaps: tuple[Interval, ...] = ()
    external_fetched_at: datetime | None = None

    def __post_init__(self) -> None:
        if not self.blocks:
            object.__setattr__(self, "blocks", (self.block,))


@dataclass(frozen=True, slots=True)
class HoldUnavailable:
    """The time is taken. For :meth:`FreeBusyIndex.hold` ``conflicts`` are the busy intervals that
    overlapped; for :meth:`FreeBusyIndex.hold_many` they are the requested blocks that conflict."""

    resource_id: str
    conflicts: tuple[Interval, ...]


@dataclass(frozen=True, slots=True)
class HoldInProgress:
    """A live hold by the same owner overlaps: a twin of this request is already in flight."""

    resource_id: str
    token: str


@dataclass(frozen=True, slots=True)
class IndexNotReady:
    """Days of the request were not rebuilt from the ledger (or Redis lost the index): rebuild, retry."""

    resource_id: str
    missing_days: tuple[date, ...] = ()


HoldOutcome = HoldGranted | HoldUnavailable | HoldInProgress | IndexNotReady


@dataclass(frozen=True, slots=True)
class BusySnapshot:
    """Busy time of a resource inside a window: bookings, live holds and external busy, merged and sorted.
    ``ready`` is False when a day of the window was not rebuilt (the busy list is then incomplete);
    ``external_fetched_at`` has the days whose external data is present, with when it was fetched."""

    resource_id: str
    ready: bool
    busy: tuple[Interval, ...]
    external_fetched_at: dict[date, datetime] = field(default_factory=dict)


class FreeBusyIndex:
    """Free/busy per resource with atomic holds. Times are aware datetimes; they are stored in UTC ms
    (a start is rounded down and an end up to the millisecond, so an entry never shrinks)."""

    def __init__(
        self, redis: aioredis.Redis, *, prefix: str = "vb", external_ttl: timedelta = timedelta(minutes=5)
    ) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"key prefix {prefix!r} must be non-empty and free of braces")
        self._redis = redis
        self._prefix = prefix
        self._external_ttl_ms = _positive_ms(external_ttl, "external_ttl")
        self._scripts: dict[str, AsyncScript] = {
            name: redis.register_script(source) for name, source in _script_sources().items()
        }

    async def load_scripts(self) -> None:
        """Have Redis compile the index's scripts now (``SCRIPT LOAD``), so the first hold is one
        ``EVALSHA`` instead of a refused one, the script sent whole and compiled, and a second try."""
        for script in self._scripts.values():
            await self._redis.script_load(script.script)  # its SHA1 is the one the script object computed

    @property
    def prefix(self) -> str:
        """The key prefix: another client on the same Redis with it sees the same index."""
        return self._prefix

    def keys(self, resource_id: str) -> ResourceKeys:
        """Key names of ``resource_id`` under this index's prefix (for operations and tests)."""
        _check_resource(resource_id)
        return ResourceKeys(self._prefix, resource_id)

    async def hold(
        self,
        resource_id: str,
        block: Interval,
        *,
        ttl: timedelta,
        owner: str,
        ignore_booking: str | None = None,
        refuse_external: bool = True,
    ) -> HoldOutcome:
        """Hold ``block`` if no booking, live hold of another owner or external busy time overlaps it on
        any day it touches. ``ignore_booking``'s own entries do not count (a reschedule may overlap its
        old time). If only a live hold of the same ``owner`` overlaps, the answer is HoldInProgress.
        With ``refuse_external=False`` external busy time does not refuse the hold; the granted outcome
        lists what it overlaps instead. One EVALSHA."""
        reply = await self._hold(resource_id, [block], ttl, owner, ignore_booking, refuse_external)
        if isinstance(reply, list):
            overlapped = {Interval(_from_ms(s), _from_ms(e)) for _, s, e in reply}
            return HoldUnavailable(resource_id, tuple(sorted(overlapped)))
        return reply

    async def hold_many(
        self,
        resource_id: str,
        blocks: Sequence[Interval],
        *,
        ttl: timedelta,
        owner: str,
        refuse_external: bool = True,
    ) -> HoldOutcome:
        """Hold every block under one token, or none (a recurring series); on conflict ``conflicts``
        are the requested blocks that are taken."""
        ordered = sorted(set(blocks))
        if not ordered:
            raise ValueError("hold_many needs at least one block")
        reply = await self._hold(resource_id, ordered, ttl, owner, None, refuse_external)
        if isinstance(reply, list):
            taken = sorted({index for index, _, _ in reply})
            return HoldUnavailable(resource_id, tuple(ordered[index - 1] for index in taken))
        return reply

    async def refresh_hold(self, token: str, *, owner: str | None = None, ttl: timedelta) -> HoldGranted | None:
        """Extend a live hold (owned by ``owner`` when given) to expire ``ttl`` from now; None when the
        hold expired, was released or confirmed, or belongs to someone else."""
        resource_id = _resource_of(token)
        if resource_id is None:
            return None
        keys = ResourceKeys(self._prefix, resource_id)
        ttl_ms = _positive_ms(ttl, "ttl")

        def call(days: list[int]) -> tuple[list[str], list[str | int]]:
            args: list[str | int] = [token, owner or "", ttl_ms, len(days), *days]
            return [keys.hold(token), *(keys.busy(_day(d)) for d in days)], args

        reply = await self._run_declaring_days("refresh", call, set())
        if _text(reply[0]) == "gone":
            return None
        spans = (part.split(":") for part in _text(reply[2]).split(","))
        held = tuple(Interval(_from_ms(int(s)), _from_ms(int(e))) for s, e in spans)
        return HoldGranted(token, resource_id, held[0], _from_ms(int(reply[1])), held)

    async def confirm(
        self, token: str | None, *, booking_id: str, resource_id: str, blocks: Sequence[Interval]
    ) -> bool:
        """After the ledger commit: drop the hold (if ``token`` is given and live) and add the booking's
        entries, atomically. Returns whether the hold was still live; the booking is recorded either way.
        Idempotent."""
        additions = [(block, _booking_member(booking_id, block)) for block in blocks]
        return await self._finish(resource_id, token, removals=[], additions=additions)

    async def release(self, token: str) -> bool:
        """Give the held time back. Returns whether the hold was live."""
        resource_id = _resource_of(token)
        if resource_id is None:
            return False
        return await self._finish(resource_id, token, removals=[], additions=[])

    async def add_booking(self, booking_id: str, resource_id: str, block: Interval) -> None:
        await self._finish(resource_id, None, removals=[], additions=[(block, _booking_member(booking_id, block))])

    async def remove_booking(self, booking_id: str, resource_id: str, block: Interval) -> None:
        await self._finish(resource_id, None, removals=[(block, _booking_member(booking_id, block))], additions=[])

    async def move_booking(
        self, booking_id: str, resource_id: str, old_block: Interval, new_block: Interval, *, token: str | None
    ) -> None:
        """Finalise a reschedule: the booking's entry moves and the hold on the new time is dropped, atomically."""
        old, new = _booking_member(booking_id, old_block), _booking_member(booking_id, new_block)
        await self._finish(resource_id, token, removals=[(old_block, old)], additions=[(new_block, new)])

    async def snapshot(self, resource_id: str, window: Interval, *, include_external: bool = True) -> BusySnapshot:
        """Busy time overlapping ``window`` (entries are not clipped), in one round trip. Without
        ``include_external`` the busy list leaves external busy time out (``external_fetched_at`` is
        reported either way)."""
        keys = self.keys(resource_id)
        start_ms, end_ms = _span_ms(window)
        days = [_day(d) for d in _day_numbers(start_ms, end_ms)]
        reply = await self._run(
            "snapshot",
            [keys.meta, *map(keys.busy, days), *map(keys.external, days), *map(keys.external_fetched_at, days)],
            [len(days), *(d.isoformat() for d in days), start_ms, end_ms, "1" if include_external else "0"],
        )
        ready, flat, fetched = int(reply[0]), list(reply[1]), list(reply[2])
        spans = sorted({(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)})
        return BusySnapshot(
            resource_id,
            ready == 1,
            tuple(Interval(_from_ms(s), _from_ms(e)) for s, e in _merge(spans)),
            {days[int(fetched[i]) - 1]: _from_ms(int(fetched[i + 1])) for i in range(0, len(fetched), 2)},
        )

    async def set_external_busy(
        self, resource_id: str, day: date, intervals: Sequence[Interval], *, fetched_at: datetime
    ) -> None:
        """Replace the external busy time of the UTC ``day`` (intervals are clipped to it; an empty list
        records a free day). It expires after the external TTL."""
        keys = self.keys(resource_id)
        day_start = _day_number(day) * DAY_MS
        args: list[str | int] = [self._external_ttl_ms, _to_ms(ensure_utc(fetched_at))]
        for interval in intervals:
            start_ms, end_ms = _span_ms(interval)
            start_ms, end_ms = max(start_ms, day_start), min(end_ms, day_start + DAY_MS)
            if start_ms < end_ms:
                args += [start_ms, f"x|{start_ms}|{end_ms}"]
        await self._run("external", [keys.external(day), keys.external_fetched_at(day)], args)

    async def external_fetched_at(self, resource_id: str, days: Sequence[date]) -> dict[date, datetime]:
        """When the external data of each of ``days`` was fetched; a day without data is left out.
        One MGET (the keys share the resource's hash slot)."""
        if not days:
            return {}
        keys = self.keys(resource_id)
        stamps = await self._redis.mget([keys.external_fetched_at(day) for day in days])
        return {day: _from_ms(int(stamp)) for day, stamp in zip(days, stamps, strict=True) if stamp is not None}

    async def external_busy(self, resource_id: str, window: Interval) -> tuple[Interval, ...]:
        """External busy time overlapping ``window`` (clipped to UTC days, merged), in one round trip."""
        keys = self.keys(resource_id)
        start_ms, end_ms = _span_ms(window)
        async with self._redis.pipeline(transaction=False) as pipe:
            for d in _day_numbers(start_ms, end_ms):
                pipe.zrangebyscore(keys.external(_day(d)), "-inf", f"({end_ms}")
            replies = await pipe.execute()
        spans = sorted(
            {
                (int(s), int(e))
                for members in replies
                for _, s, e in (_text(member).split("|") for member in members)
                if int(e) > start_ms
            }
        )
        return tuple(Interval(_from_ms(s), _from_ms(e)) for s, e in _merge(spans))

    async def rebuild(
        self,
        resource_id: str,
        window_days: Sequence[date] | tuple[date, date],
        bookings: Iterable[tuple[str, Interval]],
    ) -> None:
        """Replace the booking entries of the days with ``bookings`` (the ledger's active bookings touching
        them), keep live holds and external data, and mark the days built, in one atomic script.

        ``window_days`` is a list of days, or a ``(first, last)`` tuple meaning every day in between,
        both included. A booking committed after the caller read the ledger and confirmed before this
        runs would be dropped from the index (the ledger still refuses an overlap); read the ledger
        immediately before calling."""
        keys = self.keys(resource_id)
        days = _window_days(window_days)
        position = {_day_number(d): i for i, d in enumerate(days, start=1)}
        args: list[str | int] = [len(days), *(d.isoformat() for d in days)]
        for booking_id, block in bookings:
            start_ms, end_ms = _span_ms(block)
            member = _booking_member(booking_id, block)
            for d in _day_numbers(start_ms, end_ms):
                if d in position:
                    args += [position[d], start_ms, member]
        await self._run("rebuild", [keys.meta, *map(keys.busy, days)], args)

    async def is_ready(self, resource_id: str) -> bool:
        """Whether the index was built since Redis last lost it (some days may still be unbuilt)."""
        return bool(await self._redis.exists(self.keys(resource_id).meta))

    async def invalidate(self, resource_id: str) -> None:
        """Forget that the index was built; holds answer IndexNotReady until the next rebuild."""
        await self._redis.delete(self.keys(resource_id).meta)

    async def _hold(
        self,
        resource_id: str,
        blocks: Sequence[Interval],
        ttl: timedelta,
        owner: str,
        ignore_booking: str | None,
        refuse_external: bool,
    ) -> HoldOutcome | list[tuple[int, int, int]]:
        keys = self.keys(resource_id)
        _check_id("owner", owner)
        if ignore_booking is not None:
            _check_id("booking id", ignore_booking)
        spans = [_span_ms(block) for block in blocks]
        days = sorted({d for s, e in spans for d in _day_numbers(s, e)})
        # The token names its resource (release and refresh get only the token); the rest is random.
        encoded = base64.urlsafe_b64encode(resource_id.encode()).decode().rstrip("=")
        token = f"{secrets.token_urlsafe(18)}.{encoded}"
        reply = await self._run(
            "hold",
            [
                keys.meta,
                keys.hold(token),
                *(keys.busy(_day(d)) for d in days),
                *(keys.external(_day(d)) for d in days),
                *(keys.external_fetched_at(_day(d)) for d in days),
            ],
            [
                token,
                owner,
                _positive_ms(ttl, "ttl"),
                ignore_booking or "",
                "1" if refuse_external else "0",
                len(days),
                *days,
                *(_day(d).isoformat() for d in days),
                *(ms for span in spans for ms in span),
            ],
        )
        status = _text(reply[0])
        if status == "granted":
            oldest = _text(reply[2])
            flat = reply[3:]
            overlaps = _merge(sorted({(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)}))
            return HoldGranted(
                token,
                resource_id,
                blocks[0],
                _from_ms(int(reply[1])),
                tuple(blocks),
                tuple(Interval(_from_ms(s), _from_ms(e)) for s, e in overlaps),
                _from_ms(int(oldest)) if oldest else None,
            )
        if status == "in_progress":
            return HoldInProgress(resource_id, _text(reply[1]))
        if status == "not_ready":
            return IndexNotReady(resource_id, tuple(date.fromisoformat(_text(d)) for d in reply[1:]))
        rest = reply[1:]
        return [(int(rest[i]), int(rest[i + 1]), int(rest[i + 2])) for i in range(0, len(rest), 3)]

    async def _finish(
        self,
        resource_id: str,
        token: str | None,
        *,
        removals: list[tuple[Interval, str]],
        additions: list[tuple[Interval, str]],
    ) -> bool:
        keys = self.keys(resource_id)
        if token is not None and _resource_of(token) != resource_id:
            raise ValueError(f"hold token {token!r} does not belong to resource {resource_id!r}")
        removed = [(_span_ms(block), member) for block, member in removals]
        added = [(_span_ms(block), member) for block, member in additions]

        def call(days: list[int]) -> tuple[list[str], list[str | int]]:
            position = {d: i for i, d in enumerate(days, start=1)}
            remove, add = _placed(removed, position), _placed(added, position)
            args = [token or "", len(days), *days, len(remove) // 3, *remove, len(add) // 3, *add]
            return [keys.hold(token) if token else keys.meta, *(keys.busy(_day(d)) for d in days)], args

        days = {d for span, _ in removed + added for d in _day_numbers(*span)}
        reply = await self._run_declaring_days("finish", call, days)
        return bool(int(reply[1]))

    async def _run_declaring_days(
        self, name: str, call: Callable[[list[int]], tuple[list[str], list[str | int]]], days: set[int]
    ) -> list[Any]:
        """Run a script that may touch a hold. Only Redis knows which days a hold covers, so when the
        hold touches a day whose key was not declared the script writes nothing and names the days; the
        second call declares them too (a hold's blocks never change, so two calls always suffice)."""
        for _ in range(2):
            keys, args = call(sorted(days))
            reply = await self._run(name, keys, args)
            if _text(reply[0]) != "keys":
                return reply
            days.update(int(d) for d in reply[1:])
        raise RuntimeError(f"free/busy script {name} kept asking for more day keys")

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[str | int]) -> list[Any]:
        reply = await self._scripts[name](keys=keys, args=args)
        if not isinstance(reply, list):
            raise TypeError(f"free/busy script {name} replied {reply!r} instead of a list")
        return reply


@cache
def _script_sources() -> dict[str, str]:
    folder = resources.files("booking") / "lua"
    common = (folder / "_common.lua").read_text(encoding="utf-8")
    names = ("hold", "finish", "refresh", "rebuild", "external", "snapshot")
    return {name: common + "\n" + (folder / f"{name}.lua").read_text(encoding="utf-8") for name in names}


def _check_id(kind: str, value: str) -> None:
    # Ids go into '|'-separated members that Lua splits; refusing '|' keeps the parsing exact.
    if not value or "|" in value:
        raise ValueError(f"{kind} {value!r} must be non-empty and must not contain '|'")


def _check_resource(resource_id: str) -> None:
    _check_id("resource id", resource_id)
    if "{" in resource_id or "}" in resource_id:
        raise ValueError(f"resource id {resource_id!r} must not contain braces (they delimit the hash tag)")


def _booking_member(booking_id: str, block: Interval) -> str:
    _check_id("booking id", booking_id)
    start_ms, end_ms = _span_ms(block)
    return f"b|{booking_id}|{start_ms}|{end_ms}"


def _resource_of(token: str) -> str | None:
    """The resource a token was issued for (tokens are ``<random>.<base64url resource id>``)."""
    _, dot, encoded = token.partition(".")
    try:
        resource_id = base64.b64decode(encoded + "=" * (-len(encoded) % 4), altchars=b"-_", validate=True).decode()
        _check_resource(resource_id)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return resource_id if dot and "|" not in token else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _positive_ms(value: timedelta, name: str) -> int:
    ms = value // _MS
    if ms < 1:
        raise ValueError(f"{name} must be at least one millisecond, not {value}")
    return ms


def _to_ms(instant: datetime) -> int:
    return (instant - _EPOCH) // _MS


def _from_ms(ms: int) -> datetime:
    return _EPOCH + ms * _MS


def _span_ms(interval: Interval) -> tuple[int, int]:
    return _to_ms(interval.start), -((_EPOCH - interval.end) // _MS)


def _day_numbers(start_ms: int, end_ms: int) -> range:
    """Epoch day numbers of the UTC days that ``[start_ms, end_ms)`` touches."""
    return range(start_ms // DAY_MS, (end_ms - 1) // DAY_MS + 1)


def _day(number: int) -> date:
    return _EPOCH_DAY + timedelta(days=number)


def _day_number(day: date) -> int:
    return (day - _EPOCH_DAY).days


def _window_days(window: Sequence[date] | tuple[date, date]) -> list[date]:
    if isinstance(window, tuple) and len(window) == 2:
        first, last = window
        if last < first:
            raise ValueError(f"rebuild window ends ({last}) before it starts ({first})")
        return [first + timedelta(days=i) for i in range((last - first).days + 1)]
    days = sorted(set(window))
    if not days:
        raise ValueError("rebuild needs at least one day")
    return days


def _placed(entries: list[tuple[tuple[int, int], str]], position: dict[int, int]) -> list[str | int]:
    """``(day position, start ms, member)`` triples: one per day each entry touches."""
    return [arg for (s, e), member in entries for d in _day_numbers(s, e) for arg in (position[d], s, member)]


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of sorted half-open spans; touching spans join (the busy time is the same)."""
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged
