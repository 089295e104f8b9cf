"""The monitoring assets in deploy/ and the runbook agree with each other and with the code.

Every PromQL expression (dashboard queries, alert rules) is parsed with promql-parser, and every metric
it reads must be one the code registers in prometheus_client's default registry (histograms exposed as
``_bucket``/``_sum``/``_count``, counters as ``_total``; ``process_*`` from the default process
collector). Every alert names a runbook section that exists, and every panel the runbook points at is on
the dashboard.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info, Summary
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "voicebook-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RUNBOOK = ROOT / "docs" / "operations.md"

METRIC_MODULES = (
    "booking.metrics",
    "booking.reconciler",
    "integrations.metrics",
    "voice_server.fallback",
    "voice_server.metrics",
    "voice_server.turn_timing",
)
"""The modules that register voicebook's instruments when imported."""

SCRAPE_GENERATED = frozenset({"up"})
"""Series Prometheus writes itself for every target."""

DATASOURCE = "${DS_PROMETHEUS}"
TEMPLATE_VALUES = {"$job": "voicebook"}
"""Grafana variables a dashboard query may use, and a value that makes the query plain PromQL."""

REQUIRED_ALERTS = {
    # alert -> a metric its expression must read
    "VoicebookBookingLatencyHigh": "voicebook_booking_seconds_bucket",
    "VoicebookTurnServerOverheadHigh": "voicebook_turn_server_overhead_seconds_bucket",
    "VoicebookVoiceToVoiceSlow": "voicebook_turn_voice_to_voice_server_seconds_bucket",
    "VoicebookEventLoopLagHigh": "voicebook_event_loop_lag_seconds_bucket",
    "VoicebookProviderErrorRateHigh": "voicebook_provider_requests_total",
    "VoicebookWebhookServerErrors": "voicebook_webhook_requests_total",
    "VoicebookEffectRetriesHigh": "voicebook_effect_attempts_total",
    "VoicebookDeadLettersGrowing": "voicebook_effect_dead_letters",
    "VoicebookSmsDeliveryRateLow": "voicebook_sms_delivery_rate",
    "VoicebookEffectQueueGrowing": "voicebook_effect_queue_depth",
    "VoicebookEffectOldestDueHigh": "voicebook_effect_oldest_due_seconds",
    "VoicebookCalendarSuccessRateLow": "voicebook_provider_requests_total",
    "VoicebookSpeechBreakerOpen": "voicebook_speech_breaker_open",
    "VoicebookSpeechFallbackShareHigh": "voicebook_speech_fallbacks_total",
    "VoicebookSpeechRecognitionFallbackHigh": "voicebook_speech_fallbacks_total",
    "VoicebookTargetDown": "up",
}
PINNED_FOR = {
    # the issue's thresholds are sustained for at least this long
    "VoicebookBookingLatencyHigh": "10m",
    "VoicebookEventLoopLagHigh": "5m",
    "VoicebookSmsDeliveryRateLow": "30m",
}
SEVERITIES = frozenset({"critical", "warning", "info"})
PANEL_REFERENCE = re.compile(r"\*\*([^*\n]+?) \u203a ([^*\n]+?)\*\*")
"""How the runbook names a panel: in bold, its row and its title joined by " \u203a " (U+203A)."""


# -- helpers --------------------------------------------------------------------------------------------


def exposed_names(family: Metric) -> set[str]:
    """The series names a collected metric family is exposed under."""
    name = family.name
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }.get(family.type, ("",))
    return {name + suffix for suffix in suffixes} | {sample.name for sample in family.samples}


def registered_names(registry: CollectorRegistry) -> set[str]:
    return set().union(*(exposed_names(family) for family in registry.collect()))


def selected_metrics(expr: str) -> list[str]:
    """The metric names ``expr`` selects; a selector without a name is reported as ``<unnamed>``."""
    names: list[str] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.append(node.name or "<unnamed>")

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def label_filters(expr: str) -> list[tuple[str, str, str]]:
    """``(metric, label, value)`` for every ``label="value"`` matcher of a named selector in ``expr``."""
    filters: list[tuple[str, str, str]] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            for matcher in node.matchers.matchers:
                if matcher.op == promql_parser.MatchOp.Equal:
                    filters.append((node.name, matcher.name, matcher.value))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return filters


def heading_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def markdown_headings(text: str) -> list[str]:
    headings, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.+)", line)):
            headings.append(match.group(1))
    return headings


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def query_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])  # a collapsed row keeps its panels inside
        else:
            yield panel


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """``(panel title, query)`` for every target, with the Grafana variables filled in."""
    queries = []
    for panel in query_panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in TEMPLATE_VALUES.items():
                expr = expr.replace(variable, value)
            queries.append((panel["title"], expr))
    return queries


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def runbook_anchors() -> set[str]:
    return {heading_slug(heading) for heading in markdown_headings(RUNBOOK.read_text())}


@pytest.fixture(scope="module")
def code_metrics() -> set[str]:
    for module in METRIC_MODULES:
        importlib.import_module(module)  # registers the module's instruments in the default registry
    return registered_names(REGISTRY)


# -- the helpers themselves -------------------------------------------------------------------------------


def test_exposed_names_follow_the_exposition_format() -> None:
    registry = CollectorRegistry()
    Counter("demo_requests_total", "requests", ["kind"], registry=registry)
    Histogram("demo_seconds", "time", registry=registry)
    Gauge("demo_depth", "depth", registry=registry)
    Summary("demo_size", "size", registry=registry)
    Info("demo_build", "build", registry=registry)
    names = registered_names(registry)
    assert {"demo_requests_total", "demo_seconds_bucket", "demo_seconds_sum", "demo_seconds_count"} <= names
    assert {"demo_depth", "demo_size_sum", "demo_size_count", "demo_build_info"} <= names
    assert "demo_requests" not in names
    assert "demo_seconds" not in names


def test_selected_metrics_reads_every_selector() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le) (rate(a_bucket[5m]))) > on() b"
        " or delta(sum(c)[15m:1m]) > 0 unless d offset 15m"
    )
    assert sorted(selected_metrics(expr)) == ["a_bucket", "b", "c", "d"]
    assert selected_metrics('{__name__="x"}') == ["<unnamed>"]
    with pytest.raises(ValueError):
        promql_parser.parse("rate(a[5m]")


def test_label_filters_reads_equality_matchers_only() -> None:
    expr = 'sum(rate(a_total{role="stt", reason=~"x|y", job!="j"}[5m])) / b{role="tts"} and {c="d"}'
    assert sorted(label_filters(expr)) == [("a_total", "role", "stt"), ("b", "role", "tts")]


def test_heading_slug_matches_github() -> None:
    assert heading_slug("VoicebookBookingLatencyHigh") == "voicebookbookinglatencyhigh"
    assert heading_slug("Working through dead letters") == "working-through-dead-letters"
    assert heading_slug("Dead-letter tools") == "dead-letter-tools"
    assert markdown_headings("# A\n```sh\n# not a heading\n```\n## B") == ["A", "B"]


# -- the dashboard --------------------------------------------------------------------------------------


def test_dashboard_is_a_grafana_model_with_a_datasource_variable() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 39
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["job"]["datasource"]["uid"] == DATASOURCE
    # No data source uid written in: every Prometheus reference goes through the variable.
    uids = re.findall(r'"uid":\s*"([^"]*)"', DASHBOARD.read_text())
    assert set(uids) <= {DATASOURCE, "-- Grafana --", dashboard["uid"]}


def test_every_panel_has_the_datasource_variable_and_a_query() -> None:
    dashboard = load_dashboard()
    panels = list(query_panels(dashboard))
    assert len(panels) >= 20
    rows = [panel for panel in dashboard["panels"] if panel["type"] == "row"]
    ids = [panel["id"] for panel in [*rows, *panels]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"]["uid"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_dashboard_rows_cover_the_issue() -> None:
    rows = [panel["title"] for panel in load_dashboard()["panels"] if panel["type"] == "row"]
    assert rows == ["Calls", "Turn latency", "Booking", "Effects", "SMS", "Providers", "Runtime"]


def test_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in load_dashboard()["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_dashboard_queries_parse() -> None:
    for title, expr in dashboard_queries(load_dashboard()):
        assert "$" not in expr, f"{title}: unknown Grafana variable in {expr}"
        try:
            promql_parser.parse(expr)
        except ValueError as error:
            pytest.fail(f"{title}: {error}\n{expr}")


def test_dashboard_reads_only_metrics_the_code_registers(code_metrics: set[str]) -> None:
    dashboard = load_dashboard()
    unknown = {
        (title, name)
        for title, expr in dashboard_queries(dashboard)
        for name in selected_metrics(expr)
        if name not in code_metrics
    }
    assert not unknown, f"queried but not registered: {sorted(unknown)}"
    job = next(variable for variable in dashboard["templating"]["list"] if variable["name"] == "job")
    listed_from = re.fullmatch(r"label_values\((\w+), job\)", job["query"])
    assert listed_from is not None and listed_from.group(1) in code_metrics, job["query"]


# -- the alerts ---------------------------------------------------------------------------------------------


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    assert set(REQUIRED_ALERTS) <= set(names), f"missing: {sorted(set(REQUIRED_ALERTS) - set(names))}"
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        for annotation in ("summary", "description", "runbook_url"):
            assert rule["annotations"][annotation].strip(), f"{rule['alert']}: no {annotation}"
    by_name = {rule["alert"]: rule for rule in rules}
    for alert, duration in PINNED_FOR.items():
        assert by_name[alert]["for"] == duration, alert


def test_alert_expressions_parse_and_read_their_metric() -> None:
    for rule in alert_rules():
        try:
            metrics = selected_metrics(rule["expr"])
        except ValueError as error:
            pytest.fail(f"{rule['alert']}: {error}")
        required = REQUIRED_ALERTS.get(rule["alert"])
        if required is not None:
            assert required in metrics, f"{rule['alert']} does not read {required}"


def test_alerts_read_only_metrics_the_code_registers(code_metrics: set[str]) -> None:
    known = code_metrics | SCRAPE_GENERATED
    unknown = {(rule["alert"], name) for rule in alert_rules() for name in selected_metrics(rule["expr"])}
    unknown = {(alert, name) for alert, name in unknown if name not in known}
    assert not unknown, f"alerted on but not registered: {sorted(unknown)}"


def test_every_runbook_url_names_a_runbook_section() -> None:
    anchors = runbook_anchors()
    for rule in alert_rules():
        url = rule["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page.endswith("docs/operations.md"), f"{rule['alert']}: {url}"
        assert anchor in anchors, f"{rule['alert']}: no heading for #{anchor} in docs/operations.md"
        assert anchor == rule["alert"].lower(), f"{rule['alert']}: its section is named after it"


def test_target_down_watches_the_scraped_job() -> None:
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    assert "alerts.yml" in config["rule_files"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["voicebook"]["metrics_path"] == "/metrics"
    down = next(rule for rule in alert_rules() if rule["alert"] == "VoicebookTargetDown")
    assert 'job="voicebook"' in down["expr"]


# -- the speech fallback's metrics ------------------------------------------------------------------------------


def test_speech_fallback_metrics_are_on_the_dashboard_and_alerted_for_both_roles() -> None:
    """Every instrument voice_server.fallback registers is read by a panel and (but one) by an alert, under a name
    taken from the instrument itself; every role and reason they filter on is one the code labels its
    series with; and each role's fallbacks have an alert of their own. A renamed metric or label value
    then fails here instead of leaving the speech panels and alerts reading nothing."""
    fallback = importlib.import_module("voice_server.fallback")
    instruments = [value for value in vars(fallback).values() if isinstance(value, MetricWrapperBase)]
    exported = {family.name: exposed_names(family) for instrument in instruments for family in instrument.collect()}
    assert set(exported) == {
        "voicebook_speech_fallbacks",
        "voicebook_speech_breaker_open",
        "voicebook_speech_deadline_extended",
    }
    # Deadlines extended are the server's own overload, which VoicebookEventLoopLagHigh alerts on.
    panel_only = {"voicebook_speech_deadline_extended"}
    panel_exprs = [expr for _title, expr in dashboard_queries(load_dashboard())]
    alert_exprs = [rule["expr"] for rule in alert_rules()]
    for family, names in exported.items():
        for kind, exprs in (("panel", panel_exprs), ("alert", alert_exprs)):
            if kind == "alert" and family in panel_only:
                continue
            assert any(names & set(selected_metrics(expr)) for expr in exprs), f"no {kind} reads {family}"

    allowed = {"role": set(get_args(fallback.Role)), "reason": set(get_args(fallback.FallbackReason))}
    speech_names = set().union(*exported.values())
    for expr in panel_exprs + alert_exprs:
        for metric, label, value in label_filters(expr):
            if metric in speech_names and label in allowed:
                assert value in allowed[label], f"{metric}{{{label}={value!r}}}: the code never sets it\n{expr}"
    alerted_roles = {
        value
        for expr in alert_exprs
        for metric, label, value in label_filters(expr)
        if metric == "voicebook_speech_fallbacks_total" and label == "role"
    }
    assert alerted_roles == allowed["role"], f"fallback alerts cover {sorted(alerted_roles)} only"


# -- the runbook ----------------------------------------------------------------------------------------------


def test_runbook_links_and_anchors_resolve() -> None:
    text = RUNBOOK.read_text()
    slugs = [heading_slug(heading) for heading in markdown_headings(text)]
    assert len(slugs) == len(set(slugs)), "two headings share an anchor"
    for section in ("provider-outage", "quota-exhausted", "redis-lost", "database-failover", "dead-letter-tools"):
        assert section in slugs
    for target in re.findall(r"\]\(#([^)]+)\)", text):
        assert target in slugs, f"link to #{target} has no heading"


def test_runbook_names_only_panels_on_the_dashboard() -> None:
    dashboard = load_dashboard()
    panels: set[tuple[str, str]] = set()
    row = ""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            panels |= {(row, inner["title"]) for inner in panel.get("panels", [])}
        else:
            panels.add((row, panel["title"]))
    references = PANEL_REFERENCE.findall(RUNBOOK.read_text())
    assert len(references) >= 20
    missing = sorted({reference for reference in references if reference not in panels})
    assert not missing, f"the runbook names panels the dashboard does not have: {missing}"
