#!/usr/bin/env bash
# Prefect server with its UI. Usage: infra/prefect-server.sh [PORT]   (Ctrl-C stops it)
# Clients and workers: PREFECT_API_URL=http://127.0.0.1:PORT/api ; UI: http://127.0.0.1:PORT
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PORT="${1:-${PREFECT_PORT:-4200}}"
export PREFECT_HOME="${PREFECT_HOME:-$ROOT/.state/prefect}" PREFECT_SERVER_ANALYTICS_ENABLED=false
echo "Prefect UI http://127.0.0.1:$PORT  (PREFECT_API_URL=http://127.0.0.1:$PORT/api)"
exec "$ROOT/.venv/bin/prefect" server start --host 127.0.0.1 --port "$PORT"
