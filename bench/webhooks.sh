#!/usr/bin/env bash
# Benchmark: signed customer.updated deliveries (~1.5 KB, 1,000 customers, each linked to a
# user) POSTed over HTTP with keep-alive; acknowledged events/s at 64 connections, ack latency
# at 16 connections, then how fast the applier drains what was stored, and the server's RSS.
#
#   bench/webhooks.sh                    # Postgres
#   BACKEND=sqlite bench/webhooks.sh     # the embedded default
#   DURATION=10 EVENTS=400000 bench/webhooks.sh
#   ORDER=latency-first bench/webhooks.sh   # 16 connections before the burst, not after
#
# Needs: the local Postgres, wrk, python3. Loopback only. Results go to bench/out/.
set -euo pipefail
cd "$(dirname "$0")/.."

BACKEND="${BACKEND:-postgres}"
DURATION="${DURATION:-10}"
EVENTS="${EVENTS:-400000}"
CUSTOMERS="${CUSTOMERS:-1000}"
PORT="${PORT:-18081}"
SECRET="whsec_bench_secret"
PGURL_BASE="postgres://postgres@127.0.0.1:5432"
OUT="bench/out/webhooks-$BACKEND-$(date -u +%Y%m%dT%H%M%SZ).txt"
WORK="$(mktemp -d)"
mkdir -p bench/out
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }

cargo build --release --quiet
BIN="${CARGO_TARGET_DIR:-target}/release/billsync"

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

STRIPE_SECRET_KEY=sk_test_bench STRIPE_WEBHOOK_SECRET="$SECRET" BILLSYNC_WEBHOOK_TOLERANCE_SECS=86400 \
  BILLSYNC_STRIPE_API_BASE="http://127.0.0.1:9" BILLSYNC_LISTEN="127.0.0.1:$PORT" \
  RUST_LOG=warn "$BIN" serve &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done

export BENCH_THREADS=2
INGEST_START=$(date +%s.%N)
burst() { BURST="$(BENCH_EVENTS="$WORK/burst.tsv" wrk -t2 -c64 -d"$DURATION" -s bench/webhook_replay.lua "http://127.0.0.1:$PORT")"; }
latency() { LAT="$(BENCH_EVENTS="$WORK/latency.tsv" wrk -t2 -c16 -d"$DURATION" --latency -s bench/webhook_replay.lua "http://127.0.0.1:$PORT")"; }
# ORDER=latency-first measures the 16-connection latency before any backlog exists (the
# applier keeping pace with that load only); the default runs it right after the burst, while
# the applier also drains the burst's backlog.
if [ "${ORDER:-burst-first}" = latency-first ]; then latency; burst; else burst; latency; fi

# The applier drains what was stored: time it from here.
START=$(date +%s.%N); START_PENDING=$(SQL "SELECT count(*) FROM stripe_event_queue")
APPLIED_LIVE=$(SQL "SELECT count(*) FROM stripe_event_states WHERE state = 'applied'")
while :; do
  PENDING=$(SQL "SELECT count(*) FROM stripe_event_queue")
  [ "$PENDING" = 0 ] && break
  sleep 0.5
done
END=$(date +%s.%N)
RSS_KB="$(awk '/VmHWM/ {print $2}' "/proc/$SERVER/status")"
STORED=$(SQL "SELECT count(*) FROM stripe_events")
APPLIED=$(SQL "SELECT count(*) FROM stripe_event_states WHERE state = 'applied'")
kill -TERM $SERVER; wait $SERVER 2>/dev/null || true

field() { sed -n "s/.* $1=\([0-9.]*\).*/\1/p" <<<"$2" | head -n1; }
APPLY_RATE=$(python3 -c "print(round($START_PENDING / max($END - $START, 1e-9)))")
LIVE_RATE=$(python3 -c "print(round($APPLIED_LIVE / max($START - $INGEST_START, 1e-9)))")
{
  echo "webhook ingestion, $BACKEND, ${DURATION}s runs, $CUSTOMERS customers (linked users), ~1.5 KB events"
  echo "machine: $(nproc) cores; $(date -u +%FT%TZ)"
  echo "64 connections: $(field rps "$BURST") acknowledged events/s, p99 $(field p99_ms "$BURST") ms, non-2xx $(field non2xx "$BURST"), duplicates $(field duplicates "$BURST")"
  echo "16 connections: $(field rps "$LAT") events/s, p50 $(field p50_ms "$LAT") ms, p99 $(field p99_ms "$LAT") ms, non-2xx $(field non2xx "$LAT")"
  echo "applier while ingesting: $APPLIED_LIVE applied in $(python3 -c "print(round($START - $INGEST_START, 1))") s, $LIVE_RATE events/s"
  echo "applier after ingestion: drained $START_PENDING pending events at $APPLY_RATE events/s"
  echo "stored $STORED, applied $APPLIED; server RSS peak $((RSS_KB / 1024)) MiB"
  echo; echo "--- wrk 64"; echo "$BURST"; echo "--- wrk 16"; echo "$LAT"
} | tee "$OUT"
