#!/usr/bin/env bash
# The full benchmark session behind RESULTS.md: every scenario against every target,
# one after the other on this machine. Not part of CI (about 45 minutes). Each step is
# bounded by `timeout`; the JSON reports land in loadtest/results/, progress on stdout.
# The machine is shared with other jobs (test suites): the runs go at nice -10 so those
# steal less of the two cores; every phase still records what the rest of the machine used.
set -uo pipefail
cd "$(dirname "$0")/.."
R=loadtest/results
mkdir -p "$R"
TARGETS=${TARGETS:-all}
run() { echo "### $(date -u +%FT%TZ) $*"; uptime; timeout 1500 nice -n -10 python -m loadtest "$@"; echo "### exit $?"; }

run idle   --target "$TARGETS" -n 10000 -r 100 --idle-window 20 --json "$R/idle.json"
run fanout --target "$TARGETS" -n 10000 -r 100 --rate 100,300,1000,2000 -d 8 --json "$R/fanout-100x100.json"
run fanout --target "$TARGETS" -n 1000 -r 1 --rate 10,30,100,200 -d 8 --json "$R/fanout-1x1000.json"
run churn  --target "$TARGETS" -n 1000 -r 100 --churn-rate 200 -d 20 --json "$R/churn.json"
run slow   --target "$TARGETS" -n 200 -r 10 --rate 1000 --size 2000 -d 15 --json "$R/slow.json"
python -m loadtest plot "$R"/idle.json "$R"/fanout-*.json --out "$R"
for f in idle fanout-100x100 fanout-1x1000 churn slow; do python -m loadtest report "$R/$f.json" > "$R/$f.md"; done
