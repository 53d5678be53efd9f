#!/usr/bin/env bash
# The TypeScript client's types, generated from billsync's own OpenAPI document, so the client
# can never drift from the server:
#
#   scripts/client-types.sh BILLSYNC_BINARY           # writes clients/typescript/src/schema.ts
#   scripts/client-types.sh BILLSYNC_BINARY --check   # fails when the committed file differs
#
# Needs the client's packages (npm ci --prefix clients/typescript).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$1"
MODE="${2:-write}"
OUT=clients/typescript/src/schema.ts
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

"$BIN" openapi >"$WORK/openapi.json"
clients/typescript/node_modules/.bin/openapi-typescript "$WORK/openapi.json" \
  --output "$WORK/schema.ts" >/dev/null 2>&1 ||
  { clients/typescript/node_modules/.bin/openapi-typescript "$WORK/openapi.json" --output "$WORK/schema.ts"; exit 1; }

if [ "$MODE" = "--check" ]; then
  if ! diff -u "$OUT" "$WORK/schema.ts"; then
    echo "client-types: $OUT differs from the server's OpenAPI document: run scripts/client-types.sh $BIN" >&2
    exit 1
  fi
  echo "client-types: $OUT matches the server's OpenAPI document"
else
  cp "$WORK/schema.ts" "$OUT"
  echo "client-types: wrote $OUT"
fi
