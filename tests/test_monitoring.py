"""What the chart gives an operator on top of scraping: alerts and a dashboard, checked offline.

- The PrometheusRule (helm/templates/prometheusrule.yaml) is rendered by Helm's
  own engine, passes `promtool check rules`, and `promtool test rules` fires
  every alert on synthetic series (tests/monitoring/alerts-test.yaml), each
  next to a case that must stay silent. Thresholds are values: changing one
  makes the same unit tests fail.
- Every alert has a summary, a description and a runbook subsection in
  docs/operations.md that its runbook_url points at.
- The Grafana dashboard (helm/dashboards/wschat.json) ships in a ConfigMap for
  the Grafana sidecar; every query parses (promtool) and names only series
  and label values that a live server's /metrics really exports.
- wschat_worker_restarts_total counts a worker the gunicorn master replaced.

Needs promtool (Debian: apt-get install prometheus) and the test extra
(helm-python-sdk, jsonschema, PyYAML). Missing tools skip these tests locally
and fail them under CI=true.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import IN_CI, ROOT, Server, redis_url_or_skip, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parent))
from packaging_support import (  # noqa: E402
    CHART_DIR,
    NAMESPACE,
    PROMETHEUSRULE_SCHEMA,
    RELEASE,
    Rendered,
    render,
    require_modules,
)

require_modules(("helm_python", "jsonschema", "yaml"), "monitoring checks")

import jsonschema  # noqa: E402
import yaml  # noqa: E402

ALERT_TESTS = ROOT / "tests" / "monitoring" / "alerts-test.yaml"
DASHBOARD = CHART_DIR / "dashboards" / "wschat.json"
OPERATIONS = ROOT / "docs" / "operations.md"
RUNBOOK_HEADING = "## Alerts: runbook"
# Series the rules read from kube-state-metrics rather than from wschat.
KUBE_STATE_METRICS = {"kube_pod_status_ready", "kube_pod_status_phase",
                      "kube_pod_container_status_restarts_total", "kube_pod_owner"}
# Labels Prometheus (the ServiceMonitor) adds to every scraped series.
TARGET_LABELS = {"namespace", "pod", "service", "job", "instance", "container", "endpoint"}
# What Grafana substitutes for the dashboard's variables, for checking its queries here.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$namespace": NAMESPACE, "$pod": ".*"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                "unless", "bool", "offset", "inf", "nan"}
ALERTS_ON = {"prometheusRule": {"enabled": True}}


def promtool() -> str:
    path = shutil.which("promtool")
    if path:
        return path
    if IN_CI:
        pytest.fail("promtool is required under CI=true (Debian: apt-get install prometheus)")
    pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def rules_of(release: Rendered) -> list[dict[str, Any]]:
    return [rule for group in release.get("PrometheusRule")["spec"]["groups"]
            for rule in group["rules"]]


def unit_test_rules(values: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Render the rules with ``values`` and run the alert unit tests against them."""
    rule = render(values).get("PrometheusRule")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    return run_promtool("test", "rules", ALERT_TESTS.name, cwd=tmp_path)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_sections() -> dict[str, str]:
    """docs/operations.md's runbook: anchor -> text of each ### subsection."""
    text = OPERATIONS.read_text()
    assert RUNBOOK_HEADING in text, f"{OPERATIONS.name} has no '{RUNBOOK_HEADING}' section"
    runbook = text.split(RUNBOOK_HEADING, 1)[1]
    assert not re.search(r"^## ", runbook, re.MULTILINE), "the runbook must be the last section"
    sections = re.split(r"^### ", runbook, flags=re.MULTILINE)[1:]
    return {github_anchor(s.splitlines()[0]): s for s in sections}


# --------------------------------------------------------------------------
# PromQL, read just far enough to name series and label matchers
# --------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Every series an expression reads, with its label matchers."""
    found = []
    for match in re.finditer(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", expr):
        found.append((match.group(1), _MATCHER.findall(match.group(2))))
    # Bare names (no braces) would escape the matcher checks: list them too.
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", _STRING.sub('""', expr))
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    for match in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:])(\s*\()?", bare):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in PROMQL_WORDS:
            continue
        if name not in {n for n, _ in found}:
            found.append((name, []))
    return found


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel."""
    return [(panel["title"], target["expr"]) for panel in dashboard()["panels"]
            for target in panel.get("targets", [])]


def exposition_series(text: str) -> dict[str, dict[str, set[str]]]:
    """name -> label -> values, from a Prometheus text exposition (HELP/TYPE names too)."""
    series: dict[str, dict[str, set[str]]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            suffixes = {"histogram": ("_bucket", "_count", "_sum"),
                        "counter": ("_total", "")}.get(kind, ("",))
            for suffix in suffixes:
                series.setdefault(name + suffix if not name.endswith(suffix) else name, {})
            continue
        match = re.match(r"([A-Za-z_:][\w:]*)(\{(.*)\})? ", line)
        if not match or line.startswith("#"):
            continue
        labels = series.setdefault(match.group(1), {})
        for label, _, value in _MATCHER.findall(match.group(3) or ""):
            labels.setdefault(label, set()).add(value)
    return series


# --------------------------------------------------------------------------
# Alerts
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alerts_release() -> Rendered:
    return render(ALERTS_ON)


def test_prometheusrule_follows_the_servicemonitor_rule() -> None:
    """"auto" without the operator's API (as offline here) leaves the PrometheusRule and the
    dashboard out, like the ServiceMonitor; true puts them in; false keeps them out."""
    default = render()
    assert not default.all("PrometheusRule") and not default.all("ServiceMonitor")
    assert len(default.all("ConfigMap")) == 1
    forced = render({**ALERTS_ON, "grafanaDashboard": {"enabled": True}})
    assert len(forced.all("PrometheusRule")) == 1
    assert len(forced.all("ConfigMap")) == 2
    off = render({"prometheusRule": {"enabled": False}, "grafanaDashboard": {"enabled": False},
                  "serviceMonitor": {"enabled": True}})
    assert not off.all("PrometheusRule") and len(off.all("ConfigMap")) == 1


def test_prometheusrule_matches_the_crd_schema(alerts_release: Rendered) -> None:
    """The rendered PrometheusRule validates against the CRD's schema, which does catch a
    misspelt field and a rule that is neither alert nor record."""
    rule = alerts_release.get("PrometheusRule")
    schema = json.loads(PROMETHEUSRULE_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(rule)
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    broken = copy.deepcopy(rule)
    broken["spec"]["groups"][0]["rules"][0]["annotation"] = {}
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))
    broken = copy.deepcopy(rule)
    del broken["spec"]["groups"][0]["rules"][0]["alert"]
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))


def test_rules_pass_promtool_check(alerts_release: Rendered, tmp_path: Path) -> None:
    """`promtool check rules` accepts every rule (PromQL syntax, templates, durations)."""
    rules = rules_of(alerts_release)
    (tmp_path / "rules.yaml").write_text(
        yaml.safe_dump(alerts_release.get("PrometheusRule")["spec"], sort_keys=False))
    result = run_promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout, result.stdout
    # ... and it is not vacuous: a broken expression is refused.
    spec = copy.deepcopy(alerts_release.get("PrometheusRule")["spec"])
    spec["groups"][0]["rules"][0]["expr"] += " >"
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(spec))
    assert run_promtool("check", "rules", "broken.yaml", cwd=tmp_path).returncode != 0


def test_every_alert_fires_in_promtool_unit_tests(alerts_release: Rendered,
                                                  tmp_path: Path) -> None:
    """`promtool test rules` passes, and it fires every alert the chart renders at least once
    and holds each one silent at least once."""
    result = unit_test_rules(ALERTS_ON, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {rule["alert"] for rule in rules_of(alerts_release)}
    assert alerts == {"WschatPodNotReady", "WschatStoreErrors", "WschatRedisMemoryHigh",
                      "WschatSlowConsumers",
                      "WschatRateLimitedShare", "WschatMessageLatencyHigh",
                      "WschatConnectionsNearLimit", "WschatWorkerRestarts", "WschatPodRestarts"}
    cases = [case for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
             for case in test["alert_rule_test"]]
    fired = {case["alertname"] for case in cases if case["exp_alerts"]}
    silent = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert alerts - fired == set(), "alerts no unit test fires"
    assert alerts - silent == set(), "alerts no unit test holds silent"


@pytest.mark.parametrize("values, alert", [
    ({"storeErrors": {"perSecond": 1}}, "WschatStoreErrors"),
    ({"redisMemory": {"ratio": 0.95}}, "WschatRedisMemoryHigh"),
    ({"slowConsumers": {"for": "30m"}}, "WschatSlowConsumers"),
    ({"rateLimited": {"ratio": 0.2}}, "WschatRateLimitedShare"),
    ({"latency": {"p99Seconds": 0.5}}, "WschatMessageLatencyHigh"),
    ({"connections": {"ratio": 0.99}}, "WschatConnectionsNearLimit"),
    ({"workerRestarts": {"allowed": 1}}, "WschatWorkerRestarts"),
    ({"podRestarts": {"window": "1m"}}, "WschatPodRestarts"),
    ({"podNotReady": {"for": "15m"}}, "WschatPodNotReady"),
], ids=lambda v: v if isinstance(v, str) else next(iter(v)))
def test_thresholds_are_values(values: dict[str, Any], alert: str, tmp_path: Path) -> None:
    """Raising one alert's threshold (or its duration) makes its unit test fail: the rules
    really read the values, and the unit tests really depend on the thresholds."""
    result = unit_test_rules({"prometheusRule": {"enabled": True, "alerts": values}}, tmp_path)
    assert result.returncode != 0, result.stdout
    output = result.stdout + result.stderr
    assert f"alertname: {alert}" in output, output
    failing = set(re.findall(r"alertname: (\w+)", output))
    assert failing == {alert}, output


def test_latency_bound_is_below_the_top_finite_bucket(tmp_path: Path) -> None:
    """histogram_quantile never answers more than the largest finite bucket of
    wschat_fanout_seconds (a p99 in the +Inf bucket reads as that bound), so a
    latency.p99Seconds at or above it made an alert that could never fire, however slow
    the messages: the schema refuses it."""
    import helm_python

    from wschat.metrics import FANOUT

    bounds = [b for b in FANOUT._upper_bounds if b != float("inf")]
    top = max(bounds)
    # Every message of ten minutes took longer than the top bucket: p99 reads as `top`.
    series = [{"series": f'wschat_fanout_seconds_bucket{{le="{b}"}}', "values": "0+0x10"}
              for b in bounds]
    series.append({"series": 'wschat_fanout_seconds_bucket{le="+Inf"}', "values": "0+60x10"})
    (tmp_path / "empty.yaml").write_text("groups: []\n")
    (tmp_path / "cap.yaml").write_text(yaml.safe_dump({
        "rule_files": ["empty.yaml"], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": [{
            "expr": "histogram_quantile(0.99, sum by (le) "
                    "(rate(wschat_fanout_seconds_bucket[5m])))",
            "eval_time": "10m", "exp_samples": [{"labels": "{}", "value": top}]}]}]}))
    result = run_promtool("test", "rules", "cap.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    latency = schema["properties"]["prometheusRule"]["properties"]["alerts"]["properties"][
        "latency"]["properties"]["p99Seconds"]
    assert latency.get("exclusiveMaximum") == top, "schema bound out of step with metrics.py"
    for dead in (top, 2 * top):
        with pytest.raises(helm_python.HelmValuesError):
            render({"prometheusRule": {"enabled": True,
                                       "alerts": {"latency": {"p99Seconds": dead}}}})
    rules = rules_of(render({"prometheusRule": {"enabled": True, "alerts": {
        "latency": {"p99Seconds": top / 2}}}}))
    assert any(f"> {top / 2}" in r["expr"] for r in rules)


def test_alerts_can_be_turned_off_labelled_and_follow_max_connections() -> None:
    """Per-alert switches, extra labels on every alert, the ruleSelector's labels, and
    MAX_CONNECTIONS from extraEnv when it overrides config.maxConnections."""
    release = render({"prometheusRule": {
        "enabled": True, "labels": {"release": "kube-prometheus-stack"},
        "alertLabels": {"team": "chat"}, "runbookUrl": "https://runbooks.example.com/ops.md",
        "alerts": {"podRestarts": {"enabled": False}}}, "extraEnv": {"MAX_CONNECTIONS": "20000"}})
    rule = release.get("PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    rules = {r["alert"]: r for r in rules_of(release)}
    assert "WschatPodRestarts" not in rules and len(rules) == 8
    for name, r in rules.items():
        assert r["labels"]["team"] == "chat", name
        assert r["annotations"]["runbook_url"] == \
            f"https://runbooks.example.com/ops.md#{name.lower()}"
    assert "> 20000 * 0.9" in rules["WschatConnectionsNearLimit"]["expr"]
    assert "(20000)" in rules["WschatConnectionsNearLimit"]["annotations"]["description"]


def test_every_alert_has_summary_description_and_a_runbook(alerts_release: Rendered) -> None:
    """Each alert carries a summary, a description and a severity, and its runbook_url
    names a subsection of the runbook at the end of docs/operations.md that names it."""
    sections = runbook_sections()
    for rule in rules_of(alerts_release):
        name = rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        url, _, anchor = annotations["runbook_url"].partition("#")
        assert url == "docs/operations.md", name
        assert anchor in sections, f"{name}: no runbook subsection #{anchor}"
        assert name in sections[anchor], name
    alerts = {rule["alert"].lower() for rule in rules_of(alerts_release)}
    assert set(sections) == alerts, "runbook subsections without an alert"


# --------------------------------------------------------------------------
# Dashboard
# --------------------------------------------------------------------------


def test_dashboard_ships_in_a_configmap_for_the_grafana_sidecar() -> None:
    """The ConfigMap carries the sidecar's label and exactly the dashboard file."""
    release = render({"grafanaDashboard": {"enabled": True, "annotations": {
        "grafana_folder": "Chat"}}})
    maps = [m for m in release.all("ConfigMap") if m["metadata"]["name"].endswith("-dashboard")]
    assert len(maps) == 1
    metadata = maps[0]["metadata"]
    assert metadata["labels"]["grafana_dashboard"] == "1"
    assert metadata["annotations"] == {"grafana_folder": "Chat"}
    assert metadata["namespace"] == NAMESPACE
    assert json.loads(maps[0]["data"]["wschat.json"]) == dashboard()
    elsewhere = render({"grafanaDashboard": {"enabled": True, "namespace": "monitoring"}})
    assert [m["metadata"]["namespace"] for m in elsewhere.all("ConfigMap")
            if "grafana_dashboard" in m["metadata"]["labels"]] == ["monitoring"]


def test_dashboard_is_importable_and_covers_what_operators_watch() -> None:
    """Unique panel ids, a ${datasource} variable (so it imports into any Grafana), and
    panels for each figure the issue lists, per pod and in total."""
    board = dashboard()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:  # within 24 columns, no two panels on one cell
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel.get("targets"), f"{panel['title']}: no query"
        assert panel.get("description"), f"{panel['title']}: no description"
    queries = " ".join(expr for _, expr in dashboard_queries())
    for needed in ("wschat_connections_total", 'type=~"join|leave"',
                   "wschat_messages_received_total", "wschat_messages_delivered_total",
                   "histogram_quantile(0.5,", "histogram_quantile(0.99,",
                   'reason="slow_consumer"', "wschat_rate_limited_total",
                   "wschat_store_errors_total", "wschat_store_seconds_bucket",
                   "wschat_store_memory_bytes", "wschat_store_memory_limit_bytes",
                   "wschat_worker_restarts_total"):
        assert needed in queries, needed
    for series in ("wschat_connections_total", "wschat_messages_delivered_total",
                   "wschat_store_errors_total"):
        exprs = [e for _, e in dashboard_queries() if series in e]
        assert any("by (pod" in e or "by (backend, pod" in e for e in exprs), series
        assert any("pod" not in e.split("{")[0] for e in exprs), series


def test_dashboard_queries_pass_promtool(tmp_path: Path) -> None:
    """Every panel query, with Grafana's variables filled in, parses as PromQL."""
    rules = [{"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
             for i, (_, expr) in enumerate(dashboard_queries())]
    (tmp_path / "dashboard.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", "dashboard.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def operations_queries() -> list[tuple[str, str]]:
    """("docs/operations.md", PromQL) for each line of its ```promql blocks and each inline
    `...` query (the runbook's **Check**s): operators paste them as they are."""
    text = OPERATIONS.read_text()
    queries = []
    for block in re.findall(r"```promql\n(.*?)```", text, re.DOTALL):
        queries += [line for line in block.splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    queries += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", text)
                if "wschat_" in span and ("(" in span or "{" in span)]
    assert len(queries) > 20, queries  # not vacuous: the dashboards block and the runbook
    return [(OPERATIONS.name, query) for query in queries]


@pytest.fixture(scope="module")
def live_series(tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[dict[str, dict[str, set[str]]]]:
    """A live server's series; on Redis with SQLite persistence, so every store series has
    its backends (Redis db 27, no other module uses it)."""
    database = tmp_path_factory.mktemp("live") / "wschat.db"
    with Server({"ENABLE_PERSISTENCE": "true", "DATABASE_URL": f"sqlite:///{database}",
                 "REDIS_URL": redis_url_or_skip(27)}) as server:
        status, body = server.http("/metrics", metrics=True)
        assert status == 200
        yield exposition_series(body.decode())


def test_every_query_names_series_the_server_exports(
        live_series: dict[str, dict[str, set[str]]], alerts_release: Rendered) -> None:
    """Each series a dashboard panel, an alert or a query in docs/operations.md reads is in a
    live server's /metrics (or is kube-state-metrics'), with the labels and label values its
    matchers ask for."""
    queries = [(f"panel {title!r}", grafana_to_promql(expr)) for title, expr in dashboard_queries()]
    queries += [(f"alert {r['alert']}", r["expr"]) for r in rules_of(alerts_release)]
    queries += operations_queries()
    problems = []
    used = set()
    for where, expr in queries:
        found = selectors(expr)
        if not found:
            problems.append(f"{where}: names no series: {expr}")
        for name, matchers in found:
            used.add(name)
            if name in KUBE_STATE_METRICS:
                continue
            if name not in live_series:
                problems.append(f"{where}: {name} is not exported")
                continue
            for label, op, value in matchers:
                if label in TARGET_LABELS or label == "le":
                    continue
                exported = live_series[name].get(label)
                if not exported:
                    problems.append(f"{where}: {name} has no label {label}")
                elif op in ("=", "=~") and re.fullmatch(r"[\w|]+", value):
                    missing = set(value.split("|")) - exported
                    if missing:
                        problems.append(f"{where}: {name}{{{label}}} never is {missing}")
    assert not problems, "\n".join(problems)
    # The check reads names: a misspelt one is caught.
    assert "wschat_conections_total" not in live_series
    assert selectors('sum by (pod) (rate(wschat_conections_total{reason="x"}[5m]))') == [
        ("wschat_conections_total", [("reason", "=", "x")])]
    assert "wschat_fanout_seconds_bucket" in used and "wschat_worker_restarts_total" in used
    assert "wschat_store_seconds_bucket" in used


_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def grouping_labels(expr: str) -> list[set[str]]:
    """The labels of each by/without/on/ignoring clause of an expression, in order."""
    return [{label.strip() for label in match.group(1).split(",") if label.strip()}
            for match in _GROUPING.finditer(_STRING.sub('""', expr))]


def test_grouping_legend_and_annotation_labels_exist(
        live_series: dict[str, dict[str, set[str]]], alerts_release: Rendered) -> None:
    """A label a query groups by must be one of its series' (a misspelt one groups
    everything into one empty-labelled series, silently); a panel's legend ({{label}}) and
    an alert's annotation ($labels.label) may only name labels every grouping keeps,
    else they render empty."""
    queries = [(f"panel {panel['title']!r}", grafana_to_promql(target["expr"]),
                re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
               for panel in dashboard()["panels"] for target in panel.get("targets", [])]
    for rule in rules_of(alerts_release):
        text = " ".join(rule["annotations"].values())
        queries.append((f"alert {rule['alert']}", rule["expr"],
                        re.findall(r"\$labels\.(\w+)", text)))
    queries += [(where, expr, []) for where, expr in operations_queries()]
    problems = []
    for where, expr, shown in queries:
        names = [name for name, _ in selectors(expr)]
        known = set(TARGET_LABELS) | {"le"}
        for name in names:
            if name in KUBE_STATE_METRICS:
                known |= {"namespace", "pod", "condition", "phase", "container",
                          "owner_kind", "owner_name"}
            known |= set(live_series.get(name, {}))
        groupings = grouping_labels(expr)
        for labels in groupings:
            for label in labels - known:
                problems.append(f"{where}: groups by {label!r}, a label none of "
                                f"{names} has")
        kept = set.intersection(*groupings) if groupings else set()
        for label in set(shown) - kept:
            problems.append(f"{where}: shows {{{{{label}}}}}, which its groupings {groupings} "
                            "drop")
    assert not problems, "\n".join(problems)
    # Not vacuous: a misspelt grouping and a dropped legend label are caught.
    assert grouping_labels("sum by (pod, reasn) (rate(x[5m])) / on (pod) y") == [
        {"pod", "reasn"}, {"pod"}]
    assert "reasn" not in live_series["wschat_disconnects_total"]


# --------------------------------------------------------------------------
# The one metric the alerts needed
# --------------------------------------------------------------------------


def _metric(server: Server, name: str) -> float | None:
    status, body = server.http("/metrics", metrics=True)
    if status != 200:
        return None
    match = re.search(rf"^{name} (\S+)$", body.decode(), re.MULTILINE)
    return float(match.group(1)) if match else None


def test_worker_restart_is_counted() -> None:
    """The first worker is not a restart; a worker killed with SIGKILL and replaced by the
    master counts 1 in wschat_worker_restarts_total, and the count stays after it."""
    with Server() as server:
        assert _metric(server, "wschat_worker_restarts_total") == 0.0
        (victim,) = server.worker_pids()
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(pids := server.worker_pids()) == 1 and victim not in pids,
                   message="the master to replace the worker")
        wait_until(lambda: _metric(server, "wschat_worker_restarts_total") == 1.0,
                   message="wschat_worker_restarts_total to count the replacement")
        assert _metric(server, "wschat_workers") == 1.0
