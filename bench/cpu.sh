# Sourced by the benchmarks: CPU time (user + system, in clock ticks) of one process, and of
# every postgres process together, for per-event CPU accounting.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
pg_ticks() { for p in $(pgrep -u postgres); do ticks "$p"; done | awk '{s += $1} END {print s + 0}'; }
