#!/usr/bin/env bash
# Start (or stop) a local Prefect server on SQLite in the background and wait until its API is healthy.
set -euo pipefail
action=${1:-start}; port=${2:-4200}
home=${PREFECT_HOME:?PREFECT_HOME must be set (the Makefile sets it)}
mkdir -p "$home"; pidfile="$home/server.pid"; log="$home/server.log"
health="http://127.0.0.1:$port/api/health"
healthy() { curl -fsS --max-time 2 "$health" >/dev/null 2>&1; }
if [ "$action" = stop ]; then
  [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  rm -f "$pidfile"; exit 0
fi
if healthy; then echo "Prefect server already up: http://127.0.0.1:$port"; exit 0; fi
echo "Starting Prefect server on 127.0.0.1:$port (log: $log)"
nohup .venv/bin/prefect server start --host 127.0.0.1 --port "$port" >"$log" 2>&1 &
echo $! >"$pidfile"
for _ in $(seq 1 120); do
  if healthy; then echo "Prefect server up: UI at http://127.0.0.1:$port"; exit 0; fi
  if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then echo "Prefect server exited; last lines of $log:"; tail -20 "$log"; exit 1; fi
  sleep 1
done
echo "Prefect server not healthy after 120 s; see $log"; exit 1
