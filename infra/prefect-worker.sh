#!/usr/bin/env bash
# A Prefect worker for the GPU work pool (process type), one flow run at a time.
# Usage: PREFECT_API_URL=http://127.0.0.1:4200/api infra/prefect-worker.sh [POOL]   (Ctrl-C or one SIGTERM stops it)
#   MODELPRESS_WORKER_NAME  default modelpress-<hostname>; keep it stable per machine: on start the
#                           worker reschedules the runs it had started whose process is gone
#                           (machine or worker killed), and they resume where they stopped.
# Before starting it creates the pool if missing and this machine's GPU concurrency limit
# (gpu-<hostname>, limit 1), which the GPU-heavy tasks hold while they run (MODELPRESS_GPU_LIMIT).
# Device selection is automatic (run.device=auto: CUDA when present, else CPU) and logged by each task.
#   MODELPRESS_WORKER_KIND=control  a worker for the sweep pool (gpu-sweeps): sweeps only wait for
#                           their points (runs on the GPU pool), so it takes many runs at once
#                           (MODELPRESS_WORKER_LIMIT, default 16) and holds no GPU limit.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
POOL="${1:-${MODELPRESS_POOL:-gpu}}"
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server, e.g. http://127.0.0.1:4200/api}"
KIND="${MODELPRESS_WORKER_KIND:-gpu}"
cd "$ROOT"
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_LOGGING_EXTRA_LOGGERS="${PREFECT_LOGGING_EXTRA_LOGGERS:-modelpress}"
if [ "$KIND" = control ]; then
  NAME="${MODELPRESS_WORKER_NAME:-modelpress-control-$(hostname)}"
  LIMIT="${MODELPRESS_WORKER_LIMIT:-16}"
  MODELPRESS_GPU_LIMIT="$("$ROOT/.venv/bin/python" -m modelpress.flows.deploy worker-setup --no-gpu "$POOL" "$NAME")"
else
  NAME="${MODELPRESS_WORKER_NAME:-modelpress-$(hostname)}"
  LIMIT="${MODELPRESS_WORKER_LIMIT:-1}"
  MODELPRESS_GPU_LIMIT="$("$ROOT/.venv/bin/python" -m modelpress.flows.deploy worker-setup "$POOL" "$NAME")"
fi
export MODELPRESS_GPU_LIMIT
echo "worker $NAME ($KIND) on pool $POOL (GPU limit ${MODELPRESS_GPU_LIMIT:-none}), API $PREFECT_API_URL"
# One SIGTERM (docker stop, systemd, kill) stops the worker within seconds: prefect turns it into
# a SIGINT to itself and restores the SIGINT disposition it started with for that. Started in the
# background by a non-interactive shell (`infra/prefect-worker.sh gpu &`), that disposition is
# "ignore", so the SIGTERM did nothing; env --default-signal=INT starts it with the default one.
# Runs it is executing are stopped with it and rescheduled when it starts again (same name).
exec env --default-signal=INT "$ROOT/.venv/bin/prefect" worker start --pool "$POOL" --name "$NAME" --limit "$LIMIT"
