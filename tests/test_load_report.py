"""The load test's summary maths (load_tests/load_report.py) on fixed inputs: exact percentiles, histogram
quantiles from real ``generate_latest`` text, the ledger's verdicts on a real ledger filled through the
booking service and the outbox, CPU and memory from /proc figures; and, marked slow, one real run of
``run_load.py`` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import select, text

from booking.errors import EffectFailed
from booking.ledger import schema as t
from booking.ledger.database import Database
from booking.ledger.repository import CustomerDetails
from booking.outbox import EffectKind, Outbox
from booking.service import Booked, BookingService, BookRequest
from tests.conftest import FrozenClock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "load_tests"))  # load_tests/ is a folder of scripts, not a package

import load_report as report  # noqa: E402 - after the path it lives on
import run_load  # noqa: E402 - the same folder; it imports no locust
from load_report import Metrics, ProcSample, Quantiles, StepFigures, Summary  # noqa: E402

NY = ZoneInfo("America/New_York")


# -- exact percentiles ------------------------------------------------------------------------------


def test_percentiles_are_nearest_rank_observed_values() -> None:
    values = [float(n) for n in range(100, 0, -1)]  # 100..1, unordered on purpose
    assert Quantiles.of(values) == Quantiles(100, 50.0, 95.0, 99.0)
    few = [3.0, 1.0, 2.0]
    assert Quantiles.of(few) == Quantiles(3, 2.0, 3.0, 3.0)  # p99 of three is the slowest
    assert Quantiles.of([]) == Quantiles(0, None, None, None)


def test_samples_of_every_locust_process_are_read_and_failures_counted(tmp_path: Path) -> None:
    prefix = tmp_path / "samples.jsonl"
    (tmp_path / "samples.jsonl.101").write_text(
        '{"kind": "turn", "ms": 700, "t": 10.0}\n{"kind": "booking", "ms": 900, "t": 11.0}\n'
    )
    (tmp_path / "samples.jsonl.202").write_text(
        '{"kind": "turn", "ms": 650, "t": 20.0}\n{"kind": "call", "ms": 20000, "t": 21.0, "error": "no answer"}\n'
        '{"kind": "turn", "ms": 6'  # a process killed mid-line
    )
    (tmp_path / "other.jsonl.1").write_text('{"kind": "turn", "ms": 1, "t": 1.0}\n')
    samples = report.read_samples(prefix)
    assert sorted(report.sample_ms(samples, "turn")) == [650.0, 700.0]
    assert report.sample_ms(samples, "turn", begin=15.0, end=30.0) == [650.0]
    assert report.sample_ms(samples, "call") == []  # failed calls are counted, not timed
    assert report.failed_samples(samples) == {"call": 1}


# -- /metrics ---------------------------------------------------------------------------------------------


def filled_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    seconds = Histogram(
        "voicebook_booking_seconds", "d", ["operation"], registry=registry, buckets=(0.001, 0.005, 0.01, 0.05, 0.1)
    )
    for value, times in ((0.002, 50), (0.007, 40), (0.07, 10)):
        for _ in range(times):
            seconds.labels("book").observe(value)
    seconds.labels("cancel").observe(0.5)  # beyond the last bucket: lands in +Inf
    attempts = Counter("voicebook_effect_attempts", "d", ["integration", "outcome"], registry=registry)
    attempts.labels("calendar", "retry").inc(3)
    attempts.labels("sms", "retry").inc(2)
    attempts.labels("sms", "done").inc(7)
    Gauge("voicebook_calls_active", "d", registry=registry).set(42)
    return registry


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    metrics = Metrics.parse(generate_latest(filled_registry()).decode())
    book = metrics.buckets("voicebook_booking_seconds", operation="book")
    assert book[-1] == (float("inf"), 100.0)
    assert report.histogram_quantile(0.5, book) == pytest.approx(0.005)  # rank 50 ends the (1, 5] ms bucket
    assert report.histogram_quantile(0.25, book) == pytest.approx(0.003)  # half-way through it
    assert report.histogram_quantile(0.99, book) == pytest.approx(0.095)  # 9 of the 10 in (50, 100] ms
    cancel = metrics.buckets("voicebook_booking_seconds", operation="cancel")
    assert report.histogram_quantile(0.99, cancel) == pytest.approx(0.1)  # +Inf answers the top finite bound
    assert len(metrics.buckets("voicebook_booking_seconds")) == 6  # both operations added up per bound
    assert report.metric_quantile(metrics, "voicebook_missing_seconds", 0.99) is None
    assert report.histogram_quantile(0.5, []) is None


def test_counters_sum_over_matching_labels_and_runs_are_differences() -> None:
    registry = filled_registry()
    before = Metrics.parse(generate_latest(registry).decode())
    assert before.total("voicebook_effect_attempts_total", outcome="retry") == 5.0
    assert before.total("voicebook_effect_attempts_total") == 12.0
    assert before.total("voicebook_calls_active") == 42.0
    assert before.total("voicebook_provider_errors_total") is None  # not exposed: the table says n/a
    assert before.by_labels("voicebook_effect_attempts_total", "integration", "outcome") == {
        "calendar/retry": 3.0,
        "sms/retry": 2.0,
        "sms/done": 7.0,
    }
    seconds = registry._names_to_collectors["voicebook_booking_seconds"]
    assert isinstance(seconds, Histogram)
    for _ in range(10):
        seconds.labels("book").observe(0.2)  # the run: ten slow commits
    run = Metrics.parse(generate_latest(registry).decode()).minus(before)
    assert run.total("voicebook_booking_seconds_count", operation="book") == 10.0
    assert report.metric_quantile(run, "voicebook_booking_seconds", 0.5, operation="book") == pytest.approx(0.1)


def test_collector_pauses_are_runs_and_seconds_per_generation_over_the_run() -> None:
    registry = CollectorRegistry()
    assert report.collector_pauses(Metrics.parse(generate_latest(registry).decode())) is None  # not exported
    pauses = Histogram("voicebook_gc_pause_seconds", "", ["generation"], registry=registry)
    pauses.labels("0").observe(0.001)
    before = Metrics.parse(generate_latest(registry).decode())
    for seconds in (0.002, 0.003):
        pauses.labels("0").observe(seconds)
    pauses.labels("2").observe(0.08)
    run = Metrics.parse(generate_latest(registry).decode()).minus(before)
    found = report.collector_pauses(run)
    assert found is not None
    assert found["0"] == (2.0, pytest.approx(0.005)) and found["2"] == (1.0, pytest.approx(0.08))
    summary = Summary("steady", 1, 1.0, gc_pauses=found)
    [row] = [line for line in report.render(summary) if "collector pauses" in line]
    assert "gen0 2 runs 5 ms" in row and "gen2 1 runs 80 ms" in row
    assert any("collector pauses" in line and "n/a" in line for line in report.render(Summary("steady", 1, 1.0)))


def test_the_timeline_shows_when_the_loop_was_late_and_who_used_the_cpu(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    active = Gauge("voicebook_calls_active", "calls", registry=registry)
    lag = Histogram("voicebook_event_loop_lag_seconds", "lag", buckets=(0.005, 0.01, 0.1, 0.25), registry=registry)
    started = Counter("voicebook_calls", "calls", registry=registry)
    commit = Histogram(
        "voicebook_booking_seconds", "commit", ["operation"], buckets=(0.01, 0.05, 0.25), registry=registry
    )
    overhead = Histogram("voicebook_turn_server_overhead_seconds", "own", buckets=(0.005, 0.05), registry=registry)

    def scrape(t: float) -> tuple[float, str]:
        return (t, generate_latest(registry).decode())

    scrapes = [scrape(1000.0)]
    active.set(50)
    for _ in range(100):
        lag.observe(0.002)  # a quiet interval
    scrapes.append(scrape(1002.0))
    active.set(100)
    for _ in range(90):
        lag.observe(0.002)
    for _ in range(10):
        lag.observe(0.2)  # a burst: a tenth of the samples late
    started.inc(30)  # the callers dialling again
    commit.labels("book").observe(0.2)  # the slow booking fell in the burst
    commit.labels("cancel").observe(0.001)
    overhead.observe(0.03)
    scrapes.append(scrape(1004.0))
    proc = {
        "server": [
            ProcSample(1000.0 + i, cpu, 0, wait)
            for i, (cpu, wait) in enumerate([(0, 0), (0.5, 0.001), (1.0, 0.002), (1.9, 0.052), (2.8, 0.102)])
        ],
        "worker": [ProcSample(1003.0, 7.0, 0), ProcSample(1004.0, 7.25, 0)],
    }
    rows = report.timeline(scrapes, proc, begin=1000.0)
    assert [row["t_s"] for row in rows] == [2.0, 4.0]
    assert [row["calls_active"] for row in rows] == [50.0, 100.0]
    quiet, burst = (row["loop_lag_p99_ms"] for row in rows)
    assert quiet is not None and quiet <= 5.0
    assert burst is not None and burst > 100.0
    assert [row["calls_started"] for row in rows] == [0.0, 30.0]
    assert rows[0]["booking_commit_p99_ms"] is None and rows[0]["turn_overhead_p99_ms"] is None  # none in it
    commit_p99, overhead_p99 = rows[1]["booking_commit_p99_ms"], rows[1]["turn_overhead_p99_ms"]
    assert commit_p99 is not None and 50.0 < commit_p99 <= 250.0  # bookings only, not the quick cancel
    assert overhead_p99 is not None and 5.0 < overhead_p99 <= 50.0
    assert [row["cpu_server"] for row in rows] == [0.5, 0.9]
    assert [row["cpu_worker"] for row in rows] == [None, 0.25]  # one sample in the first interval: unknown
    # The server's loop waited 1 ms a second for a core while the load was light, then 50 ms a second.
    assert [row["wait_ms_per_s_server"] for row in rows] == [1.0, 50.0]
    assert [row["wait_ms_per_s_worker"] for row in rows] == [None, 0.0]
    path = tmp_path / "timeline.csv"
    report.write_timeline(rows, path)
    lines = path.read_text().splitlines()
    assert lines[0] == (
        "t_s,calls_active,calls_started,loop_lag_p99_ms,booking_commit_p99_ms,turn_overhead_p99_ms,"
        "cpu_server,cpu_worker,wait_ms_per_s_server,wait_ms_per_s_worker"
    )
    assert lines[1].startswith("2,50,0,") and lines[1].endswith(",,,0.5,,1,")
    assert lines[2].endswith(",0.9,0.25,50,0")


# -- /proc ------------------------------------------------------------------------------------------------


def test_proc_stat_is_read_after_the_command_name() -> None:
    fields = ["S"] + ["0"] * 10 + ["250", "50"] + ["0"] * 8 + ["1000"] + ["0"] * 20
    line = "1234 (voice (book) x) " + " ".join(fields)
    sample = report.parse_proc_stat(line, t=5.0)
    assert sample.cpu_seconds == pytest.approx(300 / report.CLOCK_TICKS)
    assert sample.rss_bytes == 1000 * report.PAGE_SIZE
    mine = report.read_proc(os.getpid(), t=0.0)
    assert mine is not None and mine.rss_bytes > 0 and mine.cpu_seconds > 0
    assert report.read_proc(2**22 + 7, t=0.0) is None  # no such process


def test_schedstat_gives_the_seconds_a_main_thread_waited_for_a_core() -> None:
    assert report.parse_schedstat("20972955498 5483687709 31145\n") == pytest.approx(5.483687709)
    if not Path(f"/proc/{os.getpid()}/schedstat").exists():
        pytest.skip("this kernel keeps no schedstats")
    # Twice as many busy processes as cores, and this one busy too: it must sometimes wait for a core.
    before = report.read_proc(os.getpid(), t=0.0)
    burn = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass"
    burners = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(2 * (os.cpu_count() or 1))]
    try:
        end = time.process_time() + 0.3
        while time.process_time() < end:
            pass
    finally:
        for burner in burners:
            burner.wait()
    after = report.read_proc(os.getpid(), t=0.0)
    assert before is not None and after is not None
    assert after.wait_seconds > before.wait_seconds


def test_cpu_per_call_share_of_a_core_and_memory_per_concurrent_call() -> None:
    mb = 2**20
    samples = [
        ProcSample(0.0, 1.0, 100 * mb),  # before the window
        ProcSample(10.0, 2.0, 100 * mb),
        ProcSample(20.0, 5.0, 140 * mb),
        ProcSample(30.0, 8.0, 150 * mb),
        ProcSample(40.0, 9.0, 120 * mb),  # after it
    ]
    figures = report.cpu_figures(samples, 10.0, 30.0, calls=60, concurrent=25)
    assert figures is not None
    assert figures.cpu_seconds == pytest.approx(6.0)
    assert figures.core_share == pytest.approx(0.3)
    assert figures.cpu_ms_per_call == pytest.approx(100.0)
    assert figures.rss_peak_mb == pytest.approx(150.0)
    assert figures.rss_kb_per_concurrent_call == pytest.approx(50 * 1024 / 25)
    assert figures.wait_share == 0.0  # samples without a wait: none
    assert report.cpu_figures(samples, 11.0, 12.0, calls=1, concurrent=1) is None  # too few samples
    waited = [ProcSample(10.0, 2.0, mb, 1.0), ProcSample(30.0, 8.0, mb, 3.5)]
    figures = report.cpu_figures(waited, 10.0, 30.0, calls=60, concurrent=25)
    assert figures is not None and figures.wait_share == pytest.approx(0.125)  # 2.5 s waited over 20 s
    [row] = [line for line in report.render(Summary("steady", 25, 20.0, server=figures)) if "waiting" in line]
    assert row.split() == ["server", "waiting", "for", "a", "core", "125", "ms", "per", "s", "(main", "threads)"]
    assert report.calls_per_core(25, figures.core_share) == pytest.approx(25 / 0.3)
    assert report.calls_per_core(None, 0.3) is None


def test_calls_per_core_counts_only_steps_within_the_lag_target(tmp_path: Path) -> None:
    def step(users: int, lag: float, per_core: float) -> StepFigures:
        return StepFigures(users, users * 0.9, Quantiles.of([700.0, 800.0]), lag, 1.0, users / per_core, per_core)

    steps = [step(25, 2.0, 300.0), step(50, 6.0, 320.0), step(100, 14.0, 400.0)]
    assert report.best_calls_per_core(steps) == 320.0
    summary = Summary("steady", 100, 90.0, steps=steps)
    table = "\n".join(report.render(summary))
    assert "calls per core (largest with loop lag p99 < 10 ms): 320" in table
    assert "booking commit (server histogram)  p50 n/a  p99 n/a" in table
    assert "speech fallbacks (role/reason)" in table and "n/a" in table.split("speech fallbacks")[1].split("\n")[0]
    counted = "\n".join(report.render(Summary("steady", 100, 90.0, speech_fallbacks={"tts/breaker_open": 12.0})))
    assert "speech fallbacks (role/reason)     tts/breaker_open 12" in counted
    pytest.importorskip("matplotlib")
    report.plot(steps, tmp_path / "latency.png")
    assert (tmp_path / "latency.png").read_bytes().startswith(b"\x89PNG")


# -- the ledger ---------------------------------------------------------------------------------------------


def request(number: int, resource: str, hour: int) -> BookRequest:
    return BookRequest(
        service_id="checkup",
        start=datetime(2026, 12, 1, hour, tzinfo=NY).astimezone(UTC),
        resource_id=resource,
        customer=CustomerDetails(phone=f"+1646555{number:04d}", name=f"Caller {number}"),
        idempotency_key=f"load-report-{number}",
    )


async def test_ledger_figures_time_effects_find_the_lost_and_count_overlaps(
    service: BookingService, database: Database, clock: FrozenClock
) -> None:
    since = clock.now
    booked = [await service.book(request(n, "dr-lee", 9 + n)) for n in range(3)]
    assert all(isinstance(outcome, Booked) for outcome in booked)
    first, second, third = (outcome.bookings[0] for outcome in booked if isinstance(outcome, Booked))
    outbox = Outbox(database, clock=clock)
    lease = timedelta(minutes=1)

    clock.advance(timedelta(milliseconds=200))
    calendar = await outbox.claim("test", [EffectKind.CALENDAR_CREATE.value], limit=2, lease=lease)
    assert {e.booking_id for e in calendar} == {first.id, second.id}
    for effect in calendar:
        assert await outbox.complete(effect)
    clock.advance(timedelta(milliseconds=150))
    texts = await outbox.claim("test", [EffectKind.SMS_CONFIRMATION.value], limit=2, lease=lease)
    for effect in texts:
        if effect.booking_id == first.id:
            assert await outbox.complete(effect)
        else:
            await outbox.fail(effect, EffectFailed("landline", permanent=True))

    figures = await report.ledger_figures(database, since, clock.now)
    assert figures.bookings == 3
    assert figures.tool_to_effects == [pytest.approx(0.35)]  # only the first has both, 200 + 150 ms later
    assert figures.lost == sorted([second.id, third.id])  # a dead text; effects never run
    assert figures.dead == 1
    assert figures.pending_due == 2  # the third's event and text; reminders are due the day before
    assert figures.effects["sms.reminder"] == {"pending": 3}
    assert figures.overlaps == 0
    assert (await report.ledger_figures(database, clock.now + timedelta(seconds=1), clock.now)).bookings == 0

    if database.dialect != "sqlite":
        return  # PostgreSQL's exclusion constraint cannot be lifted for one test of a shared database
    # The database refuses an overlap; lift its guard to prove the count would see one.
    async with database.reader.connect() as conn:
        row = dict((await conn.execute(select(t.bookings).where(t.bookings.c.id == first.id))).mappings().one())
    await database.write(lambda conn: conn.execute(text("DROP TRIGGER bookings_no_overlap_insert")))
    copy = row | {"id": "overlapping-copy", "idempotency_key": None}
    await database.write(lambda conn: conn.execute(t.bookings.insert().values(**copy)))
    assert (await report.ledger_figures(database, since, clock.now)).overlaps == 1


# -- the whole command ------------------------------------------------------------------------------------


def test_run_load_hands_the_realtime_priority_to_the_stack_and_refuses_one_out_of_range() -> None:
    assert run_load.parse_args(["--users", "10"]).stack.realtime_priority == 0
    assert run_load.parse_args(["--users", "10", "--realtime-priority", "10"]).stack.realtime_priority == 10
    with pytest.raises(SystemExit) as refused:
        run_load.parse_args(["--realtime-priority", "100"])
    assert refused.value.code == 2


def test_run_load_hands_the_callers_pause_to_locust_and_refuses_a_malformed_one() -> None:
    options = run_load.parse_args(["--users", "10"])
    assert run_load.locust_env(options, 10)["LOAD_THINK_MS"] == "300,1200"
    options = run_load.parse_args(["--users", "10", "--think-ms", "0,0"])
    assert run_load.locust_env(options, 10)["LOAD_THINK_MS"] == "0,0"
    with pytest.raises(SystemExit) as refused:
        run_load.parse_args(["--think-ms", "900,100"])
    assert refused.value.code == 2


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_run_load_measures_turns_and_finds_no_overlap(tmp_path: Path) -> None:
    if not (Path(sys.executable).parent / "locust").exists():  # never imported here: it monkey-patches with gevent
        pytest.skip("locust is the load extra: pip install -e '.[load]'")
    out = tmp_path / "summary.json"
    command = [sys.executable, str(ROOT / "load_tests" / "run_load.py"), "--users", "2", "--spawn-rate", "2"]
    command += ["--seconds", "15", "--stop-timeout", "20", "--drain-seconds", "30", "--json", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=220, cwd=ROOT)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["turn_ms"]["n"] > 0
    assert summary["overlaps"] == 0
    assert summary["lost_bookings"] == 0
    assert summary["server"]["cpu_seconds"] > 0
    assert summary["gc_pauses"] and sum(runs for runs, _ in summary["gc_pauses"].values()) > 0


def test_a_process_tree_adds_up_its_children() -> None:
    # ``voicebook serve --processes N`` is a supervisor and N servers: the server's figures are all of them.
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\ntime.sleep(30)"
    children = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(2)]
    try:
        pids = {child.pid for child in children}
        deadline = datetime.now(UTC) + timedelta(seconds=20)
        while datetime.now(UTC) < deadline:  # until both have burnt their CPU (then they sleep)
            burnt = [report.read_proc(pid, 0.0) for pid in pids]
            if all(sample is not None and sample.cpu_seconds >= 0.3 for sample in burnt):
                break
        alone, tree = report.read_proc(os.getpid(), 0.0), report.read_proc_tree(os.getpid(), 0.0)
        assert alone is not None and tree is not None
        assert pids <= set(report.child_pids(os.getpid()))
        assert tree.cpu_seconds >= alone.cpu_seconds + 0.5  # both children's 0.3 s of CPU
        assert tree.rss_bytes > alone.rss_bytes
    finally:
        for child in children:
            child.kill()
            child.wait()
    assert report.read_proc_tree(children[0].pid, 0.0) is None  # gone
