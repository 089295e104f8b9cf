"""The Redis free/busy index against a real redis-server (6.2 embedded or the local 7)."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from booking.domain import Interval
from booking.freebusy import (
    BusySnapshot,
    FreeBusyIndex,
    HoldGranted,
    HoldInProgress,
    HoldUnavailable,
    IndexNotReady,
)

DAY = date(2030, 3, 14)
LONG = timedelta(seconds=30)
SHORT = timedelta(milliseconds=200)


def at(hour: int, minute: int = 0, day: date = DAY) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(hours=hour, minutes=minute)


def span(start_hour: float, end_hour: float, day: date = DAY) -> Interval:
    base = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return Interval(base + timedelta(hours=start_hour), base + timedelta(hours=end_hour))


@pytest.fixture
async def index(redis_client: aioredis.Redis) -> FreeBusyIndex:
    """An index whose resource "r1" is built for a week around DAY, with no bookings."""
    built = FreeBusyIndex(redis_client)
    await built.rebuild("r1", (DAY - timedelta(days=3), DAY + timedelta(days=3)), [])
    return built


async def granted(
    index: FreeBusyIndex,
    block: Interval,
    owner: str = "call-a",
    *,
    ttl: timedelta = LONG,
    ignore_booking: str | None = None,
) -> HoldGranted:
    outcome = await index.hold("r1", block, ttl=ttl, owner=owner, ignore_booking=ignore_booking)
    assert isinstance(outcome, HoldGranted), outcome
    return outcome


async def test_hold_is_granted_once_and_touching_blocks_stay_free(index: FreeBusyIndex) -> None:
    first = await granted(index, span(10, 11))
    assert first.resource_id == "r1" and first.block == span(10, 11) and first.blocks == (span(10, 11),)
    assert first.expires_at > datetime.now(UTC)

    overlapping = await index.hold("r1", span(10.5, 11.5), ttl=LONG, owner="call-b")
    assert overlapping == HoldUnavailable("r1", (span(10, 11),))
    inside = await index.hold("r1", span(10.25, 10.75), ttl=LONG, owner="call-b")
    assert isinstance(inside, HoldUnavailable)

    await granted(index, span(9, 10), owner="call-b")  # ends where the hold starts
    await granted(index, span(11, 12), owner="call-c")  # starts where the hold ends
    around = await index.hold("r1", span(8, 13), ttl=LONG, owner="call-d")
    assert around == HoldUnavailable("r1", (span(9, 10), span(10, 11), span(11, 12)))


async def test_hold_across_utc_midnight_is_stored_in_both_days(
    index: FreeBusyIndex, redis_client: aioredis.Redis
) -> None:
    night = span(23, 25)  # 23:00 on DAY to 01:00 the next day
    await granted(index, night)
    keys = index.keys("r1")
    assert await redis_client.zcard(keys.busy(DAY)) == 1
    assert await redis_client.zcard(keys.busy(DAY + timedelta(days=1))) == 1

    next_morning = span(0.5, 2, day=DAY + timedelta(days=1))
    assert await index.hold("r1", next_morning, ttl=LONG, owner="call-b") == HoldUnavailable("r1", (night,))
    await granted(index, span(1, 2, day=DAY + timedelta(days=1)), owner="call-b")


async def test_expired_hold_frees_the_slot_and_its_entry_is_removed(
    index: FreeBusyIndex, redis_client: aioredis.Redis
) -> None:
    hold = await granted(index, span(10, 11), ttl=SHORT)
    assert isinstance(await index.hold("r1", span(10, 11), ttl=LONG, owner="call-b"), HoldUnavailable)
    await asyncio.sleep(0.3)
    assert not await redis_client.exists(index.keys("r1").hold(hold.token))
    second = await granted(index, span(10, 11), owner="call-b")
    members = await redis_client.zrange(index.keys("r1").busy(DAY), 0, -1)
    assert [m.decode().split("|")[1] for m in members] == [second.token]


async def test_overlap_with_a_live_hold_of_the_same_owner_is_in_progress(index: FreeBusyIndex) -> None:
    first = await granted(index, span(10, 11), owner="call-a")
    assert await index.hold("r1", span(10, 11), ttl=LONG, owner="call-a") == HoldInProgress("r1", first.token)
    assert isinstance(await index.hold("r1", span(10, 11), ttl=LONG, owner="call-b"), HoldUnavailable)


async def test_bookings_block_holds_except_the_booking_being_moved(index: FreeBusyIndex) -> None:
    await index.add_booking("bk-1", "r1", span(10, 11))
    assert await index.hold("r1", span(10.5, 11.5), ttl=LONG, owner="call-a") == HoldUnavailable("r1", (span(10, 11),))
    moved = await granted(index, span(10.5, 11.5), ignore_booking="bk-1")
    assert moved.block == span(10.5, 11.5)
    await index.add_booking("bk-2", "r1", span(12, 13))
    other = await index.hold("r1", span(12.5, 13.5), ttl=LONG, owner="call-b", ignore_booking="bk-1")
    assert other == HoldUnavailable("r1", (span(12, 13),))


async def test_hold_many_is_all_or_nothing_under_one_token(index: FreeBusyIndex, redis_client: aioredis.Redis) -> None:
    weekly = [span(10, 11, DAY + timedelta(days=d)) for d in (-2, 0, 2)]
    await index.add_booking("bk-1", "r1", span(10.5, 12, DAY))
    refused = await index.hold_many("r1", weekly, ttl=LONG, owner="call-a")
    assert refused == HoldUnavailable("r1", (weekly[1],))
    assert not await redis_client.keys(f"{index.keys('r1').tag}:hold:*")
    for block in (weekly[0], weekly[2]):  # nothing was held by the refused request
        await granted(index, block, owner="call-b", ttl=SHORT)
    await asyncio.sleep(0.3)

    await index.remove_booking("bk-1", "r1", span(10.5, 12, DAY))
    series = await index.hold_many("r1", list(reversed(weekly)), ttl=LONG, owner="call-a")
    assert isinstance(series, HoldGranted)
    assert series.blocks == tuple(weekly) and series.block == weekly[0]
    for block in weekly:
        assert isinstance(await index.hold("r1", block, ttl=LONG, owner="call-b"), HoldUnavailable)

    assert await index.confirm(series.token, booking_id="series-1", resource_id="r1", blocks=weekly)
    week = Interval(at(0, day=DAY - timedelta(days=3)), at(0, day=DAY + timedelta(days=3)))
    snapshot = await index.snapshot("r1", week)
    assert snapshot.busy == tuple(weekly)
    assert not await redis_client.keys(f"{index.keys('r1').tag}:hold:*")


async def test_hold_many_reports_every_conflicting_block(index: FreeBusyIndex) -> None:
    blocks = [span(9, 10), span(11, 12), span(13, 14)]
    await granted(index, span(9.5, 11.5), owner="call-b")
    refused = await index.hold_many("r1", blocks, ttl=LONG, owner="call-a")
    assert refused == HoldUnavailable("r1", (span(9, 10), span(11, 12)))


async def test_refresh_extends_a_live_hold_only(index: FreeBusyIndex) -> None:
    hold = await granted(index, span(23, 25), ttl=SHORT)  # two days: the refresh rewrites both entries
    refreshed = await index.refresh_hold(hold.token, owner="call-a", ttl=LONG)
    assert refreshed is not None
    assert refreshed.token == hold.token and refreshed.blocks == hold.blocks
    assert refreshed.expires_at > hold.expires_at
    assert await index.refresh_hold(hold.token, owner="call-b", ttl=LONG) is None
    await asyncio.sleep(0.3)
    assert isinstance(await index.hold("r1", span(24, 24.5), ttl=LONG, owner="call-b"), HoldUnavailable)

    assert await index.refresh_hold(hold.token, ttl=SHORT) is not None  # any owner
    await asyncio.sleep(0.3)
    assert await index.refresh_hold(hold.token, ttl=LONG) is None  # expired
    assert await index.refresh_hold("no-such-token", ttl=LONG) is None
    await granted(index, span(24, 24.5), owner="call-b")


async def test_confirm_turns_the_hold_into_a_booking_idempotently(
    index: FreeBusyIndex, redis_client: aioredis.Redis
) -> None:
    hold = await granted(index, span(10, 11))
    assert await index.confirm(hold.token, booking_id="bk-1", resource_id="r1", blocks=[hold.block])
    assert not await index.confirm(hold.token, booking_id="bk-1", resource_id="r1", blocks=[hold.block])
    members = await redis_client.zrange(index.keys("r1").busy(DAY), 0, -1)
    start_ms, end_ms = int(at(10).timestamp() * 1000), int(at(11).timestamp() * 1000)
    assert [m.decode() for m in members] == [f"b|bk-1|{start_ms}|{end_ms}"]
    assert not await redis_client.exists(index.keys("r1").hold(hold.token))
    assert isinstance(await index.hold("r1", span(10, 11), ttl=LONG, owner="call-a"), HoldUnavailable)
    assert not await index.release(hold.token)


async def test_confirm_after_expiry_still_records_the_booking(index: FreeBusyIndex) -> None:
    hold = await granted(index, span(10, 11), ttl=SHORT)
    await asyncio.sleep(0.3)
    assert not await index.confirm(hold.token, booking_id="bk-1", resource_id="r1", blocks=[hold.block])
    assert await index.hold("r1", span(10, 11), ttl=LONG, owner="call-b") == HoldUnavailable("r1", (span(10, 11),))


async def test_confirm_of_a_hold_on_other_days_than_the_booking(index: FreeBusyIndex) -> None:
    """The hold's days are found in Redis even when the confirmed blocks lie elsewhere."""
    hold = await granted(index, span(23, 25))
    elsewhere = [span(8, 9, DAY - timedelta(days=1))]
    assert await index.confirm(hold.token, booking_id="bk-1", resource_id="r1", blocks=elsewhere)
    await granted(index, span(23, 25), owner="call-b")
    with pytest.raises(ValueError, match="does not belong"):
        await index.confirm(hold.token, booking_id="bk-1", resource_id="r2", blocks=[span(8, 9)])


async def test_release_frees_the_time(index: FreeBusyIndex, redis_client: aioredis.Redis) -> None:
    hold = await granted(index, span(23, 25))
    assert await index.release(hold.token)
    assert not await index.release(hold.token)
    assert not await index.release("garbage")
    assert not await index.release("abc.!!!")
    assert await redis_client.zcard(index.keys("r1").busy(DAY)) == 0
    assert await redis_client.zcard(index.keys("r1").busy(DAY + timedelta(days=1))) == 0
    await granted(index, span(23, 25), owner="call-b")


async def test_move_booking_drops_the_hold_and_moves_the_entry(index: FreeBusyIndex) -> None:
    await index.add_booking("bk-1", "r1", span(10, 11))
    hold = await granted(index, span(10.5, 11.5), owner="call-a", ignore_booking="bk-1")
    await index.move_booking("bk-1", "r1", span(10, 11), span(10.5, 11.5), token=hold.token)
    snapshot = await index.snapshot("r1", span(0, 24))
    assert snapshot.busy == (span(10.5, 11.5),)
    await granted(index, span(10, 10.5), owner="call-b")
    assert not await index.release(hold.token)
    await index.remove_booking("bk-1", "r1", span(10.5, 11.5))
    await index.move_booking("bk-1", "r1", span(10.5, 11.5), span(14, 15), token=None)  # the old entry is already gone
    assert (await index.snapshot("r1", span(0, 24))).busy == (span(10, 10.5), span(14, 15))


async def test_external_busy_blocks_until_its_ttl_passes(redis_client: aioredis.Redis) -> None:
    index = FreeBusyIndex(redis_client, external_ttl=timedelta(milliseconds=500))
    await index.rebuild("r1", [DAY, DAY + timedelta(days=1)], [])
    fetched = datetime.now(UTC)
    await index.set_external_busy("r1", DAY, [span(9, 10), span(22, 26)], fetched_at=fetched)
    await index.set_external_busy("r1", DAY + timedelta(days=1), [], fetched_at=fetched)

    refused = await index.hold("r1", span(9.5, 10.5), ttl=LONG, owner="call-a")
    assert refused == HoldUnavailable("r1", (span(9, 10),))
    assert isinstance(await index.hold("r1", span(23, 23.5), ttl=LONG, owner="call-a"), HoldUnavailable)
    await granted(index, span(10, 11))  # touching the external interval
    await granted(index, span(24, 25))  # the day-1 list is empty and the spill-over was clipped

    snapshot = await index.snapshot("r1", span(0, 48))
    assert snapshot.busy == (span(9, 11), span(22, 25))
    expected_stamp = datetime.fromtimestamp(int(fetched.timestamp() * 1000) / 1000, UTC)
    assert snapshot.external_fetched_at == {DAY: expected_stamp, DAY + timedelta(days=1): expected_stamp}

    await asyncio.sleep(0.6)
    await granted(index, span(9, 10), owner="call-b")
    assert (await index.snapshot("r1", span(0, 48))).external_fetched_at == {}


async def test_snapshot_lists_bookings_live_holds_and_external_time(index: FreeBusyIndex) -> None:
    await index.add_booking("bk-1", "r1", span(8, 9))
    await index.add_booking("bk-2", "r1", span(9, 10))
    await granted(index, span(12, 13))
    await granted(index, span(14, 15), ttl=SHORT)
    await index.set_external_busy("r1", DAY, [span(12.5, 13.5), span(20, 21)], fetched_at=datetime.now(UTC))
    await index.add_booking("bk-3", "r1", span(-2, 1))  # from the previous day into this one
    await asyncio.sleep(0.3)

    snapshot = await index.snapshot("r1", span(0, 21))
    assert snapshot == BusySnapshot(
        "r1", True, (span(-2, 1), span(8, 10), span(12, 13.5), span(20, 21)), {DAY: snapshot.external_fetched_at[DAY]}
    )
    assert (await index.snapshot("r1", span(10, 12))).busy == ()
    assert (await index.snapshot("r1", span(10, 30))).ready  # all within the built week
    assert not (await index.snapshot("r1", span(0, 24, DAY + timedelta(days=4)))).ready


async def test_flushdb_makes_the_index_not_ready_until_rebuilt(
    index: FreeBusyIndex, redis_client: aioredis.Redis
) -> None:
    await index.add_booking("bk-1", "r1", span(10, 11))
    assert await index.is_ready("r1")
    await redis_client.flushdb()
    assert not await index.is_ready("r1")
    assert await index.hold("r1", span(10, 11), ttl=LONG, owner="call-a") == IndexNotReady("r1", (DAY,))
    assert not (await index.snapshot("r1", span(0, 24))).ready

    await index.rebuild("r1", (DAY, DAY + timedelta(days=1)), [("bk-1", span(10, 11)), ("bk-2", span(23, 25))])
    assert await index.is_ready("r1")
    assert isinstance(await index.hold("r1", span(10, 11), ttl=LONG, owner="call-a"), HoldUnavailable)
    assert isinstance(await index.hold("r1", span(24.5, 25), ttl=LONG, owner="call-a"), HoldUnavailable)
    built = await redis_client.hgetall(index.keys("r1").meta)
    assert built[b"first_day"] == DAY.isoformat().encode() and b"built_at" in built


async def test_hold_on_a_day_never_built_is_not_ready(index: FreeBusyIndex) -> None:
    far = DAY + timedelta(days=10)
    assert await index.hold("r1", span(23, 25, far), ttl=LONG, owner="a") == IndexNotReady(
        "r1", (far, far + timedelta(days=1))
    )
    await index.rebuild("r1", [far, far + timedelta(days=1)], [])
    await granted(index, span(23, 25, far))


async def test_invalidate_forces_a_rebuild(index: FreeBusyIndex) -> None:
    await index.invalidate("r1")
    assert not await index.is_ready("r1")
    assert isinstance(await index.hold("r1", span(10, 11), ttl=LONG, owner="a"), IndexNotReady)


async def test_rebuild_replaces_bookings_but_keeps_live_holds(
    index: FreeBusyIndex, redis_client: aioredis.Redis
) -> None:
    await index.add_booking("cancelled-meanwhile", "r1", span(8, 9))
    hold = await granted(index, span(12, 13))
    await index.rebuild("r1", [DAY], [("bk-1", span(10, 11))])
    assert (await index.snapshot("r1", span(0, 24))).busy == (span(10, 11), span(12, 13))
    assert await index.confirm(hold.token, booking_id="bk-2", resource_id="r1", blocks=[hold.block])


async def test_rebuild_concurrent_with_holds_keeps_every_granted_hold(index: FreeBusyIndex) -> None:
    ledger = [(f"bk-{h}", span(h, h + 0.5)) for h in range(0, 24, 2)]
    blocks = [span(h + 0.5, h + 1) for h in range(24)]
    outcomes = await asyncio.gather(
        *(index.hold("r1", block, ttl=LONG, owner=f"call-{i}") for i, block in enumerate(blocks)),
        *(index.rebuild("r1", [DAY], ledger) for _ in range(5)),
    )
    holds = [o for o in outcomes[: len(blocks)] if isinstance(o, HoldGranted)]
    assert len(holds) == len(blocks)
    # Even hours: booking [h, h+0.5) then hold [h+0.5, h+1); odd hours: only the hold [h+0.5, h+1).
    merged = (span(0, 1), *(span(h + 0.5, h + 2) for h in range(1, 23, 2)), span(23.5, 24))
    assert (await index.snapshot("r1", span(0, 24))).busy == merged


async def test_two_hundred_concurrent_holds_on_separate_connections_grant_exactly_one(
    index: FreeBusyIndex, redis_url: str
) -> None:
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(200)]
    try:
        indexes = [FreeBusyIndex(client) for client in clients]
        outcomes = await asyncio.gather(
            *(idx.hold("r1", span(10, 11), ttl=LONG, owner=f"call-{i}") for i, idx in enumerate(indexes))
        )
        twins = await asyncio.gather(*(idx.hold("r1", span(12, 13), ttl=LONG, owner="same") for idx in indexes))
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))
    assert sum(isinstance(o, HoldGranted) for o in outcomes) == 1
    assert sum(isinstance(o, HoldUnavailable) for o in outcomes) == 199
    winner = next(o for o in twins if isinstance(o, HoldGranted))
    assert [o for o in twins if o is not winner] == [HoldInProgress("r1", winner.token)] * 199


async def test_every_key_of_a_resource_hashes_to_one_cluster_slot(
    index: FreeBusyIndex, redis_client: aioredis.Redis
) -> None:
    await index.rebuild("r2", [DAY, DAY + timedelta(days=1)], [("bk-9", span(9, 10))])
    for resource in ("r1", "r2"):
        hold = await index.hold_many(resource, [span(23, 25), span(12, 13)], ttl=LONG, owner="a")
        assert isinstance(hold, HoldGranted)
        await index.set_external_busy(resource, DAY, [span(1, 2)], fetched_at=datetime.now(UTC))
        await index.add_booking("bk-1", resource, span(6, 7))
    keys_by_resource: dict[str, list[bytes]] = {}
    async for key in redis_client.scan_iter(match="vb:*"):
        keys_by_resource.setdefault(key.split(b"}")[0].decode(), []).append(key)
    assert set(keys_by_resource) == {"vb:{r:r1", "vb:{r:r2"}
    for resource, keys in keys_by_resource.items():
        kinds = {key.split(b"}:")[1].split(b":")[0] for key in keys}
        assert kinds == {b"meta", b"busy", b"ext", b"ext-at", b"hold"}
        tag = resource.split("{")[1].encode()
        assert {key_slot(key) for key in keys} == {key_slot(tag)}


async def test_ids_that_would_break_the_encoding_are_refused(index: FreeBusyIndex) -> None:
    with pytest.raises(ValueError, match="must not contain"):
        await index.hold("r1", span(10, 11), ttl=LONG, owner="a|b")
    with pytest.raises(ValueError, match="must not contain"):
        await index.add_booking("bk|1", "r1", span(10, 11))
    with pytest.raises(ValueError, match="braces"):
        await index.hold("r{1}", span(10, 11), ttl=LONG, owner="a")
    with pytest.raises(ValueError, match="millisecond"):
        await index.hold("r1", span(10, 11), ttl=timedelta(0), owner="a")
    with pytest.raises(ValueError, match="braces"):
        FreeBusyIndex(index._redis, prefix="{vb}")


async def test_a_custom_prefix_keeps_indexes_apart(redis_client: aioredis.Redis) -> None:
    tenant_a = FreeBusyIndex(redis_client, prefix="tenant-a")
    tenant_b = FreeBusyIndex(redis_client, prefix="tenant-b")
    for idx in (tenant_a, tenant_b):
        await idx.rebuild("r1", [DAY], [])
        assert isinstance(await idx.hold("r1", span(10, 11), ttl=LONG, owner="a"), HoldGranted)
    assert await redis_client.exists(tenant_a.keys("r1").meta, tenant_b.keys("r1").meta) == 2


class CommandLog(aioredis.Redis):
    """A real client that also records the name of every command it sends."""

    sent: list[str]

    async def execute_command(self, *args: object, **options: object) -> object:
        self.sent.append(str(args[0]).upper())
        return await super().execute_command(*args, **options)


async def test_hold_confirm_and_snapshot_are_one_evalsha_each(redis_url: str, redis_client: aioredis.Redis) -> None:
    client = CommandLog.from_url(redis_url)
    client.sent = []
    try:
        index = FreeBusyIndex(client)
        await index.rebuild("r1", [DAY], [])
        await index.hold("r1", span(8, 9), ttl=SHORT, owner="warm-up")  # loads the script after NOSCRIPT
        await index.confirm(None, booking_id="warm-up", resource_id="r1", blocks=[span(20, 21)])
        await index.snapshot("r1", span(0, 1))
        client.sent.clear()
        hold = await granted(index, span(10, 11))
        await index.confirm(hold.token, booking_id="bk-1", resource_id="r1", blocks=[hold.block])
        await index.snapshot("r1", span(0, 24))
        assert client.sent == ["EVALSHA", "EVALSHA", "EVALSHA"]
    finally:
        await client.aclose()
