"""One command for a complete local load test of the production stack on simulated providers.

    python load_tests/run_load.py --scenario steady|burst|mixed|faults --users 100 --spawn-rate 10 --seconds 60
        [--database-url postgresql://... --redis-url redis://...] [--workers inprocess|separate] [--processes N]
        [--steps 25,50,100,150,200 --step-seconds 30] [--plot docs/load-latency.png] [--json summary.json]
        [--stt-final-ms 150 --llm-first-token-ms 250 --tts-first-byte-ms 100 --provider-ms 150]

What runs, each in its own process, all on loopback: the provider simulators (``load_sims.py``: Deepgram
in one process, OpenAI, Twilio and Google Calendar in another, at the latencies given), ``voicebook
migrate``, ``voicebook serve`` (and ``voicebook worker`` with ``--workers separate``), then ``locust``
headless on ``load_tests/locustfile.py`` for ``--seconds`` (one run per step with ``--steps``). The server
uses the embedded-style defaults of a fresh install unless told otherwise: a redis-server of the run's own
and a SQLite ledger in a temporary folder; ``--redis-url`` and ``--database-url`` (loopback only) use
local services instead, under a key prefix and a scratch database of the run's own that are removed after.

Scenarios: ``steady`` (each caller books a slot of its own), ``burst`` (every caller wants the same
morning), ``mixed`` (bookings, cancellations and reschedules, plus the booking API and Twilio callback
users), ``faults`` (steady calls; at a third of the run Google Calendar and Twilio Messages go down for
20 s, then answer slowly (1 s) for 20 s, then recover; the queues must absorb it and lose nothing).

While it runs the server's CPU and memory are read from ``/proc`` every second and ``/metrics`` every few
seconds; after locust stops the runner waits (at most ``--drain-seconds``) until no effect is due, then
prints the summary (``load_report.render``): concurrent calls, caller-side turn and booking latency,
booking commit and turn overhead from the server's histograms, tool call to calendar + SMS from the
ledger, errors, overlapping bookings (must be 0), effects pending, bookings lost, CPU and memory per call,
event-loop lag, and with ``--steps`` calls per core. Everything it started is stopped again, also on
Ctrl-C, on SIGTERM (exit status 130) and on failure. Exit status 1 when a booking overlaps or is lost,
or no turn was measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # load_tests/ is a folder of scripts, not a package
import load_report as report
from load_report import Metrics, ProcSample, StepFigures, Summary
from load_script import THINK_MS, think_seconds
from load_stack import LoadStack, StackOptions

MAX_USERS = 500
MAX_SECONDS = 1800
SCRAPE_SECONDS = 2.0
FAULT_PHASE_SECONDS = 20.0
SLOW_MS = 1000
HERE = Path(__file__).resolve().parent
"""Deepgram's 20 ms audio frames from every call are most of the simulators' work: a process of its own."""


# -- the run ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    scenario: str
    users: int
    spawn_rate: float
    seconds: int
    stack: StackOptions
    steps: tuple[int, ...] = ()
    step_seconds: int = 30
    stop_timeout: int = 30
    drain_seconds: int = 120
    caller_pool: int | None = None
    think_ms: str = ""  # the callers' pause before each line, "LOW,HIGH" (load_script.think_seconds)
    api_weight: int | None = None
    callback_weight: int | None = None
    plot: Path | None = None
    json: Path | None = None
    timeline: Path | None = None


@dataclass
class Monitor:
    """The server's (and its neighbours') /proc figures every second and its /metrics every few seconds."""

    stack: LoadStack
    proc: dict[str, list[ProcSample]] = field(default_factory=dict)
    scrapes: list[tuple[float, str]] = field(default_factory=list)

    async def scrape(self) -> Metrics:
        text = await self.stack.metrics_text()
        self.scrapes.append((time.time(), text))
        return Metrics.parse(text)

    async def run(self) -> None:
        next_scrape = 0.0
        while True:
            now = time.time()
            for name, pid in self.stack.pids().items():
                sample = report.read_proc_tree(pid, now) if name == "server" else report.read_proc(pid, now)
                if sample is not None:
                    self.proc.setdefault(name, []).append(sample)
            if now >= next_scrape:
                next_scrape = now + SCRAPE_SECONDS
                with contextlib.suppress(httpx.HTTPError):
                    await self.scrape()
            await asyncio.sleep(1.0)

    def gauge(self, name: str, begin: float, end: float) -> list[float]:
        """A gauge's values in the scrapes between ``begin`` and ``end`` (parsed on demand: the runner keeps
        its own CPU off the machine while the load runs)."""
        values = []
        for t, text in self.scrapes:
            if begin <= t <= end:
                value = Metrics.parse(text).total(name)
                if value is not None:
                    values.append(value)
        return values

    def core_share(self, names: Sequence[str], begin: float, end: float) -> float | None:
        shares = [
            figures.core_share
            for name in names
            if (figures := report.cpu_figures(self.proc.get(name, []), begin, end, calls=0, concurrent=None))
        ]
        return sum(shares) if shares else None


@contextlib.asynccontextmanager
async def monitoring(stack: LoadStack) -> AsyncIterator[Monitor]:
    monitor = Monitor(stack)
    task = asyncio.create_task(monitor.run())
    try:
        yield monitor
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def inject_faults(stack: LoadStack, after: float, log: list[str]) -> None:
    """Calendar and SMS down for 20 s, then slow for 20 s, then well again."""
    began = time.monotonic()
    await asyncio.sleep(after)
    for mode, latency, hold in (("down", None, FAULT_PHASE_SECONDS), ("slow", SLOW_MS, FAULT_PHASE_SECONDS)):
        for provider in ("google_calendar", "twilio_messages"):
            await stack.set_fault(provider, mode, latency)
        log.append(
            f"t+{time.monotonic() - began:.0f} s: calendar and SMS {mode}" + (f" ({latency} ms)" if latency else "")
        )
        await asyncio.sleep(hold)
    for provider in ("google_calendar", "twilio_messages"):
        await stack.set_fault(provider, "ok", None)
    log.append(f"t+{time.monotonic() - began:.0f} s: calendar and SMS ok")


async def drain(stack: LoadStack, since: datetime, limit: float) -> bool:
    """Wait until no effect created in the run is due and unfinished; False when ``limit`` passed first."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        figures = await report.ledger_figures(stack.database(), since, datetime.now(UTC))
        if figures.pending_due == 0:
            return True
        await asyncio.sleep(1.0)
    return False


def locust_env(options: Options, users: int) -> dict[str, str]:
    scenario = "steady" if options.scenario == "faults" else options.scenario
    mixed = scenario == "mixed"
    return {
        "LOAD_SCENARIO": scenario,
        "LOAD_CALLER_POOL": str(options.caller_pool or max(users * 5, 20)),
        "LOAD_THINK_MS": options.think_ms,
        "LOAD_API_WEIGHT": str(options.api_weight if options.api_weight is not None else int(mixed)),
        "LOAD_CALLBACK_WEIGHT": str(options.callback_weight if options.callback_weight is not None else int(mixed)),
    }


async def one_run(
    stack: LoadStack, monitor: Monitor, options: Options, users: int, seconds: int, label: str
) -> tuple[float, float, float, int | None]:
    """Locust for ``seconds`` at ``users``; returns (start, end of full load, end, locust failures)."""
    start = time.time()
    ramp = users / options.spawn_rate
    failures = await stack.run_locust(
        users=users,
        spawn_rate=options.spawn_rate,
        seconds=seconds,
        stop_timeout=options.stop_timeout,
        env=locust_env(options, users),
        label=label,
    )
    return start + ramp, start + seconds, time.time(), failures


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def fill_from_metrics(summary: Summary, run: Metrics) -> None:
    """The server's own figures over the run (``run``: the scrape after minus the scrape before)."""
    commit = run.buckets("voicebook_booking_seconds", operation="book")
    summary.booking_commit_p50_ms = _ms(report.histogram_quantile(0.5, commit))
    summary.booking_commit_p99_ms = _ms(report.histogram_quantile(0.99, commit))
    for stage in ("hold", "ledger", "index"):
        summary.booking_stage_p99_ms[stage] = _ms(
            report.metric_quantile(run, "voicebook_booking_stage_seconds", 0.99, operation="book", stage=stage)
        )
    summary.ledger_wait_p99_ms = _ms(report.metric_quantile(run, "voicebook_ledger_write_wait_seconds", 0.99))
    summary.ledger_transaction_p99_ms = _ms(report.metric_quantile(run, "voicebook_ledger_transaction_seconds", 0.99))
    writes, batches = run.total("voicebook_ledger_batch_writes_sum"), run.total("voicebook_ledger_batch_writes_count")
    summary.ledger_batch_mean = writes / batches if writes is not None and batches else None
    summary.turn_overhead_p99_ms = _ms(report.metric_quantile(run, "voicebook_turn_server_overhead_seconds", 0.99))
    summary.loop_lag_p99_ms = _ms(report.metric_quantile(run, "voicebook_event_loop_lag_seconds", 0.99))
    summary.effect_retries_metric = run.total("voicebook_effect_attempts_total", outcome="retry")
    summary.effect_dead_metric = run.total("voicebook_effect_attempts_total", outcome="dead")
    if run.has("voicebook_provider_errors_total"):
        summary.provider_errors = run.by_labels("voicebook_provider_errors_total", "provider", "kind")
    elif run.has("voicebook_provider_requests_total"):
        summary.provider_errors = {}  # instrumented, and no error was counted (a labelled counter starts empty)
    summary.gc_pauses = report.collector_pauses(run)
    if run.has("voicebook_speech_fallbacks_total"):
        summary.speech_fallbacks = run.by_labels("voicebook_speech_fallbacks_total", "role", "reason")


async def run(options: Options) -> Summary:
    summary = Summary(options.scenario, max(options.steps or (options.users,)), options.seconds)
    async with LoadStack(options.stack) as stack, monitoring(stack) as monitor:
        await asyncio.sleep(1.5)  # a baseline of /proc samples before any call
        before = await monitor.scrape()
        since = datetime.now(UTC)
        if options.steps:
            for users in options.steps:
                step_before = await monitor.scrape()
                full, end, _, failures = await one_run(
                    stack, monitor, options, users, options.step_seconds, f"u{users}"
                )
                step_after = await monitor.scrape()
                summary.steps.append(step_figures(monitor, stack, users, full, end, step_after.minus(step_before)))
                summary.locust_failures = (summary.locust_failures or 0) + (failures or 0)
            begin, full, end = since.timestamp(), since.timestamp(), time.time()
            finished = end
        else:
            faults: asyncio.Task[None] | None = None
            if options.scenario == "faults":
                faults = asyncio.create_task(inject_faults(stack, options.seconds / 3, summary.faults))
            try:
                full, end, finished, summary.locust_failures = await one_run(
                    stack, monitor, options, options.users, options.seconds, "run"
                )
            finally:
                if faults is not None:
                    if not faults.done():
                        summary.problems.append("the run ended before the fault phases did")
                    faults.cancel()
                    await asyncio.gather(faults, return_exceptions=True)
            begin = since.timestamp()
        summary.drained = await drain(stack, since, options.drain_seconds)
        after = await monitor.scrape()
        fill_from_metrics(summary, after.minus(before))
        if options.timeline is not None:
            report.write_timeline(report.timeline(monitor.scrapes, monitor.proc, begin), options.timeline)
        active = monitor.gauge("voicebook_calls_active", full, end)
        summary.concurrent_max = max(active) if active else None
        summary.concurrent_median = report.median(active)
        samples = report.read_samples(stack.samples_prefix)
        summary.turn_ms = report.Quantiles.of(report.sample_ms(samples, "turn"))
        summary.booking_ms = report.Quantiles.of(report.sample_ms(samples, "booking"))
        summary.calls_ok = len(report.sample_ms(samples, "call"))
        summary.caller_failures = report.failed_samples(samples)
        ledger = await report.ledger_figures(stack.database(), since, datetime.now(UTC))
        summary.tool_to_effects_ms = report.Quantiles.of([s * 1000 for s in ledger.tool_to_effects])
        summary.effect_retries_ledger, summary.effects_dead_ledger = ledger.retries, ledger.dead
        summary.bookings, summary.overlaps = ledger.bookings, ledger.overlaps
        summary.effects_pending, summary.lost_bookings = ledger.pending_due, len(ledger.lost)
        calls = summary.calls_ok + summary.caller_failures.get("call", 0)
        concurrent = summary.concurrent_max or float(summary.users)
        # CPU from before the first call until locust has stopped (calls in progress get to finish).
        proc = monitor.proc
        summary.server = report.cpu_figures(proc.get("server", []), begin, finished, calls=calls, concurrent=concurrent)
        summary.workers = report.cpu_figures(proc.get("worker", []), begin, finished, calls=calls, concurrent=None)
        summary.simulators_core_share = monitor.core_share(stack.simulator_names(), begin, finished)
        runs = [name for name in monitor.proc if name.startswith("locust-")]
        if len(runs) == 1:  # one locust process over the whole window (steps run one each)
            summary.locust_core_share = monitor.core_share(runs, begin, finished)
        summary.problems += stack.problems
    return summary


def step_figures(monitor: Monitor, stack: LoadStack, users: int, begin: float, end: float, run: Metrics) -> StepFigures:
    """One step's figures over its window at full load (after the ramp, before locust stops)."""
    samples = report.read_samples(stack.samples_prefix)
    active = monitor.gauge("voicebook_calls_active", begin, end)
    concurrent = report.median(active)
    cpu = report.cpu_figures(monitor.proc.get("server", []), begin, end, calls=0, concurrent=None)
    lag = report.metric_quantile(run, "voicebook_event_loop_lag_seconds", 0.99)
    overhead = report.metric_quantile(run, "voicebook_turn_server_overhead_seconds", 0.99)
    return StepFigures(
        users=users,
        concurrent_median=concurrent,
        turn_ms=report.Quantiles.of(report.sample_ms(samples, "turn", begin=begin, end=end)),
        loop_lag_p99_ms=_ms(lag),
        overhead_p99_ms=_ms(overhead),
        core_share=None if cpu is None else cpu.core_share,
        calls_per_core=report.calls_per_core(concurrent, None if cpu is None else cpu.core_share),
    )


def _loopback_only(parser: argparse.ArgumentParser, name: str, url: str | None) -> None:
    if url is None:
        return
    host = urlsplit(url).hostname
    if url.startswith("unix://") or host in ("127.0.0.1", "::1", "localhost"):
        return
    parser.error(f"{name}: a load test only runs against loopback services (got host {host!r})")


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=("steady", "burst", "mixed", "faults"), default="steady")
    parser.add_argument("--users", type=int, default=10, help=f"concurrent callers (at most {MAX_USERS})")
    parser.add_argument("--spawn-rate", type=float, default=10.0, help="callers started per second")
    parser.add_argument("--seconds", type=int, default=60, help=f"how long locust runs (at most {MAX_SECONDS})")
    parser.add_argument("--steps", help="comma-separated user counts, one locust run each (e.g. 25,50,100)")
    parser.add_argument("--step-seconds", type=int, default=30, help="each step's length")
    parser.add_argument("--database-url", help="a loopback PostgreSQL (a scratch database is made beside it)")
    parser.add_argument("--redis-url", help="a loopback Redis (default: a redis-server of the run's own)")
    parser.add_argument("--workers", choices=("inprocess", "separate"), default="inprocess")
    parser.add_argument("--processes", type=int, default=1, help="server processes on the port (VOICEBOOK_PROCESSES)")
    parser.add_argument("--resources", type=int, help="bookable people in the load business (default users/10, >= 3)")
    parser.add_argument("--caller-pool", type=int, help="distinct caller numbers (default 5 per user)")
    parser.add_argument(
        "--think-ms",
        default="{},{}".format(*THINK_MS),
        help="a caller's pause before each line, LOW,HIGH ms, drawn evenly (0,0: none; callers then stay in step)",
    )
    parser.add_argument("--api-weight", type=int, help="booking API users' weight (default 1 in mixed, else 0)")
    parser.add_argument("--callback-weight", type=int, help="Twilio callback users' weight (default 1 in mixed)")
    parser.add_argument("--stt-final-ms", type=int, default=150)
    parser.add_argument("--llm-first-token-ms", type=int, default=250)
    parser.add_argument("--llm-tokens-per-second", type=float, default=60.0, help="0: no limit")
    parser.add_argument("--tts-first-byte-ms", type=int, default=100)
    parser.add_argument("--provider-ms", type=int, default=150, help="Google Calendar and Twilio answer time")
    parser.add_argument("--sms-per-minute", type=int, default=6000, help="the sender's limit (a Messaging Service)")
    parser.add_argument("--backoff-percent", type=int, default=100, help="VOICEBOOK_EFFECT_BACKOFF_PERCENT")
    parser.add_argument("--stop-timeout", type=int, default=30, help="seconds calls in progress get to finish")
    parser.add_argument("--drain-seconds", type=int, default=120, help="longest wait for the effects queue")
    parser.add_argument("--plot", type=Path, help="PNG of latency and loop lag against concurrent calls (--steps)")
    parser.add_argument("--json", type=Path, help="write the summary here as JSON")
    parser.add_argument(
        "--timeline", type=Path, help="CSV per scrape: calls, loop lag, commit and overhead p99, CPU per process"
    )
    parser.add_argument("--locustfile", type=Path, default=HERE / "locustfile.py", help="the users locust runs")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, samples, ledger)")
    parser.add_argument(
        "--realtime-priority",
        type=int,
        default=0,
        help="VOICEBOOK_REALTIME_PRIORITY for the server, booking process, worker and the run's Redis (0: off)",
    )
    args = parser.parse_args(argv)
    steps = tuple(int(n) for n in args.steps.split(",") if n.strip()) if args.steps else ()
    users = max(steps or (args.users,))
    total = sum(args.step_seconds for _ in steps) if steps else args.seconds
    if not 1 <= users <= MAX_USERS or min(steps or (1,)) < 1:
        parser.error(f"users must be within 1..{MAX_USERS}")
    if not 1 <= total <= MAX_SECONDS:
        parser.error(f"the run must last 1..{MAX_SECONDS} s (got {total})")
    if steps and args.scenario == "faults":
        parser.error("--steps measures capacity; the faults scenario is one run")
    if args.scenario == "faults" and args.seconds < 3 * FAULT_PHASE_SECONDS:
        parser.error(f"the faults scenario needs --seconds >= {3 * FAULT_PHASE_SECONDS:.0f} (two 20 s phases)")
    if args.spawn_rate <= 0:
        parser.error("--spawn-rate must be positive")
    if not 0 <= args.realtime_priority <= 99:
        parser.error("--realtime-priority must be within 0..99")
    try:
        think_seconds(args.think_ms)
    except ValueError as wrong:
        parser.error(f"--think-ms: {wrong}")
    _loopback_only(parser, "--database-url", args.database_url)
    _loopback_only(parser, "--redis-url", args.redis_url)
    stack = StackOptions(
        scenario=args.scenario,
        database_url=args.database_url,
        redis_url=args.redis_url,
        separate_workers=args.workers == "separate",
        processes=max(1, min(args.processes, 8)),
        resources=args.resources or max(3, math.ceil(users / 10)),
        stt_final_ms=args.stt_final_ms,
        llm_first_token_ms=args.llm_first_token_ms,
        llm_tokens_per_second=args.llm_tokens_per_second,
        tts_first_byte_ms=args.tts_first_byte_ms,
        provider_ms=args.provider_ms,
        sms_per_minute=args.sms_per_minute,
        backoff_percent=args.backoff_percent,
        locustfile=args.locustfile.resolve(),
        keep=args.keep,
        realtime_priority=args.realtime_priority,
    )
    return Options(
        scenario=args.scenario,
        users=users,
        spawn_rate=args.spawn_rate,
        seconds=total,
        stack=stack,
        steps=steps,
        step_seconds=args.step_seconds,
        stop_timeout=args.stop_timeout,
        drain_seconds=args.drain_seconds,
        caller_pool=args.caller_pool,
        think_ms=args.think_ms,
        api_weight=args.api_weight,
        callback_weight=args.callback_weight,
        plot=args.plot,
        json=args.json,
        timeline=args.timeline,
    )


def main() -> None:
    options = parse_args()
    # SIGTERM (a CI job's timeout, `kill`) stops the run as Ctrl-C does, so the stack it started (server,
    # worker, simulators, Redis: each in a session of its own, out of reach of the terminal's signals)
    # is stopped too rather than left running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        summary = asyncio.run(run(options))
    except KeyboardInterrupt:
        print("run_load: interrupted; everything it started has been stopped", file=sys.stderr)
        sys.exit(130)
    for line in report.render(summary):
        print(line)
    if options.json is not None:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_bytes(summary.to_json())
    if options.plot is not None:
        if summary.steps:
            report.plot(summary.steps, options.plot)
            print(f"plot: {options.plot}")
        else:
            print("plot: needs --steps (one point per step)", file=sys.stderr)
    failed = bool(summary.overlaps) or bool(summary.lost_bookings) or not summary.turn_ms.n
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
