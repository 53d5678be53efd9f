#!/usr/bin/env bash
# Build and CI wall times of commits, each in a fresh clone with its own target directory:
#
#   bench/build_times.sh REV [REV…]
#
# For each commit: `cargo test --no-run` into an empty target directory (cold: every crate
# compiled, the registry already downloaded), again after touching src/lib.rs (warm: billsync
# and its test binaries rebuilt and linked), then that commit's `.ci/run` on the warm target.
# Run it with nothing else on the machine; .ci/run restarts the local Postgres.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
secs() {
  local start=$SECONDS
  "$@" >"$dir/last.log" 2>&1 || echo "FAILED: $* (see $dir/last.log)" >&2
  echo $((SECONDS - start))
}
printf '%-10s %8s %8s %8s %s\n' commit cold_s warm_s ci_s test_binaries
for rev in "$@"; do
  dir="$(mktemp -d /tmp/billsync-bt.XXXXXX)"
  git clone -q "$repo" "$dir/src" && git -C "$dir/src" checkout -q "$rev"
  export CARGO_TARGET_DIR="$dir/target"
  cd "$dir/src"
  cold=$(secs cargo test --locked --no-run)
  touch src/lib.rs
  warm=$(secs cargo test --locked --no-run)
  ci=$(secs env CI=true bash .ci/run)
  bins=$( (ls tests/*.rs tests/*/main.rs 2>/dev/null || true) | wc -l)
  printf '%-10s %8s %8s %8s %s\n' "$(git rev-parse --short HEAD)" "$cold" "$warm" "$ci" "$bins"
  cd "$repo"
  rm -rf "$dir/target"
done
