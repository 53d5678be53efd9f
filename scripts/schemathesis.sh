#!/usr/bin/env bash
# Property-based API test: schemathesis generates requests from billsync's /openapi.json and
# checks every answer — no 5xx, status codes, content types, headers and bodies as documented.
# Admin routes run with the admin key, user routes with a signed user JWT.
#
#   scripts/schemathesis.sh BILLSYNC_BINARY STRIPE_BASE_URL [MAX_EXAMPLES]
#
# Needs python3; installs schemathesis into ~/.cache/billsync/schemathesis-venv. Loopback only.
set -euo pipefail
BIN="$1"
STRIPE="$2"
EXAMPLES="${3:-30}"
VENV="${BILLSYNC_SCHEMATHESIS_VENV:-$HOME/.cache/billsync/schemathesis-venv}"
if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q 3.39.16; then
  python3 -m venv "$VENV"
  # hypothesis pinned: later releases removed an API this schemathesis uses.
  "$VENV/bin/pip" install -q --disable-pip-version-check schemathesis==3.39.16 hypothesis==6.124.9
fi

WORK="$(mktemp -d)"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
ADMIN_KEY="schemathesis-admin-key-0123456789"
JWT_SECRET="schemathesis-jwt-secret-0123456789-abcdefgh"
DATABASE_URL="sqlite://$WORK/billsync.db" STRIPE_SECRET_KEY=sk_test_schemathesis \
  BILLSYNC_STRIPE_API_BASE="$STRIPE" BILLSYNC_LISTEN="127.0.0.1:$PORT" \
  BILLSYNC_ADMIN_API_KEY="$ADMIN_KEY" BILLSYNC_JWT_SECRET="$JWT_SECRET" \
  STRIPE_WEBHOOK_SECRET=whsec_schemathesis APP_URL=https://app.example.com \
  BILLSYNC_STRIPE_TIMEOUT_MS=3000 RUST_LOG=warn "$BIN" serve 2>"$WORK/server.log" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done

USER_TOKEN="$(python3 - "$JWT_SECRET" <<'PY'
import base64, hashlib, hmac, json, sys, time
b64 = lambda d: base64.urlsafe_b64encode(json.dumps(d, separators=(",", ":")).encode()).rstrip(b"=")
head = b64({"alg": "HS256", "typ": "JWT"})
body = b64({"sub": "schemathesis-user", "aud": "authenticated", "exp": int(time.time()) + 3600,
            "email": "schemathesis@example.com", "email_verified": True})
sig = base64.urlsafe_b64encode(hmac.new(sys.argv[1].encode(), head + b"." + body, hashlib.sha256).digest()).rstrip(b"=")
print((head + b"." + body + b"." + sig).decode())
PY
)"

run() {
  "$VENV/bin/schemathesis" run "http://127.0.0.1:$PORT/openapi.json" \
    --checks all --hypothesis-max-examples "$EXAMPLES" --hypothesis-seed 1 \
    --hypothesis-suppress-health-check all --request-timeout 10000 \
    --experimental=openapi-3.1 --no-color ${BILLSYNC_SCHEMATHESIS_ARGS:-} "$@"
}
status=0
echo "== schemathesis: admin and health routes"
run -H "Authorization: Bearer $ADMIN_KEY" --exclude-path-regex '^/api/' || status=1
echo "== schemathesis: user and webhook routes"
run -H "Authorization: Bearer $USER_TOKEN" --include-path-regex '^/api/' || status=1
if [ "$status" != 0 ]; then
  echo "== server log (warnings)"; tail -n 50 "$WORK/server.log"
fi
exit "$status"
