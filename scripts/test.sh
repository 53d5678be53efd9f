#!/usr/bin/env bash
# The whole test suite, with the services it needs, and a count of what ran:
#
#   scripts/test.sh [cargo test arguments…]
#
# - localstripe: installed into a venv and started on a free loopback port (stopped at exit),
#   unless BILLSYNC_TEST_LOCALSTRIPE_URL already points at one that answers.
# - tests/receiver (the app's side of app-event tests, Node): npm ci from its lockfile.
# - Then the TypeScript client and the example app (scripts/test-typescript.sh) against the
#   billsync binary cargo built: npm ci from their lockfiles, types checked against the
#   server's OpenAPI document, Node's test runner. Only on an unfiltered run.
# - Postgres: BILLSYNC_TEST_POSTGRES_URL, or the local server at
#   postgres://postgres@127.0.0.1:5432/postgres when it answers; each test makes its own database.
# - tests/alone/postgres_restart.rs stops and starts that server. It runs when the cluster is this
#   machine's own (a Debian cluster on port 5432 that pg_ctlcluster may control, as on the
#   project's CI and development machines) or with BILLSYNC_TEST_PG_RESTART=1;
#   BILLSYNC_TEST_PG_RESTART=0 keeps it from running.
#
# A suite whose service is missing is skipped out loud (`SKIPPED <test>: <why>`), and the last
# lines here count those skips by reason. With BILLSYNC_REQUIRE_SUITES=1 (CI) a skip fails.
set -uo pipefail
cd "$(dirname "$0")/.."

log="$(mktemp -t billsync-tests.XXXXXX)"
cleanup() {
  [[ -n "${started_localstripe:-}" ]] && scripts/localstripe.sh stop >/dev/null 2>&1
  rm -f "$log"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

answers_stripe() {
  curl -sf -o /dev/null --max-time 2 -u sk_test_123: "$1/v1/customers?limit=1"
}

if [[ -n "${BILLSYNC_TEST_LOCALSTRIPE_URL:-}" ]] && answers_stripe "$BILLSYNC_TEST_LOCALSTRIPE_URL"; then
  echo "== localstripe at $BILLSYNC_TEST_LOCALSTRIPE_URL (given)"
else
  export BILLSYNC_LOCALSTRIPE_PIDFILE="${BILLSYNC_LOCALSTRIPE_PIDFILE:-$(mktemp -d)/localstripe.pid}"
  export BILLSYNC_LOCALSTRIPE_PERSIST="${BILLSYNC_LOCALSTRIPE_PERSIST:-0}"
  if url="$(scripts/localstripe.sh start "$(free_port)")"; then
    started_localstripe=1
    export BILLSYNC_TEST_LOCALSTRIPE_URL="$url"
    echo "== localstripe at $url (started)"
  else
    unset BILLSYNC_TEST_LOCALSTRIPE_URL
    echo "== localstripe could not start: its suites will be skipped"
  fi
fi

# The app-event tests' receiver verifies deliveries with the official standardwebhooks package.
if [[ ! -d tests/receiver/node_modules/standardwebhooks ]]; then
  if command -v npm >/dev/null && npm ci --prefix tests/receiver --no-audit --no-fund --silent; then
    echo "== tests/receiver installed (npm ci)"
  else
    echo "== tests/receiver could not be installed: the app-event suites will be skipped"
  fi
fi

pg_url="${BILLSYNC_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
if psql "$pg_url" -Atqc 'SELECT 1' >/dev/null 2>&1; then
  export BILLSYNC_TEST_POSTGRES_URL="$pg_url"
  echo "== postgres at $pg_url"
  if [[ -z "${BILLSYNC_TEST_PG_RESTART:-}" && "$pg_url" == *@127.0.0.1:5432/* ]] &&
    command -v pg_ctlcluster >/dev/null && [[ "$(id -u)" == 0 ]] &&
    pg_lsclusters -h 2>/dev/null | awk '$3 == 5432 && $4 == "online"' | grep -q .; then
    export BILLSYNC_TEST_PG_RESTART=1
    echo "== postgres is this machine's own cluster: the restart test runs"
  fi
else
  unset BILLSYNC_TEST_POSTGRES_URL
  echo "== no postgres answers at $pg_url: its suites will be skipped"
fi
[[ "${BILLSYNC_TEST_PG_RESTART:-}" == 1 ]] || unset BILLSYNC_TEST_PG_RESTART

cargo test --locked --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

# The TypeScript client and the example app, against the billsync binary cargo just built.
billsync_bin="${CARGO_TARGET_DIR:-target}/debug/billsync"
typescript_skipped=""
if [[ $# -gt 0 ]]; then
  typescript_skipped="a filtered run (arguments were given)"
elif ! command -v npm >/dev/null; then
  typescript_skipped="npm is not installed"
elif [[ -z "${BILLSYNC_TEST_LOCALSTRIPE_URL:-}" ]]; then
  typescript_skipped="no localstripe"
elif [[ ! -x "$billsync_bin" ]]; then
  typescript_skipped="no billsync binary at $billsync_bin"
else
  scripts/test-typescript.sh "$billsync_bin" 2>&1 | tee -a "$log"
  typescript_status=${PIPESTATUS[0]}
  [[ $typescript_status -eq 0 ]] || status=$typescript_status
fi
[[ -z "$typescript_skipped" ]] || echo "SKIPPED typescript: $typescript_skipped" | tee -a "$log"
if [[ "${BILLSYNC_REQUIRE_SUITES:-}" == 1 ]]; then
  if [[ -n "$typescript_skipped" ]]; then
    echo "== the TypeScript suites did not run (BILLSYNC_REQUIRE_SUITES=1)"
    status=1
  elif grep -qE "^# (skipped|todo|cancelled) [1-9]" "$log"; then
    echo "== a TypeScript test was skipped, left to do or cancelled (BILLSYNC_REQUIRE_SUITES=1)"
    status=1
  fi
fi

python3 - "$log" "$status" <<'EOF'
import collections, re, sys
text = open(sys.argv[1], errors="replace").read()
passed = failed = ignored = 0
for m in re.finditer(r"test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored", text):
    passed += int(m[1]); failed += int(m[2]); ignored += int(m[3])
# Unanchored: libtest may have written half a line ("test x ... ") just before.
skips = re.findall(r"SKIPPED (\S+): (.*)$", text, re.M)
# A skipped Rust test returned early and counts as passed; the TypeScript suites never started.
returned_early = [s for s in skips if s[0] != "typescript"]
reasons = collections.Counter(reason for _, reason in skips)
# Node's test runner (TAP): "# pass N", "# fail N", once per suite.
node_passed = sum(int(n) for n in re.findall(r"^# pass (\d+)$", text, re.M))
node_failed = sum(int(n) for n in re.findall(r"^# fail (\d+)$", text, re.M))
node_unrun = sum(int(n) for n in re.findall(r"^# (?:skipped|todo|cancelled) (\d+)$", text, re.M))
print()
print(f"== {passed + failed + ignored} Rust tests: {passed - len(returned_early)} ran and passed, "
      f"{failed} failed, {ignored} ignored, {len(returned_early)} skipped (returned early)")
print(f"== {node_passed + node_failed + node_unrun} TypeScript tests: {node_passed} passed, "
      f"{node_failed} failed, {node_unrun} skipped, left to do or cancelled"
      + ("; the suites did not run (see below)" if len(skips) > len(returned_early) else ""))
for reason, count in reasons.most_common():
    print(f"   skipped {count}: {reason}")
if int(sys.argv[2]) != 0 and failed == 0 and node_failed == 0:
    print("== the run failed before or outside the tests (see above)")
EOF
exit "$status"
