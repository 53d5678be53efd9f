#!/usr/bin/env bash
# Benchmark: the resolve hit path (an already-linked user) over HTTP on Postgres, with
# `pgbench -S` (select-only) at the same concurrency as the reference, and the server's RSS.
#
#   bench/resolve.sh            # defaults: 32 connections, 20 s, 1000 linked users
#   CONNS=64 DURATION=30 bench/resolve.sh
#   BIN_DIR=/tmp/build bench/resolve.sh   # a prebuilt billsync, no cargo build
#
# Needs: the local Postgres (127.0.0.1:5432, trust auth), wrk and pgbench (apt-get install wrk
# postgresql-contrib). Only loopback traffic. Results go to bench/out/.
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS="${CONNS:-32}"
DURATION="${DURATION:-20}"
USERS="${USERS:-1000}"
THREADS="${THREADS:-2}"
PORT="${PORT:-18080}"
PGURL_BASE="postgres://postgres@127.0.0.1:5432"
DB=billsync_bench
PGBENCH_DB=billsync_pgbench
KEY="bench-admin-key-0123456789"
OUT="bench/out/resolve-$(date -u +%Y%m%dT%H%M%SZ).txt"
mkdir -p bench/out

command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
command -v pgbench >/dev/null || { echo "pgbench is missing" >&2; exit 1; }

. bench/binary.sh

psql -q "$PGURL_BASE/postgres" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
export DATABASE_URL="$PGURL_BASE/$DB"
"$BIN" migrate 2>/dev/null
# Seed linked users straight into the tables: the benchmark measures lookups, not Stripe.
psql -q "$DATABASE_URL" <<SQL
INSERT INTO users (id, email, email_verified, version, created_at, updated_at)
  SELECT 'bench-user-' || i, 'bench-user-' || i || '@example.com', true, 1, now(), now()
  FROM generate_series(1, $USERS) AS i;
INSERT INTO customer_links (user_id, stripe_customer_id, livemode, linked_via, linked_at)
  SELECT 'bench-user-' || i, 'cus_bench' || i, false, 'created', now()
  FROM generate_series(1, $USERS) AS i;
ANALYZE;
SQL

STRIPE_SECRET_KEY=sk_test_bench BILLSYNC_ADMIN_API_KEY="$KEY" \
  BILLSYNC_STRIPE_API_BASE="http://127.0.0.1:9" BILLSYNC_LISTEN="127.0.0.1:$PORT" \
  RUST_LOG=warn "$BIN" serve &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done

export BENCH_USERS="$USERS" BENCH_ADMIN_KEY="$KEY"
# Warm-up: connections, prepared statements, caches.
wrk -t "$THREADS" -c "$CONNS" -d 3 -s bench/resolve_hit.lua "http://127.0.0.1:$PORT" >/dev/null
WRK_OUT="$(wrk -t "$THREADS" -c "$CONNS" -d "$DURATION" -s bench/resolve_hit.lua "http://127.0.0.1:$PORT")"
RSS_KB="$(awk '/VmHWM/ {print $2}' "/proc/$SERVER/status")"
kill -TERM $SERVER; wait $SERVER 2>/dev/null || true
trap - EXIT

psql -q "$PGURL_BASE/postgres" -c "DROP DATABASE IF EXISTS $PGBENCH_DB" -c "CREATE DATABASE $PGBENCH_DB"
pgbench -q -i -s 10 "$PGURL_BASE/$PGBENCH_DB" >/dev/null 2>&1
PGB_OUT="$(pgbench -S -M prepared -c "$CONNS" -j "$THREADS" -T "$DURATION" "$PGURL_BASE/$PGBENCH_DB" 2>&1)"
psql -q "$PGURL_BASE/postgres" -c "DROP DATABASE IF EXISTS $PGBENCH_DB" -c "DROP DATABASE IF EXISTS $DB"

RPS="$(sed -n 's/.* rps=\([0-9]*\).*/\1/p' <<<"$WRK_OUT")"
P99="$(sed -n 's/.* p99_ms=\([0-9.]*\).*/\1/p' <<<"$WRK_OUT")"
P50="$(sed -n 's/.* p50_ms=\([0-9.]*\).*/\1/p' <<<"$WRK_OUT")"
NON2XX="$(sed -n 's/.*non2xx=\([0-9]*\).*/\1/p' <<<"$WRK_OUT")"
TPS="$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$PGB_OUT" | head -n1)"
RATIO="$(python3 -c "print(f'{$RPS / $TPS:.2f}')")"

{
  echo "resolve hit path over HTTP, Postgres, $CONNS connections, ${DURATION}s, $USERS linked users"
  echo "machine: $(nproc) cores, $(uname -r); $(date -u +%FT%TZ)"
  echo "billsync: ${RPS} resolves/s, p50 ${P50} ms, p99 ${P99} ms, non-2xx ${NON2XX}, RSS peak $((RSS_KB / 1024)) MiB"
  echo "pgbench -S -M prepared (same conns): ${TPS} tps"
  echo "ratio billsync/pgbench: ${RATIO}"
  echo
  echo "--- wrk"; echo "$WRK_OUT"
  echo "--- pgbench"; echo "$PGB_OUT"
} | tee "$OUT"
[ "$NON2XX" = "0" ] || { echo "FAIL: $NON2XX non-2xx answers" >&2; exit 1; }
