"""The documented contract and the code agree, checked offline (no server, no Redis).

README.md (configuration table, protocol tables, error and close codes, the server API's
error codes), docs/operations.md (the series table, ``/metrics/json``) and the chart's
alerts and dashboard name what operators and clients rely on; README.md and docs/*.md
also point at code by name (section 6). The rule
(shared/design/SPEC.md) is to keep every documented name exactly and only add: so a
name the code has and the docs lack, or the docs have and the code lacks, is drift.

The names the seed README and SPEC.md fixed are kept here too (section 5), so that a
rename made in code and docs at once still fails.

The docs are read by structure, not wording: names in backticks in a table's first
column, under a known heading; a row's wording can change freely.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docs_markdown import section, table, ticked

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "wschat"
README = ROOT / "README.md"
OPERATIONS = ROOT / "docs" / "operations.md"
HELM = ROOT / "helm"


# --------------------------------------------------------------------------
# Reading Markdown: sections, tables, backticked names (tests/docs_markdown.py)
# --------------------------------------------------------------------------

def first_column(rows: list[list[str]]) -> set[str]:
    """The names in backticks in the first column (a row may name several)."""
    return {name for row in rows for name in ticked(row[0])}


def readme() -> str:
    return README.read_text()


# --------------------------------------------------------------------------
# Reading the code
# --------------------------------------------------------------------------

def sources(*skip: str) -> Iterator[tuple[Path, ast.Module]]:
    """Every module of the server (and gunicorn.conf.py), parsed; ``skip``: file names
    relative to the repository."""
    for path in sorted([*PACKAGE.rglob("*.py"), ROOT / "gunicorn.conf.py"]):
        if str(path.relative_to(ROOT)) not in skip:
            yield path, ast.parse(path.read_text(), str(path))


def _is_os_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ"
            and isinstance(node.value, ast.Name) and node.value.id == "os")


def environment_reads(tree: ast.AST) -> set[str]:
    """Names read with ``os.environ.get("X")``, ``os.getenv("X")`` or ``os.environ["X"]``
    (reads only: an assignment to ``os.environ["X"]`` is no read)."""
    names = set()
    for node in ast.walk(tree):
        arg = None
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            if ((isinstance(func, ast.Attribute) and func.attr in ("get", "pop")
                 and _is_os_environ(func.value))
                    or (isinstance(func, ast.Attribute) and func.attr == "getenv")
                    or (isinstance(func, ast.Name) and func.id == "getenv")):
                arg = node.args[0]
        elif (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load)
              and _is_os_environ(node.value)):
            arg = node.slice
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            names.add(arg.value)
    return names


def environment_writes(tree: ast.AST) -> set[str]:
    return {node.slice.value for node in ast.walk(tree)
            if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store)
            and _is_os_environ(node.value) and isinstance(node.slice, ast.Constant)}


def enum_members_used(enum: str, *skip: str) -> set[str]:
    """``Enum.MEMBER`` attribute uses in the server's code outside ``skip``."""
    return {node.attr for _, tree in sources(*skip) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == enum}


# ==========================================================================
# 1. Configuration: README's table <-> the variables the server reads
# ==========================================================================

# Read from the environment but no setting: the gunicorn master writes it for its
# workers (gunicorn.conf.py), so that uptime is the server's, not a worker's.
INTERNAL_VARIABLES = {"WSCHAT_STARTED_AT"}
# Defaults the table gives as a multiple of another variable: the property that applies
# it (the field itself defaults to None, "derive it").
DERIVED_DEFAULTS = {"RATE_LIMIT_GUEST_IP": "guest_ip_rate",
                    "RATE_LIMIT_GUEST_IP_BURST": "guest_ip_burst",
                    "RATE_LIMIT_REQUESTS": "request_rate",
                    "RATE_LIMIT_REQUESTS_BURST": "request_burst"}


def config_table() -> dict[str, list[str]]:
    """README's configuration table: variable -> its row's cells."""
    rows = table(section(readme(), "## Configuration"), "variable", "default")
    found = {}
    for row in rows:
        names = ticked(row[0])
        assert len(names) == 1 and re.fullmatch(r"[A-Z][A-Z0-9_]*", names[0]), row[0]
        found[names[0]] = row
    return found


def settings_fields() -> dict[str, dataclasses.Field[Any]]:
    from wschat.config import Settings

    return {f.metadata["env"]: f for f in dataclasses.fields(Settings)}


def variables_read() -> dict[str, set[str]]:
    """Every environment variable the server reads -> where (Settings, or the files)."""
    found: dict[str, set[str]] = {name: {"Settings"} for name in settings_fields()}
    for path, tree in sources():
        for name in environment_reads(tree):
            found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_variable_the_server_reads_is_in_the_readme_table_and_back() -> None:
    """Settings' fields, and any other os.environ/getenv read in wschat/ or
    gunicorn.conf.py, are the README configuration table's variables, no more, no less."""
    documented = set(config_table())
    read = variables_read()
    assert {"PROMETHEUS_MULTIPROC_DIR", "WSCHAT_ECHO_ENDPOINT"} <= set(read)  # not vacuous
    missing = {n: sorted(w) for n, w in read.items()
               if n not in documented and n not in INTERNAL_VARIABLES}
    assert not missing, f"read by the server, missing from README's configuration table: {missing}"
    assert documented - set(read) == set(), "in README's configuration table, read by nothing"
    # The exemptions stay true: written by gunicorn.conf.py, never documented as settings.
    written = environment_writes(ast.parse((ROOT / "gunicorn.conf.py").read_text()))
    assert INTERNAL_VARIABLES <= written and not INTERNAL_VARIABLES & documented


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def test_documented_defaults_are_the_code_defaults() -> None:
    """The table's default of each setting is what Settings uses when it is unset: a
    literal (`8080`, `false`, `*`) parses to the field's default; "unset" is none; a
    multiple of another variable (10 x `RATE_LIMIT`) is what the setting then follows."""
    from wschat.config import Settings

    fields = settings_fields()
    checked = 0
    for name, row in config_table().items():
        default = row[1]
        literals = ticked(default)
        if name not in fields:  # read outside Settings, with .get(): unset by default
            assert default.lower().startswith("unset"), f"{name}: default {default!r}"
            continue
        field = fields[name]
        if default.lower().startswith("unset"):
            assert field.default in (None, ()), f"{name}: documented unset, code {field.default!r}"
        elif name in DERIVED_DEFAULTS:
            match = re.fullmatch(r"(?:(\d+) x )?`([A-Z_]+)`", default)
            assert match, f"{name}: default {default!r} is not 'N x `VARIABLE`'"
            factor, base = int(match.group(1) or 1), match.group(2)
            assert field.default is None, name
            prop = DERIVED_DEFAULTS[name]
            assert getattr(Settings(), prop) == factor * fields[base].default, name
            raw = "3"
            moved = Settings.from_env({base: raw})
            assert getattr(moved, prop) == factor * fields[base].metadata["parse"](raw), name
        elif len(literals) == 1 and default == f"`{literals[0]}`":
            parsed = field.metadata["parse"](literals[0])
            assert parsed == field.default, (
                f"{name}: README says {literals[0]!r}, the code's default is {field.default!r}")
        else:  # in words ("from the key"): computed at start, the field is unset
            assert field.default is None, f"{name}: default {default!r}, code {field.default!r}"
        checked += 1
    assert checked == len(fields), "a variable Settings reads is missing from the table"


_NUMBER = r"\d[\d,]*(?:\.\d+)?(?:e\d+)?"


def documented_ranges() -> dict[str, tuple[float | None, float | None]]:
    """variable -> (lowest, highest) the table's meaning column states: "A to B", "A-B",
    "at least A" (a number), with "(so are `X` and `Y`)" giving the same to others."""
    ranges: dict[str, tuple[float | None, float | None]] = {}
    for name, row in config_table().items():
        meaning = row[2]
        found: tuple[float | None, float | None] | None = None
        match = (re.search(rf"(?<![\w.\-/])({_NUMBER}) to ({_NUMBER})(?![\w\-])", meaning)
                 or re.search(r"(?<![\w.\-/])(\d+)-(\d+)(?![\w\-])", meaning))
        if match:
            found = (_number(match.group(1)), _number(match.group(2)))
        else:
            match = re.search(rf"\b[Aa]t least ({_NUMBER})(?![\w\-]| ?(?:characters|bytes))",
                              meaning)
            if match:
                found = (_number(match.group(1)), None)
        if found is None:
            continue
        ranges[name] = found
        also = re.search(r"\(so (?:is|are) ([^)]*)\)", meaning)
        for other in ticked(also.group(1)) if also else ():
            ranges[other] = found
    return ranges


# What start-up needs beside a variable to accept it (the combination checks of
# Settings._check): more than one worker needs Redis.
RANGE_CONTEXT = {"WEB_CONCURRENCY": {"REDIS_URL": "redis://localhost:6379/0"}}
# Bounds the table gives in words: the lowest MAX_INBOUND_BUFFER_BYTES start-up takes is
# MAX_MESSAGE_BYTES (checked with it), above the parser's own 256.
RANGES_IN_WORDS = {"MAX_INBOUND_BUFFER_BYTES": "At least `MAX_MESSAGE_BYTES`"}


def parser_bounds() -> dict[str, tuple[float | None, float | None]]:
    """variable -> (lowest, highest) its parser (config's _int or _float) accepts."""
    bounds = {}
    for name, field in settings_fields().items():
        parse = field.metadata["parse"]
        closure = getattr(parse, "__closure__", None) or ()
        cells = dict(zip(parse.__code__.co_freevars, (c.cell_contents for c in closure),
                         strict=True)) if closure else {}
        if {"lo", "hi"} <= set(cells) and (cells["lo"], cells["hi"]) != (None, None):
            bounds[name] = (cells["lo"], cells["hi"])
    return bounds


def test_every_bounded_variable_has_its_range_in_the_table() -> None:
    """A number start-up refuses outside a range has that range in the table (what an
    operator reads before setting it): HISTORY_SIZE=1000000 stopped the server with
    "must be <= 100000", which no row said. A lowest value of 0 and no highest (a
    count or a duration that only may not be negative) needs none."""
    bounds = parser_bounds()
    assert {"PORT", "HISTORY_SIZE", "RATE_LIMIT", "HEARTBEAT_INTERVAL"} <= set(bounds)
    documented, table_rows = documented_ranges(), config_table()
    problems = []
    for name, (low, high) in sorted(bounds.items()):
        if name in RANGES_IN_WORDS:
            if RANGES_IN_WORDS[name] not in table_rows[name][2]:
                problems.append(f"{name}: no {RANGES_IN_WORDS[name]!r}")
        elif (low, high) != (0, None) and documented.get(name) != (low, high):
            problems.append(f"{name}: the code takes {low} to {high}, "
                            f"README says {documented.get(name)}")
    assert not problems, "\n".join(problems)


def test_documented_ranges_are_the_validation() -> None:
    """Each range the table states is what start-up accepts: both ends parse, one step
    beyond either end stops the server naming the variable."""
    from wschat.config import ConfigError, Settings

    fields = settings_fields()
    ranges = documented_ranges()
    # Not vacuous: the ranges the table states today.
    assert {"RATE_LIMIT", "RATE_LIMIT_GUEST_IP", "RATE_LIMIT_REQUESTS", "RATE_LIMIT_BURST",
            "MAX_CONNECTIONS", "METRICS_PORT", "ROOM_TTL", "GRACEFUL_TIMEOUT"} <= set(ranges)
    problems = []
    for name, (low, high) in sorted(ranges.items()):
        assert name in fields, f"{name}: a range for a variable Settings does not read"
        integer = "int" in str(fields[name].type) and "float" not in str(fields[name].type)

        def raw(value: float, integer: bool = integer) -> str:
            return str(int(value)) if integer else repr(value)

        def accepted(value: float, name: str = name, raw: Any = raw) -> bool:
            try:
                Settings.from_env({**RANGE_CONTEXT.get(name, {}), name: raw(value)})
            except ConfigError as exc:
                assert str(exc).startswith(name), exc
                return False
            return True

        if low is not None:
            below = low - 1 if integer else low - (abs(low) / 2 or 1)
            if not accepted(low) or accepted(below):
                problems.append(f"{name}: README's lowest is {low:g}")
        if high is not None and (not accepted(high) or accepted(high * 2 if high else 1)):
            problems.append(f"{name}: README's highest is {high:g}")
    assert not problems, "\n".join(problems)


# ==========================================================================
# 2. Metrics: the series the code creates <-> docs/operations.md, README, the chart
# ==========================================================================

# The series table's label cell gives each label's values in backticks after "`label`:";
# for these series, the values the code knows in advance (it exports each from 0) are
# compared with the documented list. (depth: how deep in parentheses the list is.)
LABEL_VALUE_LISTS = {
    ("wschat_errors_total", "code"): ("wschat.protocol", "ErrorCode", 1),
    ("wschat_disconnects_total", "reason"): ("wschat.metrics", "DISCONNECT_REASONS", 0),
    ("wschat_handshakes_refused_total", "reason"): ("wschat.metrics", "REFUSAL_REASONS", 0),
    ("wschat_waiting_sockets_closed_total", "reason"): ("wschat.metrics",
                                                        "WAITING_CLOSE_REASONS", 0),
    ("wschat_auth_failures_total", "reason"): ("wschat.metrics", "AUTH_FAILURE_REASONS", 0),
    ("wschat_messages_received_total", "type"): ("wschat.metrics", "_WIRE_TYPES", 0),
    ("wschat_messages_delivered_total", "type"): ("wschat.metrics", "DELIVERED_TYPES", 0),
    ("wschat_messages_posted_total", "kind"): ("wschat.metrics", "POSTED_KINDS", 0),
}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


@pytest.fixture(scope="module")
def app() -> Iterator[Any]:
    """A started memory-backend app in this process (no server): building it registers
    every series, prometheus-flask-exporter's too, in the default registry."""
    from wschat import metrics, runtime
    from wschat.config import Settings
    from wschat.factory import create_app

    if metrics.MULTIPROCESS:
        pytest.skip("PROMETHEUS_MULTIPROC_DIR is set: the exporter's series are elsewhere")
    application = create_app(Settings())
    runtime.of(application).start()
    yield application
    runtime.of(application).stop(timeout=0)


@pytest.fixture(scope="module")
def series(app: Any) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every wschat_ series the server creates: exposed name -> (type, label names)."""
    from prometheus_client import REGISTRY
    from prometheus_client.metrics import MetricWrapperBase

    found = {}
    for collector in list(REGISTRY._collector_to_names):  # no public list of them
        if isinstance(collector, MetricWrapperBase) and collector._name.startswith("wschat_"):
            kind = collector._type
            name = collector._name + ("_total" if kind == "counter" else "")
            found[name] = (kind, tuple(collector._labelnames))
    assert {"wschat_connections_total", "wschat_http_request_total"} <= set(found)
    return found


def _split_top(text: str, separator: str = ";") -> list[str]:
    """``text`` split at ``separator``s outside parentheses."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == separator and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


def _ticked_at_depth(text: str, depth: int) -> list[str]:
    """Backticked names at exactly ``depth`` levels of parentheses."""
    names, level, i = [], 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "`":
            end = text.index("`", i + 1)
            if level == depth:
                names.append(text[i + 1:end])
            i = end + 1
            continue
        level += (ch == "(") - (ch == ")")
        i += 1
    return names


def documented_labels(cell: str) -> dict[str, list[str]]:
    """A series row's label cell -> label -> the values named at each depth (0, 1):
    "`a`, `b` (`x`, `y`)" (names only) or "`label`: `v1`, `v2`; `other`: ..."."""
    labels: dict[str, list[str]] = {}
    for part in _split_top(cell):
        match = re.match(r"\s*`(\w+)`\s*:(.*)", part, re.DOTALL)
        if match:
            labels[match.group(1)] = [_ticked_at_depth(match.group(2), d) for d in (0, 1)]
        else:
            for name in _ticked_at_depth(part, 0):
                labels[name] = [[], []]
    return labels


def documented_series() -> dict[str, tuple[str, dict[str, list[str]]]]:
    """docs/operations.md's series table: name -> (type, labels)."""
    rows = table(section(OPERATIONS.read_text(), "### Series"), "name", "type")
    found = {}
    for row in rows:
        names = ticked(row[0])
        assert len(names) == 1 and names[0].startswith("wschat_"), row[0]
        found[names[0]] = (row[1], documented_labels(row[2]))
    return found


def test_every_series_is_documented_with_its_type_and_labels(
        series: dict[str, tuple[str, tuple[str, ...]]]) -> None:
    """Each series wschat/metrics.py (or the HTTP exporter) creates is a row of
    docs/operations.md's table with its type and label names, and each row a series the
    code creates. (test_metrics checks the same against a live Redis cluster's scrape.)"""
    documented = documented_series()
    assert set(series) - set(documented) == set(), "created, missing from operations.md"
    assert set(documented) - set(series) == set(), "in operations.md, created by nothing"
    problems = []
    for name, (kind, labels) in series.items():
        doc_kind, doc_labels = documented[name]
        if doc_kind != kind:
            problems.append(f"{name}: documented as a {doc_kind}, created as a {kind}")
        if set(doc_labels) != set(labels):
            problems.append(f"{name}: documented labels {sorted(doc_labels)}, code {labels}")
    assert not problems, "\n".join(problems)


def test_documented_label_values_are_the_code_values() -> None:
    """Where the code knows a label's values in advance (error codes, disconnect and
    refusal reasons, request types, ...), the table lists exactly those."""
    import importlib

    documented = documented_series()
    problems = []
    for (name, label), (module, attr, depth) in LABEL_VALUE_LISTS.items():
        known = getattr(importlib.import_module(module), attr)
        if isinstance(known, dict):
            known = known.values()
        code = {getattr(v, "value", v) for v in known}
        listed = set(documented[name][1][label][depth])
        if listed != code:
            problems.append(f"{name}{{{label}}}: missing {sorted(code - listed)}, "
                            f"not in the code {sorted(listed - code)}")
    assert not problems, "\n".join(problems)


def _exists(name: str, series: dict[str, tuple[str, tuple[str, ...]]]) -> bool:
    if name in series:
        return True
    base, _, suffix = name.rpartition("_")
    return f"_{suffix}" in HISTOGRAM_SUFFIXES and series.get(base, ("",))[0] == "histogram"


def test_the_http_series_name_the_paths_they_leave_out(app: Any) -> None:
    """The HTTP request series' rows name every plain HTTP route the exporter leaves out
    (WebSocket routes are left out in words): their rows said only `/metrics`, and
    `/metrics/json`, a route a person or script polls, was never counted either."""
    from prometheus_client import REGISTRY

    def requests() -> float:
        return sum(sample.value for family in REGISTRY.collect()
                   if family.name == "wschat_http_request" for sample in family.samples
                   if sample.name == "wschat_http_request_total")

    client, left_out = app.test_client(), set()
    for path in sorted(NON_API_ROUTES - {"/ws", "/echo"}):
        before = requests()
        port = 8081 if path.startswith("/metrics") else 8080
        client.get(path, base_url=f"http://localhost:{port}")
        if requests() == before:
            left_out.add(path)
    assert "/metrics" in left_out and "/health" not in left_out  # not vacuous
    rows = table(section(OPERATIONS.read_text(), "### Series"), "name", "type")
    for row in rows:
        if ticked(row[0])[0] in ("wschat_http_request_total",
                                 "wschat_http_request_duration_seconds"):
            named = set(ticked(row[3]))
            assert left_out <= named, f"{row[0]}: left out, not named: {left_out - named}"


def test_docs_and_chart_name_only_series_that_exist(
        series: dict[str, tuple[str, tuple[str, ...]]]) -> None:
    """Every wschat_ series name README.md, docs/*.md (prose and ```promql blocks; other
    code blocks hold code, `from wschat_client import ...`) or any file of the chart
    (values, templates, alerts, dashboard) mentions is one the server creates (a
    histogram's _bucket/_count/_sum included)."""
    problems = []
    files = [README, *sorted((ROOT / "docs").glob("*.md")),
             *sorted(p for p in HELM.rglob("*") if p.is_file() and p.suffix != ".tgz")]
    for path in files:
        text = path.read_text()
        if path.suffix == ".md":
            text = re.sub(r"```(?!promql)[^\n]*\n.*?```", "", text, flags=re.DOTALL)
        for name in set(re.findall(r"(?<![\w/.-])(wschat_[a-z0-9_]+)", text)):
            if not _exists(name, series):
                problems.append(f"{path.relative_to(ROOT)}: {name}")
    assert not problems, "series that do not exist:\n" + "\n".join(sorted(problems))


def test_alerts_and_dashboard_read_existing_series_and_labels(
        series: dict[str, tuple[str, tuple[str, ...]]]) -> None:
    """Every selector of the chart's alert rules (rendered by Helm) and dashboard names a
    series the server creates, and matches only on labels that series has (or that
    Prometheus adds to every scraped series). Offline: test_monitoring checks label
    values against a live server's scrape."""
    import test_monitoring as monitoring
    from packaging_support import render

    queries = [(f"panel {title!r}", monitoring.grafana_to_promql(expr))
               for title, expr in monitoring.dashboard_queries()]
    queries += [(f"alert {rule['alert']}", rule["expr"])
                for rule in monitoring.rules_of(render(monitoring.ALERTS_ON))]
    assert len(queries) > 20
    problems = []
    for where, expr in queries:
        for name, matchers in monitoring.selectors(expr):
            if name in monitoring.KUBE_STATE_METRICS:
                continue
            if not _exists(name, series):
                problems.append(f"{where}: {name} does not exist")
                continue
            base = name if name in series else name.rpartition("_")[0]
            labels = set(series[base][1]) | monitoring.TARGET_LABELS | {"le"}
            for label, _, _ in matchers:
                if label not in labels:
                    problems.append(f"{where}: {name} has no label {label!r}")
    assert not problems, "\n".join(problems)


def test_readme_lists_every_alert_and_the_docs_name_only_alerts_that_exist() -> None:
    """README's "What an operator gets" names every alert the chart's PrometheusRule
    holds (rendered by Helm), and every Wschat... alert name in README.md, docs/*.md or
    the chart is one of them (WschatError is the Python exception, not an alert)."""
    import test_monitoring as monitoring
    from packaging_support import render

    alerts = {rule["alert"] for rule in monitoring.rules_of(render(monitoring.ALERTS_ON))}
    assert len(alerts) >= 9
    listed = {name for name in ticked(section(readme(), "### What an operator gets"))
              if re.fullmatch(r"Wschat[A-Z]\w+", name)}
    assert alerts - listed == set(), "alerts missing from README's list"
    files = [README, *sorted((ROOT / "docs").glob("*.md")),
             *sorted(p for p in HELM.rglob("*") if p.is_file())]
    named = {(path.relative_to(ROOT), name) for path in files
             for name in re.findall(r"\b(Wschat[A-Z]\w+)", path.read_text())}
    unknown = sorted(f"{path}: {name}" for path, name in named
                     if name not in alerts and name != "WschatError")
    assert not unknown, f"no such alert: {unknown}"


def _paths(value: Any, prefix: str = "") -> set[str]:
    """The dotted paths of every key of nested objects."""
    if not isinstance(value, dict):
        return set()
    return {p for k, v in value.items() for p in {prefix + k} | _paths(v, f"{prefix}{k}.")}


def test_metrics_port_paths_name_the_content_type_served(app: Any) -> None:
    """docs/operations.md's table of METRICS_PORT's paths gives the Content-Type each
    serves, as served (a scraper or proxy configured from it matches the header):
    `/metrics` said `text/plain; version=0.0.4`, without the `charset=utf-8` it has."""
    rows = {name: row for row in table(section(OPERATIONS.read_text(), "## Metrics"),
                                       "path", "what") for name in ticked(row[0])}
    client = app.test_client()
    for path, kind in (("/metrics", "text/plain"), ("/metrics/json", "application/json")):
        served = client.get(path, base_url="http://localhost:8081").headers["Content-Type"]
        assert served.startswith(kind), served
        named = [t for t in ticked(rows[path][1]) if t.startswith(kind)]
        assert named in ([], [served]), f"{path}: documented {named}, served {served!r}"


def test_metrics_json_example_has_the_served_fields(app: Any) -> None:
    """docs/operations.md's /metrics/json example has the fields the endpoint serves, and
    no other, down to the per-type counts (maps of codes or reasons seen so far, and the
    per-backend store figures, vary and are left out)."""
    block = section(OPERATIONS.read_text(), "### `/metrics/json`")
    documented = json.loads(re.search(r"```json\n(.*?)```", block, re.DOTALL).group(1))
    served = app.test_client().get("/metrics/json", base_url="http://localhost:8081").get_json()
    variable = ("errors", "disconnects", "handshakes_refused", "auth_failures",
                "store_ms_since_start")
    for body in (documented, served):
        for key in variable:
            assert isinstance(body.pop(key), dict), key
    assert _paths(served) - _paths(documented) == set(), "served, not in the example"
    assert _paths(documented) - _paths(served) == set(), "in the example, not served"


# ==========================================================================
# 3. Error codes: `error` codes, close codes, the server API's error codes
# ==========================================================================

def readme_error_codes() -> set[str]:
    return first_column(table(section(readme(), "### Error codes"), "code", "when"))


def test_every_error_code_is_in_the_readme_table_and_sent() -> None:
    """The README's error-code table is exactly ErrorCode's values; each is used by the
    server (outside the metrics, which only label them, and the HTTP API); and every
    `error` event is built by protocol.encode_error, from an ErrorCode, so no code can
    be sent as a bare string the enum does not know."""
    from wschat.protocol import ErrorCode

    codes = {code.value for code in ErrorCode}
    documented = readme_error_codes()
    assert codes - documented == set(), "sent as `error` codes, missing from README's table"
    assert documented - codes == set(), "in README's table, no such ErrorCode"
    used = enum_members_used("ErrorCode", "wschat/metrics.py", "wschat/api.py")
    unused = {code.value for code in ErrorCode if code.name not in used}
    assert unused == set(), "documented codes nothing sends"
    builders = [(path.relative_to(ROOT), node.lineno) for path, tree in sources()
                for node in ast.walk(tree) if isinstance(node, ast.Dict)
                and any(isinstance(k, ast.Constant) and k.value == "type"
                        and isinstance(v, ast.Constant) and v.value == "error"
                        for k, v in zip(node.keys, node.values, strict=True))]
    assert [str(path) for path, _ in builders] == ["wschat/protocol.py"], builders


def test_every_close_code_the_server_sends_is_in_the_readme_table() -> None:
    """Each CloseCode the server uses is a row of README's close-code table, and each row
    a CloseCode (1000 is the client's own, echoed)."""
    from wschat.protocol import CloseCode

    rows = table(section(readme(), "### Close codes"), "code", "meaning")
    documented = {int(row[0]) for row in rows if row[0].isdigit()}
    assert len(documented) >= 10
    used = {CloseCode[name].value for name in enum_members_used("CloseCode")}
    assert used - documented == set(), "sent, missing from README's close-code table"
    assert documented - {code.value for code in CloseCode} == set(), "documented, no CloseCode"


def close_calls() -> dict[int, set[str]]:
    """Close code -> the literal reasons the server's ``.close(code, "reason")`` calls
    give it (a CloseCode member or a bare integer)."""
    from wschat.protocol import CloseCode

    found: dict[int, set[str]] = {}
    for _, tree in sources():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "close" and len(node.args) >= 2):
                continue
            code, reason = node.args[:2]
            if (isinstance(code, ast.Attribute) and isinstance(code.value, ast.Name)
                    and code.value.id == "CloseCode"):
                number = CloseCode[code.attr].value
            elif isinstance(code, ast.Constant) and isinstance(code.value, int):
                number = code.value
            else:
                continue
            reasons = found.setdefault(number, set())
            if isinstance(reason, ast.Constant) and isinstance(reason.value, str):
                reasons.add(reason.value)
    return found


def test_close_code_rows_that_name_reasons_name_every_reason() -> None:
    """A close-code row that names the close frame's reasons (reason `...`) names every
    one the server sends with that code, and a code written as a bare integer is in the
    table too: 1013's row named three reasons but not `temporarily unavailable; retry`,
    sent from three places (one of them `ws.close(1013, ...)`, which the CloseCode check
    above does not see)."""
    calls = close_calls()
    assert "missed messages; join again" in calls[1013]  # not vacuous
    rows = {int(row[0]): row[1] for row in
            table(section(readme(), "### Close codes"), "code", "meaning") if row[0].isdigit()}
    assert set(calls) - set(rows) == set(), "sent, missing from README's close-code table"
    problems = [f"{code}: {sorted(reasons - set(ticked(rows[code])))}"
                for code, reasons in sorted(calls.items())
                if "reason `" in rows[code] and reasons - set(ticked(rows[code]))]
    assert not problems, f"reasons sent, not in their row: {problems}"


def api_error_codes() -> set[tuple[str, int]]:
    """(code, HTTP status) of every error the server API (or gunicorn, for a request it
    refuses before the app) can answer with."""
    from werkzeug.exceptions import MethodNotAllowed, NotFound

    from wschat import api, worker
    from wschat.protocol import ErrorCode, Limits, ProtocolError, parse_command

    found = set()
    tree = ast.parse((PACKAGE / "api.py").read_text())
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("ApiError", "_error") and len(node.args) >= 2):
            continue
        status, code = node.args[:2]
        if not isinstance(status, ast.Constant):
            continue  # the pass-throughs, below
        if isinstance(code, ast.Constant):
            found.add((code.value, status.value))
        else:  # ErrorCode.X.value
            assert (isinstance(code, ast.Attribute) and code.attr == "value"
                    and isinstance(code.value, ast.Attribute)), ast.dump(code)
            found.add((ErrorCode[code.value.attr].value, status.value))
    # The protocol's own refusals of what /api/publish and /api/dm are given (_parsed).
    limits = Limits()
    for frame in ({"type": "message", "room": "no room!", "text": "x"},
                  {"type": "message", "room": "r", "text": None},
                  {"type": "message", "room": "r", "text": "x" * (limits.max_text_chars + 1)},
                  {"type": "dm", "to": "system", "text": "x"}):
        with pytest.raises(ProtocolError) as refused:
            parse_command(json.dumps(frame), limits)
        code = refused.value.code
        found.add((code.value, api.STATUS.get(code, 400)))
    # A path or method the API does not have (api._http_error names werkzeug's).
    for exc in (NotFound(), MethodNotAllowed()):
        found.add((exc.name.lower().replace(" ", "_"), exc.code))
    # gunicorn's refusals (wschat.worker.write_refusal); another 5xx is internal_error.
    found |= {(code, status) for status, code in worker.REFUSED_REQUEST_CODES.items()}
    found.add(("internal_error", 500))
    return found


def test_every_api_error_code_is_in_the_readme_table_with_its_status() -> None:
    """README's server-API error table has every code the API can answer with, under
    its HTTP status, and only codes it can answer with."""
    rows = table(section(readme(), "## Server HTTP API"), "code", "status")
    documented: dict[str, set[int]] = {}
    for row in rows:
        for code in ticked(row[0]):
            documented.setdefault(code, set()).update(int(s) for s in
                                                      re.findall(r"\b[1-5]\d\d\b", row[1]))
    sent = api_error_codes()
    assert {("too_large", 413), ("not_found", 404), ("uri_too_long", 414)} <= sent
    missing = sorted(f"{code} ({status})" for code, status in sent
                     if status not in documented.get(code, set()))
    assert not missing, f"answered by the API, missing from README's table: {missing}"
    assert set(documented) - {code for code, _ in sent} == set(), "documented, never sent"


def test_every_api_status_mapping_is_reachable() -> None:
    """api.STATUS maps the protocol's refusals of what a call is given (api._parsed) to
    HTTP statuses: each code it maps is one the protocol's parsing raises. It mapped
    forbidden, user_not_found and unavailable too, which parse_command never raises (the
    API answers those itself: 404 in /api/dm, 503 from Unavailable): dead entries that
    suggested statuses no call gave."""
    from wschat import api
    from wschat.protocol import ErrorCode

    raised = set()
    for node in ast.walk(ast.parse((PACKAGE / "protocol.py").read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "ProtocolError" and node.args
                and isinstance(node.args[0], ast.Attribute)):
            raised.add(ErrorCode[node.args[0].attr])
    assert ErrorCode.MESSAGE_TOO_LARGE in raised
    unreachable = sorted(code.value for code in set(api.STATUS) - raised)
    assert not unreachable, f"api.STATUS maps codes the protocol never raises: {unreachable}"


# Where the routes that are not the server API's are documented (the OpenAPI document
# describes METRICS_PORT's /api/): README, by path. A new route fails until it is in the
# document or here (and in README).
NON_API_ROUTES = {"/", "/web/", "/ws", "/echo", "/health", "/ready", "/metrics",
                  "/metrics/json"}


def _api_views() -> tuple[dict[str, ast.FunctionDef], dict[str, ast.FunctionDef]]:
    """api.py's views (endpoint -> definition, in create_api) and module functions."""
    tree = ast.parse((PACKAGE / "api.py").read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    views = {f"api.{node.name}": node for node in ast.walk(functions["create_api"])
             if isinstance(node, ast.FunctionDef) and any(
                 isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute)
                 and isinstance(d.func.value, ast.Name) and d.func.value.id == "api"
                 for d in node.decorator_list)}
    return views, functions


def _statuses(node: ast.AST, functions: dict[str, ast.FunctionDef],
              seen: set[str] | None = None) -> set[int]:
    """The HTTP statuses the code under ``node`` answers with: ApiError's and _error's
    (api.STATUS's, and its default, for a status looked up there), and those of the
    module's functions it calls, transitively. 503 where a store is used (``stores``,
    ``access``: the blueprint answers Unavailable with 503)."""
    from wschat import api

    seen = set() if seen is None else seen
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and sub.id in ("stores", "access"):
            found.add(503)
        if not (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name)):
            continue
        name = sub.func.id
        if name in ("ApiError", "_error") and sub.args:
            status = sub.args[0]
            if isinstance(status, ast.Constant):
                found.add(status.value)
            else:  # STATUS.get(err.code, 400)
                assert ast.unparse(status).startswith("STATUS.get("), ast.unparse(status)
                found |= set(api.STATUS.values()) | {status.args[1].value}  # type: ignore
        elif name in functions and name not in seen:
            seen.add(name)
            found |= _statuses(functions[name], functions, seen)
    return found


def test_every_route_and_every_status_it_answers_is_documented(app: Any) -> None:
    """Walks the app's url_map: each route under /api is in the OpenAPI document with its
    methods, and each operation lists exactly the statuses its view can answer with (its
    own and its helpers', the API's guard's, 500 from its handler of any exception, 503
    where it uses a store); what any path may answer (404 for none, 405 with Allow for a
    method it does not take, 501 for a method HTTP does not define, gunicorn's refusals)
    is in components.responses; every other route is one README documents."""
    from wschat import api, worker
    from wschat.api import OPENAPI

    views, functions = _api_views()
    # The guard's answers, all but the API asked on PORT (the document is METRICS_PORT's).
    guard = next(node for node in ast.walk(functions["register_api"])
                 if isinstance(node, ast.FunctionDef) and node.name == "guard_api")
    port_check = next(node for node in guard.body if isinstance(node, ast.If)
                      and "SERVER_PORT" in ast.unparse(node.test))
    every_call = _statuses(guard, functions) - _statuses(port_check, functions) | {500}
    assert every_call == {401, 403, 413, 500}, every_call

    documented: dict[str, dict[str, Any]] = OPENAPI["paths"]
    served: dict[str, set[str]] = {}
    text = readme()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        if not path.startswith("/api/"):
            bare = re.sub(r"\{\w+\}$", "", path)
            assert bare in NON_API_ROUTES, f"{rule.rule}: a route in neither list"
            assert f"`{bare}" in text or f" {bare} " in text or f"{bare})" in text, bare
            continue
        assert path in documented, f"{rule.rule}: served, missing from the OpenAPI document"
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            served.setdefault(path, set()).add(method.lower())
            op = documented[path].get(method.lower())
            assert op is not None, f"{method} {path}: served, missing from the document"
            answers = _statuses(views[rule.endpoint], functions) | every_call
            listed = {int(status) for status in op["responses"]} - {200}
            assert answers - listed == set(), f"{method} {path}: answered, not listed"
            assert listed - answers == set(), f"{method} {path}: listed, never answered"
    assert served == {path: set(ops) for path, ops in documented.items()}

    # What any path may answer, and the operations' own answers, each once under
    # components.responses (with its headers), which the operations refer to.
    responses = OPENAPI["components"]["responses"]
    anywhere = {404, 405, 501, *worker.REFUSED_REQUEST_CODES}  # no route, no method, gunicorn
    every = anywhere | {int(s) for ops in documented.values() for op in ops.values()
                        for s in op["responses"]} - {200}
    assert every - set(api.RESPONSES) == set(), "answered, not in components.responses"
    named = {status: api.RESPONSES[status][0] for status in every}
    assert set(responses) == set(named.values()), "components.responses no status uses"
    for status, name in named.items():
        assert responses[name]["description"].startswith(f"{status}: "), name
        if status in anywhere:
            assert "Any path: " in responses[name]["description"], name
    for ops in documented.values():
        for op in ops.values():
            for status, response in op["responses"].items():
                if status != "200":
                    assert response == {"$ref": f"#/components/responses/{named[int(status)]}"}
    for status, header in ((401, "WWW-Authenticate"), (405, "Allow"), (503, "Retry-After")):
        assert header in responses[named[status]].get("headers", {}), (status, header)

# ==========================================================================
# 4. Protocol types: README's client -> server and server -> client tables
# ==========================================================================

def parse_command_types() -> set[str]:
    """The ``type``s protocol.parse_command compares ``kind`` with."""
    tree = ast.parse((PACKAGE / "protocol.py").read_text())
    function = next(node for node in ast.walk(tree)
                    if isinstance(node, ast.FunctionDef) and node.name == "parse_command")
    types = set()
    for node in ast.walk(function):
        if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Name)
                and node.left.id == "kind"):
            for right in node.comparators:
                elements = (right.elts if isinstance(right, (ast.Tuple, ast.Set, ast.List))
                            else [right])
                types |= {e.value for e in elements if isinstance(e, ast.Constant)
                          and isinstance(e.value, str)}
    return types


def test_every_command_parse_command_accepts_is_in_the_readme_table() -> None:
    """The client -> server table is exactly what parse_command accepts: each documented
    type parses (or is refused for its fields, never as unknown_type), and each type the
    parser knows is documented."""
    from wschat.protocol import ErrorCode, ProtocolError, parse_command

    documented = first_column(table(section(readme(), "### Client -> server"), "type", "fields"))
    accepted = parse_command_types()
    assert {"auth", "join", "message", "kick"} <= accepted  # not vacuous
    assert accepted - documented == set(), "parsed, missing from README's client -> server table"
    assert documented - accepted == set(), "in README's client -> server table, not parsed"
    for kind in documented | {"no_such_type"}:
        try:
            parse_command(json.dumps({"type": kind}))
        except ProtocolError as exc:
            assert (exc.code == ErrorCode.UNKNOWN_TYPE) == (kind == "no_such_type"), kind


def _event_type(node: ast.AST) -> str | None:
    """The event type a node builds: {"type": "x", ...}, encode_reply("x", ...), or a
    prebuilt frame's bytes b'{"type":"x",...'."""
    if isinstance(node, ast.Dict):
        for key, value in zip(node.keys, node.values, strict=True):
            if (isinstance(key, ast.Constant) and key.value == "type"
                    and isinstance(value, ast.Constant) and isinstance(value.value, str)):
                return value.value
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "encode_reply" and node.args
            and isinstance(node.args[0], ast.Constant)):
        return node.args[0].value
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
        text = (node.value.decode("latin-1") if isinstance(node.value, bytes)
                else node.value)
        match = re.match(r'\{"type": ?"(\w+)"', text)
        return match.group(1) if match else None
    return None


def server_event_types() -> dict[str, set[str]]:
    """Every event type the server builds -> the modules that build it. The server API
    (its OpenAPI schemas' "type"s, the commands it builds) and the terminal client (which
    sends commands) build no events."""
    found: dict[str, set[str]] = {}
    for path, tree in sources("wschat/api.py", "wschat/__main__.py", "wschat/terminal.py"):
        for node in ast.walk(tree):
            kind = _event_type(node)
            if kind:
                found.setdefault(kind, set()).add(str(path.relative_to(ROOT)))
    for path in PACKAGE.rglob("*.lua"):  # the stores' scripts (Redis) could build frames too
        for kind in re.findall(r'\{\\?"type\\?": ?\\?"(\w+)', path.read_text()):
            found.setdefault(kind, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_event_the_server_sends_is_in_the_readme_table() -> None:
    """The server -> client table is exactly the event types the server builds."""
    documented = first_column(table(section(readme(), "### Server -> client"), "type", "fields"))
    built = server_event_types()
    assert {"welcome", "message", "dm", "error", "moderated"} <= set(built)  # not vacuous
    missing = {kind: sorted(where) for kind, where in built.items() if kind not in documented}
    assert not missing, f"sent, missing from README's server -> client table: {missing}"
    assert documented - set(built) == set(), "in README's server -> client table, never sent"


# ==========================================================================
# 5. The names the seed README and SPEC.md fixed: never renamed, never dropped
# ==========================================================================

# Copied from the seed README (shared/seed/wschat-seed-README.md) and the contract that
# extends it (shared/design/SPEC.md), neither of which ships in the repository. The
# checks above keep code and docs in step; these keep both on the original names, which
# a rename made in both places at once would otherwise pass.
SEED_DEFAULTS = {"HOST": "0.0.0.0", "PORT": "8080", "MAX_CONNECTIONS": "10000",
                 "RATE_LIMIT": "10", "HEARTBEAT_INTERVAL": "30", "ENABLE_PERSISTENCE": "false",
                 "METRICS_PORT": "8081", "HISTORY_SIZE": "100", "MAX_MESSAGE_BYTES": "65536",
                 "MAX_OUTBOUND_BYTES": "1048576", "PRESENCE_TTL": "30"}
SEED_VARIABLES = {*SEED_DEFAULTS, "DATABASE_URL", "REDIS_URL", "ALLOWED_ORIGINS", "LOG_FORMAT",
                  "WEB_CONCURRENCY", "JWT_SECRET", "JWT_PUBLIC_KEY", "JWT_JWKS_URL",
                  "JWT_ALGORITHMS", "JWT_AUDIENCE", "JWT_ISSUER", "JWT_LEEWAY", "AUTH_REQUIRED"}
SEED_COMMANDS = {"auth", "join", "leave", "message", "dm", "typing", "list_users", "history",
                 "ping"}
SEED_EVENTS = {"welcome", "joined", "message", "presence", "typing", "error", "pong", "left",
               "users", "history", "dm"}
SEED_ERROR_CODES = {"invalid_json", "invalid_message", "unknown_type", "auth_required",
                    "auth_failed", "token_expired", "not_in_room", "invalid_room",
                    "rate_limited", "message_too_large", "too_many_rooms", "user_not_found"}
SEED_SERIES = {"wschat_connections_total", "wschat_rooms_total", "wschat_room_members_total",
               "wschat_uptime_seconds"}
SEED_JSON_FIELDS = {"connections", "rooms", "total_memberships", "timestamp"}


def test_the_seed_and_spec_names_are_kept(
        app: Any, series: dict[str, tuple[str, tuple[str, ...]]]) -> None:
    """Every variable (with the seed's default), command, event, error code, series and
    /metrics/json field the seed or SPEC.md names is still documented and still in the
    code, under the same name."""
    from wschat.protocol import ErrorCode

    text = readme()
    variables = config_table()
    fields = settings_fields()
    assert SEED_VARIABLES - set(variables) == set(), "dropped from README's table"
    assert SEED_VARIABLES - set(fields) == set(), "no longer read by Settings"
    for name, default in SEED_DEFAULTS.items():
        field = fields[name]
        assert field.metadata["parse"](default) == field.default, f"{name}: not the seed's"
    assert SEED_COMMANDS - parse_command_types() == set(), "no longer parsed"
    assert SEED_COMMANDS - first_column(
        table(section(text, "### Client -> server"), "type", "fields")) == set(), "undocumented"
    assert SEED_EVENTS - set(server_event_types()) == set(), "no longer sent"
    assert SEED_EVENTS - first_column(
        table(section(text, "### Server -> client"), "type", "fields")) == set(), "undocumented"
    assert SEED_ERROR_CODES - {code.value for code in ErrorCode} == set(), "gone from the code"
    assert SEED_ERROR_CODES - readme_error_codes() == set(), "undocumented"
    gauges = {n for n, (kind, _) in series.items() if kind == "gauge"}
    assert SEED_SERIES - gauges == set(), "no longer gauges the server creates"
    assert SEED_SERIES - set(documented_series()) == set(), "undocumented"
    served = app.test_client().get("/metrics/json", base_url="http://localhost:8081").get_json()
    assert SEED_JSON_FIELDS - set(served) == set(), "no longer in /metrics/json"


# ==========================================================================
# 6. Code the docs point at: `name` in `file.py`, and dotted `wschat.x.y` names
# ==========================================================================

# Backticked dotted names that are no Python names (the SQLite file's default name).
NOT_PYTHON_NAMES = {"wschat.db"}


def test_code_the_docs_point_at_exists() -> None:
    """Every "`name` in `path.py`" of README.md and docs/*.md names a file that defines
    or uses that name, and every backticked `wschat.module.name` resolves: "`_admit()` in
    `wschat/factory.py`" (docs/conformance.md) outlived the function by a refactor that
    moved admission to wschat/routes.py and wschat/admission.py."""
    import importlib

    problems, checked = [], 0
    for path in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        where = path.relative_to(ROOT)
        pointers = re.findall(r"`([A-Za-z_][\w.]*)(?:\(\))?` in `([\w/.]+\.py)`", text)
        checked += len(pointers)
        for name, file in pointers:
            target = ROOT / file
            last = name.rsplit(".", 1)[-1]
            if not target.is_file() or not re.search(rf"\b{re.escape(last)}\b",
                                                     target.read_text()):
                problems.append(f"{where}: `{name}` in `{file}`")
        for dotted in set(re.findall(r"`(wschat(?:\.[A-Za-z_]\w*)+)(?:\(\))?`", text)):
            if dotted in NOT_PYTHON_NAMES:
                continue
            parts = dotted.split(".")
            for split in range(len(parts), 0, -1):
                try:
                    found: Any = importlib.import_module(".".join(parts[:split]))
                except ImportError:
                    continue
                break
            for attr in parts[split:]:
                found = getattr(found, attr, None)
            if found is None:
                problems.append(f"{where}: `{dotted}`")
    assert checked >= 4  # not vacuous
    assert not problems, "the docs name code that is not there:\n" + "\n".join(problems)
