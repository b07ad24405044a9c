#!/usr/bin/env bash
# Rebuilds the JavaScript client library (clients/js) and copies its browser bundle to
# wschat/web/wschat-client.js, which the Python package ships with the page (no Node at
# run time). tests/test_web_bundle.py fails when the copy is older than clients/js/src.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d clients/js/node_modules ] || (cd clients/js && npm ci --no-audit --no-fund)
(cd clients/js && npm run --silent build >/dev/null)
sed '/^\/\/# sourceMappingURL=/d' clients/js/dist/wschat-client.browser.js > wschat/web/wschat-client.js
echo "wschat/web/wschat-client.js: $(wc -c < wschat/web/wschat-client.js) bytes"
