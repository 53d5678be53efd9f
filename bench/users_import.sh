#!/usr/bin/env bash
# Benchmark: `billsync users import` of a large JSON Lines file into an empty database, then
# the same file again (every row unchanged), on Postgres and on SQLite; wall time, rows a
# second and the command's peak RSS, RUNS times each (a fresh database per run), medians and
# ranges.
#
#   bench/users_import.sh                     # 1,000,000 rows, 3 runs per backend
#   ROWS=100000 RUNS=5 bench/users_import.sh
#   BIN_DIR=/tmp/build bench/users_import.sh  # a prebuilt billsync, no cargo build
#   BACKENDS=postgres bench/users_import.sh
#
# Needs: the local Postgres (127.0.0.1:5432, trust auth), python3, GNU time (/usr/bin/time).
# Results go to bench/out/.
set -euo pipefail
cd "$(dirname "$0")/.."

ROWS="${ROWS:-1000000}"
RUNS="${RUNS:-3}"
BACKENDS="${BACKENDS:-postgres sqlite}"
PGURL_BASE="postgres://postgres@127.0.0.1:5432"
DB=billsync_bench_import
OUT="bench/out/users-import-$(date -u +%Y%m%dT%H%M%SZ).txt"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"; psql -q "$PGURL_BASE/postgres" -c "DROP DATABASE IF EXISTS $DB" 2>/dev/null || true' EXIT
mkdir -p bench/out

. bench/binary.sh

# An app's export: random UUID ids (as Supabase's), every field of PUT /v1/users/{id}, some
# names and phones missing, a few addresses with capitals.
FILE="$WORK/users.jsonl"
python3 - "$ROWS" "$FILE" <<'PY'
import json, random, sys, uuid
rows, path = int(sys.argv[1]), sys.argv[2]
rng = random.Random(16)
with open(path, "w") as out:
    for i in range(rows):
        user = {"id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "email": f"{'User' if i % 10 == 0 else 'user'}{i}@example.com",
                "email_verified": i % 3 != 0}
        if i % 4:
            user["first_name"], user["last_name"] = f"First{i}", f"Last{i}"
        if i % 5 == 0:
            user["phone"] = f"+1415{i % 10_000_000:07d}"
        out.write(json.dumps(user) + "\n")
PY
echo "$ROWS rows, $(du -h "$FILE" | cut -f1) (JSON Lines); $BIN" | tee "$OUT"

# One import: "seconds peak_rss_kib", and the summary's created/unchanged counts.
measure() {
  local url="$1" log="$WORK/run.log"
  DATABASE_URL="$url" RUST_LOG=warn /usr/bin/time -f "%e %M" -o "$WORK/time" \
    "$BIN" users import "$FILE" >"$log" 2>"$WORK/stderr" || { cat "$WORK/stderr" >&2; exit 1; }
  read -r secs rss <"$WORK/time"
  local created unchanged
  created="$(awk '$1 == "created" {print $2}' "$log")"
  unchanged="$(awk '$1 == "unchanged" {print $2}' "$log")"
  echo "$secs $rss $created $unchanged"
}

fresh_db() {
  case "$1" in
    postgres)
      psql -q "$PGURL_BASE/postgres" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
      psql -q "$PGURL_BASE/postgres" -c "CHECKPOINT"
      echo "$PGURL_BASE/$DB" ;;
    sqlite)
      rm -f "$WORK"/bench.db*
      echo "sqlite://$WORK/bench.db" ;;
  esac
}

summarise() { # label, then "value" lines on stdin: median and range
  sort -n | awk -v label="$1" '{ v[NR] = $1 } END {
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    printf "  %-34s median %10.1f   range %.1f–%.1f\n", label, m, v[1], v[NR] }'
}

for backend in $BACKENDS; do
  : >"$WORK/first" && : >"$WORK/again"
  for run in $(seq 1 "$RUNS"); do
    url="$(fresh_db "$backend")"
    DATABASE_URL="$url" "$BIN" migrate 2>/dev/null
    read -r secs rss created _ <<<"$(measure "$url")"
    [ "$created" = "$ROWS" ] || { echo "run $run created $created of $ROWS" >&2; exit 1; }
    echo "$secs $rss" >>"$WORK/first"
    read -r secs2 rss2 _ unchanged <<<"$(measure "$url")"
    [ "$unchanged" = "$ROWS" ] || { echo "re-run found $unchanged of $ROWS unchanged" >&2; exit 1; }
    echo "$secs2 $rss2" >>"$WORK/again"
    printf '%s run %d: import %6.1f s (%6.0f rows/s, peak RSS %5.1f MiB); again %6.1f s (%6.0f rows/s, %5.1f MiB)\n' \
      "$backend" "$run" "$secs" "$(echo "$ROWS / $secs" | bc -l)" "$(echo "$rss / 1024" | bc -l)" \
      "$secs2" "$(echo "$ROWS / $secs2" | bc -l)" "$(echo "$rss2 / 1024" | bc -l)" | tee -a "$OUT"
  done
  echo "$backend, $RUNS runs:" | tee -a "$OUT"
  awk -v n="$ROWS" '{ print n / $1 }' "$WORK/first" | summarise "import, rows/s" | tee -a "$OUT"
  awk '{ print $2 / 1024 }' "$WORK/first" | summarise "import, peak RSS MiB" | tee -a "$OUT"
  awk -v n="$ROWS" '{ print n / $1 }' "$WORK/again" | summarise "re-run (unchanged), rows/s" | tee -a "$OUT"
  awk '{ print $2 / 1024 }' "$WORK/again" | summarise "re-run, peak RSS MiB" | tee -a "$OUT"
done
echo "results in $OUT"
