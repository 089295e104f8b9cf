"""The maths of a load test's summary (``run_load.py``): exact percentiles of the callers' samples,
Prometheus histogram quantiles from ``/metrics`` text, the ledger's verdicts (overlapping bookings, the
time from a booking's commit to its calendar event and text, effects pending or lost), a process's CPU
and memory from ``/proc``, the printed table and the plot of latency against concurrent calls.

Pure functions and small value objects, so ``tests/test_load_report.py`` checks each on fixed inputs; only
``ledger_figures`` does I/O (a read of the ledger) and ``read_proc`` reads ``/proc``. Nothing here imports
locust.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import and_, case, func, select

from booking.ledger import schema as t
from booking.ledger.database import Database
from booking.ledger.repository import Ledger
from booking.outbox import EffectKind

QUANTILES = (50, 95, 99)
BOOKING_EFFECTS = (EffectKind.CALENDAR_CREATE.value, EffectKind.SMS_CONFIRMATION.value)
"""What "calendar + SMS" means for a new booking: its event written and its confirmation accepted."""
SETTLED = ("done", "cancelled")


# -- exact percentiles ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile: an observed value, exact for small samples (p99 of 15 is the largest)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass(frozen=True)
class Quantiles:
    """p50/p95/p99 of ``n`` values, in the values' unit (None when there were none)."""

    n: int
    p50: float | None
    p95: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Quantiles:
        return cls(len(values), *(percentile(values, q) for q in QUANTILES))


# -- the callers' samples ---------------------------------------------------------------------------


def read_samples(prefix: Path) -> list[dict[str, Any]]:
    """Every sample the locust processes appended to ``<prefix>.<pid>`` (JSON lines; a torn last line
    of a process that was killed is skipped)."""
    samples: list[dict[str, Any]] = []
    for path in sorted(prefix.parent.glob(prefix.name + ".*")):
        for line in path.read_bytes().splitlines():
            try:
                sample = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(sample, dict):
                samples.append(sample)
    return samples


def sample_ms(
    samples: Iterable[Mapping[str, Any]], kind: str, *, begin: float = 0.0, end: float = math.inf
) -> list[float]:
    """The ``ms`` of the samples of ``kind`` taken within [begin, end) (epoch seconds ``t``); failed ones
    (an ``error``) are left out: they are counted, not timed."""
    return [
        float(s["ms"])
        for s in samples
        if s.get("kind") == kind
        and isinstance(s.get("ms"), int | float)
        and not s.get("error")
        and begin <= float(s.get("t", 0.0)) < end
    ]


def failed_samples(samples: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Failures the callers reported, by kind (``call``: refused, unanswered or cut off)."""
    failures: dict[str, int] = {}
    for sample in samples:
        if sample.get("error"):
            kind = str(sample.get("kind", "?"))
            failures[kind] = failures.get(kind, 0) + 1
    return failures


# -- /metrics ------------------------------------------------------------------------------------------


Labels = frozenset[tuple[str, str]]


@dataclass(frozen=True)
class Metrics:
    """One scrape of ``/metrics``: sample name -> label set -> value."""

    samples: Mapping[str, Mapping[Labels, float]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Metrics:
        samples: dict[str, dict[Labels, float]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = float(sample.value)
        return cls(samples)

    def has(self, name: str) -> bool:
        return name in self.samples

    def total(self, name: str, **labels: str) -> float | None:
        """The sum of ``name`` over the label sets that match ``labels``; None when it is not exposed."""
        if name not in self.samples:
            return None
        wanted = set(labels.items())
        return sum(value for key, value in self.samples[name].items() if wanted <= key)

    def by_labels(self, name: str, *labels: str) -> dict[str, float]:
        """``name`` summed per combination of ``labels``' values, keyed "value/value"."""
        totals: dict[str, float] = {}
        for key, value in self.samples.get(name, {}).items():
            found = dict(key)
            group = "/".join(found.get(label, "") for label in labels)
            totals[group] = totals.get(group, 0.0) + value
        return totals

    def buckets(self, histogram: str, **labels: str) -> list[tuple[float, float]]:
        """Cumulative (upper bound, count) of ``histogram`` summed over the matching label sets."""
        counts: dict[float, float] = {}
        wanted = set(labels.items())
        for key, value in self.samples.get(histogram + "_bucket", {}).items():
            if wanted <= key:
                bound = float(dict(key)["le"])
                counts[bound] = counts.get(bound, 0.0) + value
        return sorted(counts.items())

    def minus(self, earlier: Metrics) -> Metrics:
        """What accrued since ``earlier`` (meaningful for counters and histograms)."""
        return Metrics(
            {
                name: {key: value - earlier.samples.get(name, {}).get(key, 0.0) for key, value in series.items()}
                for name, series in self.samples.items()
            }
        )


def collector_pauses(run: Metrics) -> dict[str, tuple[float, float]] | None:
    """``voicebook_gc_pause_seconds`` over the run: (runs, seconds in all) per generation; None when the
    server does not export it."""
    if not run.has("voicebook_gc_pause_seconds_count"):
        return None
    runs = run.by_labels("voicebook_gc_pause_seconds_count", "generation")
    seconds = run.by_labels("voicebook_gc_pause_seconds_sum", "generation")
    return {generation: (runs[generation], seconds.get(generation, 0.0)) for generation in sorted(runs)}


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus's ``histogram_quantile``: linear interpolation inside the bucket that holds the rank;
    the highest finite bound when the rank falls in ``+Inf``; None without observations."""
    if not buckets or buckets[-1][1] <= 0 or not math.isinf(buckets[-1][0]):
        return None
    rank = q * buckets[-1][1]
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return previous_bound
            if count == previous_count:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (count - previous_count)
        previous_bound, previous_count = bound, count
    return previous_bound


def metric_quantile(metrics: Metrics, histogram: str, q: float, **labels: str) -> float | None:
    return histogram_quantile(q, metrics.buckets(histogram, **labels))


# -- /proc -----------------------------------------------------------------------------------------------


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcSample:
    t: float  # epoch seconds
    cpu_seconds: float  # user + system, this process only
    rss_bytes: int
    # Seconds its main thread (a server's event loop) was runnable but waiting for a core: what the other
    # processes on the machine cost it (``/proc/<pid>/schedstat``; 0 where the kernel keeps no schedstats).
    wait_seconds: float = 0.0


def parse_proc_stat(text: str, t: float) -> ProcSample:
    """``/proc/<pid>/stat``: utime and stime (fields 14, 15, in clock ticks) and rss (field 24, pages). The
    command name (field 2) may hold spaces and parentheses, so fields are counted after its last ')'."""
    fields = text[text.rindex(")") + 2 :].split()
    return ProcSample(t, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS, int(fields[21]) * PAGE_SIZE)


def parse_schedstat(text: str) -> float:
    """``/proc/<pid>/schedstat``: time on a CPU, time waiting on a run queue, time slices; the wait in
    seconds (the kernel counts nanoseconds)."""
    return int(text.split()[1]) / 1e9


def read_proc(pid: int, t: float) -> ProcSample | None:
    try:
        sample = parse_proc_stat(Path(f"/proc/{pid}/stat").read_text(), t)
    except (OSError, ValueError, IndexError):
        return None  # the process has gone
    try:
        return replace(sample, wait_seconds=parse_schedstat(Path(f"/proc/{pid}/schedstat").read_text()))
    except (OSError, ValueError, IndexError):
        return sample  # no schedstats in this kernel (or gone since): the wait stays unknown as 0


def child_pids(pid: int) -> list[int]:
    """The children of ``pid`` (``/proc/<pid>/task/*/children``; empty when it has none or has gone)."""
    children: list[int] = []
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(word) for word in listing.read_text().split()]
        except (OSError, ValueError):
            continue
    return children


def read_proc_tree(pid: int, t: float) -> ProcSample | None:
    """``pid`` and its children added up: ``voicebook serve --processes N`` is a supervisor and N servers
    (their RSS is a sum, so pages they share are counted once per process). None when ``pid`` has gone.
    A child that exits between two samples takes its CPU seconds with it: restarts are rare enough."""
    own = read_proc(pid, t)
    if own is None:
        return None
    samples = [own, *(s for child in child_pids(pid) if (s := read_proc(child, t)) is not None)]
    return ProcSample(
        t,
        sum(s.cpu_seconds for s in samples),
        sum(s.rss_bytes for s in samples),
        sum(s.wait_seconds for s in samples),
    )


@dataclass(frozen=True)
class CpuFigures:
    cpu_seconds: float
    wall_seconds: float
    core_share: float  # CPU seconds per wall second (1.0 = one core busy)
    cpu_ms_per_call: float | None
    rss_start_mb: float
    rss_peak_mb: float
    rss_kb_per_concurrent_call: float | None
    # Main threads' seconds waiting for a core per wall second (summed over a tree's processes): the
    # event loop cannot run while it waits, however little CPU it needs.
    wait_share: float = 0.0


def cpu_figures(
    samples: Sequence[ProcSample], begin: float, end: float, *, calls: int, concurrent: float | None
) -> CpuFigures | None:
    """A process's CPU and memory between ``begin`` and ``end`` (epoch seconds): the first sample at or
    after ``begin`` to the last at or before ``end``; per call over ``calls`` calls; memory growth per
    concurrent call over the peak of ``concurrent``."""
    window = [s for s in samples if begin <= s.t <= end]
    if len(window) < 2:
        return None
    first, last = window[0], window[-1]
    cpu, wall = last.cpu_seconds - first.cpu_seconds, last.t - first.t
    peak = max(s.rss_bytes for s in window)
    growth = (peak - first.rss_bytes) / 1024 / concurrent if concurrent else None
    return CpuFigures(
        cpu_seconds=cpu,
        wall_seconds=wall,
        core_share=cpu / wall if wall > 0 else 0.0,
        cpu_ms_per_call=cpu * 1000 / calls if calls else None,
        rss_start_mb=first.rss_bytes / 2**20,
        rss_peak_mb=peak / 2**20,
        rss_kb_per_concurrent_call=growth,
        wait_share=(last.wait_seconds - first.wait_seconds) / wall if wall > 0 else 0.0,
    )


def calls_per_core(concurrent: float | None, core_share: float | None) -> float | None:
    """Concurrent calls one fully busy core would hold at this load: calls over the share of a core used."""
    if not concurrent or not core_share:
        return None
    return concurrent / core_share


# -- the ledger ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerFigures:
    bookings: int  # created since the run began (any status now)
    overlaps: int  # pairs of active bookings of one resource whose blocks overlap (must be 0)
    tool_to_effects: list[float]  # seconds: booking created -> both its calendar event and text done
    effects: dict[str, dict[str, int]]  # kind -> status -> count, effects created since the run began
    pending_due: int  # pending or running and already due (reminders due later are not waiting)
    dead: int
    retries: int  # attempts after the first, over the run's effects
    lost: list[str]  # bookings whose calendar event or confirmation is neither done nor cancelled


async def ledger_figures(database: Database, since: datetime, now: datetime) -> LedgerFigures:
    """What the ledger says about the bookings and effects created since ``since``."""
    b, e = t.bookings.c, t.effects.c
    booking_effects = and_(e.booking_id == b.id, e.kind.in_(BOOKING_EFFECTS))
    done = (
        select(b.id, b.created_at, func.max(e.done_at), func.count())
        .select_from(t.bookings.join(t.effects, booking_effects))
        .where(b.created_at >= since, e.status == "done")
        .group_by(b.id, b.created_at)
    )
    settled = (
        select(b.id, func.count(e.id))
        .select_from(t.bookings.outerjoin(t.effects, and_(booking_effects, e.status.in_(SETTLED))))
        .where(b.created_at >= since)
        .group_by(b.id)
    )
    after_first = func.sum(case((e.attempts > 1, e.attempts - 1), else_=0))
    by_status = (
        select(e.kind, e.status, func.count(), after_first).where(e.created_at >= since).group_by(e.kind, e.status)
    )
    waiting = select(func.count()).where(e.created_at >= since, e.status.in_(("pending", "running")), e.due_at <= now)
    async with database.reader.connect() as conn:
        delays = [
            (last - created).total_seconds()
            for _, created, last, count in await conn.execute(done)
            if count == len(BOOKING_EFFECTS) and last is not None
        ]
        counts = [(booking_id, int(count)) for booking_id, count in await conn.execute(settled)]
        effects: dict[str, dict[str, int]] = {}
        retries = 0
        for kind, status, count, again in await conn.execute(by_status):
            effects.setdefault(kind, {})[status] = int(count)
            retries += int(again or 0)
        pending_due = int((await conn.execute(waiting)).scalar_one())
    overlaps = await Ledger(database).count_overlaps()
    return LedgerFigures(
        bookings=len(counts),
        overlaps=overlaps,
        tool_to_effects=sorted(delays),
        effects=effects,
        pending_due=pending_due,
        dead=sum(statuses.get("dead", 0) for statuses in effects.values()),
        retries=retries,
        lost=sorted(booking_id for booking_id, count in counts if count < len(BOOKING_EFFECTS)),
    )


# -- the summary -----------------------------------------------------------------------------------------


@dataclass
class StepFigures:
    """One step of ``--steps``: the load held and what it cost."""

    users: int
    concurrent_median: float | None
    turn_ms: Quantiles
    loop_lag_p99_ms: float | None
    overhead_p99_ms: float | None
    core_share: float | None
    calls_per_core: float | None


@dataclass
class Summary:
    scenario: str
    users: int
    seconds: float
    concurrent_max: float | None = None
    concurrent_median: float | None = None
    turn_ms: Quantiles = field(default_factory=lambda: Quantiles.of([]))
    booking_ms: Quantiles = field(default_factory=lambda: Quantiles.of([]))
    calls_ok: int = 0
    caller_failures: dict[str, int] = field(default_factory=dict)
    locust_failures: int | None = None
    booking_commit_p50_ms: float | None = None
    booking_commit_p99_ms: float | None = None
    # Where a booking's time went (p99 of each part, ms): hold, ledger, index; the ledger's own part split
    # into the wait for a transaction and the transaction; and how many writes one transaction took.
    booking_stage_p99_ms: dict[str, float | None] = field(default_factory=dict)
    ledger_wait_p99_ms: float | None = None
    ledger_transaction_p99_ms: float | None = None
    ledger_batch_mean: float | None = None
    turn_overhead_p99_ms: float | None = None
    loop_lag_p99_ms: float | None = None
    tool_to_effects_ms: Quantiles = field(default_factory=lambda: Quantiles.of([]))
    effect_retries_metric: float | None = None
    effect_dead_metric: float | None = None
    effect_retries_ledger: int | None = None
    effects_dead_ledger: int | None = None
    provider_errors: dict[str, float] | None = None
    # Sentences (tts) and calls (stt) served by the offline fallback, by role/reason: each is the server's
    # own CPU spent on a voice or an ear the provider should have supplied.
    speech_fallbacks: dict[str, float] | None = None
    # The cycle collector's runs in the server's processes, by generation: (runs, seconds in all). Each
    # run stops the whole process, its event loop included.
    gc_pauses: dict[str, tuple[float, float]] | None = None
    bookings: int | None = None
    overlaps: int | None = None
    effects_pending: int | None = None
    lost_bookings: int | None = None
    drained: bool | None = None
    server: CpuFigures | None = None
    workers: CpuFigures | None = None
    simulators_core_share: float | None = None
    locust_core_share: float | None = None
    steps: list[StepFigures] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)


def _num(value: float | None, unit: str = "", decimals: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{decimals}f}{unit}"


def _quantiles(q: Quantiles, unit: str = " ms") -> str:
    if not q.n:
        return "n/a (no samples)"
    return f"p50 {_num(q.p50, unit)}  p95 {_num(q.p95, unit)}  p99 {_num(q.p99, unit)}  (n={q.n})"


def render(summary: Summary) -> list[str]:
    """The printed table: one row per figure, "n/a" for what this run could not measure."""
    s = summary
    rows: list[tuple[str, str]] = [
        ("concurrent calls (calls_active)", f"max {_num(s.concurrent_max, '', 0)}  median {_num(s.concurrent_median)}"),
        ("calls completed", f"{s.calls_ok}"),
        ("turn latency (caller, v2v)", _quantiles(s.turn_ms)),
        ("booking latency (caller, v2v)", _quantiles(s.booking_ms)),
        (
            "booking commit (server histogram)",
            f"p50 {_num(s.booking_commit_p50_ms, ' ms', 2)}  p99 {_num(s.booking_commit_p99_ms, ' ms', 2)}"
            "  (target p99 <= 10 ms)",
        ),
        (
            "booking commit parts p99",
            "  ".join(f"{stage} {_num(ms, ' ms', 2)}" for stage, ms in s.booking_stage_p99_ms.items()) or "n/a",
        ),
        (
            "ledger write p99",
            f"wait {_num(s.ledger_wait_p99_ms, ' ms', 2)}  transaction {_num(s.ledger_transaction_p99_ms, ' ms', 2)}"
            f"  (writes per transaction: mean {_num(s.ledger_batch_mean, '', 2)})",
        ),
        ("server turn overhead p99", f"{_num(s.turn_overhead_p99_ms, ' ms', 2)}  (target <= 5 ms)"),
        ("event-loop lag p99", f"{_num(s.loop_lag_p99_ms, ' ms', 2)}  (target < 10 ms)"),
        ("tool call -> calendar + SMS", _quantiles(s.tool_to_effects_ms) + "  (target p99 <= 400 ms)"),
        ("errors: locust failures", _num(s.locust_failures, "", 0)),
        ("errors: caller-reported", ", ".join(f"{k} {v}" for k, v in sorted(s.caller_failures.items())) or "0"),
        (
            "errors: effect retries / dead",
            f"metrics {_num(s.effect_retries_metric, '', 0)} / {_num(s.effect_dead_metric, '', 0)}; "
            f"ledger {_num(s.effect_retries_ledger, '', 0)} / {_num(s.effects_dead_ledger, '', 0)}",
        ),
        (
            "errors: provider",
            "n/a"
            if s.provider_errors is None
            else ", ".join(f"{k} {v:.0f}" for k, v in sorted(s.provider_errors.items()) if v) or "0",
        ),
        (
            "speech fallbacks (role/reason)",
            "n/a"
            if s.speech_fallbacks is None
            else ", ".join(f"{k} {v:.0f}" for k, v in sorted(s.speech_fallbacks.items()) if v) or "0",
        ),
        (
            "collector pauses (server)",
            "n/a"
            if s.gc_pauses is None
            else "  ".join(f"gen{g} {n:.0f} runs {sec * 1000:.0f} ms" for g, (n, sec) in s.gc_pauses.items()) or "0",
        ),
        ("bookings made in the run", _num(s.bookings, "", 0)),
        ("overlapping bookings (must be 0)", _num(s.overlaps, "", 0)),
        (
            "effects still pending (due)",
            _num(s.effects_pending, "", 0) + ("" if s.drained is not False else " (drain timed out)"),
        ),
        ("lost bookings (no event/SMS)", _num(s.lost_bookings, "", 0)),
    ]
    for name, cpu in (("server", s.server), ("workers", s.workers)):
        if cpu is None:
            if name == "server":
                rows.append(("server CPU", "n/a"))
            continue
        rows.append(
            (
                f"{name} CPU",
                f"{cpu.cpu_seconds:.1f} s over {cpu.wall_seconds:.0f} s = {cpu.core_share:.0%} of a core; "
                f"{_num(cpu.cpu_ms_per_call, ' ms')} per call",
            )
        )
        rows.append((f"{name} waiting for a core", f"{cpu.wait_share * 1000:.0f} ms per s (main threads)"))
        rows.append(
            (
                f"{name} RSS",
                f"{cpu.rss_start_mb:.0f} -> {cpu.rss_peak_mb:.0f} MB; "
                f"{_num(cpu.rss_kb_per_concurrent_call, ' KB')} per concurrent call",
            )
        )
    for name, share in (("simulators", s.simulators_core_share), ("locust", s.locust_core_share)):
        if share is not None:  # the load's own cost on the same cores: context for the server's figures
            rows.append((f"{name} CPU (context)", f"{share:.0%} of a core"))
    width = max(len(name) for name, _ in rows)
    lines = [f"load test: scenario {s.scenario}, {s.users} users, {s.seconds:.0f} s"]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    if s.steps:
        lines.append("  steps: users | concurrent | turn p50/p99 ms | lag p99 ms | overhead p99 ms | core | calls/core")
        for step in s.steps:
            cells = (
                f"{step.users:>5}",
                f"{_num(step.concurrent_median):>10}",
                f"{_num(step.turn_ms.p50, '', 0)} / {_num(step.turn_ms.p99, '', 0)}",
                _num(step.loop_lag_p99_ms, "", 2),
                _num(step.overhead_p99_ms, "", 2),
                _num(step.core_share, "", 2),
                _num(step.calls_per_core, "", 0),
            )
            lines.append("    " + " | ".join(cells))
        best = _num(best_calls_per_core(s.steps), "", 0)
        lines.append(f"  calls per core (largest with loop lag p99 < 10 ms): {best}")
    lines += [f"  fault: {line}" for line in s.faults]
    lines += [f"  problem: {line}" for line in s.problems]
    return lines


def best_calls_per_core(steps: Sequence[StepFigures], lag_limit_ms: float = 10.0) -> float | None:
    """The most calls per core among the steps whose event-loop lag p99 stayed under the limit."""
    eligible = [
        step.calls_per_core
        for step in steps
        if step.calls_per_core is not None and step.loop_lag_p99_ms is not None and step.loop_lag_p99_ms < lag_limit_ms
    ]
    return max(eligible) if eligible else None


def _per_second(
    samples: Sequence[ProcSample], start: float, end: float, figure: Callable[[ProcSample], float]
) -> float | None:
    """How fast ``figure`` grew between the first and last samples within [start, end] (None: fewer than
    two samples there)."""
    inside = [sample for sample in samples if start <= sample.t <= end]
    if len(inside) < 2 or inside[-1].t <= inside[0].t:
        return None
    return (figure(inside[-1]) - figure(inside[0])) / (inside[-1].t - inside[0].t)


def timeline(
    scrapes: Sequence[tuple[float, str]], proc: Mapping[str, Sequence[ProcSample]], begin: float
) -> list[dict[str, float | None]]:
    """The run second by second, one row per interval between two /metrics scrapes: when it ended
    (seconds after ``begin``), calls active at its end and calls started within it, the event-loop lag,
    booking commit and turn overhead p99 within it, each process's CPU within it as a share of one core,
    and how long each one's main thread waited for a core (ms per s). A run's p99 hides whether the loop
    was late all along or in bursts (callers hanging up and dialling again together); this shows which,
    whether the slow bookings fell in the same bursts, and whether the loop was waiting for a core."""

    def p99_ms(within: Metrics, histogram: str, **labels: str) -> float | None:
        value = metric_quantile(within, histogram, 0.99, **labels)
        return None if value is None else round(value * 1000, 1)

    rows: list[dict[str, float | None]] = []
    previous: tuple[float, Metrics] | None = None
    for at, text in scrapes:
        metrics = Metrics.parse(text)
        if previous is not None:
            start = previous[0]
            within = metrics.minus(previous[1])
            row: dict[str, float | None] = {
                "t_s": round(at - begin, 1),
                "calls_active": metrics.total("voicebook_calls_active"),
                "calls_started": within.total("voicebook_calls_total"),
                "loop_lag_p99_ms": p99_ms(within, "voicebook_event_loop_lag_seconds"),
                "booking_commit_p99_ms": p99_ms(within, "voicebook_booking_seconds", operation="book"),
                "turn_overhead_p99_ms": p99_ms(within, "voicebook_turn_server_overhead_seconds"),
            }
            for name, samples in sorted(proc.items()):
                share = _per_second(samples, start, at, lambda sample: sample.cpu_seconds)
                row[f"cpu_{name}"] = None if share is None else round(share, 3)
            for name, samples in sorted(proc.items()):  # after every cpu_ column, so those stay together
                wait = _per_second(samples, start, at, lambda sample: sample.wait_seconds)
                row[f"wait_ms_per_s_{name}"] = None if wait is None else round(wait * 1000, 1)
            rows.append(row)
        previous = (at, metrics)
    return rows


def write_timeline(rows: Sequence[Mapping[str, float | None]], path: Path) -> None:
    """``timeline`` rows as CSV (an empty cell where a figure is missing)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [",".join(columns)]
    lines += [",".join("" if row.get(key) is None else f"{row[key]:g}" for key in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def plot(steps: Sequence[StepFigures], path: Path) -> None:
    """Turn latency p50/p99 and event-loop lag p99 against concurrent calls, one point per step (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted((step.concurrent_median or float(step.users), step) for step in steps)
    x = [concurrent for concurrent, _ in points]
    figure, (turns, lag) = plt.subplots(2, 1, sharex=True, figsize=(7, 6))
    for label, values in (
        ("turn p50", [step.turn_ms.p50 for _, step in points]),
        ("turn p99", [step.turn_ms.p99 for _, step in points]),
    ):
        turns.plot(x, [math.nan if v is None else v for v in values], marker="o", label=label)
    turns.set_ylabel("caller voice-to-voice (ms)")
    turns.legend()
    turns.grid(True, alpha=0.3)
    lag.plot(x, [math.nan if s.loop_lag_p99_ms is None else s.loop_lag_p99_ms for _, s in points], marker="o")
    lag.axhline(10.0, color="red", linestyle="--", linewidth=1, label="10 ms")
    lag.set_ylabel("event-loop lag p99 (ms)")
    lag.set_xlabel("concurrent calls")
    lag.legend()
    lag.grid(True, alpha=0.3)
    figure.suptitle("voicebook: latency against concurrent calls")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
