#!/usr/bin/env bash
# Prefect server with its UI. Usage: infra/prefect-server.sh [PORT]   (Ctrl-C or one SIGTERM stops it)
# Clients and workers: PREFECT_API_URL=http://127.0.0.1:PORT/api ; UI: http://127.0.0.1:PORT
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PORT="${1:-${PREFECT_PORT:-4200}}"
HOST="${PREFECT_SERVER_HOST:-127.0.0.1}"  # 0.0.0.0: reachable by workers on other machines
export PREFECT_HOME="${PREFECT_HOME:-$ROOT/.state/prefect}" PREFECT_SERVER_ANALYTICS_ENABLED=false
# Concurrency leases (the GPU slot a running task holds) on disk, in $PREFECT_HOME/concurrency_leases,
# next to the database: a restarted server still knows them. Prefect's default keeps them in memory,
# and a restart then leaves the slot counted as taken with nobody able to release it.
export PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE="${PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE:-prefect.server.concurrency.lease_storage.filesystem}"
echo "Prefect UI http://$HOST:$PORT  (PREFECT_API_URL=http://$HOST:$PORT/api), home $PREFECT_HOME"
# env --default-signal=INT: a service started in the background (`... &`, SIGINT ignored) still
# stops on SIGINT/SIGTERM.
exec env --default-signal=INT "$ROOT/.venv/bin/prefect" server start --host "$HOST" --port "$PORT"
