# Sourced by the benchmarks: BIN, the billsync to measure. BIN_DIR's when it is set (a
# prebuilt build, e.g. two builds compared in alternating runs), else a fresh release build.
if [ -n "${BIN_DIR:-}" ]; then
  BIN="$BIN_DIR/billsync"
else
  cargo build --release --quiet --bin billsync
  BIN="${CARGO_TARGET_DIR:-target}/release/billsync"
fi
