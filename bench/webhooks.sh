#!/usr/bin/env bash
# Benchmark: signed customer.updated deliveries (~1.5 KB, 1,000 customers, each linked to a
# user) POSTed over HTTP with keep-alive; acknowledged events/s at 64 connections, ack latency
# at 16 connections, then how fast the applier drains what was stored, and the server's RSS.
#
#   bench/webhooks.sh                    # Postgres
#   BACKEND=sqlite bench/webhooks.sh     # the embedded default
#   DURATION=10 EVENTS=400000 bench/webhooks.sh
#   ORDER=latency-first bench/webhooks.sh   # 16 connections before the burst, not after
#   LOADGEN=wrk bench/webhooks.sh        # wrk with bench/webhook_replay.lua instead of the
#                                        # built-in generator (examples/webhook_load.rs)
#   BIN_DIR=/tmp/build bench/webhooks.sh # prebuilt billsync and webhook_load, no cargo build
#   APP_EVENTS=on bench/webhooks.sh      # app events delivered as they are made, to the
#                                        # local receiver (tests/receiver, which verifies each
#                                        # with the official standardwebhooks package); off
#                                        # (the default): stored for the pull API only.
#                                        # bench/app_events_overhead.sh compares the two.
#                                        # RECEIVER_VERIFY=0: the receiver accepts without
#                                        # verifying (its CPU off the shared cores).
#                                        # APP_RECEIVER=count: webhook_load's counting
#                                        # receiver instead of Node (less CPU still).
#   MODE=split bench/webhooks.sh         # Postgres: ingestion on an HTTP-only instance
#                                        # (BILLSYNC_RUN_WORKERS=false), then a worker
#                                        # instance drains everything it stored
#
# Needs: the local Postgres, python3 (and wrk for LOADGEN=wrk). Loopback only. Results go to
# bench/out/.
set -euo pipefail
cd "$(dirname "$0")/.."

BACKEND="${BACKEND:-postgres}"
DURATION="${DURATION:-10}"
EVENTS="${EVENTS:-400000}"
CUSTOMERS="${CUSTOMERS:-1000}"
PORT="${PORT:-18081}"
SECRET="whsec_bench_secret"
PGURL_BASE="${PGURL_BASE:-postgres://postgres@127.0.0.1:5432}"   # or the Unix socket: postgres://postgres@%2Fvar%2Frun%2Fpostgresql
OUT="bench/out/webhooks-$BACKEND-$(date -u +%Y%m%dT%H%M%SZ).txt"
WORK="$(mktemp -d)"
mkdir -p bench/out
LOADGEN="${LOADGEN:-rust}"
if [ "$LOADGEN" = wrk ]; then
  command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
fi

if [ -n "${BIN_DIR:-}" ]; then
  # Prebuilt binaries (billsync, webhook_load), e.g. two builds compared in alternating runs.
  BIN="$BIN_DIR/billsync"
  LOAD="$BIN_DIR/webhook_load"
else
  cargo build --release --quiet --bin billsync --example webhook_load
  BIN="${CARGO_TARGET_DIR:-target}/release/billsync"
  LOAD="${CARGO_TARGET_DIR:-target}/release/examples/webhook_load"
fi

if [ "$BACKEND" = postgres ]; then
  psql -q "$PGURL_BASE/postgres" -c "DROP DATABASE IF EXISTS billsync_bench_wh" -c "CREATE DATABASE billsync_bench_wh"
  export DATABASE_URL="$PGURL_BASE/billsync_bench_wh"
  SQL() { psql -qAt "$DATABASE_URL" -c "$1"; }
else
  export DATABASE_URL="sqlite://$WORK/billsync.db"
  SQL() { python3 -c "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); r=c.execute(sys.argv[2]).fetchall(); c.commit(); print(r[0][0] if r else '')" "$WORK/billsync.db" "$1"; }
fi
"$BIN" migrate 2>/dev/null
NOW_MS=$(($(date +%s) * 1000))
if [ "$BACKEND" = postgres ]; then TS="now()"; else TS="$NOW_MS"; fi
SQL "INSERT INTO users (id, email, email_verified, version, created_at, updated_at)
     SELECT 'bench-user-' || i, 'bench-user-' || i || '@example.com', 1 = 1, 1, $TS, $TS
     FROM (WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < $CUSTOMERS - 1) SELECT i FROM s) AS g" >/dev/null
SQL "INSERT INTO customer_links (user_id, stripe_customer_id, livemode, linked_via, linked_at)
     SELECT 'bench-user-' || i, 'cus_bench' || i, 1 = 0, 'created', $TS
     FROM (WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < $CUSTOMERS - 1) SELECT i FROM s) AS g" >/dev/null

echo "generating $EVENTS + $((EVENTS / 2)) signed events…" >&2
python3 bench/gen_events.py "$WORK/burst.tsv" "$EVENTS" "$CUSTOMERS" "$SECRET" 0
python3 bench/gen_events.py "$WORK/latency.tsv" "$((EVENTS / 2))" "$CUSTOMERS" "$SECRET" "$EVENTS"

MODE="${MODE:-mixed}"
if [ "$MODE" = split ] && [ "$BACKEND" != postgres ]; then
  echo "MODE=split needs Postgres (an HTTP-only instance cannot serve SQLite)" >&2; exit 1
fi
APP_EVENTS="${APP_EVENTS:-off}"
RECEIVER=""
APP_ENV=()
if [ "$APP_EVENTS" = on ]; then
  APP_SECRET="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8GKYo="
  if [ "${APP_RECEIVER:-node}" = count ]; then
    "$LOAD" receive 0 > "$WORK/receiver.out" &
  else
    [ -d tests/receiver/node_modules/standardwebhooks ] || npm ci --prefix tests/receiver --silent
    RECEIVER_VERIFY="${RECEIVER_VERIFY:-1}" node tests/receiver/receiver.mjs 0 "$APP_SECRET" > "$WORK/receiver.out" &
  fi
  RECEIVER=$!
  for _ in $(seq 1 50); do grep -q listening "$WORK/receiver.out" 2>/dev/null && break; sleep 0.1; done
  RPORT=$(awk '{print $2}' "$WORK/receiver.out")
  APP_ENV=(BILLSYNC_APP_WEBHOOK_URL="http://127.0.0.1:$RPORT/hook" BILLSYNC_APP_WEBHOOK_SECRET="$APP_SECRET")
fi
start_server() { # $1: whether it runs the applier and the outbox worker
  env "${APP_ENV[@]}" STRIPE_SECRET_KEY=sk_test_bench STRIPE_WEBHOOK_SECRET="$SECRET" BILLSYNC_WEBHOOK_TOLERANCE_SECS=86400 \
    BILLSYNC_STRIPE_API_BASE="http://127.0.0.1:9" BILLSYNC_LISTEN="127.0.0.1:$PORT" \
    BILLSYNC_RUN_WORKERS="$1" RUST_LOG=warn "$BIN" serve &
  SERVER=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done
}
rss_mib() { echo $(($(awk '/VmHWM/ {print $2}' "/proc/$SERVER/status") / 1024)); }
if [ "$MODE" = split ]; then start_server false; else start_server true; fi
trap 'kill $SERVER 2>/dev/null || true; [ -n "$RECEIVER" ] && kill $RECEIVER 2>/dev/null; rm -rf "$WORK"' EXIT

export BENCH_THREADS=2
field() { sed -n "s/.* $1=\([0-9.]*\).*/\1/p" <<<"$2" | head -n1; }
INGEST_START=$(date +%s.%N)
load() { # $1: events file, $2: connections
  if [ "$LOADGEN" = wrk ]; then
    BENCH_EVENTS="$1" wrk -t2 -c"$2" -d"$DURATION" --latency -s bench/webhook_replay.lua "http://127.0.0.1:$PORT"
  else
    "$LOAD" "127.0.0.1:$PORT" "$1" "$2" "$DURATION"
  fi
}
# CPU of the server, the receiver and Postgres in the 64-connection phase, per event; the
# built-in generator reports its own.
. bench/cpu.sh
burst() {
  local server0 pg0 server1 pg1 receiver0=0 receiver1=0
  server0=$(ticks "$SERVER"); pg0=$(pg_ticks)
  [ -n "$RECEIVER" ] && receiver0=$(ticks "$RECEIVER")
  BURST="$(load "$WORK/burst.tsv" 64)"
  server1=$(ticks "$SERVER"); pg1=$(pg_ticks)
  [ -n "$RECEIVER" ] && receiver1=$(ticks "$RECEIVER")
  CPU_LINE=$(python3 - "$(field requests "$BURST")" "$((server1 - server0))" "$((pg1 - pg0))" \
      "$(getconf CLK_TCK)" "$(field cpu_us_per_request "$BURST")" "$((receiver1 - receiver0))" <<'PY'
import sys
n, server, pg, hz, generator, receiver = sys.argv[1:]
n, hz = max(int(n or 0), 1), int(hz)
us = lambda ticks: round(int(ticks) * 1e6 / hz / n, 1)
total = us(server) + us(pg) + us(receiver) + (float(generator) if generator else 0)
print(f"CPU per acknowledged event at 64 connections: server {us(server)} us, postgres {us(pg)} us, "
      f"app-event receiver {us(receiver)} us, load generator {generator or 'n/a'} us; together {round(total, 1)} us, "
      f"so two cores carry at most {round(2e6 / total) if generator else 'n/a'} events/s")
PY
)
}
latency() { LAT="$(load "$WORK/latency.tsv" 16)"; }
# ORDER=latency-first measures the 16-connection latency before any backlog exists (the
# applier keeping pace with that load only); the default runs it right after the burst, while
# the applier also drains the burst's backlog.
if [ "${ORDER:-burst-first}" = latency-first ]; then latency; burst; else burst; latency; fi

if [ "$MODE" = split ]; then
  INGEST_RSS=$(rss_mib); kill -TERM $SERVER; wait $SERVER 2>/dev/null || true
  APPLIED_LIVE=0; START_LIVE=$(date +%s.%N)
  start_server true
else
  APPLIED_LIVE=$(SQL "SELECT count(*) FROM stripe_event_states WHERE state = 'applied'")
  START_LIVE=$(date +%s.%N)
fi
# The applier drains what was stored: time it from here.
START=$(date +%s.%N); START_PENDING=$(SQL "SELECT count(*) FROM stripe_event_queue")
while :; do
  PENDING=$(SQL "SELECT count(*) FROM stripe_event_queue")
  [ "$PENDING" = 0 ] && break
  sleep 0.5
done
END=$(date +%s.%N)
RSS=$(rss_mib)
APP_EVENTS_MADE=$(SQL "SELECT count(*) FROM app_events" 2>/dev/null || echo 0)   # none before app events existed
if [ "$APP_EVENTS" = on ]; then
  # Every event made reaches the receiver (it counts the verified ones).
  for _ in $(seq 1 600); do
    DELIVERED=$(curl -sf "http://127.0.0.1:$RPORT/_stats" | python3 -c "import json,sys; print(json.load(sys.stdin)['distinct'])" 2>/dev/null || echo 0)
    [ "$DELIVERED" -ge "$APP_EVENTS_MADE" ] && break
    sleep 0.5
  done
  APP_LINE="app events: $APP_EVENTS_MADE made, $DELIVERED delivered to the receiver (APP_RECEIVER=${APP_RECEIVER:-node}, RECEIVER_VERIFY=${RECEIVER_VERIFY:-1})"
else
  APP_LINE="app events: $APP_EVENTS_MADE made, stored for the pull API (no receiver)"
fi
STORED=$(SQL "SELECT count(*) FROM stripe_events")
APPLIED=$(SQL "SELECT count(*) FROM stripe_event_states WHERE state = 'applied'")
kill -TERM $SERVER; wait $SERVER 2>/dev/null || true

APPLY_RATE=$(python3 -c "print(round($START_PENDING / max($END - $START, 1e-9)))")
LIVE_RATE=$(python3 -c "print(round($APPLIED_LIVE / max($START_LIVE - $INGEST_START, 1e-9)))")
{
  echo "webhook ingestion, $BACKEND, MODE=$MODE, APP_EVENTS=$APP_EVENTS, LOADGEN=$LOADGEN, ${DURATION}s runs, $CUSTOMERS customers (linked users), ~1.5 KB events"
  echo "machine: $(nproc) cores; $(date -u +%FT%TZ)"
  echo "64 connections: $(field rps "$BURST") acknowledged events/s, p99 $(field p99_ms "$BURST") ms, non-2xx $(field non2xx "$BURST"), duplicates $(field duplicates "$BURST")"
  echo "$CPU_LINE"
  echo "16 connections: $(field rps "$LAT") events/s, p50 $(field p50_ms "$LAT") ms, p99 $(field p99_ms "$LAT") ms, non-2xx $(field non2xx "$LAT")"
  if [ "$MODE" = split ]; then
    echo "HTTP-only instance (BILLSYNC_RUN_WORKERS=false): RSS peak $INGEST_RSS MiB; nothing applied while ingesting"
  else
    echo "applier while ingesting: $APPLIED_LIVE applied in $(python3 -c "print(round($START_LIVE - $INGEST_START, 1))") s, $LIVE_RATE events/s"
  fi
  echo "applier after ingestion: drained $START_PENDING pending events at $APPLY_RATE events/s"
  echo "stored $STORED, applied $APPLIED; server RSS peak $RSS MiB"
  echo "$APP_LINE"
  echo; echo "--- $LOADGEN 64"; echo "$BURST"; echo "--- $LOADGEN 16"; echo "$LAT"
} | tee "$OUT"
