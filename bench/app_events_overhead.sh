#!/usr/bin/env bash
# Benchmark: webhook ingestion with app events delivered (APP_EVENTS=on: to the local verifying
# receiver) against app events only stored (off), in one run, alternating so that the machine's
# drift falls on both alike. Prints each run's lines and the medians.
#
#   BIN_DIR=$CARGO_TARGET_DIR/release bench/app_events_overhead.sh
#   RUNS=5 BACKEND=sqlite bench/app_events_overhead.sh
#   RECEIVER_VERIFY=0 bench/app_events_overhead.sh   # a receiver that only counts: billsync's
#                                                    # own cost, not the receiver's
#   APP_RECEIVER=count bench/app_events_overhead.sh  # webhook_load's Rust counting receiver:
#                                                    # an app on another machine, nearly
#
# Runs alternate ABBA (off-on, on-off, ...). Needs what bench/webhooks.sh needs, and Node for the receiver.
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
  # ABBA: odd runs measure off first, even runs on first, so that whatever one run leaves
  # behind for the next (a checkpoint, autovacuum of the dropped database) falls on both.
  if [ $((run % 2)) = 1 ]; then order="off on"; else order="on off"; fi
  for mode in $order; do
    if [ "${BACKEND:-postgres}" = postgres ]; then
      psql -qAt "${PGURL_BASE:-postgres://postgres@127.0.0.1:5432}/postgres" -c CHECKPOINT >/dev/null
    fi
    out="$(APP_EVENTS=$mode bench/webhooks.sh 2>/dev/null)"
    ack=$(sed -n 's/^64 connections: \([0-9.]*\) acknowledged.*/\1/p' <<<"$out")
    live=$(sed -n 's/^applier while ingesting: .* s, \([0-9]*\) events\/s/\1/p' <<<"$out")
    drain=$(sed -n 's/^applier after ingestion: .* at \([0-9]*\) events\/s/\1/p' <<<"$out")
    # billsync's own CPU (server and Postgres) per acknowledged event in the burst.
    own=$(sed -n 's/^CPU per acknowledged event.*: server \([0-9.]*\) us, postgres \([0-9.]*\) us.*/\1 \2/p' <<<"$out" \
      | awk '{print $1 + $2}')
    echo "run $run, app events $mode: acknowledged $ack/s at 64 connections; applied $live/s while ingesting, $drain/s after"
    grep -E '^(app events:|CPU per)' <<<"$out" || true
    echo "$mode $ack $live $drain ${own:-}" >> "$RESULTS"
  done
done
python3 - "$RESULTS" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
def column(mode, i):
    return [float(r[i]) for r in rows if r[0] == mode and len(r) > i]
for i, name in [(1, "acknowledged/s at 64 connections"), (2, "applied/s while ingesting"),
                (3, "applied/s after ingestion"),
                (4, "server + Postgres CPU us per acknowledged event")]:
    off, on = column("off", i), column("on", i)
    if not off or not on:
        continue
    mo, mn = statistics.median(off), statistics.median(on)
    print(f"{name}: off median {mo:,.0f} (range {min(off):,.0f}-{max(off):,.0f}), "
          f"on median {mn:,.0f} (range {min(on):,.0f}-{max(on):,.0f}); on/off {mn / mo:.1%}")
PY
python3 - "$RESULTS" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
# Each run's two lines are one pair, measured back to back.
pairs = [dict((r[0], r) for r in rows[i:i + 2]) for i in range(0, len(rows) - 1, 2)]
ratios = [float(p["on"][1]) / float(p["off"][1]) for p in pairs if "on" in p and "off" in p]
if ratios:
    print("acknowledged on/off per pair: " + ", ".join(f"{r:.0%}" for r in ratios)
          + f"; median {statistics.median(ratios):.1%}")
PY
