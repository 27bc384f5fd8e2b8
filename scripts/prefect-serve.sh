#!/usr/bin/env bash
# (Re)start the process that serves deployments sela/full and sela/predict from this checkout, and wait until both
# are registered.
set -euo pipefail
home=${PREFECT_HOME:?PREFECT_HOME must be set (the Makefile sets it)}
pidfile="$home/serve.pid"; log="$home/serve.log"
if [ -f "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; rm -f "$pidfile"; sleep 1; fi
[ "${1:-start}" = stop ] && exit 0
# Restarted on every run so the deployment always serves the code and params of this checkout.
nohup .venv/bin/python -m flows.serve >"$log" 2>&1 &
echo $! >"$pidfile"
for _ in $(seq 1 90); do
  if grep -q "sela/predict" "$log" 2>/dev/null && .venv/bin/prefect deployment inspect sela/full >/dev/null 2>&1 \
     && .venv/bin/prefect deployment inspect sela/predict >/dev/null 2>&1; then
    echo "Serving deployments sela/full and sela/predict (log: $log)"; exit 0
  fi
  if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then echo "serve process exited; last lines of $log:"; tail -20 "$log"; exit 1; fi
  sleep 1
done
echo "deployments sela/full and sela/predict not registered after 90 s; see $log"; exit 1
