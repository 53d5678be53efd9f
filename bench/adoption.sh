#!/usr/bin/env bash
# README's "Adopting an existing Stripe account", run on a test world and timed step by step:
# 10,000 users whose customers the spec's own code made (5 % with an email changed since, 1 %
# with a duplicate customer, 300 without one) and 3,000 subscriptions, in a localstripe of its
# own; billsync on a fresh Postgres database. Then it checks the outcome: every user with a
# customer linked to the right one, every subscription mirrored, every duplicate reported, no
# customer created.
#
#   bench/adoption.sh                          # 10,000 users, 3,000 subscriptions, 100 req/s
#   USERS=1000 SUBSCRIPTIONS=300 bench/adoption.sh
#   BIN_DIR=/tmp/build bench/adoption.sh       # a prebuilt billsync
#
# Needs: the local Postgres (127.0.0.1:5432, trust auth), python3, localstripe (installed by
# scripts/localstripe.sh). Loopback only. Results go to bench/out/.
set -euo pipefail
cd "$(dirname "$0")/.."

USERS="${USERS:-10000}"
SUBSCRIPTIONS="${SUBSCRIPTIONS:-3000}"
RPS="${RPS:-100}"
PGURL_BASE="postgres://postgres@127.0.0.1:5432"
DB=billsync_bench_adoption
OUT="bench/out/adoption-$(date -u +%Y%m%dT%H%M%SZ).txt"
WORK="$(mktemp -d)"
mkdir -p bench/out

. bench/binary.sh

PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export BILLSYNC_LOCALSTRIPE_PIDFILE="$WORK/localstripe.pid" BILLSYNC_LOCALSTRIPE_PERSIST=0
STRIPE="$(scripts/localstripe.sh start "$PORT")"
trap 'scripts/localstripe.sh stop >/dev/null 2>&1; rm -rf "$WORK"' EXIT

python3 bench/adoption_world.py "$STRIPE" "$USERS" "$SUBSCRIPTIONS" "$WORK" | tee "$OUT"

psql -q "$PGURL_BASE/postgres" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
export DATABASE_URL="$PGURL_BASE/$DB" STRIPE_SECRET_KEY=sk_test_adoption \
  BILLSYNC_STRIPE_API_BASE="$STRIPE" BILLSYNC_STRIPE_RPS="$RPS" BILLSYNC_STRIPE_BUDGET_RPS="$RPS" \
  RUST_LOG=warn
"$BIN" migrate

# One step of the guide: its wall time, and the Stripe requests its report counts.
step() {
  local name="$1" report="$2"; shift 2
  local start end
  start="$(date +%s.%N)"
  "$@" >"$WORK/step.out" 2>"$WORK/step.err" || { cat "$WORK/step.out" "$WORK/step.err" >&2; exit 1; }
  end="$(date +%s.%N)"
  local requests=0
  [ -n "$report" ] && requests="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["stripe_requests"])' "$report")"
  printf '%-34s %8.1f s  %6d Stripe requests\n' "$name" "$(echo "$end - $start" | bc -l)" "$requests" | tee -a "$OUT"
  cat "$WORK/step.out" >>"$OUT"
}

step "billsync users import" "" "$BIN" users import "$WORK/users.jsonl"
step "billsync reconcile (dry run)" "$WORK/dry.json" "$BIN" reconcile --json "$WORK/dry.json"
step "billsync reconcile --apply" "$WORK/apply.json" "$BIN" reconcile --apply --json "$WORK/apply.json"
step "billsync reconcile (again)" "$WORK/again.json" "$BIN" reconcile --json "$WORK/again.json"

python3 - "$WORK" "$STRIPE" "$DATABASE_URL" <<'PY' | tee -a "$OUT"
import base64, json, subprocess, sys, urllib.request
work, stripe, database = sys.argv[1:4]
expected = json.load(open(f"{work}/expected.json"))

def rows(sql):
    out = subprocess.run(["psql", database, "-Atc", sql], check=True, capture_output=True, text=True)
    return [line.split("|") for line in out.stdout.splitlines() if line]

links = dict(rows("SELECT user_id, stripe_customer_id FROM customer_links"))
wrong = [u for u, c in expected["customer_of"].items() if links.get(u) != c]
extra = set(links) - set(expected["customer_of"])
mirrored = {r[0] for r in rows("SELECT id FROM subscriptions WHERE user_id IS NOT NULL")}
missing = set(expected["subscriptions"]) - mirrored
applied = json.load(open(f"{work}/apply.json"))
reported = {f["customer_id"] for f in applied["findings"] if f["category"] == "duplicate"}
unreported = set(expected["duplicates"].values()) - reported

auth = "Basic " + base64.b64encode(b"sk_test_adoption:").decode()
count, cursor = 0, None
while True:
    url = f"{stripe}/v1/customers?limit=100" + (f"&starting_after={cursor}" if cursor else "")
    page = json.load(urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": auth})))
    count += len(page["data"])
    if not page["has_more"]:
        break
    cursor = page["data"][-1]["id"]
again = json.load(open(f"{work}/again.json"))["summary"]

print(f"users linked to the right customer: {len(expected['customer_of']) - len(wrong)} of "
      f"{len(expected['customer_of'])} (wrong or missing: {len(wrong)}; linked without a customer: {len(extra)})")
print(f"subscriptions mirrored: {len(expected['subscriptions']) - len(missing)} of {len(expected['subscriptions'])}")
print(f"duplicates reported: {len(expected['duplicates']) - len(unreported)} of {len(expected['duplicates'])}")
print(f"customers in Stripe: {count} before {expected['customers']} (created by the procedure: {count - expected['customers']})")
print("the run after --apply: " + ", ".join(f"{k} {v['found']}" for k, v in again.items()))
ok = not wrong and not extra and not missing and not unreported and count == expected["customers"]
print("adoption: " + ("every check passed" if ok else "FAILED"))
sys.exit(0 if ok else 1)
PY
echo "results in $OUT"
