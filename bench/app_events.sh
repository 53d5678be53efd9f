#!/usr/bin/env bash
# Benchmark: app events delivered to a local receiver (tests/receiver/receiver.mjs, which
# verifies every delivery with the official standardwebhooks package).
#
#   1. Throughput: EVENTS events of USERS users are written into app_events while billsync is
#      stopped; billsync then starts and delivers them. Events/s = EVENTS / the time from its
#      start until the receiver has every one.
#   2. Latency: billsync running, RATE events/s committed for DURATION s (batches every 100 ms);
#      commit → delivery = arrival at the receiver − the event's timestamp (its commit).
#
#   bench/app_events.sh                  # Postgres
#   BACKEND=sqlite bench/app_events.sh   # the embedded default
#   BIN_DIR=/tmp/build bench/app_events.sh
#
# Needs: the local Postgres, Node (npm ci --prefix tests/receiver), python3. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."

BACKEND="${BACKEND:-postgres}"
EVENTS="${EVENTS:-50000}"
USERS="${USERS:-1000}"
RATE="${RATE:-1000}"
DURATION="${DURATION:-10}"
PORT="${PORT:-18091}"
PGURL_BASE="${PGURL_BASE:-postgres://postgres@127.0.0.1:5432}"
SECRET="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8GKYo="
OUT="bench/out/app-events-$BACKEND-$(date -u +%Y%m%dT%H%M%SZ).txt"
WORK="$(mktemp -d)"
mkdir -p bench/out
[ -d tests/receiver/node_modules/standardwebhooks ] || npm ci --prefix tests/receiver --silent

. bench/binary.sh

if [ "$BACKEND" = postgres ]; then
  psql -q "$PGURL_BASE/postgres" -c "DROP DATABASE IF EXISTS billsync_bench_ae" -c "CREATE DATABASE billsync_bench_ae"
  export DATABASE_URL="$PGURL_BASE/billsync_bench_ae"
else
  export DATABASE_URL="sqlite://$WORK/billsync.db"
fi
"$BIN" migrate 2>/dev/null

node tests/receiver/receiver.mjs 0 "$SECRET" > "$WORK/receiver.out" &
RECEIVER=$!
for _ in $(seq 1 50); do grep -q listening "$WORK/receiver.out" 2>/dev/null && break; sleep 0.1; done
RPORT=$(awk '{print $2}' "$WORK/receiver.out")
SERVER=""
cleanup() { [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; kill "$RECEIVER" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

start_server() {
  STRIPE_SECRET_KEY=sk_test_bench BILLSYNC_STRIPE_API_BASE="http://127.0.0.1:9" \
    BILLSYNC_LISTEN="127.0.0.1:$PORT" BILLSYNC_APP_WEBHOOK_URL="http://127.0.0.1:$RPORT/hook" \
    BILLSYNC_APP_WEBHOOK_SECRET="$SECRET" RUST_LOG=warn "$BIN" serve &
  SERVER=$!
}

# Events straight into the outbox, as the store's transactions write them.
python3 bench/app_events_load.py "$DATABASE_URL" insert "$EVENTS" "$USERS"
# Where a delivery's cost goes during the throughput phase.
. bench/cpu.sh
PG0=$(pg_ticks); RECEIVER0=$(ticks "$RECEIVER")
START=$(date +%s.%N)
start_server
python3 bench/app_events_load.py "$DATABASE_URL" wait-for "http://127.0.0.1:$RPORT" "$EVENTS"
END=$(date +%s.%N)
CPU_LINE=$(python3 -c '
import sys
n, server, pg, receiver, hz = map(int, sys.argv[1:])
us = lambda t: round(t * 1e6 / hz / n, 1)
print(f"CPU per delivered event: billsync {us(server)} us, postgres {us(pg)} us, receiver {us(receiver)} us")
' "$EVENTS" "$(ticks "$SERVER")" "$(($(pg_ticks) - PG0))" "$(($(ticks "$RECEIVER") - RECEIVER0))" "$(getconf CLK_TCK)")
RSS=$(($(awk '/VmHWM/ {print $2}' "/proc/$SERVER/status") / 1024))
{
  echo "backend=$BACKEND events=$EVENTS users=$USERS"
  python3 -c "import sys; e=int(sys.argv[1]); t=float(sys.argv[3])-float(sys.argv[2]); print(f'throughput: {e} events in {t:.2f} s = {e/t:,.0f} events/s (from billsync start)')" "$EVENTS" "$START" "$END"
  echo "$CPU_LINE"
  python3 bench/app_events_load.py "$DATABASE_URL" steady "http://127.0.0.1:$RPORT" "$RATE" "$DURATION" "$USERS" "$EVENTS"
  echo "server peak RSS: $RSS MiB"
} | tee "$OUT"
