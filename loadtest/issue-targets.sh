#!/usr/bin/env bash
# The side-by-side run behind issue 18's targets, one scenario after the other in one session:
#
#   idle        wschat, node-ws, bun           4,000 joined connections (memory per connection)
#   smallrooms  wschat, wschat-redis, node-ws, bun   rooms of 2-5 + DMs, published msgs per server CPU-s
#   fanout      wschat, wschat-redis, node-ws, bun   1 room x 1,000 at 100k deliveries/s
#   fanout      wschat, wschat-redis           10,000 connections, 100 x 100 at 30k deliveries/s (p99)
#
# Usage: bash loadtest/issue-targets.sh OUT_DIR      (about 12-20 minutes; JSON reports into OUT_DIR)
#   SCALE=0.1 bash loadtest/issue-targets.sh /tmp/x  (a rehearsal: connections, rates and durations
#                                                     scaled down, ~3 minutes)
#   PYTHON=...   the interpreter with wschat and .[loadtest] installed [.venv/bin/python]
#   LOCK=...     each scenario runs under `flock $LOCK` [/work/heavy.lock if it exists; LOCK= for none]
#
# wschat-redis gets a private redis-server on a free port (no persistence), stopped on exit.
# Needs: `python -m loadtest setup-peers` done (node-ws, bun), redis-server on PATH.
set -euo pipefail

OUT=${1:?usage: $0 OUT_DIR}
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SCALE=${SCALE:-1}
if [[ -z ${LOCK+x} ]]; then LOCK=$([[ -e /work/heavy.lock ]] && echo /work/heavy.lock || true); fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# n(x): x scaled, at least $2 (default 1), as an integer
n() { "$PY" -c "import sys; print(max(int(sys.argv[2]), round(float(sys.argv[1]) * $SCALE)))" "$1" "${2:-1}"; }
secs() { "$PY" -c "import sys; print(max(2.0, round(float(sys.argv[1]) * $SCALE, 1)))" "$1"; }

"$PY" -m loadtest setup-peers --check
command -v redis-server >/dev/null || { echo "redis-server not found" >&2; exit 1; }

# -- a private Redis for wschat-redis -----------------------------------------------------------
RDIR=$(mktemp -d /tmp/issue-targets-redis.XXXXXX)
RPORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
stop_redis() {
    if [[ -f $RDIR/redis.pid ]]; then kill "$(cat "$RDIR/redis.pid")" 2>/dev/null || true; fi
    sleep 0.5
    rm -rf "$RDIR"
}
trap stop_redis EXIT
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --dir "$RDIR" --pidfile "$RDIR/redis.pid" --logfile "$RDIR/redis.log"
for _ in $(seq 50); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
REDIS_URL="redis://127.0.0.1:$RPORT/14"
echo "# private redis-server on port $RPORT; reports into $OUT; SCALE=$SCALE; started $(date -u +%FT%TZ)"

run() {  # run NAME ARGS...: one scenario, its report in $OUT/NAME.json
    local name=$1; shift
    echo
    echo "######## $name: python -m loadtest $* ($(date -u +%T))"
    # A run with a problem (exit 1) is reported and the session goes on.
    ${LOCK:+flock "$LOCK"} "$PY" -m loadtest "$@" --redis-url "$REDIS_URL" --json "$OUT/$name.json" \
        || echo "######## $name: exit status $? (see its report's problems)"
}

T0=$(date +%s)
run idle idle --target wschat,node-ws,bun -n "$(n 4000 40)" -r "$(n 40 2)" \
    --idle-window "$(secs 10)" --settle "$(secs 2)"
run smallrooms smallrooms --target wschat,wschat-redis,node-ws,bun -n "$(n 2000 40)" \
    --rate "$(n 2000 40)" -d "$(secs 8)" --warmup "$(secs 2)"
run fanout-1x1000 fanout --target wschat,wschat-redis,node-ws,bun -n "$(n 1000 20)" -r 1 \
    --rate 100 -d "$(secs 8)" --warmup "$(secs 2)"
run fanout-100x100 fanout --target wschat,wschat-redis -n "$(n 10000 100)" -r 100 \
    --rate 300 -d "$(secs 8)" --warmup "$(secs 2)"
echo
echo "######## done in $(( $(date +%s) - T0 )) s; reports in $OUT:"
ls -1 "$OUT"/*.json
echo
"$PY" -m loadtest report "$OUT"/*.json
