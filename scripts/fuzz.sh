#!/usr/bin/env bash
# Runs each fuzz target for a fixed time (default 60 s): the Stripe-Signature header and its
# verification, the event envelope parser, and the JWT front door. Needs a nightly toolchain
# and cargo-fuzz (`cargo install cargo-fuzz`). Seeds are committed in fuzz/seeds/<target>;
# what libFuzzer finds goes to fuzz/corpus/<target> (not committed), crashes to
# fuzz/artifacts/<target>.
#
#   scripts/fuzz.sh            # 60 s per target
#   scripts/fuzz.sh 600        # 10 minutes per target
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECONDS_PER_TARGET="${1:-60}"
status=0
for target in signature_header event_envelope jwt; do
  mkdir -p "corpus/$target"
  echo "== $target ($SECONDS_PER_TARGET s)"
  if ! cargo +nightly fuzz run "$target" "corpus/$target" "seeds/$target" -- \
      -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1 >"corpus/$target.log" 2>&1; then
    status=1
  fi
  grep -E "DONE|^Done|number_of_executed_units|peak_rss_mb|panicked|SUMMARY|Test unit written" \
    "corpus/$target.log" || true
done
exit "$status"
