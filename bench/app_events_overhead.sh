#!/usr/bin/env bash
# Benchmark: webhook ingestion with app events delivered (APP_EVENTS=on: to the local verifying
# receiver) against app events only stored (off), in one run, alternating so that the machine's
# drift falls on both alike. Prints each run's lines and the medians.
#
#   BIN_DIR=$CARGO_TARGET_DIR/release bench/app_events_overhead.sh
#   RUNS=5 BACKEND=sqlite bench/app_events_overhead.sh
#   RECEIVER_VERIFY=0 bench/app_events_overhead.sh   # a receiver that only counts: billsync's
#                                                    # own cost, not the receiver's
#
# Needs what bench/webhooks.sh needs, and Node for the receiver.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-3}"
if [ -z "${BIN_DIR:-}" ]; then
  cargo build --release --quiet --bin billsync --example webhook_load
  export BIN_DIR="${CARGO_TARGET_DIR:-target}/release"
fi
RESULTS="$(mktemp)"
trap 'rm -f "$RESULTS"' EXIT
for run in $(seq 1 "$RUNS"); do
  for mode in off on; do
    out="$(APP_EVENTS=$mode bench/webhooks.sh 2>/dev/null)"
    ack=$(sed -n 's/^64 connections: \([0-9.]*\) acknowledged.*/\1/p' <<<"$out")
    live=$(sed -n 's/^applier while ingesting: .* s, \([0-9]*\) events\/s/\1/p' <<<"$out")
    drain=$(sed -n 's/^applier after ingestion: .* at \([0-9]*\) events\/s/\1/p' <<<"$out")
    echo "run $run, app events $mode: acknowledged $ack/s at 64 connections; applied $live/s while ingesting, $drain/s after"
    grep '^app events:' <<<"$out"
    echo "$mode $ack $live $drain" >> "$RESULTS"
  done
done
python3 - "$RESULTS" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
def column(mode, i):
    return [float(r[i]) for r in rows if r[0] == mode and len(r) > i]
for i, name in [(1, "acknowledged/s at 64 connections"), (2, "applied/s while ingesting"), (3, "applied/s after ingestion")]:
    off, on = column("off", i), column("on", i)
    if not off or not on:
        continue
    mo, mn = statistics.median(off), statistics.median(on)
    print(f"{name}: off median {mo:,.0f} (range {min(off):,.0f}-{max(off):,.0f}), "
          f"on median {mn:,.0f} (range {min(on):,.0f}-{max(on):,.0f}); on/off {mn / mo:.1%}")
PY
