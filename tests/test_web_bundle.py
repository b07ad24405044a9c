"""The page's copy of the JavaScript client library is the build of clients/js.

The Python package ships wschat/web/wschat-client.js (no Node at run time); it must be
what clients/js builds from its sources today. After changing clients/js, run
``scripts/update-web-bundle.sh``. Needs Node and npm (clients/js's dev dependencies are
installed with ``npm ci`` if missing): without them this test skips outside CI and fails
under ``CI=true``.
"""

from __future__ import annotations

import shutil
import subprocess

from conftest import ROOT, TIMEOUT, service_unavailable

CLIENT = ROOT / "clients" / "js"
SHIPPED = ROOT / "wschat" / "web" / "wschat-client.js"


def without_source_map(code: str) -> str:
    return "".join(line for line in code.splitlines(keepends=True)
                   if not line.startswith("//# sourceMappingURL="))


def test_shipped_bundle_is_the_build_of_clients_js() -> None:
    """wschat/web/wschat-client.js equals clients/js's fresh browser build (minus its map link)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        service_unavailable("node and npm are needed to build clients/js")
    if not (CLIENT / "node_modules" / "esbuild").is_dir():
        # The lockfile's dev dependencies, as clients/js's own test command installs them.
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=CLIENT, check=True,
                       capture_output=True, timeout=60 * TIMEOUT)
    subprocess.run([node, "scripts/build.mjs"], cwd=CLIENT, check=True, capture_output=True,
                   timeout=60 * TIMEOUT)
    built = without_source_map((CLIENT / "dist" / "wschat-client.browser.js").read_text())
    assert SHIPPED.read_text() == built, (
        "wschat/web/wschat-client.js is not the build of clients/js/src: "
        "run scripts/update-web-bundle.sh and commit the result")
