"""Helpers for tests/test_packaging.py: read the Dockerfile, render the chart.

Kept apart from the tests so that the tests read as statements about the
image and the chart. Nothing here needs Docker, a cluster or the helm binary.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = ROOT / "helm"
CI_VALUES_DIR = CHART_DIR / "ci"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"
# The image's dependencies, pinned with hashes; the Dockerfile installs exactly these.
IMAGE_LOCK = ROOT / "requirements" / "image.txt"
# The command that writes IMAGE_LOCK, as pip-compile records it in the file's header.
# Run from the repository root under the image's Python (docs/deployment.md).
LOCK_COMMAND = ("pip-compile --all-build-deps --allow-unsafe --extra=postgres --extra=redis "
                "--generate-hashes "
                "--output-file=requirements/image.txt --strip-extras pyproject.toml")
SERVICEMONITOR_SCHEMA = CI_VALUES_DIR / "servicemonitor-v1.schema.json"
PROMETHEUSRULE_SCHEMA = CI_VALUES_DIR / "prometheusrule-v1.schema.json"
# Prometheus Operator kinds the chart renders, and the schema each is checked against.
OPERATOR_SCHEMAS = {"ServiceMonitor": SERVICEMONITOR_SCHEMA, "PrometheusRule": PROMETHEUSRULE_SCHEMA}

RELEASE = "wschat"
NAMESPACE = "chat"


def require_modules(modules: tuple[str, ...], checks: str) -> None:
    """Skip the calling test module when a tool it needs is not installed; under
    CI=true fail instead (raise at import), so CI never passes by skipping."""
    missing = []
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        reason = f"{checks} need {', '.join(missing)} (pip install -e '.[test]')"
        if os.environ.get("CI", "").lower() == "true":
            raise ImportError(reason)
        pytest.skip(reason, allow_module_level=True)


# --------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------


@dataclass
class Stage:
    """One FROM ... [AS name] stage: its instructions as (KEYWORD, argument) pairs."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def arg_default(self, stage: Stage, name: str) -> str | None:
        for arg in stage.all("ARG") + [f"{k}={v}" for k, v in self.global_args.items()]:
            key, _, value = arg.partition("=")
            if key.strip() == name:
                return value.strip().strip('"') if _ else None
        return None


def _logical_lines(text: str) -> Iterator[str]:
    """Instructions with backslash continuations joined and comments dropped."""
    buffer = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        if buffer.strip():
            yield buffer.strip()
        buffer = ""
    if buffer.strip():
        yield buffer.strip()


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text()):
        keyword, _, argument = line.partition(" ")
        keyword = keyword.upper()
        argument = argument.strip()
        if keyword == "FROM":
            words = argument.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            if keyword == "ARG":
                key, _, value = argument.partition("=")
                global_args[key.strip()] = value.strip().strip('"')
        else:
            stages[-1].instructions.append((keyword, argument))
    return Dockerfile(global_args=global_args, stages=stages)


def exec_form(argument: str) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD."""
    value = json.loads(argument)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), argument
    return value


def healthcheck_command(argument: str) -> list[str]:
    """The command of `HEALTHCHECK [--options] CMD [...]`."""
    head, sep, tail = argument.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {argument!r}"
    return exec_form(tail.strip())


def copy_sources(stage: Stage) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context (no --from)."""
    copies = []
    for argument in stage.all("COPY"):
        words = shlex.split(argument)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        copies.append((words[:-1], words[-1]))
    return copies


def substitute(text: str, variables: dict[str, str]) -> str:
    for key, value in variables.items():
        text = text.replace("${" + key + "}", value).replace("$" + key, value)
    return text


# --------------------------------------------------------------------------
# The image's lock (requirements/image.txt)
# --------------------------------------------------------------------------


@dataclass
class Lock:
    """A pip-compile output: its header comment, its pins and their hashes."""

    header: str
    pins: dict[str, str]  # canonical project name -> exact version
    hashes: dict[str, list[str]]
    options: list[str]  # lines such as --find-links, --index-url or -e, which it must not hold


def parse_lock(path: Path = IMAGE_LOCK) -> Lock:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lines = path.read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    pins: dict[str, str] = {}
    hashes: dict[str, list[str]] = {}
    options: list[str] = []
    for entry in _logical_lines("\n".join(lines)):
        if entry.startswith("-"):
            options.append(entry)
            continue
        spec, *hash_options = entry.split(" --hash=")
        requirement = Requirement(spec.split(" #")[0].strip())
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", \
            f"{path.name}: {spec!r} is not an exact pin"
        name = canonicalize_name(requirement.name)
        pins[name] = specifiers[0].version
        hashes[name] = [h.strip() for h in hash_options]
    return Lock(header="\n".join(header), pins=pins, hashes=hashes, options=options)


def lock_extras(command: str = LOCK_COMMAND) -> list[str]:
    """The extras of pyproject.toml that the lock (and so the image) includes."""
    return sorted(word.split("=", 1)[1] for word in command.split() if word.startswith("--extra="))


# --------------------------------------------------------------------------
# Chart
# --------------------------------------------------------------------------


def load_values_file(name: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((CI_VALUES_DIR / name).read_text()) or {}


@dataclass
class Rendered:
    """A rendered release: template outputs and the parsed manifests."""

    templates: dict[str, str]
    manifests: list[dict[str, Any]]

    @property
    def notes(self) -> str:
        return next((t for k, t in self.templates.items() if k.endswith("NOTES.txt")), "")

    def template(self, suffix: str) -> str:
        matches = [t for k, t in self.templates.items() if k.endswith("/templates/" + suffix)]
        assert len(matches) == 1, f"template {suffix}: {len(matches)} matches"
        return matches[0]

    def kinds(self) -> list[str]:
        return sorted(m["kind"] for m in self.manifests)

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.manifests if m["kind"] == kind]

    def get(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [m for m in self.all(kind) if name is None or m["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind} {name or ''}: {len(found)} rendered, kinds: {self.kinds()}"
        return found[0]

    def deployment(self, component: str = "server") -> dict[str, Any]:
        found = [
            m for m in self.all("Deployment")
            if m["metadata"]["labels"].get("app.kubernetes.io/component") == component
        ]
        assert len(found) == 1, f"Deployment of {component}: {len(found)} rendered"
        return found[0]

    def container(self, component: str = "server") -> dict[str, Any]:
        return self.deployment(component)["spec"]["template"]["spec"]["containers"][0]

    def config_map(self) -> dict[str, Any]:
        """The server's environment ConfigMap (not the Grafana dashboard's)."""
        found = [m for m in self.all("ConfigMap")
                 if "grafana_dashboard" not in m["metadata"]["labels"]]
        assert len(found) == 1, f"environment ConfigMaps: {len(found)} rendered"
        return found[0]

    def config_env(self) -> dict[str, str]:
        return dict(self.config_map()["data"])

    def secret_data(self) -> dict[str, str]:
        secrets = self.all("Secret")
        if not secrets:
            return {}
        return {k: base64.b64decode(v).decode() for k, v in secrets[0].get("data", {}).items()}


def render(values: dict[str, Any] | None = None, *, name: str = RELEASE,
           chart_dir: Path = CHART_DIR) -> Rendered:
    import helm_python
    import yaml

    chart = helm_python.Chart.load(str(chart_dir))
    try:
        templates = chart.render(values or {}, name=name, namespace=NAMESPACE, is_install=True)
    finally:
        with contextlib.suppress(Exception):
            chart.close()
    manifests: list[dict[str, Any]] = []
    for path, text in sorted(templates.items()):
        if path.endswith("NOTES.txt") or "/templates/_" in path:
            continue
        for document in yaml.safe_load_all(text):
            if document:
                manifests.append(document)
    return Rendered(templates=templates, manifests=manifests)


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def http_body(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode("utf-8", "replace")


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1,
               message: str = "condition", alive: Callable[[], bool] | None = None) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` s or if ``alive`` turns false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if alive is not None and not alive():
            raise AssertionError(f"process exited while waiting for {message}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message}")


def process_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def environ_for(path_dirs: list[str], extra: dict[str, str]) -> dict[str, str]:
    """A small, explicit environment like a container's (no venv or CI leakage)."""
    env = {
        "PATH": os.pathsep.join(path_dirs + ["/usr/local/bin", "/usr/bin", "/bin"]),
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "HOME": "/nonexistent",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.update(extra)
    return env
