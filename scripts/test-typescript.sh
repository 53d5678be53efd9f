#!/usr/bin/env bash
# The TypeScript client (clients/typescript) and the example app (examples/nextjs-supabase),
# against a real billsync and localstripe:
#
#   scripts/test-typescript.sh BILLSYNC_BINARY
#
# Installs both from their committed lockfiles, checks the client's generated types against the
# binary's OpenAPI document, builds the client, checks what `npm pack` would publish, and runs
# both test suites (Node's test runner). Each source is type-checked once, by the `tsc` that
# compiles it: the build (the client's sources, without Node's types) and each `npm test`
# (tests and sources, with them; the example's app and lib included). Needs
# BILLSYNC_TEST_LOCALSTRIPE_URL.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$(realpath "${1:?usage: scripts/test-typescript.sh BILLSYNC_BINARY}")"
: "${BILLSYNC_TEST_LOCALSTRIPE_URL:?the TypeScript tests need localstripe (scripts/test.sh starts one)}"
export BILLSYNC_BIN="$BIN"

client=clients/typescript
example=examples/nextjs-supabase

echo "== typescript: client"
npm ci --prefix "$client" --no-audit --no-fund --silent
scripts/client-types.sh "$BIN" --check
rm -rf "$client/dist" "$client/build"
npm run --prefix "$client" --silent build

# What is published: packed, then installed into an empty project that type-checks against
# its declarations and imports it. The build above is what is packed (`prepack` would build again).
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
tarball="$(cd "$client" && npm pack --silent --ignore-scripts --pack-destination "$work" | tail -n1)"
tar tzf "$work/$tarball" | python3 -c '
import sys
files = {line.strip().removeprefix("package/") for line in sys.stdin}
wanted = {"package.json", "README.md", "dist/index.js", "dist/index.d.ts", "dist/client.d.ts",
          "dist/events.d.ts", "dist/errors.d.ts", "dist/schema.d.ts"}
missing = wanted - files
stray = sorted(f for f in files if f.startswith(("test/", "build/", "node_modules/")))
if missing or stray:
    sys.exit(f"npm pack: missing {sorted(missing)}, stray {stray}")
print(f"npm pack: {len(files)} files, declarations included")'
mkdir "$work/consumer"
cat >"$work/consumer/package.json" <<'JSON'
{ "name": "consumer", "private": true, "type": "module" }
JSON
cat >"$work/consumer/use.ts" <<'TS'
import { Billsync, BillsyncError, type AppEvent } from "@billsync/client";
const billsync = new Billsync({ baseUrl: "http://127.0.0.1:1", adminKey: "k" });
export const limits = (event: AppEvent) => (event.type === "plan.changed" ? event.data.limits : null);
export const code = (err: unknown) => (err instanceof BillsyncError ? err.code : null);
export const billing = () => billsync.asUser("token").getBilling();
TS
# --prefer-offline: standardwebhooks' own dependencies come from the npm cache the lockfile's
# npm ci filled where it can; npm resolves them by standardwebhooks' version ranges, as an
# app installing the package would.
npm install --prefix "$work/consumer" --prefer-offline --no-audit --no-fund --silent "$work/$tarball"
"$client/node_modules/.bin/tsc" --noEmit --strict --target es2022 --module nodenext \
  --moduleResolution nodenext --lib es2022,dom "$work/consumer/use.ts"
(cd "$work/consumer" && node --input-type=module -e \
  'const m = await import("@billsync/client"); if (typeof m.Billsync !== "function" || typeof m.verifyAppEvent !== "function") process.exit(1)')
echo "npm pack: installs, type-checks and imports in an empty project"

npm test --prefix "$client" --silent

echo "== typescript: example"
npm ci --prefix "$example" --no-audit --no-fund --silent
rm -rf "$example/build"
npm test --prefix "$example" --silent
