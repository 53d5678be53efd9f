#!/usr/bin/env bash
# Fake Stripe (localstripe) for billsync tests, bound to 127.0.0.1 only.
#
#   scripts/localstripe.sh install       # venv + pinned localstripe (idempotent)
#   scripts/localstripe.sh start [PORT]  # default 8420; prints http://127.0.0.1:PORT
#   scripts/localstripe.sh stop
#
# Env: BILLSYNC_LOCALSTRIPE_VENV    venv dir (default ~/.cache/billsync/localstripe-venv)
#      BILLSYNC_LOCALSTRIPE_PIDFILE pid file (default ${TMPDIR:-/tmp}/billsync-localstripe.pid)
#      BILLSYNC_LOCALSTRIPE_PERSIST=0  don't write the state pickle (much faster writes)
# Each start gets a fresh, empty state dir (pickle + log); stop removes it.
set -euo pipefail

VENV="${BILLSYNC_LOCALSTRIPE_VENV:-$HOME/.cache/billsync/localstripe-venv}"
PIDFILE="${BILLSYNC_LOCALSTRIPE_PIDFILE:-${TMPDIR:-/tmp}/billsync-localstripe.pid}"
PKGS=(localstripe==1.15.10 aiohttp==3.14.5 python-dateutil==4.0.0)
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

die() { echo "localstripe.sh: $*" >&2; exit 1; }

installed() {
  [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c \
    'import importlib.metadata as m, localstripe.server; assert m.version("localstripe") == "1.15.10"' \
    >/dev/null 2>&1
}

cmd_install() {
  installed && return 0
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PKGS[@]}"
  installed || die "install into $VENV failed"
}

answers() {  # any authenticated 2xx from the API
  curl -sf -o /dev/null --max-time 2 -u sk_test_123: "http://127.0.0.1:$1/v1/customers?limit=1"
}

ours() {  # pid $1 is a live localstripe_server.py
  local c
  [[ -n "$1" ]] && c="$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null)" && [[ "$c" == *localstripe_server.py* ]]
}

cmd_start() {
  local port="${1:-8420}" pid rundir deadline
  [[ "$port" =~ ^[0-9]+$ ]] || die "bad port: $port"
  if [[ -f "$PIDFILE" ]] && ours "$(head -n1 "$PIDFILE")"; then
    die "already running (pid $(head -n1 "$PIDFILE"), pidfile $PIDFILE); run stop first"
  fi
  answers "$port" && die "something already answers on 127.0.0.1:$port"
  cmd_install
  mkdir -p "$(dirname "$PIDFILE")"
  rundir="$(mktemp -d "${TMPDIR:-/tmp}/billsync-localstripe.XXXXXX")"
  TMPDIR="$rundir" nohup "$VENV/bin/python" -u "$HERE/localstripe_server.py" "$port" "$rundir" \
    >"$rundir/localstripe.log" 2>&1 </dev/null &
  pid=$!
  printf '%s\n%s\n' "$pid" "$rundir" >"$PIDFILE"
  deadline=$((SECONDS + 20))
  while ((SECONDS < deadline)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      cat "$rundir/localstripe.log" >&2
      rm -f "$PIDFILE"
      die "localstripe exited during startup (log: $rundir/localstripe.log)"
    fi
    if answers "$port"; then
      echo "http://127.0.0.1:$port"
      return 0
    fi
    sleep 0.2
  done
  cat "$rundir/localstripe.log" >&2
  cmd_stop
  die "localstripe did not answer on 127.0.0.1:$port within 20 s"
}

cmd_stop() {
  [[ -f "$PIDFILE" ]] || { echo "localstripe.sh: not running (no $PIDFILE)" >&2; return 0; }
  local pid rundir i
  pid="$(sed -n 1p "$PIDFILE")"
  rundir="$(sed -n 2p "$PIDFILE")"
  if ours "$pid"; then
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do ours "$pid" || break; sleep 0.1; done
    ours "$pid" && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$PIDFILE"
  [[ "$rundir" == */billsync-localstripe.* ]] && rm -rf "$rundir"
  return 0
}

case "${1:-}" in
  install) cmd_install ;;
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  *) die "usage: $0 install | start [PORT] | stop" ;;
esac
